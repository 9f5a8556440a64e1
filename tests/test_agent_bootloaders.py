"""The agent end to end with real bootloader environments (U-Boot, GRUB) instead of the JSON file."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from client.agent import make_boot_environment
from client.config import load_config
from tests.test_bootenv import make_grub_env, make_uboot_env
from tests.uptake_fixtures import ServerProcess, Vehicle, sample


def _uboot(directory: Path) -> tuple[str, Path]:
    if not all(shutil.which(t) for t in ("fw_printenv", "fw_setenv", "mkenvimage")):
        pytest.skip(
            "needs fw_printenv/fw_setenv (apt: libubootenv-tool) and mkenvimage (apt: u-boot-tools)"
        )
    return "uboot", make_uboot_env(directory, {"bootcmd": "run distro_bootcmd"})


def _grub(directory: Path) -> tuple[str, Path]:
    if shutil.which("grub-editenv") is None:
        pytest.skip("needs grub-editenv (apt: grub-common)")
    return "grub", make_grub_env(directory, {"saved_entry": "uptake"})


@pytest.mark.parametrize("bootloader", [_uboot, _grub], ids=["uboot", "grub"])
def test_update_and_rollback_through_a_real_boot_environment(
    server: ServerProcess, tmp_path: Path, bootloader: Callable[[Path], tuple[str, Path]]
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    (tmp_path / "bootenv").mkdir()
    kind, env_path = bootloader(tmp_path / "bootenv")
    text = vehicle.config_path.read_text().replace(
        'type = "file"',
        # image files stand in for the partitions a real board boots
        f'type = "{kind}"\nboot_env = "{env_path}"\nslot_type = "file"',
    )
    vehicle.config_path.write_text(text)
    env = make_boot_environment(load_config(vehicle.config_path))

    good = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, good.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
    variables = env.read()
    assert variables["boot_slot"] == "b" and variables["upgrade_available"] == "0"
    assert (
        variables.get("bootcmd") == "run distro_bootcmd" or kind == "grub"
    )  # other variables untouched

    broken = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")
    server.assign(vehicle.vin, vehicle.primary, broken.filepath)
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert (
        outcome["result"] == "rolled_back"
    )  # bootcount passed bootlimit: the bootloader fell back
    variables = env.read()
    assert variables["boot_slot"] == "b" and variables["upgrade_available"] == "0"
    assert vehicle.booted_image() == good.filepath
