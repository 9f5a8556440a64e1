"""The agent as a service: preconditions (R156), configuration errors, SIGTERM, status."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest

from client.config import AgentConfig, AgentConfigError, load_config, parse_config
from client.fetcher import FetcherConfig
from tests.uptake_fixtures import ENV, REPO, ServerProcess, Vehicle, sample


def test_install_waits_while_a_precondition_fails(
    server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    battery_ok = tmp_path / "battery-ok"
    with open(vehicle.config_path, "a") as f:
        f.write(
            '\n[[preconditions]]\nname = "battery"\n'
            f'command = ["sh", "-c", "test -e {battery_ok} || {{ echo \'battery at 12 %, need 30 %\'; exit 1; }}"]\n'
        )
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    report = vehicle.run_once().report
    assert report["waiting"] == "battery: battery at 12 %, need 30 %"
    assert report["outcomes"][vehicle.primary]["result"] == "postponed"
    assert not (vehicle.state_dir / "slots" / "b.img").exists()  # nothing written while waiting
    record = server.vehicle(vehicle.vin)
    assert record["assignments"][0]["status"] == "pending"
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert (
        primary["last_install"]["result"] == "postponed"
        and "battery" in primary["last_install"]["detail"]
    )
    battery_ok.touch()
    report = vehicle.run_once().report
    assert report["waiting"] == ""
    assert report["outcomes"][vehicle.primary]["result"] == "installed"


def test_precondition_hook_that_raises_blocks_the_install() -> None:
    from client.preconditions import Precondition, unmet_precondition

    assert (
        unmet_precondition([Precondition("consent", hook="json:loads")]) is not None
    )  # raises TypeError
    assert unmet_precondition([Precondition("true", command=("true",))]) is None


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[agent]\n", "agent.vin is required"),
        ('[agent]\nstate_dir="s"\nserver_url="ftp://x"\nvin="V"\n', "must start with http"),
        (
            '[agent]\nstate_dir="s"\nserver_url="http://x"\nvin="V"\npoll_interval=-1\n[primary]\necu_serial="E"\nhardware_id="h"\n',
            "agent.poll_interval: must be > 0",
        ),
        (
            '[agent]\nstate_dir="s"\nserver_url="http://x"\nvin="V"\n[primary]\necu_serial="E"\nhardware_id="h"\n'
            '[installer]\ntype="lilo"\n',
            "installer.type must be one of",
        ),
        (
            '[agent]\nstate_dir="s"\nserver_url="http://x"\nvin="V"\n[primary]\necu_serial="E"\nhardware_id="h"\nbogus=1\n',
            "unknown key primary.bogus",
        ),
        (
            '[agent]\nstate_dir="s"\nserver_url="http://x"\nvin="V"\n[primary]\necu_serial="E"\nhardware_id="h"\n'
            '[[preconditions]]\nname="x"\n',
            "needs exactly one of command",
        ),
        ("not = [toml", "not valid TOML"),
    ],
)
def test_bad_configuration_names_file_and_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(
        AgentConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ) as err:
        load_config(path)
    assert str(path) in str(err.value)
    proc = subprocess.run(
        [sys.executable, "-m", "uptake", "agent", "run", "--once", "--config", str(path)],
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Error:" in proc.stderr


def test_defaults_come_from_the_schema() -> None:
    minimal = parse_config(
        {
            "agent": {"vin": "V", "server_url": "http://127.0.0.1", "state_dir": "/s"},
            "primary": {"ecu_serial": "E", "hardware_id": "h"},
        }
    )
    assert minimal.agent.poll_interval == 300 and minimal.download == FetcherConfig()


def _schema_keys(info: mi.Type, prefix: str, found: set[str]) -> None:
    """Every key the schema accepts, as dotted paths (``secondaries[uds].options.can_fd``)."""
    if isinstance(info, mi.StructType):
        for field in info.fields:
            path = f"{prefix}.{field.encode_name}" if prefix else field.encode_name
            found.add(path)
            _schema_keys(field.type, path, found)
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            _schema_keys(member, prefix, found)
    elif isinstance(info, (mi.ListType, mi.VarTupleType)):
        item = info.item_type
        if isinstance(item, mi.UnionType):  # a tagged union: one table per tag
            for member in item.types:
                assert isinstance(member, mi.StructType) and member.tag_field
                found.add(f"{prefix}[{member.tag}].{member.tag_field}")
                _schema_keys(member, f"{prefix}[{member.tag}]", found)
        elif isinstance(item, mi.StructType):
            _schema_keys(item, f"{prefix}[]", found)


def _file_keys(value: Any, prefix: str, found: set[str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            found.add(path)
            _file_keys(inner, path, found)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for item in value:
            tag = f"[{item['transport']}]" if "transport" in item else "[]"
            _file_keys(item, prefix + tag, found)


def test_example_configuration_names_every_option_of_the_schema() -> None:
    """The example can never miss an option again: every key of the schema is in it."""
    example = REPO / "client" / "agent.example.toml"
    text = example.read_text()
    load_config(example)  # and it is valid
    accepted: set[str] = set()
    _schema_keys(mi.type_info(AgentConfig), "", accepted)
    shown: set[str] = set()
    _file_keys(tomllib.loads(text), "", shown)
    missing = accepted - shown
    # a key that excludes another (UDS: security_secret or key_algorithm) is shown commented out
    commented = {k for k in missing if re.search(rf"^# {k.rsplit('.', 1)[-1]} = ", text, re.M)}
    assert missing - commented == set(), sorted(missing - commented)
    assert commented == {"secondaries[uds].options.key_algorithm"}
    assert {
        "download.min_rate",
        "agent.manifest_heartbeat",
        "secondaries[uds].options.can_fd",
    } <= shown
    assert shown - accepted == set()  # and nothing the agent would refuse


def test_long_running_agent_polls_and_stops_cleanly_on_sigterm(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    vehicle.configure(agent={"poll_interval": 0.5, "manifest_heartbeat": 0.5})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uptake",
            "-v",
            "agent",
            "run",
            "--config",
            str(vehicle.config_path),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while server.vehicle(vehicle.vin)["manifests_accepted"] < 2:
            assert time.monotonic() < deadline, "the agent did not poll twice"
            time.sleep(0.2)
        gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        server.assign(vehicle.vin, vehicle.primary, gw.filepath)
        while vehicle.booted_image() != gw.filepath:
            assert time.monotonic() < deadline + 30, (
                "the running agent did not install the new assignment"
            )
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert vehicle.state().journal is None


def test_status_reports_slots_and_boot_state(server: ServerProcess, vehicle: Vehicle) -> None:
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    vehicle.run_once()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uptake",
            "agent",
            "status",
            "--json",
            "--config",
            str(vehicle.config_path),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    primary, secondary = json.loads(proc.stdout)["ecus"]
    assert primary["serial"] == vehicle.primary and primary["boot"]["boot_slot"] == "b"
    assert primary["slot"] == "b" and primary["installed"]["filepath"] == gw.filepath
    assert primary["slots"]["b"]["filepath"] == gw.filepath and primary["pending"] is None
    assert primary["last_install"] is None  # acknowledged by the server
    assert secondary["serial"] == vehicle.secondary and secondary["transport"] == "local"


def test_command_installer_installs_and_rolls_back_with_the_users_commands(
    server: ServerProcess, tmp_path: Path
) -> None:
    from tests.uptake_fixtures import SELFTEST

    target = tmp_path / "custom-target"
    target.mkdir()
    vehicle = Vehicle(
        tmp_path,
        server,
        secondaries=False,
        health_check=[[a.replace("{slot_path}", str(target / "firmware")) for a in SELFTEST]],
    )
    install = (
        f'cp "$0" {target}/firmware.new && mv {target}/firmware.new {target}/firmware '
        f"&& cp {target}/firmware {target}/last-good.tmp"
    )
    vehicle.configure(
        installer={
            "type": "command",
            "install_command": ["sh", "-c", install, "{image}"],
            "rollback_command": ["sh", "-c", f"cp {target}/last-good {target}/firmware"],
        }
    )
    good = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, good.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
    assert (target / "firmware").read_bytes() == sample("rpi-gateway", "1.1.0").read_bytes()
    (target / "last-good.tmp").rename(target / "last-good")
    broken = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")
    server.assign(vehicle.vin, vehicle.primary, broken.filepath)
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome["result"] == "rolled_back" and "self-test" in outcome["detail"]
    assert (target / "firmware").read_bytes() == sample(
        "rpi-gateway", "1.1.0"
    ).read_bytes()  # rollback ran
    record = server.vehicle(vehicle.vin)
    assert record["ecus"][0]["installed"]["filepath"] == good.filepath


def test_idle_polls_do_not_resend_an_unchanged_manifest(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    vehicle.run_once()
    accepted = server.vehicle(vehicle.vin)["manifests_accepted"]
    for _ in range(3):
        vehicle.run_once()
    # nothing changed: the server verified no new signatures, yet the vehicle kept polling metadata
    assert server.vehicle(vehicle.vin)["manifests_accepted"] == accepted
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    vehicle.run_once()  # a change (the install) is reported at once
    record = server.vehicle(vehicle.vin)
    assert record["manifests_accepted"] > accepted
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert primary["installed"]["filepath"] == gw.filepath
    # and an unchanged vehicle still reports at the heartbeat
    vehicle.configure(agent={"manifest_heartbeat": 0.01})
    before = server.vehicle(vehicle.vin)["manifests_accepted"]
    vehicle.run_once()
    assert server.vehicle(vehicle.vin)["manifests_accepted"] == before + 1


def test_real_reboot_mode_never_commits_a_slot_that_did_not_boot(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    """A restart without a reboot (killed agent, reboot command that did nothing) is not the trial boot."""
    vehicle.configure(installer={"reboot": ["true"]})
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    for _ in range(2):  # "reboot" returns and the process exits; the next start sees the same boot
        proc = subprocess.run(vehicle.argv(), env=ENV, capture_output=True, check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        journal = vehicle.state().journal
        assert journal is not None and journal.phase == "reboot"
        assert vehicle.boot_env()["upgrade_available"] == "1"  # armed, never committed untested
    # now the machine really reboots (a new boot id), the bootloader tries the slot
    state = vehicle.state()
    assert state.journal is not None
    state.journal.boot_id = "another-boot"
    from client.state import StateStore

    StateStore(vehicle.state_dir / "state.json").save(state)
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed"
    assert vehicle.boot_env()["upgrade_available"] == "0" and vehicle.booted_image() == gw.filepath


def test_failing_reboot_command_is_a_clear_error_and_resumes(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    vehicle.configure(installer={"reboot": ["sh", "-c", "echo no permission >&2; exit 1"]})
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    proc = subprocess.run(
        vehicle.argv(), env=ENV, capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "reboot command sh exited 1: no permission" in proc.stderr
    assert vehicle.state().journal is not None and vehicle.boot_env()["upgrade_available"] == "1"
