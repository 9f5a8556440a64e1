"""Fixtures for the HIL tests: simulated ECUs on python-can virtual buses and ptys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import can
import pytest

from client.secondaries.uds import (
    HmacKeyAlgorithm,
    UdsAddressing,
    UdsConfig,
    UdsFlasher,
    UdsTimeouts,
)
from hil.can_bus import CanFaults, SimulatedCanBus, VirtualCanWire
from hil.uds_ecu import SIMULATOR_SECRET, EcuConfig, UdsEcuSimulator

FAST_TIMEOUTS = UdsTimeouts(
    request=0.5,
    response_pending=2.0,
    erase=10.0,
    transfer_block=0.4,
    check_dependencies=5.0,
    boot=5.0,
)


class UdsRig:
    """A virtual CAN wire with one simulated ECU and a way to open flashers on it."""

    def __init__(self, state_dir: Path, addressing: UdsAddressing) -> None:
        self.state_dir = state_dir
        self.addressing = addressing
        self.wire = VirtualCanWire()
        self._buses: list[can.BusABC] = []
        self._ecus: list[UdsEcuSimulator] = []
        self._flashers: list[UdsFlasher] = []

    def bus(self, faults: CanFaults | None = None) -> SimulatedCanBus:
        bus = self.wire.open_bus(faults)
        self._buses.append(bus)
        return bus

    def ecu(
        self, config: EcuConfig | None = None, faults: CanFaults | None = None
    ) -> UdsEcuSimulator:
        config = config or EcuConfig()
        config.addressing = self.addressing
        ecu = UdsEcuSimulator(self.bus(faults), self.state_dir, config)
        ecu.power_on()
        self._ecus.append(ecu)
        return ecu

    def flasher(
        self,
        faults: CanFaults | None = None,
        secret: bytes = SIMULATOR_SECRET,
        timeouts: UdsTimeouts = FAST_TIMEOUTS,
        block_retries: int = 3,
    ) -> UdsFlasher:
        config = UdsConfig(
            addressing=self.addressing,
            timeouts=timeouts,
            key_algorithm=HmacKeyAlgorithm(secret),
            block_retries=block_retries,
        )
        self.flasher_bus = self.bus(faults)
        flasher = UdsFlasher(self.flasher_bus, config)
        self._flashers.append(flasher)
        return flasher

    def close(self) -> None:
        for flasher in self._flashers:
            flasher.close()
        for ecu in self._ecus:
            ecu.power_off()
        for bus in self._buses:
            bus.shutdown()


@pytest.fixture
def uds_rig(tmp_path: Path) -> Iterator[UdsRig]:
    rig = UdsRig(tmp_path / "ecu", UdsAddressing())
    yield rig
    rig.close()


@pytest.fixture
def uds_fd_rig(tmp_path: Path) -> Iterator[UdsRig]:
    rig = UdsRig(tmp_path / "ecu-fd", UdsAddressing(can_fd=True))
    yield rig
    rig.close()


@pytest.fixture
def image_of() -> Callable[[int, int], bytes]:
    """Deterministic pseudo-random image bytes that boot (vector table not erased)."""
    import random

    def make(size: int, seed: int = 1) -> bytes:
        data = bytearray(random.Random(seed).randbytes(size))
        data[:8] = b"\x00\x50\x00\x20\x41\x01\x00\x08"
        return bytes(data)

    return make
