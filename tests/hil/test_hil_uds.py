"""UDS flashing (client.secondaries.uds) against the simulated A/B ECU (hil.uds_ecu)."""

from __future__ import annotations

import io
import json
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from client.secondaries.flashing import (
    DependencyCheckFailed,
    FlashError,
    FlashTimeout,
    ImageDidNotBoot,
    SecurityAccessDenied,
    TransportError,
    VerificationFailed,
)
from client.secondaries.uds import DID_VERSION_REPORT
from hil.can_bus import CanFaults
from hil.uds_ecu import EcuConfig, EcuFaults, EcuStatus

if TYPE_CHECKING:
    from tests.hil.conftest import UdsRig

ImageOf = Callable[..., bytes]


def test_flash_1mib_image_boots_new_bank_and_verifies(uds_rig: UdsRig, image_of: ImageOf) -> None:
    ecu = uds_rig.ecu()
    flasher = uds_rig.flasher()
    before = flasher.identify()
    assert (before.serial, before.software_version, before.details["active_bank"]) == (
        "SIM-ECU-0001",
        "1.0.0",
        "0",
    )
    image = image_of(1024 * 1024)
    seen: list[tuple[int, int]] = []

    flasher.flash(
        io.BytesIO(image),
        len(image),
        lambda done, total: seen.append((done, total)),
        version="2.0.0",
    )

    flasher.verify(io.BytesIO(image), len(image))
    after = flasher.identify()
    assert after.software_version == "2.0.0"
    assert after.details["active_bank"] == "1"
    assert after.details["image_crc32"] == f"{zlib.crc32(image):08x}"
    assert ecu.read_bank(1, len(image)) == image  # read back from the simulated flash
    assert seen[-1] == (len(image), len(image))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    # 1 MiB in blocks of 4093 bytes: the block counter wrapped 0xFF -> 0x00.
    assert len(seen) > 256


def test_can_fd_flash(uds_fd_rig: UdsRig, image_of: ImageOf) -> None:
    uds_fd_rig.ecu()
    flasher = uds_fd_rig.flasher()
    image = image_of(256 * 1024, seed=2)
    flasher.flash(io.BytesIO(image), len(image), version="2.1.0")
    flasher.verify(io.BytesIO(image), len(image))


def test_block_counter_wraps_with_small_blocks(uds_rig: UdsRig, image_of: ImageOf) -> None:
    ecu = uds_rig.ecu(EcuConfig(max_block_length=258))
    flasher = uds_rig.flasher()
    image = image_of(300 * 256, seed=3)  # 300 blocks of 256 bytes
    flasher.flash(io.BytesIO(image), len(image))
    assert ecu.read_bank(1, len(image)) == image


def test_dropped_frames_are_recovered(uds_rig: UdsRig, image_of: ImageOf) -> None:
    # The tester loses a consecutive frame mid-block; the ECU loses one of its answers.
    ecu_faults = CanFaults(drop_frames={12})
    tester_faults = CanFaults(drop_frames={300})
    uds_rig.ecu(faults=ecu_faults)
    flasher = uds_rig.flasher(faults=tester_faults)
    image = image_of(128 * 1024, seed=4)
    flasher.flash(io.BytesIO(image), len(image))
    flasher.verify(io.BytesIO(image), len(image))
    assert uds_rig.flasher_bus.stats.dropped == 1


@pytest.mark.parametrize("fraction", [0.10, 0.50, 0.99])
def test_power_loss_keeps_old_bank_and_retry_succeeds(
    uds_rig: UdsRig, image_of: ImageOf, fraction: float
) -> None:
    ecu = uds_rig.ecu(EcuConfig(faults=EcuFaults(power_loss_at=fraction)))
    flasher = uds_rig.flasher(block_retries=1)
    factory = flasher.identify()
    image = image_of(128 * 1024, seed=5)

    with pytest.raises(FlashTimeout) as failure:
        flasher.flash(io.BytesIO(image), len(image), version="2.0.0")
    assert failure.value.step == "transfer-data"
    assert ecu.wait_power_lost(5)

    # Power comes back: a new simulator process state from the same directory.
    restarted = uds_rig.ecu()
    assert flasher.identify() == factory
    assert restarted.status.active_bank == 0
    written = ecu.read_bank(1, len(image))
    cut = int(len(image) * fraction)
    assert written[: cut - 4096] == image[: cut - 4096]  # flash kept what was written
    assert written[-1024:] == b"\xff" * 1024

    flasher.flash(io.BytesIO(image), len(image), version="2.0.0")
    flasher.verify(io.BytesIO(image), len(image))
    assert flasher.identify().software_version == "2.0.0"


def test_wrong_security_key_is_refused(uds_rig: UdsRig, image_of: ImageOf) -> None:
    ecu = uds_rig.ecu()
    flasher = uds_rig.flasher(secret=b"not the ECU's secret")
    image = image_of(8192)
    with pytest.raises(SecurityAccessDenied) as failure:
        flasher.flash(io.BytesIO(image), len(image))
    assert failure.value.step == "security-access"
    assert "0x35" in str(failure.value)  # invalidKey
    assert ecu.status.version == "1.0.0"


def test_mute_ecu_times_out_naming_the_step(uds_rig: UdsRig) -> None:
    uds_rig.ecu(EcuConfig(faults=EcuFaults(mute=True)))
    flasher = uds_rig.flasher()
    with pytest.raises(FlashTimeout) as failure:
        flasher.identify()
    assert failure.value.step == "read-identification"
    assert str(failure.value).startswith("read-identification: no answer from the ECU within 0.5 s")


