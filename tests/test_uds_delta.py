"""Server → primary agent → UDS secondary by delta: the ECU patches its inactive bank over CAN.

The server makes and signs the delta; the agent finds it for the image the ECU's
signed report names, re-encodes it as a sequential patch for the ECU's declared
limits and sends it over a python-can virtual bus; the simulated ECU applies it
from its active bank, verifies the signed sha256 (and the director metadata)
and boots the new bank. A power cut in the middle of patching leaves the old
bank running, and the next cycle finishes the update.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.uds_ecu import EcuFaults
from tests.test_delta_updates import _wait_for_delta
from tests.test_uds_secondary import ECU, VIN, UdsVehicle, _vehicle
from tests.uptake_fixtures import ServerProcess, sample

PAD = random.Random(11).randbytes(300 * 1024)


def _bms(tmp_path: Path, version: str, tweak: int) -> Path:
    """A BMS firmware image: the sample program plus a large table that changes a little."""
    pad = bytearray(PAD)
    for i in range(tweak):
        pad[i * 7919 % len(pad)] ^= 0x5A
    path = tmp_path / f"bms-{version}.bin"
    path.write_bytes(sample("stm32f4-bms", "1.1.0").read_bytes() + bytes(pad))
    return path


@pytest.fixture
def on_v1(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[UdsVehicle, Path]]:
    vehicle_gen = _vehicle(server, tmp_path, server.url)
    vehicle = next(vehicle_gen)
    try:  # from here: a failed setup powers the ECU off and shuts its bus, too
        v1_file = _bms(tmp_path, "1.0.0", 0)
        v1 = server.publish(v1_file, "stm32f4-bms", "1.0.0")
        server.assign(VIN, ECU, v1.filepath)
        assert vehicle.agent.run_cycle().outcomes[ECU].result == "installed"
        assert vehicle.ecu.patches_applied == 0  # the factory image is not in the repository
        yield vehicle, v1_file
    finally:
        vehicle_gen.close()


def _publish_v2(server: ServerProcess, tmp_path: Path) -> tuple[Path, str, str]:
    v2_file = _bms(tmp_path, "1.1.0", 60)
    v2 = server.publish(v2_file, "stm32f4-bms", "1.1.0")
    _wait_for_delta(server, v2.sha256)
    server.assign(VIN, ECU, v2.filepath)
    return v2_file, v2.filepath, v2.sha256


def _running(vehicle: UdsVehicle) -> bytes:
    status = vehicle.ecu.status
    return vehicle.ecu.read_bank(status.active_bank, status.length)


def test_uds_secondary_is_updated_by_a_delta_over_can(
    server: ServerProcess, on_v1: tuple[UdsVehicle, Path], tmp_path: Path
) -> None:
    vehicle, _ = on_v1
    v2_file, filepath, sha256 = _publish_v2(server, tmp_path)
    sent_before = vehicle.ecu.programming_bytes
    report = vehicle.agent.run_cycle()
    assert report.outcomes[ECU].result == "installed", report
    assert vehicle.ecu.patches_applied == 1
    # the CAN bus carried a patch, not the image
    assert vehicle.ecu.programming_bytes - sent_before < v2_file.stat().st_size / 20
    assert _running(vehicle) == v2_file.read_bytes()
    ecu = next(e for e in server.vehicle(VIN)["ecus"] if e["serial"] == ECU)
    assert ecu["installed"]["filepath"] == filepath and ecu["installed"]["sha256"] == sha256


def test_power_loss_while_patching_keeps_the_old_bank_and_the_next_cycle_finishes(
    server: ServerProcess, on_v1: tuple[UdsVehicle, Path], tmp_path: Path
) -> None:
    vehicle, v1_file = on_v1
    v2_file, _, _ = _publish_v2(server, tmp_path)
    active_before = vehicle.ecu.status.active_bank
    vehicle.ecu.config.faults = EcuFaults(power_loss_at=0.5)
    report = vehicle.agent.run_cycle()
    assert vehicle.ecu.wait_power_lost(5)
    assert report.outcomes[ECU].result == "failed", report  # the fallback found the ECU off too

    vehicle.ecu.power_on()  # power comes back: the bootloader boots the untouched active bank
    assert vehicle.ecu.status.active_bank == active_before
    assert _running(vehicle) == v1_file.read_bytes()
    half_written = vehicle.ecu.read_bank(1 - active_before, v2_file.stat().st_size)
    assert half_written != v2_file.read_bytes()

    report = vehicle.agent.run_cycle()
    assert report.outcomes[ECU].result == "installed", report
    assert vehicle.ecu.patches_applied == 1
    assert _running(vehicle) == v2_file.read_bytes()


def test_an_ecu_without_the_capability_gets_the_full_image(
    server: ServerProcess, on_v1: tuple[UdsVehicle, Path], tmp_path: Path
) -> None:
    vehicle, _ = on_v1
    vehicle.ecu.config.patch_limits = None
    v2_file, _, _ = _publish_v2(server, tmp_path)
    sent_before = vehicle.ecu.programming_bytes
    assert vehicle.agent.run_cycle().outcomes[ECU].result == "installed"
    assert vehicle.ecu.patches_applied == 0
    assert vehicle.ecu.programming_bytes - sent_before == v2_file.stat().st_size
    assert _running(vehicle) == v2_file.read_bytes()
