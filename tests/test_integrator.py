"""An integrator's path: provision for a real board, install the service, read the status.

``uptake agent init`` takes the installer, slots, boot environment and reboot command and
checks each before it writes anything; ``uptake agent install-service`` writes a unit that
starts this very installation; the running service logs each step once; ``uptake agent
status`` shows every ECU.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.config import InstallerType, load_config
from client.state import Journal, JournalPhase, StateStore
from signing.manifest import InstallMethod
from tests.test_agent_bootloaders import require_tools
from tests.test_bootenv import make_uboot_env
from tests.uptake_fixtures import ENV, ServerProcess, Vehicle, sample


def _uptake(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uptake", *args],
        env=env or ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _init(server: ServerProcess, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    keys = server.offline_dir
    return _uptake(
        "agent", "init", "--dir", str(state), "--vin", "VIN-PI-1", "--server", server.url,
        "--primary", "GW-PI-1:rpi-gateway", "--image-root", str(keys / "image-root.json"),
        "--director-root", str(keys / "director-root.json"), *extra,
    )  # fmt: skip


@pytest.fixture
def board(tmp_path: Path) -> dict[str, Path]:
    """A U-Boot environment and two slot images, as a Raspberry Pi's SD card would have them."""
    require_tools("u-boot-tools", "mkenvimage")
    require_tools("libubootenv-tool", "fw_printenv", "fw_setenv")
    (tmp_path / "env").mkdir()
    slots = tmp_path / "sd"
    slots.mkdir()
    (slots / "p2.img").write_bytes(b"")
    (slots / "p3.img").write_bytes(b"")
    return {
        "fw_env": make_uboot_env(tmp_path / "env", {"bootcmd": "run distro_bootcmd"}),
        "a": slots / "p2.img",
        "b": slots / "p3.img",
    }


def test_init_for_a_uboot_board_writes_what_it_was_given(
    shared_server: ServerProcess, tmp_path: Path, board: dict[str, Path]
) -> None:
    state = tmp_path / "vehicle"
    done = _init(
        shared_server, state, "--installer", "uboot", "--slot-a", str(board["a"]),
        "--slot-b", str(board["b"]), "--slot-type", "file", "--boot-env", str(board["fw_env"]),
        "--reboot", "true --really", "--bootlimit", "2",
        "--health-check", "systemctl is-system-running --wait",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "install-service" in done.stdout
    config = load_config(state / "agent.toml")
    installer = config.installer
    assert installer.type is InstallerType.UBOOT and installer.bootlimit == 2
    assert (installer.slot_a, installer.slot_b) == (str(board["a"]), str(board["b"]))
    assert installer.boot_env == str(board["fw_env"])
    assert installer.reboot_command == ("true", "--really")
    assert config.health_check.commands == (("systemctl", "is-system-running", "--wait"),)
    # every option is in the file, typed: an integrator reads what the agent will do
    text = (state / "agent.toml").read_text()
    assert "[download]" in text and "manifest_heartbeat" in text


def test_init_defaults_to_systemctl_reboot_on_a_board(
    shared_server: ServerProcess, tmp_path: Path, board: dict[str, Path]
) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("no systemctl on this machine: the default reboot command cannot be checked")
    done = _init(
        shared_server, tmp_path / "vehicle", "--installer", "uboot", "--slot-a", str(board["a"]),
        "--slot-b", str(board["b"]), "--slot-type", "file", "--boot-env", str(board["fw_env"]),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reboot = load_config(tmp_path / "vehicle" / "agent.toml").installer.reboot_command
    assert reboot == ("systemctl", "reboot")


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no slots", "needs --slot-a and --slot-b"),
        ("files as partitions", "not a block device"),
        ("same slot twice", "are the same"),
        ("no boot environment", "--boot-env"),
        ("reboot command missing", "not an executable"),
        ("bootlimit too high for U-Boot", "bootlimit: at most 8"),
    ],
)
def test_init_refuses_what_the_board_cannot_run(
    shared_server: ServerProcess, tmp_path: Path, board: dict[str, Path], case: str, needle: str
) -> None:
    slots = ["--slot-a", str(board["a"]), "--slot-b", str(board["b"])]
    files = ["--slot-type", "file"]
    env = ["--boot-env", str(board["fw_env"])]
    reboot = ["--reboot", "true"]
    extra = {
        "no slots": [*env, *reboot],
        "files as partitions": [*slots, *env, *reboot],
        "same slot twice": ["--slot-a", str(board["a"]), "--slot-b", str(board["a"]), *files,
                            *env, *reboot],
        "no boot environment": [*slots, *files, "--boot-env", str(tmp_path / "nope.config"),
                                *reboot],
        "reboot command missing": [*slots, *files, *env, "--reboot", "/usr/sbin/no-such-reboot"],
        "bootlimit too high for U-Boot": [*slots, *files, *env, *reboot, "--bootlimit", "12"],
    }[case]  # fmt: skip
    refused = _init(shared_server, tmp_path / "vehicle", "--installer", "uboot", *extra)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
    assert needle in refused.stderr, refused.stderr
    assert not (tmp_path / "vehicle" / "agent.toml").exists()


