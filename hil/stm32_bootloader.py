"""An STM32 system bootloader (ST AN3155, UART) emulated on a pty pair.

The emulator owns the master side of a pseudo-terminal; a host opens
:attr:`Stm32BootloaderEmulator.port` (the slave, e.g. ``/dev/pts/7``) with
pyserial exactly as it would open ``/dev/ttyUSB0``. It implements the
commands :mod:`client.secondaries.stm32_uart` uses: Get, Get Version, Get ID,
Read Memory, Go, Write Memory and Extended Erase, with ACK/NACK and XOR
checksums, and behaves like the ROM bootloader where it matters:

* flash is a file (``flash.bin`` in the state directory) written in place:
  erased bytes are 0xFF, and a write can only clear bits (new = old AND
  data), so writing without erasing corrupts, as on silicon;
* write addresses and lengths must be word aligned, blocks at most 256 bytes;
* after Go the bootloader is gone (it answers nothing) until
  :meth:`Stm32BootloaderEmulator.reset_into_bootloader`.

The byte timing of a real UART (8E1 at 115200 baud by default) is charged when
a :class:`~hil.wire_time.SerialTiming` is given. :class:`SerialFaults` corrupt
received bytes, cut power after a number of written bytes (flash keeps what
was written) or make the bootloader mute.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path

from client.secondaries.stm32_uart import (
    ACK,
    CMD_EXTENDED_ERASE,
    CMD_GET,
    CMD_GET_ID,
    CMD_GET_VERSION,
    CMD_GO,
    CMD_READ_MEMORY,
    CMD_WRITE_MEMORY,
    NACK,
    SYNC,
)
from hil.wire_time import SerialTiming, WireClock

_SUPPORTED = bytes(
    [
        CMD_GET,
        CMD_GET_VERSION,
        CMD_GET_ID,
        CMD_READ_MEMORY,
        CMD_GO,
        CMD_WRITE_MEMORY,
        CMD_EXTENDED_ERASE,
    ]
)


@dataclass
class SerialFaults:
    corrupt_rx_bytes: set[int] = field(default_factory=set)
    """Indices (from 1) of received bytes to flip a bit in."""
    power_loss_after_written: int | None = None
    """Lose power once this many flash bytes were written since power-on (once)."""
    mute: bool = False


@dataclass
class Stm32Config:
    product_id: int = 0x415  # STM32L47x/L48x: 1 MiB flash, 2 KiB pages
    bootloader_version: int = 0x31
    flash_base: int = 0x0800_0000
    flash_size: int = 1024 * 1024
    page_size: int = 2048
    ram_base: int = 0x2000_0000
    ram_size: int = 96 * 1024
    erase_seconds_per_page: float = 0.0
    timing: SerialTiming | None = None
    faults: SerialFaults = field(default_factory=SerialFaults)


class _Stopped(Exception):
    pass


class _PowerLost(Exception):
    pass


class Stm32BootloaderEmulator:
    """The bootloader of one STM32 behind a pty; state (flash) in ``state_dir``."""

    def __init__(self, state_dir: Path | str, config: Stm32Config | None = None) -> None:
        self.config = config or Stm32Config()
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.flash_path = self.state_dir / "flash.bin"
        if not self.flash_path.exists():
            self.flash_path.write_bytes(b"\xff" * self.config.flash_size)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        tty.setraw(self._master)
        self.port = os.ttyname(self._slave)
        self._clock = WireClock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.power_lost = threading.Event()
        self.jumped_to: int | None = None
        self.bytes_written = 0
        self._received = 0
        self._synced = False

    # -- power ------------------------------------------------------------------

    def power_on(self) -> None:
        """Reset with BOOT0 high: the bootloader runs and waits for 0x7F."""
        if self._thread is not None:
            return
        self._drain()
        self._synced = False
        self.bytes_written = 0
        self.jumped_to = None
        self.power_lost.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="stm32-bootloader", daemon=True)
        self._thread.start()

    reset_into_bootloader = power_on

    def arm_power_loss(self, after_written: int) -> None:
        """Lose power once ``after_written`` more flash bytes have been written."""
        self.bytes_written = 0
        self.config.faults.power_loss_after_written = after_written

    def power_off(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def close(self) -> None:
        self.power_off()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Stm32BootloaderEmulator:
        self.power_on()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_flash(self, offset: int, length: int) -> bytes:
        with open(self.flash_path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    # -- byte I/O -----------------------------------------------------------------

    def _drain(self) -> None:
        while select.select([self._master], [], [], 0)[0]:
            if not os.read(self._master, 4096):
                break

    def _recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self._stop.is_set():
                raise _Stopped
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            chunk = os.read(self._master, n - len(out))
            for byte in chunk:
                self._received += 1
                if self._received in self.config.faults.corrupt_rx_bytes:
                    byte ^= 0x01
                out.append(byte)
        if self.config.timing is not None:
            self._clock.occupy(self.config.timing.bytes_seconds(n))
        return bytes(out)

    def _send(self, data: bytes) -> None:
        if self.config.timing is not None:
            self._clock.occupy(self.config.timing.bytes_seconds(len(data)))
        os.write(self._master, data)

    # -- protocol -------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                first = self._recv(1)[0]
                if self.config.faults.mute:
                    continue
                if not self._synced:
                    if first == SYNC:
                        self._synced = True
                        self._send(bytes([ACK]))
                    continue  # the ROM ignores anything before the sync byte
                if first == SYNC:
                    self._send(bytes([NACK]))  # a host syncing again
                    continue
                complement = self._recv(1)[0]
                if complement != first ^ 0xFF or first not in _SUPPORTED:
                    self._send(bytes([NACK]))
                    continue
                self._send(bytes([ACK]))
                if self._run(first):
                    return
        except _Stopped:
            return
        except _PowerLost:
            self._thread = None
            self.power_lost.set()

    def _run(self, command: int) -> bool:
        """Run one acknowledged command; True when the bootloader exits (Go)."""
        if command == CMD_GET:
            self._send(
                bytes([len(_SUPPORTED)])
                + bytes([self.config.bootloader_version])
                + _SUPPORTED
                + bytes([ACK])
            )
        elif command == CMD_GET_VERSION:
            self._send(bytes([self.config.bootloader_version, 0, 0, ACK]))
        elif command == CMD_GET_ID:
            self._send(bytes([1]) + self.config.product_id.to_bytes(2, "big") + bytes([ACK]))
        elif command == CMD_READ_MEMORY:
            self._read_memory()
        elif command == CMD_GO:
            address = self._address()
            if address is None or not (self._in_flash(address, 4) or self._in_ram(address, 4)):
                self._send(bytes([NACK]))
                return False
            self._send(bytes([ACK]))
            self.jumped_to = address
            self._thread = None
            return True
        elif command == CMD_WRITE_MEMORY:
            self._write_memory()
        elif command == CMD_EXTENDED_ERASE:
            self._extended_erase()
        return False

    def _address(self) -> int | None:
        frame = self._recv(5)
        if _xor(frame[:4]) != frame[4]:
            return None
        return int.from_bytes(frame[:4], "big")

    def _in_flash(self, address: int, size: int) -> bool:
        base = self.config.flash_base
        return base <= address and address + size <= base + self.config.flash_size

    def _in_ram(self, address: int, size: int) -> bool:
        base = self.config.ram_base
        return base <= address and address + size <= base + self.config.ram_size

    def _read_memory(self) -> None:
        address = self._address()
        if address is None or not self._in_flash(address, 1):
            self._send(bytes([NACK]))
            return
        self._send(bytes([ACK]))
        n, complement = self._recv(2)
        if complement != n ^ 0xFF or not self._in_flash(address, n + 1):
            self._send(bytes([NACK]))
            return
        self._send(bytes([ACK]) + self.read_flash(address - self.config.flash_base, n + 1))

    def _write_memory(self) -> None:
        address = self._address()
        if address is None or address % 4 or not self._in_flash(address, 1):
            self._send(bytes([NACK]))
            return
        self._send(bytes([ACK]))
        n = self._recv(1)[0]
        data = self._recv(n + 1)
        checksum = self._recv(1)[0]
        if checksum != _xor(bytes([n]) + data) or (n + 1) % 4 or not self._in_flash(address, n + 1):
            self._send(bytes([NACK]))
            return
        offset = address - self.config.flash_base
        limit = self.config.faults.power_loss_after_written
        keep = len(data) if limit is None else max(0, min(len(data), limit - self.bytes_written))
        with open(self.flash_path, "r+b") as f:
            f.seek(offset)
            old = f.read(keep)
            f.seek(offset)
            f.write(bytes(a & b for a, b in zip(old, data[:keep], strict=True)))
        self.bytes_written += keep
        if limit is not None and self.bytes_written >= limit:
            self.config.faults.power_loss_after_written = None
            raise _PowerLost
        self._send(bytes([ACK]))

    def _extended_erase(self) -> None:
        head = self._recv(2)
        count = int.from_bytes(head, "big")
        if count >= 0xFFF0:  # special erase: 0xFFFF mass, 0xFFFE/0xFFFD banks
            checksum = self._recv(1)[0]
            if checksum != _xor(head) or count != 0xFFFF:
                self._send(bytes([NACK]))
                return
            pages = list(range(self.config.flash_size // self.config.page_size))
        else:
            body = self._recv(2 * (count + 1))
            checksum = self._recv(1)[0]
            if checksum != _xor(head + body):
                self._send(bytes([NACK]))
                return
            pages = [int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2)]
        if any(p * self.config.page_size >= self.config.flash_size for p in pages):
            self._send(bytes([NACK]))
            return
        with open(self.flash_path, "r+b") as f:
            for page in pages:
                f.seek(page * self.config.page_size)
                f.write(b"\xff" * self.config.page_size)
                if self.config.erase_seconds_per_page:
                    time.sleep(self.config.erase_seconds_per_page)
        self._send(bytes([ACK]))


def _xor(data: bytes) -> int:
    return reduce(lambda a, b: a ^ b, data, 0)
