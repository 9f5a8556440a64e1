"""How long frames and bytes take on a real wire, so simulated flashes take real time.

A virtual CAN bus or a pty moves data as fast as the CPU allows; a vehicle's
500 kbit/s CAN does not. The simulators charge every frame (or byte) its wire
time on a :class:`WireClock` shared by everything on the same wire:

* classic CAN: ``47 + 8*n`` bits for an 11-bit-id data frame with ``n`` data
  bytes (SOF, id, RTR, IDE, r0, DLC, data, CRC-15, delimiters, ACK, EOF and
  interframe space), plus worst-case stuff bits over the ``34 + 8*n`` bits
  from SOF to the CRC (one every four bits after the first);
* CAN FD: the arbitration and end-of-frame bits at the nominal rate, the
  data phase (ESI, DLC, data, stuff count, CRC-17/21 with its fixed stuff
  bits) at the data rate when the frame switches bit rate;
* UART: start bit, 8 data bits, parity if any, stop bits per byte.

Timing is a worst case (all stuff bits, no bus idle), so figures measured
against it are a lower bound of what a real bus reaches. ``None`` anywhere a
timing is expected means "infinitely fast": tests that don't measure time run
without the model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

_CANFD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)


def canfd_padded_length(n: int) -> int:
    """The smallest CAN FD payload length (DLC step) holding ``n`` bytes."""
    for size in _CANFD_LENGTHS:
        if size >= n:
            return size
    raise ValueError(f"CAN FD frames carry at most 64 bytes, not {n}")


@dataclass(frozen=True)
class CanTiming:
    """Bit rates of one CAN bus; ``data_bitrate`` only matters for CAN FD."""

    nominal_bitrate: int = 500_000
    data_bitrate: int = 2_000_000
    extended_id: bool = False

    def classic_bits(self, n: int) -> int:
        """Worst-case bits of a classic data frame with ``n`` bytes."""
        id_extra = 20 if self.extended_id else 0  # SRR, IDE, 18-bit extension
        stuffable = 34 + id_extra + 8 * n
        return 47 + id_extra + 8 * n + (stuffable - 1) // 4

    def frame_seconds(self, n: int, *, fd: bool = False, bitrate_switch: bool = False) -> float:
        """Wire time of one data frame carrying ``n`` bytes."""
        if not fd:
            return self.classic_bits(n) / self.nominal_bitrate
        n = canfd_padded_length(n)
        id_extra = 18 if self.extended_id else 0
        # SOF, id, RRS, IDE, FDF, res, BRS with stuff bits; CRC delimiter, ACK, EOF, IFS.
        arbitration = 17 + id_extra
        arbitration += (arbitration - 1) // 4
        tail = 1 + 2 + 7 + 3
        crc_bits = 17 if n <= 16 else 21
        # ESI, DLC, data with dynamic stuffing, stuff count (4) and CRC with fixed stuff bits.
        data_phase = 1 + 4 + 8 * n + (5 + 8 * n - 1) // 4 + 4 + crc_bits + (4 + crc_bits + 3) // 4
        data_rate = self.data_bitrate if bitrate_switch else self.nominal_bitrate
        return (arbitration + tail) / self.nominal_bitrate + data_phase / data_rate

    def payload_limit(self, *, fd: bool = False, bitrate_switch: bool = False) -> float:
        """Upper bound of ISO-TP payload bytes/s: back-to-back consecutive frames."""
        per_frame = 63 if fd else 7
        return per_frame / self.frame_seconds(64 if fd else 8, fd=fd, bitrate_switch=bitrate_switch)


@dataclass(frozen=True)
class SerialTiming:
    """A UART line: the STM32 bootloader speaks 8 data bits, even parity, 1 stop bit."""

    baudrate: int = 115_200
    parity: bool = True
    stop_bits: int = 1

    @property
    def bits_per_byte(self) -> int:
        return 1 + 8 + (1 if self.parity else 0) + self.stop_bits

    def bytes_seconds(self, n: int) -> float:
        return n * self.bits_per_byte / self.baudrate

    def payload_limit(self) -> float:
        """Bytes/s at full line rate, no protocol overhead."""
        return self.baudrate / self.bits_per_byte


class WireClock:
    """One shared wire: frames take turns, and senders wait for their frame's end.

    ``occupy(seconds)`` books the wire after whatever is already booked and
    sleeps until the booking ends. Sleeps shorter than ``min_sleep`` are
    deferred (the debt is carried into the next booking), since Python cannot
    sleep a few hundred microseconds accurately; the long-run rate stays exact.

    ``queue_frames`` models the controller's transmit queue: a sender may run
    that many frames (of the size it is sending) ahead of the wire, as a host
    does that keeps a CAN interface's queue filled (SocketCAN's default
    ``txqueuelen`` is 10 frames).
    Without it, every wake-up from a sleep that ends exactly at a frame's end
    leaves the wire idle for the sleep's overshoot and the next frame's Python
    work, which a real controller does not (it sends its queued frames back to
    back). Bookings still never overlap, so no frame takes less than its wire
    time; frames reach the receiver at most ``queue_frames`` frames early.
    """

    def __init__(self, min_sleep: float = 0.002, queue_frames: int = 0) -> None:
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._min_sleep = min_sleep
        self._queue_frames = queue_frames
        self.booked_seconds = 0.0

    def occupy(self, seconds: float) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._busy_until)
            self._busy_until = start + seconds
            self.booked_seconds += seconds
            end = self._busy_until
        wait = end - self._queue_frames * seconds - time.monotonic()
        if wait >= self._min_sleep:
            time.sleep(wait)


CAN_TX_QUEUE_FRAMES = 10
"""Frames a CAN node keeps queued for its controller (SocketCAN's default txqueuelen)."""
