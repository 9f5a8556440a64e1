"""The agent with the shipped U-Boot and GRUB boot scripts, rebooting for real between runs.

Each test builds the boot script as an integrator would (``mkimage`` for U-Boot's
``boot.scr``; ``grub-script-check`` for GRUB's ``uptake.cfg``), provisions an agent with
``installer.type = "uboot"``/``"grub"`` on a real environment store, and a reboot command
that really ends the agent process. Between two runs of the agent, the bootloader stand-in
(:mod:`tests.bootloader_standin`) runs the compiled script against that store at
"power-on" and the kernel gets a new boot id, exactly the sequence a board goes through.
The update commits after one trial boot; the broken release is tried ``bootlimit`` times,
then the script boots the previous slot and the agent reports the rollback.

The tools come from Debian's libubootenv-tool, u-boot-tools and grub-common; CI installs
them and fails without them (``.ci/run``); elsewhere the tests skip, naming the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from client.state import StateStore
from tests.bootloader_standin import grub_power_on, script_of_uimage, uboot_power_on
from tests.test_bootenv import make_grub_env, make_uboot_env
from tests.uptake_fixtures import ENV, REPO, ServerProcess, Vehicle, sample

BOOT_CMD = REPO / "client" / "boot" / "uboot" / "boot.cmd"
GRUB_CFG = REPO / "client" / "boot" / "grub" / "uptake.cfg"
BOOTLIMIT = 3


def require_tools(package: str, *tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        message = f"needs {', '.join(missing)} (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: a missing tool is a broken CI machine
        pytest.skip(message)


def _boot_id(vehicle: Vehicle, boots: int) -> None:
    """The kernel's part of a reboot: this boot has another id than the one before it."""
    store = StateStore(vehicle.state_dir / "state.json")
    state = store.load()
    assert state.journal is not None, "the agent asked for a reboot without an install journal"
    state.journal.boot_id = f"before-power-cycle-{boots}"
    store.save(state)


def _until_outcome(
    vehicle: Vehicle, power_on: Callable[[], str], booted: list[tuple[str, dict[str, str]]]
) -> dict[str, object]:
    """Run the agent; each time it reboots the machine, power on through the boot script."""
    for _ in range(2 * BOOTLIMIT + 4):
        proc = subprocess.run(
            vehicle.argv(), env=ENV, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.stdout.strip():  # the cycle ended: its report
            report: dict[str, object] = json.loads(proc.stdout)
            assert proc.returncode == report["exit_code"], proc.stderr
            return report
        assert proc.returncode == 0, proc.stderr  # the reboot command ended the agent
        booted.append((power_on(), vehicle.boot_env()))
        _boot_id(vehicle, len(booted))
    raise AssertionError(f"no outcome after {len(booted)} boots: {booted}")


def _update_then_rollback(
    server: ServerProcess, vehicle: Vehicle, power_on: Callable[[], str]
) -> None:
    good = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, good.filepath)
    booted: list[tuple[str, dict[str, str]]] = []
    report = _until_outcome(vehicle, power_on, booted)
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report  # type: ignore[index]
    # one power-on: the script counted the trial boot and booted the new slot
    assert [(slot, env["bootcount"]) for slot, env in booted] == [("b", "1")]
    env = vehicle.boot_env()
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "0", "0")
    assert vehicle.booted_image() == good.filepath

    broken = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")
    server.assign(vehicle.vin, vehicle.primary, broken.filepath)
    booted.clear()
    report = _until_outcome(vehicle, power_on, booted)
    outcome = report["outcomes"][vehicle.primary]  # type: ignore[index]
    assert outcome["result"] == "rolled_back" and "self-test" in outcome["detail"], report
    # bootlimit trial boots of slot a, each counted; then the script fell back to slot b
    trials = [("a", str(n), "1") for n in range(1, BOOTLIMIT + 1)]
    assert [(s, e["bootcount"], e["upgrade_available"]) for s, e in booted] == [
        *trials,
        ("b", "0", "0"),
    ]
    env = vehicle.boot_env()
    assert (env["boot_slot"], env["upgrade_available"]) == ("b", "0")
    assert vehicle.booted_image() == good.filepath
    record = server.vehicle(vehicle.vin)
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert primary["installed"]["filepath"] == good.filepath
    assert primary["last_install"]["result"] == "rolled_back"


def _board(vehicle: Vehicle, kind: str, boot_env: Path) -> None:
    """Image files stand in for the partitions; the reboot command ends the agent for real."""
    vehicle.configure(
        installer={
            "type": kind,
            "boot_env": str(boot_env),
            "slot_type": "file",
            "reboot": ["true"],
            "bootlimit": BOOTLIMIT,
        }
    )


def test_uboot_boot_script_updates_and_rolls_back(server: ServerProcess, tmp_path: Path) -> None:
    require_tools("u-boot-tools", "mkimage", "mkenvimage")
    require_tools("libubootenv-tool", "fw_printenv", "fw_setenv")
    boot_scr = tmp_path / "boot.scr"
    subprocess.run(
        ["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
         "-n", "Uptake A/B", "-d", str(BOOT_CMD), str(boot_scr)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert script_of_uimage(boot_scr) == BOOT_CMD.read_text()
    (tmp_path / "env").mkdir()
    fw_env_config = make_uboot_env(tmp_path / "env", {"bootcmd": "run distro_bootcmd"})
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    _board(vehicle, "uboot", fw_env_config)
    _update_then_rollback(server, vehicle, lambda: uboot_power_on(boot_scr, fw_env_config))
    assert vehicle.boot_env()["bootcmd"] == "run distro_bootcmd"  # other variables kept


def test_grub_configuration_updates_and_rolls_back(server: ServerProcess, tmp_path: Path) -> None:
    require_tools("grub-common", "grub-editenv", "grub-script-check")
    check = subprocess.run(
        ["grub-script-check", str(GRUB_CFG)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "grub").mkdir()
    grubenv = make_grub_env(tmp_path / "grub", {"saved_entry": "uptake"})
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    _board(vehicle, "grub", grubenv)
    _update_then_rollback(server, vehicle, lambda: grub_power_on(GRUB_CFG, grubenv))
    assert vehicle.boot_env()["saved_entry"] == "uptake"  # other variables kept
