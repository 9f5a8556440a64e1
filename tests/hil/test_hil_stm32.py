"""The AN3155 host (client.secondaries.stm32_uart) against the bootloader emulator on a pty."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.secondaries.flashing import EcuRejected, FlashTimeout, VerificationFailed
from client.secondaries.stm32_uart import Stm32Config as HostConfig
from client.secondaries.stm32_uart import Stm32UartFlasher
from hil.stm32_bootloader import SerialFaults, Stm32BootloaderEmulator, Stm32Config

FAST = HostConfig(ack_timeout=0.5, start_application=False)


def make_image(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Stm32BootloaderEmulator]:
    emulator = Stm32BootloaderEmulator(tmp_path / "stm32")
    emulator.power_on()
    yield emulator
    emulator.close()


def test_identify(emulator: Stm32BootloaderEmulator) -> None:
    with Stm32UartFlasher(emulator.port, FAST) as flasher:
        identity = flasher.identify()
    assert identity.hardware == "stm32:0x415"
    assert identity.details["bootloader_version"] == "3.1"
    assert "0x44" in identity.details["commands"]


def test_flash_256kib_reads_back_and_jumps(emulator: Stm32BootloaderEmulator) -> None:
    image = make_image(256 * 1024 + 3)  # not a multiple of 4: the last block is padded
    seen: list[int] = []
    with Stm32UartFlasher(emulator.port, FAST) as flasher:
        flasher.flash(io.BytesIO(image), len(image), lambda done, total: seen.append(done))
        flasher.verify(io.BytesIO(image), len(image))
        flasher.go()
    assert emulator.read_flash(0, len(image)) == image
    assert seen[-1] == len(image)
    assert emulator.jumped_to == 0x0800_0000


def test_flash_with_go_after(emulator: Stm32BootloaderEmulator) -> None:
    image = make_image(4096, seed=2)
    with Stm32UartFlasher(emulator.port, HostConfig(ack_timeout=0.5)) as flasher:
        flasher.flash(io.BytesIO(image), len(image))
        assert emulator.jumped_to == 0x0800_0000
        # The application runs now: the bootloader is gone.
        with pytest.raises(FlashTimeout) as failure:
            flasher.identify()
    assert failure.value.step == "sync"


def test_corrupted_byte_is_nacked_and_resent(tmp_path: Path) -> None:
    # Byte 3000 from the host lands inside a Write Memory data block.
    config = Stm32Config(faults=SerialFaults(corrupt_rx_bytes={3000}))
    with (
        Stm32BootloaderEmulator(tmp_path / "stm32", config) as emulator,
        Stm32UartFlasher(emulator.port, FAST) as flasher,
    ):
        image = make_image(32 * 1024, seed=3)
        flasher.flash(io.BytesIO(image), len(image))
        assert emulator.read_flash(0, len(image)) == image


def test_power_loss_then_retry(tmp_path: Path) -> None:
    image = make_image(64 * 1024, seed=4)
    config = Stm32Config(faults=SerialFaults(power_loss_after_written=len(image) // 2))
    with (
        Stm32BootloaderEmulator(tmp_path / "stm32", config) as emulator,
        Stm32UartFlasher(emulator.port, FAST) as flasher,
    ):
        with pytest.raises(FlashTimeout) as failure:
            flasher.flash(io.BytesIO(image), len(image))
        assert failure.value.step == "write-memory"
        assert emulator.power_lost.wait(5)
        assert emulator.read_flash(len(image) // 2, 256) == b"\xff" * 256
        emulator.power_on()
        flasher.flash(io.BytesIO(image), len(image))
        flasher.verify(io.BytesIO(image), len(image))


def test_mute_bootloader_times_out_naming_the_step(tmp_path: Path) -> None:
    config = Stm32Config(faults=SerialFaults(mute=True))
    with (
        Stm32BootloaderEmulator(tmp_path / "stm32", config) as emulator,
        Stm32UartFlasher(emulator.port, FAST) as flasher,
        pytest.raises(FlashTimeout) as failure,
    ):
        flasher.identify()
    assert failure.value.step == "sync"
    assert "no answer from the ECU within 0.5 s" in str(failure.value)


def test_verify_detects_a_different_image(emulator: Stm32BootloaderEmulator) -> None:
    image = make_image(8192, seed=5)
    with Stm32UartFlasher(emulator.port, FAST) as flasher:
        flasher.flash(io.BytesIO(image), len(image))
        other = bytearray(image)
        other[5000] ^= 0x10
        with pytest.raises(VerificationFailed, match="0x08001388"):
            flasher.verify(io.BytesIO(bytes(other)), len(other))


def test_bad_address_is_refused(emulator: Stm32BootloaderEmulator) -> None:
    with Stm32UartFlasher(emulator.port, FAST) as flasher, pytest.raises(EcuRejected) as failure:
        flasher.read_memory(0x0900_0000, 16)
    assert failure.value.step == "read-memory"


def test_missing_port_is_a_transport_error(tmp_path: Path) -> None:
    from client.secondaries.flashing import TransportError

    with pytest.raises(TransportError) as failure:
        Stm32UartFlasher(str(tmp_path / "no-such-tty"), FAST)
    assert failure.value.step == "open-port"
