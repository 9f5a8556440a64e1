"""Read the firmware-info block embedded in an Uptake firmware image.

Every sample image in ``firmware-samples/`` carries one 64-byte block, so a
bootloader or the OTA health check can tell what an image is without
executing it (C layout in ``firmware-samples/src/common/uptake_fw_info.h``,
little-endian, no padding)::

    char     magic[8];        "UPTKFWI1", no NUL
    char     hardware_id[32]; NUL padded
    char     version[16];     NUL padded
    uint32_t self_test;       0 = power-on self-test passes, else a failure code
    uint32_t build_flags;     per-image feature bits; bit 31 = fault injected

Workflow: :func:`read_firmware_info` streams the file in chunks looking for
the magic (images can be large; nothing is held whole in memory), insists on
exactly one complete block, and decodes it into a :class:`FirmwareInfo`.
Anything else (no block, a block cut off by the end of the file, two blocks,
malformed strings) raises :class:`FirmwareInfoError` naming the file and the
problem.

The module doubles as a health-check command with no dependency beyond the
standard library::

    python -m uptake.firmware_info selftest IMAGE [--hardware-id ID]
    python -m uptake.firmware_info show IMAGE [--json]

``selftest`` exits 0 when the block is present, matches ``--hardware-id``
(if given) and reports ``self_test == 0``; otherwise it prints one line to
stderr saying why and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import BinaryIO

from signing.exceptions import UptakeError

MAGIC = b"UPTKFWI1"
_BLOCK = struct.Struct("<8s32s16sII")
BLOCK_SIZE = _BLOCK.size  # 64

FAULT_INJECTED_FLAG = 1 << 31
"""``build_flags`` bit set in images built to fail their self-test on purpose."""

_CHUNK_SIZE = 64 * 1024


class FirmwareInfoError(UptakeError):
    """The firmware-info block of an image is missing or unusable."""


@dataclass(frozen=True)
class FirmwareInfo:
    """What an image's firmware-info block says about it."""

    hardware_id: str
    version: str
    self_test: int
    build_flags: int

    @property
    def self_test_passed(self) -> bool:
        """True when the image's power-on self-test reports success (code 0)."""
        return self.self_test == 0


def read_firmware_info(path: str | os.PathLike[str]) -> FirmwareInfo:
    """Find and decode the single firmware-info block in the image at ``path``.

    Raises:
        FirmwareInfoError: the file cannot be read, has no block, has more
            than one, ends inside the block, or the block is malformed.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as image:
            offsets = _find_magic(image)
            if not offsets:
                raise FirmwareInfoError(
                    f"{name}: no firmware-info block (magic {MAGIC.decode()!r} not found)"
                )
            if len(offsets) > 1:
                raise FirmwareInfoError(
                    f"{name}: a second firmware-info block at 0x{offsets[1]:x} "
                    f"(first at 0x{offsets[0]:x}); expected exactly one"
                )
            image.seek(offsets[0])
            block = image.read(BLOCK_SIZE)
    except OSError as exc:
        raise FirmwareInfoError(f"{name}: cannot read image: {exc.strerror or exc}") from exc

    if len(block) < BLOCK_SIZE:
        raise FirmwareInfoError(
            f"{name}: firmware-info block at 0x{offsets[0]:x} is truncated "
            f"({len(block)} of {BLOCK_SIZE} bytes before end of file)"
        )
    return _decode_block(name, offsets[0], block)


def _find_magic(image: BinaryIO) -> list[int]:
    """Offsets of the first two occurrences of MAGIC, reading chunk by chunk.

    Two are enough to reject a duplicate; stopping there keeps a hostile
    file made of nothing but magics cheap.
    """
    offsets: list[int] = []
    carry = b""  # the last len(MAGIC) - 1 bytes: a magic may straddle two chunks
    carry_start = 0  # file offset of carry[0]
    while chunk := image.read(_CHUNK_SIZE):
        window = carry + chunk
        position = window.find(MAGIC)
        while position != -1:
            offsets.append(carry_start + position)
            if len(offsets) == 2:
                return offsets
            position = window.find(MAGIC, position + 1)
        keep = min(len(window), len(MAGIC) - 1)
        carry_start += len(window) - keep
        carry = window[len(window) - keep :]
    return offsets


def _decode_block(name: str, offset: int, block: bytes) -> FirmwareInfo:
    _magic, raw_hardware_id, raw_version, self_test, build_flags = _BLOCK.unpack(block)
    where = f"{name}: firmware-info block at 0x{offset:x}"
    return FirmwareInfo(
        hardware_id=_decode_field(where, "hardware_id", raw_hardware_id),
        version=_decode_field(where, "version", raw_version),
        self_test=self_test,
        build_flags=build_flags,
    )


def _decode_field(where: str, field: str, raw: bytes) -> str:
    """A NUL-padded printable-ASCII string: non-empty, only NULs after it."""
    text, _, padding = raw.partition(b"\0")
    if padding.strip(b"\0"):
        raise FirmwareInfoError(f"{where}: {field} has bytes after its NUL terminator")
    if not text:
        raise FirmwareInfoError(f"{where}: {field} is empty")
    if not all(0x21 <= byte <= 0x7E for byte in text):
        raise FirmwareInfoError(f"{where}: {field} {text!r} is not printable ASCII")
    return text.decode("ascii")


# --- command line ---------------------------------------------------------


def _selftest(args: argparse.Namespace) -> int:
    info = read_firmware_info(args.image)
    if args.hardware_id is not None and info.hardware_id != args.hardware_id:
        _fail(
            f"{args.image}: built for hardware id {info.hardware_id!r}, expected {args.hardware_id!r}"
        )
        return 1
    if not info.self_test_passed:
        _fail(
            f"{args.image}: {info.hardware_id} {info.version} fails its power-on self-test "
            f"(code 0x{info.self_test:08x})"
        )
        return 1
    print(f"{args.image}: {info.hardware_id} {info.version} passes its power-on self-test")
    return 0


def _show(args: argparse.Namespace) -> int:
    info = read_firmware_info(args.image)
    if args.json:
        print(json.dumps(asdict(info), sort_keys=True))
    else:
        print(
            f"{info.hardware_id} {info.version} "
            f"self_test=0x{info.self_test:08x} build_flags=0x{info.build_flags:08x}"
        )
    return 0


def _fail(message: str) -> None:
    print(f"selftest failed: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m uptake.firmware_info",
        description="Read the firmware-info block embedded in an Uptake firmware image.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    selftest = commands.add_parser(
        "selftest",
        help="health check: exit 0 if the image's self-test passes, else 1",
        description=(
            "Exit 0 if IMAGE has a firmware-info block, built for --hardware-id "
            "(when given), whose self_test field is 0. Otherwise print why on "
            "stderr and exit 1."
        ),
    )
    selftest.add_argument("image", metavar="IMAGE", help="firmware image file (or slot device)")
    selftest.add_argument("--hardware-id", help="the hardware id this ECU expects")
    selftest.set_defaults(run=_selftest)

    show = commands.add_parser(
        "show",
        help="print hardware id, version, self_test and build_flags",
        description="Print what IMAGE's firmware-info block says.",
    )
    show.add_argument("image", metavar="IMAGE", help="firmware image file")
    show.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    show.set_defaults(run=_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except FirmwareInfoError as exc:
        if args.command == "selftest":
            _fail(str(exc))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
