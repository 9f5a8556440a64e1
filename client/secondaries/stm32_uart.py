"""Flashing an STM32 through its ROM bootloader's UART protocol (ST AN3155).

The STM32 system bootloader (entered with BOOT0 high) speaks a tiny
half-duplex protocol at up to 115200 baud, 8 data bits, even parity:

* the host sends ``0x7F`` once; the bootloader measures the baud rate and
  answers ACK (``0x79``);
* every command is a byte and its complement; every phase is acknowledged
  with ACK or NACK (``0x1F``); addresses are 4 bytes MSB first followed by
  their XOR; data blocks are preceded by ``N = length - 1`` and followed by
  the XOR of ``N`` and the data;
* Get (0x00) lists the commands, Get ID (0x02) the product id, Extended Erase
  (0x44) erases pages, Write Memory (0x31) and Read Memory (0x11) move at most
  256 bytes, Go (0x21) jumps to the application.

:meth:`Stm32UartFlasher.flash` syncs, erases the pages the image covers,
writes it in 256-byte blocks (a NACKed block, e.g. a corrupted checksum, is
sent again), reads it back to compare CRC-32s, and jumps to it unless told
not to. The ROM bootloader cannot verify signatures: the primary verifies the
image before flashing it. Every failure is a
:class:`~client.secondaries.flashing.FlashError` naming its step.

This host side is our own (the usual PyPI tool is GPL and fails on ptys);
only pyserial is used.
"""

from __future__ import annotations

import os
import stat
import termios
import time
import zlib
from dataclasses import dataclass
from functools import reduce
from typing import Any, BinaryIO

import serial

from client.secondaries.flashing import (
    EcuFlasher,
    EcuIdentity,
    EcuRejected,
    FlashError,
    FlashTimeout,
    ProgressCallback,
    TransportError,
    VerificationFailed,
    read_exactly,
)

ACK = 0x79
NACK = 0x1F
SYNC = 0x7F

CMD_GET = 0x00
CMD_GET_VERSION = 0x01
CMD_GET_ID = 0x02
CMD_READ_MEMORY = 0x11
CMD_GO = 0x21
CMD_WRITE_MEMORY = 0x31
CMD_ERASE = 0x43
CMD_EXTENDED_ERASE = 0x44

MAX_BLOCK = 256


def xor_checksum(data: bytes) -> int:
    """AN3155's checksum: XOR of all bytes."""
    return reduce(lambda a, b: a ^ b, data, 0)


def address_frame(address: int) -> bytes:
    """A 4-byte big-endian address followed by its XOR checksum."""
    raw = address.to_bytes(4, "big")
    return raw + bytes([xor_checksum(raw)])