def test_install_service_writes_a_unit_that_runs_this_installation(
    server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    units = tmp_path / "units"
    done = _uptake(
        "agent", "install-service", "--config", str(vehicle.config_path),
        "--unit-dir", str(units), "--env-file", str(tmp_path / "agent.env"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = (units / "uptake-agent.service").read_text()
    assert "@" not in unit.replace("multi-user.target", ""), unit  # every placeholder filled
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK), argv
    assert str(vehicle.config_path.absolute()) in argv
    # the very command systemd will run works here (one cycle of it)
    once = subprocess.run(
        [*argv, "--once", "--json"], env=ENV, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert once.returncode == 0 and json.loads(once.stdout)["status"] == "ok", once.stderr
    if shutil.which("systemd-analyze"):
        (tmp_path / "agent.env").write_text("UPTAKE_KEY_PASSWORD=x\n")
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(units / "uptake-agent.service")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        problems = [
            line
            for line in verify.stderr.splitlines()
            if "uptake-agent.service" in line and "network-online.target" not in line
        ]
        assert not problems, verify.stderr


def test_the_service_logs_each_step_once(server: ServerProcess, vehicle: Vehicle) -> None:
    vehicle.configure(agent={"poll_interval": 0.5, "manifest_heartbeat": 0.5})
    argv = [sys.executable, "-m", "uptake", "-v", "agent", "run", "--config"]
    journal_env = {**ENV, "JOURNAL_STREAM": "8:12345"}  # what systemd sets for a service
    proc = subprocess.Popen(
        [*argv, str(vehicle.config_path)],
        env=journal_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while server.vehicle(vehicle.vin)["manifests_accepted"] < 2:
            assert time.monotonic() < deadline, "the agent did not report twice"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == ""  # nothing on stdout: the journal would get it a second time
    reported = [line for line in err.splitlines() if "vehicle manifest" in line]
    accepted = server.vehicle(vehicle.vin)["manifests_accepted"]
    assert len(reported) == accepted, err  # one line per manifest sent, not two
    assert all(line.startswith("INFO client.") for line in reported), reported  # journald stamps


def test_status_shows_every_ecu_and_the_install_in_progress(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    assert vehicle.run_once().report["status"] == "ok"
    # an install of the next release, interrupted while downloading: 1000 bytes so far
    store = StateStore(vehicle.state_dir / "state.json")
    state = store.load()
    next_sha256 = "ab" * 32
    state.journal = Journal(
        JournalPhase.DOWNLOAD, "rpi-gateway/1.2.0/gateway.elf", 5000, next_sha256, 3, "a", "b"
    )
    store.save(state)
    (vehicle.state_dir / "downloads").mkdir(exist_ok=True)
    (vehicle.state_dir / "downloads" / f"{next_sha256}.part").write_bytes(b"x" * 1000)

    status = _uptake("agent", "status", "--json", "--config", str(vehicle.config_path))
    assert status.returncode == 0, status.stderr
    primary, secondary = json.loads(status.stdout)["ecus"]
    assert (primary["serial"], primary["slot"], primary["installed"]["filepath"]) == (
        vehicle.primary, "b", gw.filepath,
    )  # fmt: skip
    assert primary["boot"]["upgrade_available"] == "0"
    assert primary["pending"] == {
        "filepath": "rpi-gateway/1.2.0/gateway.elf", "phase": "download",
        "method": InstallMethod.FULL.value, "target_slot": "a", "bytes_done": 1000,
        "bytes_total": 5000, "health_failures": [],
    }  # fmt: skip
    assert secondary["serial"] == vehicle.secondary and secondary["transport"] == "local"
    assert secondary["installed"]["filepath"] == bms.filepath and secondary["slot"] == "b"
    assert secondary["last_install"]["result"] == "installed"

    text = _uptake("agent", "status", "--config", str(vehicle.config_path))
    assert text.returncode == 0, text.stderr
    assert f"primary {vehicle.primary}" in text.stdout
    assert f"secondary {vehicle.secondary}" in text.stdout
    assert "1000/5000 bytes on disk" in text.stdout and "phase download" in text.stdout
    assert f"running       {bms.filepath} (slot b)" in text.stdout
