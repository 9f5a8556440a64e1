"""Simulated CAN wires: python-can virtual buses with wire time and faults.

A :class:`VirtualCanWire` is one CAN bus segment. Every node (the flasher on
the primary, each simulated ECU) opens its own :class:`SimulatedCanBus` on it
with :meth:`VirtualCanWire.open_bus`; all of them share the wire's
:class:`~hil.wire_time.WireClock`, so frames from both directions queue for
the same wire time as they would on a real bus.

Each node's bus can carry a :class:`CanFaults` plan applied to the frames
*that node sends* (counted from 1): drop or corrupt given frames or a random
fraction, or go bus-off (``send`` raises :class:`can.CanOperationError`) for a
while. A corrupted frame models corruption the CAN CRC does not catch (a
faulty gateway): a real controller would retransmit a frame hit on the wire.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import can

from hil.wire_time import CAN_TX_QUEUE_FRAMES, CanTiming, WireClock


@dataclass
class CanFaults:
    """Faults applied to the frames one node sends."""

    drop_frames: set[int] = field(default_factory=set)
    corrupt_frames: set[int] = field(default_factory=set)
    drop_fraction: float = 0.0
    corrupt_fraction: float = 0.0
    bus_off_at_frame: int | None = None
    bus_off_seconds: float = 1.0
    seed: int = 0


@dataclass
class CanBusStats:
    sent: int = 0
    dropped: int = 0
    corrupted: int = 0
    refused: int = 0
    payload_bytes: int = 0


class SimulatedCanBus(can.BusABC):
    """A python-can bus wrapping another one with wire time and fault injection."""

    def __init__(
        self,
        inner: can.BusABC,
        *,
        timing: CanTiming | None = None,
        clock: WireClock | None = None,
        faults: CanFaults | None = None,
    ) -> None:
        self._inner = inner
        self._timing = timing
        self._clock = clock if clock is not None else WireClock()
        self.faults = faults or CanFaults()
        self.stats = CanBusStats()
        self._random = random.Random(self.faults.seed)
        self._lock = threading.Lock()
        self._bus_off_until = 0.0
        self.channel_info = f"simulated({inner.channel_info})"
        super().__init__(channel=inner.channel_info)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        with self._lock:
            self.stats.sent += 1
            index = self.stats.sent
            faults = self.faults
            if faults.bus_off_at_frame is not None and index == faults.bus_off_at_frame:
                self._bus_off_until = time.monotonic() + faults.bus_off_seconds
            if time.monotonic() < self._bus_off_until:
                self.stats.refused += 1
                raise can.CanOperationError("simulated bus-off: the controller refuses to transmit")
            drop = index in faults.drop_frames or (
                faults.drop_fraction > 0 and self._random.random() < faults.drop_fraction
            )
            corrupt = index in faults.corrupt_frames or (
                faults.corrupt_fraction > 0 and self._random.random() < faults.corrupt_fraction
            )
        if self._timing is not None:
            self._clock.occupy(
                self._timing.frame_seconds(
                    len(msg.data), fd=msg.is_fd, bitrate_switch=msg.bitrate_switch
                )
            )
        if drop:
            self.stats.dropped += 1
            return
        if corrupt and msg.data:
            data = bytearray(msg.data)
            position = self._random.randrange(len(data))
            data[position] ^= 1 << self._random.randrange(8)
            msg = can.Message(
                arbitration_id=msg.arbitration_id,
                data=bytes(data),
                is_extended_id=msg.is_extended_id,
                is_fd=msg.is_fd,
                bitrate_switch=msg.bitrate_switch,
            )
            self.stats.corrupted += 1
        self.stats.payload_bytes += len(msg.data)
        self._inner.send(msg, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return self._inner.recv(timeout), False

    def shutdown(self) -> None:
        self._inner.shutdown()
        super().shutdown()


class VirtualCanWire:
    """One CAN segment in this process (python-can ``virtual`` interface).

    ``timing=None`` makes the wire infinitely fast (for functional tests).
    """

    def __init__(self, timing: CanTiming | None = None, channel: str | None = None) -> None:
        self.timing = timing
        self.channel = channel or f"uptake-hil-{uuid.uuid4().hex[:12]}"
        self.clock = WireClock(queue_frames=CAN_TX_QUEUE_FRAMES)

    def open_bus(self, faults: CanFaults | None = None) -> SimulatedCanBus:
        inner = can.Bus(interface="virtual", channel=self.channel, receive_own_messages=False)
        return SimulatedCanBus(inner, timing=self.timing, clock=self.clock, faults=faults)