def _is_pty(path: str) -> bool:
    """True for a Unix98 pty slave (character device majors 136..143)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and 136 <= os.major(info.st_rdev) <= 143


@dataclass(frozen=True)
class Stm32Config:
    baudrate: int = 115_200
    flash_base: int = 0x0800_0000
    page_size: int = 2048
    """Extended Erase works on pages; their size depends on the part."""
    ack_timeout: float = 1.0
    erase_timeout_per_page: float = 0.1
    erase_timeout_min: float = 5.0
    retries: int = 3
    start_application: bool = True
    """Jump to the image (Go) after writing and reading it back."""


class Stm32UartFlasher(EcuFlasher):
    """An STM32 in its system bootloader on a serial port.

    ``port`` is a pyserial URL or device name (``/dev/ttyUSB0``, a pty) or an
    already open ``serial.Serial`` (then not closed by :meth:`close`).
    """

    transport_name = "stm32-uart"

    def __init__(self, port: str | Any, config: Stm32Config | None = None) -> None:
        self.config = config or Stm32Config()
        self._owns_port = isinstance(port, str)
        try:
            self._port = (
                serial.serial_for_url(
                    port,
                    baudrate=self.config.baudrate,
                    bytesize=serial.EIGHTBITS,
                    # A pty has no parity (Linux clears PARENB on it) and may refuse
                    # a termios update that sets it: ask for even parity on real lines only.
                    parity=serial.PARITY_NONE if _is_pty(port) else serial.PARITY_EVEN,
                    stopbits=serial.STOPBITS_ONE,
                    timeout=0.05,
                )
                if isinstance(port, str)
                else port
            )
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise TransportError("open-port", f"cannot open {port}: {exc}") from None
        self._synced = False
        self._commands: bytes = b""
        self._bootloader_version = 0

    def close(self) -> None:
        if self._owns_port:
            self._port.close()

    # -- protocol primitives ----------------------------------------------------

    def _write(self, data: bytes, step: str) -> None:
        try:
            self._port.write(data)
            self._port.flush()
        except (serial.SerialException, OSError) as exc:
            raise TransportError(step, f"serial write failed: {exc}") from None

    def _read(self, size: int, timeout: float, step: str) -> bytes:
        deadline = time.monotonic() + timeout
        out = b""
        while len(out) < size:
            try:
                out += self._port.read(size - len(out))
            except (serial.SerialException, OSError) as exc:
                raise TransportError(step, f"serial read failed: {exc}") from None
            if len(out) < size and time.monotonic() >= deadline:
                self._synced = False  # it may have been reset: sync again next time
                raise FlashTimeout(step, timeout, f"got {len(out)} of {size} bytes")
        return out

    def _expect_ack(self, step: str, timeout: float | None = None) -> bool:
        """True on ACK, False on NACK; anything else is a protocol error."""
        answer = self._read(1, timeout or self.config.ack_timeout, step)[0]
        if answer == ACK:
            return True
        if answer == NACK:
            return False
        raise EcuRejected(step, f"expected ACK or NACK, got 0x{answer:02X}")

    def _command(self, code: int, step: str) -> None:
        self._ensure_synced()
        self._discard_input()
        self._write(bytes([code, code ^ 0xFF]), step)
        if not self._expect_ack(step):
            raise EcuRejected(step, f"bootloader refused command 0x{code:02X} (NACK)")

    def _discard_input(self) -> None:
        try:
            self._port.reset_input_buffer()
        except (serial.SerialException, OSError) as exc:
            raise TransportError("serial", f"cannot flush input: {exc}") from None

    def _ensure_synced(self) -> None:
        if self._synced:
            return
        self._discard_input()
        self._write(bytes([SYNC]), "sync")
        # NACK means the bootloader was already synced by an earlier session.
        self._expect_ack("sync")
        self._synced = True

    # -- commands ---------------------------------------------------------------

    def get(self) -> tuple[int, bytes]:
        """Bootloader version and the command codes it supports."""
        self._command(CMD_GET, "get")
        count = self._read(1, self.config.ack_timeout, "get")[0] + 1
        payload = self._read(count, self.config.ack_timeout, "get")
        if not self._expect_ack("get"):
            raise EcuRejected("get", "NACK after the command list")
        self._bootloader_version, self._commands = payload[0], payload[1:]
        return self._bootloader_version, self._commands

    def get_id(self) -> int:
        """The product id (PID) of the part."""
        self._command(CMD_GET_ID, "get-id")
        count = self._read(1, self.config.ack_timeout, "get-id")[0] + 1
        pid = self._read(count, self.config.ack_timeout, "get-id")
        if not self._expect_ack("get-id"):
            raise EcuRejected("get-id", "NACK after the product id")
        return int.from_bytes(pid, "big")

    def identify(self) -> EcuIdentity:
        version, commands = self.get()
        pid = self.get_id()
        return EcuIdentity(
            transport=self.transport_name,
            serial=None,
            software_version=None,
            hardware=f"stm32:0x{pid:03x}",
            details={
                "bootloader_version": f"{version >> 4}.{version & 0xF}",
                "commands": " ".join(f"0x{c:02X}" for c in commands),
            },
        )

    def extended_erase(self, pages: list[int]) -> None:
        """Erase the given pages (chunks of at most 128 pages per command)."""
        for start in range(0, len(pages), 128):
            chunk = pages[start : start + 128]
            body = (len(chunk) - 1).to_bytes(2, "big") + b"".join(
                p.to_bytes(2, "big") for p in chunk
            )
            timeout = max(
                self.config.erase_timeout_min, self.config.erase_timeout_per_page * len(chunk)
            )
            self._command(CMD_EXTENDED_ERASE, "erase")
            self._write(body + bytes([xor_checksum(body)]), "erase")
            if not self._expect_ack("erase", timeout):
                raise EcuRejected(
                    "erase", f"bootloader refused to erase pages {chunk[0]}..{chunk[-1]}"
                )

    def write_memory(self, address: int, data: bytes) -> None:
        """Write at most 256 bytes (padded to a multiple of 4 with 0xFF), retrying NACKs."""
        if not 0 < len(data) <= MAX_BLOCK:
            raise ValueError("a Write Memory block holds 1..256 bytes")
        data = data + b"\xff" * (-len(data) % 4)
        body = bytes([len(data) - 1]) + data
        frame = body + bytes([xor_checksum(body)])
        for attempt in range(self.config.retries + 1):
            self._command(CMD_WRITE_MEMORY, "write-memory")
            self._write(address_frame(address), "write-memory")
            if not self._expect_ack("write-memory"):
                raise EcuRejected("write-memory", f"bootloader refused address 0x{address:08X}")
            self._write(frame, "write-memory")
            if self._expect_ack("write-memory"):
                return
            if attempt == self.config.retries:
                raise EcuRejected(
                    "write-memory",
                    f"block at 0x{address:08X} refused {attempt + 1} times (checksum NACK)",
                )

    def read_memory(self, address: int, size: int) -> bytes:
        """Read at most 256 bytes."""
        if not 0 < size <= MAX_BLOCK:
            raise ValueError("a Read Memory block holds 1..256 bytes")
        self._command(CMD_READ_MEMORY, "read-memory")
        self._write(address_frame(address), "read-memory")
        if not self._expect_ack("read-memory"):
            raise EcuRejected("read-memory", f"bootloader refused address 0x{address:08X}")
        n = size - 1
        self._write(bytes([n, n ^ 0xFF]), "read-memory")
        if not self._expect_ack("read-memory"):
            raise EcuRejected("read-memory", f"bootloader refused to read {size} bytes")
        return self._read(size, self.config.ack_timeout, "read-memory")

    def go(self, address: int | None = None) -> None:
        """Jump to the application (its vector table at ``address``)."""
        target = self.config.flash_base if address is None else address
        self._command(CMD_GO, "go")
        self._write(address_frame(target), "go")
        if not self._expect_ack("go"):
            raise EcuRejected("go", f"bootloader refused to jump to 0x{target:08X}")
        self._synced = False

    # -- EcuFlasher ---------------------------------------------------------------

    def flash(self, image: BinaryIO, length: int, progress: ProgressCallback | None = None) -> None:
        if length <= 0:
            raise FlashError("erase", "empty image")
        _version, commands = self.get()
        if CMD_EXTENDED_ERASE not in commands:
            raise EcuRejected("get", "this bootloader has no Extended Erase (0x44) command")
        first_page = 0
        page_count = (length + self.config.page_size - 1) // self.config.page_size
        self.extended_erase(list(range(first_page, first_page + page_count)))
        crc = 0
        done = 0
        while done < length:
            block = read_exactly(image, min(MAX_BLOCK, length - done), "write-memory")
            self.write_memory(self.config.flash_base + done, block)
            crc = zlib.crc32(block, crc)
            done += len(block)
            if progress is not None:
                progress(done, length)
        device_crc = self._read_back_crc(length)
        if device_crc != crc:
            raise VerificationFailed(
                "read-back", f"flash holds CRC-32 {device_crc:08x}, the image has {crc:08x}"
            )
        if self.config.start_application:
            self.go()

    def _read_back_crc(self, length: int) -> int:
        crc = 0
        for offset in range(0, length, MAX_BLOCK):
            crc = zlib.crc32(
                self.read_memory(self.config.flash_base + offset, min(MAX_BLOCK, length - offset)),
                crc,
            )
        return crc

    def verify(self, image: BinaryIO, length: int) -> None:
        """Read the flash back (the bootloader must still be running) and compare."""
        for offset in range(0, length, MAX_BLOCK):
            size = min(MAX_BLOCK, length - offset)
            expected = read_exactly(image, size, "verify")
            actual = self.read_memory(self.config.flash_base + offset, size)
            if actual != expected:
                position = next(i for i in range(size) if actual[i] != expected[i])
                raise VerificationFailed(
                    "verify",
                    f"flash differs from the image at 0x{self.config.flash_base + offset + position:08X}",
                )