def test_ecu_that_stops_answering_mid_sequence(uds_rig: UdsRig, image_of: ImageOf) -> None:
    # Answers the session, seed and key requests, then nothing.
    uds_rig.ecu(EcuConfig(faults=EcuFaults(mute_after_requests=3)))
    flasher = uds_rig.flasher()
    image = image_of(8192)
    with pytest.raises(FlashTimeout) as failure:
        flasher.flash(io.BytesIO(image), len(image))
    assert failure.value.step == "erase"


def test_long_erase_is_covered_by_response_pending(uds_rig: UdsRig, image_of: ImageOf) -> None:
    # The erase lasts three times the tester's P2: only 0x78 answers keep it waiting.
    uds_rig.ecu(EcuConfig(erase_seconds=1.5, pending_interval=0.2))
    flasher = uds_rig.flasher()
    image = image_of(16384)
    flasher.flash(io.BytesIO(image), len(image))
    flasher.verify(io.BytesIO(image), len(image))


def test_image_that_does_not_boot_falls_back(uds_rig: UdsRig, image_of: ImageOf) -> None:
    ecu = uds_rig.ecu()
    flasher = uds_rig.flasher()
    image = b"\xff" * 8 + image_of(32768)[8:]  # erased vector table
    with pytest.raises(ImageDidNotBoot) as failure:
        flasher.flash(io.BytesIO(image), len(image), version="3.0.0")
    assert failure.value.step == "boot"
    assert "fell back" in str(failure.value)
    assert ecu.status.version == "1.0.0"
    report = json.loads(flasher.read_version_report())
    assert "did not boot" in report["last_boot_failure"]
    with pytest.raises(VerificationFailed):
        flasher.verify(io.BytesIO(image), len(image))


def test_dependency_check_sees_metadata_and_can_refuse(uds_rig: UdsRig, image_of: ImageOf) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def refuse(metadata: bytes, image: bytes) -> tuple[bool, str]:
        seen.append((metadata, image))
        return False, "director targets do not name this ECU"

    ecu = uds_rig.ecu(EcuConfig(dependency_check=refuse))
    flasher = uds_rig.flasher()
    image = image_of(20000)
    metadata = json.dumps({"signed": {"targets": {"x": 1}}, "pad": "m" * 5000}).encode()
    with pytest.raises(DependencyCheckFailed) as failure:
        flasher.flash(io.BytesIO(image), len(image), metadata=metadata)
    assert failure.value.step == "check-dependencies"
    assert "do not name this ECU" in str(failure.value)
    assert seen == [(metadata, image)]
    assert ecu.status.active_bank == 0


def test_corrupted_image_is_caught_by_the_crc_check(uds_rig: UdsRig, image_of: ImageOf) -> None:
    # A frame corrupted above the CAN CRC (a faulty gateway) changes one image byte.
    uds_rig.ecu()
    flasher = uds_rig.flasher(faults=CanFaults(corrupt_frames={400}, seed=7))
    image = image_of(64 * 1024, seed=8)
    with pytest.raises(FlashError) as failure:
        flasher.flash(io.BytesIO(image), len(image))
    assert failure.value.step in {"check-dependencies", "transfer-data"}
    # The next attempt (no more corruption) succeeds.
    flasher.flash(io.BytesIO(image), len(image))
    flasher.verify(io.BytesIO(image), len(image))


def test_bus_off_is_reported_then_a_retry_succeeds(uds_rig: UdsRig, image_of: ImageOf) -> None:
    uds_rig.ecu()
    faults = CanFaults(bus_off_at_frame=200, bus_off_seconds=1.5)
    flasher = uds_rig.flasher(faults=faults, block_retries=1)
    image = image_of(64 * 1024)
    with pytest.raises(TransportError) as failure:
        flasher.flash(io.BytesIO(image), len(image))
    assert failure.value.step == "transfer-data"
    assert "bus-off" in str(failure.value)
    # The controller recovers; the ECU, still mid-transfer, accepts a fresh start.
    time.sleep(1.5)
    flasher.flash(io.BytesIO(image), len(image))
    flasher.verify(io.BytesIO(image), len(image))


def test_short_bus_off_is_ridden_out(uds_rig: UdsRig, image_of: ImageOf) -> None:
    uds_rig.ecu()
    flasher = uds_rig.flasher(faults=CanFaults(bus_off_at_frame=200, bus_off_seconds=0.2))
    image = image_of(64 * 1024)
    flasher.flash(io.BytesIO(image), len(image))
    flasher.verify(io.BytesIO(image), len(image))


def test_version_report_nonce_and_large_reports(uds_rig: UdsRig) -> None:
    def signed_report(status: EcuStatus) -> bytes:
        body = {"ecu": status.serial, "nonce": status.nonce.hex(), "sig": "ab" * 1500}
        return json.dumps(body).encode()

    uds_rig.ecu(EcuConfig(version_report=signed_report))
    flasher = uds_rig.flasher()
    report = json.loads(flasher.read_version_report(nonce=b"\x00\x11\x22\x33"))
    assert report["nonce"] == "00112233"
    assert len(report["sig"]) == 3000  # a multi-frame ISO-TP answer
    assert flasher.read_did(DID_VERSION_REPORT) == json.dumps(report).encode()


def test_state_survives_a_simulator_restart(uds_rig: UdsRig, image_of: ImageOf) -> None:
    first = uds_rig.ecu()
    flasher = uds_rig.flasher()
    image = image_of(40000)
    flasher.flash(io.BytesIO(image), len(image), version="4.0.0")
    first.power_off()
    uds_rig.ecu()
    assert flasher.identify().software_version == "4.0.0"
    flasher.verify(io.BytesIO(image), len(image))
