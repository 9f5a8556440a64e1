"""Fuzz configuration parsing: agent TOML (client.config) and server JSON (server.config).

Only ``AgentConfigError`` / ``ConfigError`` may escape, and a configuration
that loads has fields of the documented types.
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from client.config import AgentConfig, AgentConfigError, load_config, parse_config
from server.config import ConfigError, ServerConfig
from signing.names import is_name
from tests.fuzz import fuzz_settings
from tests.fuzz.strategies import edited, hostile_strings, huge_integers, json_values

EXAMPLE = Path(__file__).resolve().parents[2] / "client" / "agent.example.toml"
EXAMPLE_TEXT = EXAMPLE.read_text()


def _check(config: AgentConfig) -> None:
    assert isinstance(config.agent.vin, str) and isinstance(config.agent.server_url, str)
    assert config.agent.server_url.startswith(("http://", "https://"))
    # names become file names (secondaries' directories): only names of the grammar get through
    assert is_name(config.agent.vin) and all(is_name(s) for s in config.ecu_serials)
    assert all(is_name(hw) for hw in config.ecu_serials.values())


def test_example_parses() -> None:
    _check(load_config(EXAMPLE))


@fuzz_settings
@given(edited(tomllib.loads(EXAMPLE_TEXT), max_edits=3))
def test_edited_agent_config(raw: Any) -> None:
    assume(isinstance(raw, dict))  # load_config always passes the parsed TOML document, a dict
    with contextlib.suppress(AgentConfigError):
        _check(parse_config(raw, "fuzz.toml", Path("/var/lib/uptake")))


@fuzz_settings
@given(
    st.sampled_from([("agent", "vin"), ("primary", "ecu_serial"), ("primary", "hardware_id")]),
    hostile_strings | huge_integers,
)
def test_hostile_names_in_agent_config(key: tuple[str, str], value: Any) -> None:
    raw = tomllib.loads(EXAMPLE_TEXT)
    raw[key[0]][key[1]] = value
    with contextlib.suppress(AgentConfigError):
        _check(parse_config(raw, "fuzz.toml", Path("/var/lib/uptake")))


@fuzz_settings
@given(st.integers(1, 5000), st.sampled_from(["[", "{a = "]))
def test_deeply_nested_agent_config(tmp_path: Path, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    path = tmp_path / "agent.toml"
    path.write_text(f"{EXAMPLE_TEXT}\n[agent_extra]\nx = {opener * depth}1{closer * depth}\n")
    with contextlib.suppress(AgentConfigError):
        load_config(path)


@fuzz_settings
@given(
    st.text(max_size=300)
    | st.builds(
        lambda cut, junk: EXAMPLE_TEXT[:cut] + junk + EXAMPLE_TEXT[cut:],
        st.integers(0, len(EXAMPLE_TEXT)),
        st.text(max_size=20),
    )
)
def test_agent_config_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with contextlib.suppress(AgentConfigError):
        _check(load_config(path))


@fuzz_settings
@given(
    st.binary(max_size=128)
    | json_values.map(lambda v: json.dumps(v).encode())
    | edited({"host": "127.0.0.1", "port": 8443, "database_url": "", "encrypt_images": False}).map(
        lambda v: json.dumps(v).encode()
    )
)
def test_server_config(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "server.json").write_bytes(data)
    try:
        config = ServerConfig.load(tmp_path)
    except ConfigError:
        return
    assert isinstance(config.host, str) and isinstance(config.database_url, str)
    assert isinstance(config.port, int) and 0 < config.port < 65536


_DURATIONS = [
    ("agent", "poll_interval", "seconds"), ("agent", "manifest_heartbeat", "seconds"),
    ("installer", "command_timeout", "seconds"), ("health_check", "timeout", "seconds"),
    ("download", "connect_timeout", "seconds"), ("download", "read_timeout", "seconds"),
    ("tls", "renew_before_days", "days"),
]  # fmt: skip


@fuzz_settings
@given(
    st.sampled_from(_DURATIONS),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, 1e18, 0.0, -1.0])
    | huge_integers
    | st.floats(),
)
def test_durations_in_agent_config_are_bounded(key: tuple[str, str, str], value: Any) -> None:
    """A duration that loads is one the agent can turn into a timedelta (inf, 1e300: refused)."""
    raw = tomllib.loads(EXAMPLE_TEXT)
    raw.setdefault(key[0], {})[key[1]] = value
    try:
        config = parse_config(raw, "fuzz.toml", Path("/var/lib/uptake"))
    except AgentConfigError:
        return
    loaded = getattr(getattr(config, key[0]), key[1])
    timedelta(**{key[2]: loaded}) + datetime.now(UTC)  # no OverflowError
