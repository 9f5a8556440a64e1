"""Bench files: what a HIL bench is made of and which scenarios to run on it.

A bench file is TOML::

    [bench]
    name = "sample"                  # names the JUnit test suite
    description = "free text"

    [primary]
    name = "primary"                 # the ECU running the agent: this host

    [secondaries.engine]             # one table per secondary ECU
    transport = "uds"                # "uds" (CAN) or "stm32-uart" (serial)
    interface = "virtual"            # "virtual" (simulated ECU) or "socketcan"
    channel = "can0"                 # socketcan interface name
    can_fd = false
    bitrate = 500000
    data_bitrate = 2000000           # CAN FD data phase
    wire_time = true                 # virtual: take as long as the real wire
    request_id = 0x7E0
    response_id = 0x7E8
    key_secret = "..."               # seed/key secret (HMAC-SHA256 algorithm)
    relay = { port = "/dev/ttyUSB3", on = "A00101A2", off = "A00100A1" }

    [secondaries.body]
    transport = "stm32-uart"
    port = "virtual"                 # "virtual" (emulator on a pty) or a device
    baudrate = 115200

    [[scenario]]
    name = "engine update"           # defaults to "<kind> <secondary>"
    kind = "update"                  # update | rollback | power-loss | wrong-key | mute
    secondary = "engine"
    image_size = 131072              # generated image, or:
    image = "images/engine-2.0.bin"  # a file (relative to the bench file)
    version = "2.0.0"
    at = 0.5                         # power-loss: fraction of the transfer

``relay`` is optional: a serial relay board that cuts the ECU's supply
(``on``/``off`` are the hex bytes it expects); without one, power-loss
scenarios on real hardware are skipped. Every mistake in the file is a
:class:`BenchFileError` that names the table and key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signing.exceptions import UptakeError

TRANSPORTS = ("uds", "stm32-uart")
KINDS = ("update", "rollback", "power-loss", "wrong-key", "mute")


class BenchFileError(UptakeError):
    """The bench file is missing, not TOML, or describes an impossible bench."""


@dataclass(frozen=True)
class RelaySpec:
    port: str
    on: bytes
    off: bytes
    baudrate: int = 9600


@dataclass(frozen=True)
class SecondarySpec:
    name: str
    transport: str
    virtual: bool
    channel: str = ""
    port: str = ""
    can_fd: bool = False
    bitrate: int = 500_000
    data_bitrate: int = 2_000_000
    baudrate: int = 115_200
    wire_time: bool = True
    request_id: int = 0x7E0
    response_id: int = 0x7E8
    key_secret: bytes | None = None
    erase_seconds: float = 0.0
    boot_seconds: float = 2.0
    relay: RelaySpec | None = None


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    kind: str
    secondary: str
    image_size: int | None = None
    image: Path | None = None
    version: str | None = None
    at: float | None = None


@dataclass(frozen=True)
class BenchSpec:
    name: str
    description: str
    primary: str
    secondaries: dict[str, SecondarySpec]
    scenarios: list[ScenarioSpec] = field(default_factory=list)
    path: Path | None = None


def load_bench(path: Path | str) -> BenchSpec:
    """Read and check a bench file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchFileError(f"{path}: no such bench file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchFileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchFileError(f"{path}: not valid TOML: {exc}") from None
    return parse_bench(raw, path)


def parse_bench(raw: dict[str, Any], path: Path | None = None) -> BenchSpec:
    where = str(path) if path else "bench"
    bench = _table(raw, "bench", where, required=False)
    primary = _table(raw, "primary", where, required=False)
    secondaries_raw = _table(raw, "secondaries", where)
    if not secondaries_raw:
        raise BenchFileError(f"{where}: [secondaries] names no ECU")
    secondaries = {
        name: _secondary(
            name,
            _table(secondaries_raw, name, f"{where}: [secondaries]"),
            f"{where}: [secondaries.{name}]",
        )
        for name in secondaries_raw
    }
    scenarios_raw = raw.get("scenario", [])
    if not isinstance(scenarios_raw, list):
        raise BenchFileError(f"{where}: 'scenario' must be an array of tables ([[scenario]])")
    base = path.parent if path else Path.cwd()
    scenarios = [
        _scenario(item, secondaries, base, f"{where}: [[scenario]] #{index + 1}")
        for index, item in enumerate(scenarios_raw)
    ]
    names = [s.name for s in scenarios]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchFileError(f"{where}: scenario names must be unique: {', '.join(duplicates)}")
    return BenchSpec(
        name=_get(bench, "name", str, where + ": [bench]", default=path.stem if path else "bench"),
        description=_get(bench, "description", str, where + ": [bench]", default=""),
        primary=_get(primary, "name", str, where + ": [primary]", default="primary"),
        secondaries=secondaries,
        scenarios=scenarios,
        path=path,
    )


def _table(raw: dict[str, Any], key: str, where: str, required: bool = True) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise BenchFileError(f"{where}: missing table [{key}]")
        return {}
    if not isinstance(value, dict):
        raise BenchFileError(f"{where}: '{key}' must be a table")
    return value


def _get(
    table: dict[str, Any],
    key: str,
    kind: type,
    where: str,
    default: Any = None,
    required: bool = False,
) -> Any:
    if key not in table:
        if required:
            raise BenchFileError(f"{where}: missing key '{key}'")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BenchFileError(f"{where}: '{key}' must be a {kind.__name__}, not {value!r}")
    return value


def _secondary(name: str, table: dict[str, Any], where: str) -> SecondarySpec:
    transport = _get(table, "transport", str, where, required=True)
    if transport not in TRANSPORTS:
        raise BenchFileError(
            f"{where}: transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}"
        )
    known = {
        "transport",
        "interface",
        "channel",
        "port",
        "can_fd",
        "bitrate",
        "data_bitrate",
        "baudrate",
        "wire_time",
        "request_id",
        "response_id",
        "key_secret",
        "erase_seconds",
        "boot_seconds",
        "relay",
    }
    unknown = sorted(set(table) - known)
    if unknown:
        raise BenchFileError(f"{where}: unknown keys {', '.join(unknown)}")
    if transport == "uds":
        interface = _get(table, "interface", str, where, default="virtual")
        if interface not in ("virtual", "socketcan"):
            raise BenchFileError(
                f"{where}: interface must be 'virtual' or 'socketcan', not {interface!r}"
            )
        virtual = interface == "virtual"
        channel = _get(table, "channel", str, where, default="", required=not virtual)
        port = ""
    else:
        port = _get(table, "port", str, where, required=True)
        virtual = port == "virtual"
        channel = ""
    secret = _get(table, "key_secret", str, where)
    relay_table = table.get("relay")
    relay = None
    if relay_table is not None:
        if not isinstance(relay_table, dict):
            raise BenchFileError(f"{where}: 'relay' must be a table")
        relay = RelaySpec(
            port=_get(relay_table, "port", str, where + ".relay", required=True),
            on=_hex(
                _get(relay_table, "on", str, where + ".relay", required=True), where + ".relay.on"
            ),
            off=_hex(
                _get(relay_table, "off", str, where + ".relay", required=True), where + ".relay.off"
            ),
            baudrate=_get(relay_table, "baudrate", int, where + ".relay", default=9600),
        )
    return SecondarySpec(
        name=name,
        transport=transport,
        virtual=virtual,
        channel=channel,
        port=port,
        can_fd=_get(table, "can_fd", bool, where, default=False),
        bitrate=_get(table, "bitrate", int, where, default=500_000),
        data_bitrate=_get(table, "data_bitrate", int, where, default=2_000_000),
        baudrate=_get(table, "baudrate", int, where, default=115_200),
        wire_time=_get(table, "wire_time", bool, where, default=True),
        request_id=_get(table, "request_id", int, where, default=0x7E0),
        response_id=_get(table, "response_id", int, where, default=0x7E8),
        key_secret=secret.encode() if secret is not None else None,
        erase_seconds=_get(table, "erase_seconds", float, where, default=0.0),
        boot_seconds=_get(table, "boot_seconds", float, where, default=2.0),
        relay=relay,
    )


def _hex(text: str, where: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BenchFileError(f"{where}: not hex bytes: {text!r}") from None


def _scenario(
    item: Any, secondaries: dict[str, SecondarySpec], base: Path, where: str
) -> ScenarioSpec:
    if not isinstance(item, dict):
        raise BenchFileError(f"{where}: must be a table")
    kind = _get(item, "kind", str, where, required=True)
    if kind not in KINDS:
        raise BenchFileError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    secondary = _get(item, "secondary", str, where, required=True)
    if secondary not in secondaries:
        raise BenchFileError(
            f"{where}: no secondary named {secondary!r} (have {', '.join(secondaries)})"
        )
    unknown = sorted(
        set(item) - {"name", "kind", "secondary", "image_size", "image", "version", "at"}
    )
    if unknown:
        raise BenchFileError(f"{where}: unknown keys {', '.join(unknown)}")
    image_size = _get(item, "image_size", int, where)
    image_name = _get(item, "image", str, where)
    if (image_size is None) == (image_name is None) and kind != "mute":
        raise BenchFileError(f"{where}: give exactly one of 'image_size' or 'image'")
    if image_size is not None and image_size <= 0:
        raise BenchFileError(f"{where}: 'image_size' must be positive")
    at = _get(item, "at", float, where)
    if kind == "power-loss" and (at is None or not 0 < at < 1):
        raise BenchFileError(
            f"{where}: power-loss needs 'at', a fraction between 0 and 1 (e.g. 0.5)"
        )
    spec = secondaries[secondary]
    if kind in ("rollback", "wrong-key") and spec.transport != "uds":
        raise BenchFileError(
            f"{where}: '{kind}' needs a UDS secondary (the STM32 ROM bootloader has neither)"
        )
    return ScenarioSpec(
        name=_get(
            item,
            "name",
            str,
            where,
            default=f"{kind} {secondary}" + (f" at {at:.0%}" if at else ""),
        ),
        kind=kind,
        secondary=secondary,
        image_size=image_size,
        image=(base / image_name) if image_name else None,
        version=_get(item, "version", str, where),
        at=at,
    )
