"""Matchers: which new bytes come from which old bytes, as bsdiff-style records.

A *triplet* is what a bsdiff section encodes: control records ``(add, copy,
seek)`` (output ``add`` bytes = old bytes + diff bytes, then ``copy`` bytes
from the extra stream, then move the old position by ``add + seek``), the diff
stream and the extra stream. Two libraries find the matches:

* bsdiff4 (suffix sorting, Colin Percival's bsdiff), our baseline;
* HDiffPatch's cover search, as shipped in detools (``detools.hdiffpatch``):
  often a little smaller on firmware with many small moves, and much faster on
  long uniform runs. Its "covers" ``(old position, new position, length)`` are
  bsdiff's approximate matches under another name; we read them from its
  uncompressed serialization and re-encode them as records, so the applier
  needs neither library.

The creator tries both where affordable and keeps the smaller encoded section.
"""

from __future__ import annotations

from dataclasses import dataclass

import bsdiff4

Record = tuple[int, int, int]  # (add, copy, seek)

_NEGATE = bytes((-b) & 0xFF for b in range(256))


@dataclass
class Triplet:
    records: list[Record]
    diff: bytes
    extra: bytes


def _decode_offtout(raw: bytes) -> int:
    value = int.from_bytes(raw, "little")
    return -(value & ((1 << 63) - 1)) if value & (1 << 63) else value


def bsdiff_triplet(base: bytes, data: bytes) -> Triplet:
    """bsdiff4's records, diff and extra streams for ``base`` -> ``data``."""
    control, diff, extra = bsdiff4.core.diff(base, data)
    records = [
        (
            _decode_offtout(control[i : i + 8]),
            _decode_offtout(control[i + 8 : i + 16]),
            _decode_offtout(control[i + 16 : i + 24]),
        )
        for i in range(0, len(control), 24)
    ]
    return Triplet(records, diff, extra)


def hdiffpatch_available() -> bool:
    try:
        from detools import hdiffpatch  # noqa: F401
    except ImportError:
        return False
    return True


def hdiffpatch_covers(base: bytes, data: bytes, match_score: int = 6) -> list[tuple[int, int, int]]:
    """HDiffPatch's covers ``(old position, new position, length)``, in new order."""
    from detools import hdiffpatch

    serialized: bytes = hdiffpatch.create_patch(base, data, match_score, 0, 2)
    if not serialized.startswith(b"HDIFF13&"):
        raise ValueError("unexpected HDiffPatch serialization")
    pos = serialized.index(b"\0", 8) + 1  # after the (empty) compressor name
    sizes = []
    for _ in range(11):
        value, pos = _hdiff_uint(serialized, pos)
        sizes.append(value)
    count = sizes[2]
    covers = []
    last_old = last_new = 0
    for _ in range(count):
        distance, negative, pos = _hdiff_tagged_uint(serialized, pos)
        old = last_old - distance if negative else last_old + distance
        gap, pos = _hdiff_uint(serialized, pos)
        length, pos = _hdiff_uint(serialized, pos)
        new = last_new + gap
        covers.append((old, new, length))
        last_old, last_new = old + length, new + length
    return covers


def _hdiff_uint(buf: bytes, pos: int) -> tuple[int, int]:
    # HDiffPatch packUInt: 7-bit groups, most significant first, high bit = more.
    value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos


def _hdiff_tagged_uint(buf: bytes, pos: int) -> tuple[int, bool, int]:
    # packUIntWithTag(…, tag, 1 bit): tag in bit 7 of the first byte, 6 value bits.
    byte = buf[pos]
    pos += 1
    negative = bool(byte & 0x80)
    value = byte & 0x3F
    more = byte & 0x40
    while more:
        byte = buf[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
        more = byte & 0x80
    return value, negative, pos


def subtract(new: bytes, old: bytes) -> bytes:
    """``new - old`` byte-wise modulo 256 (bsdiff's diff bytes), in C speed."""
    if not new:
        return b""
    negated = old.translate(_NEGATE)
    control = bsdiff4.core.encode_int64(len(new)) + bytes(16)
    result: bytes = bsdiff4.core.patch(new, len(new), control, negated, b"")
    return result


def hdiffpatch_triplet(base: bytes, data: bytes, match_score: int = 6) -> Triplet:
    """HDiffPatch's covers as bsdiff records, diff and extra streams."""
    covers = hdiffpatch_covers(base, data, match_score)
    records: list[Record] = []
    diffs: list[bytes] = []
    extras: list[bytes] = []
    first_new = covers[0][1] if covers else len(data)
    first_old = covers[0][0] if covers else 0
    if first_new or first_old:  # literal bytes before the first cover, and a seek to it
        records.append((0, first_new, first_old))
        extras.append(data[:first_new])
    for index, (old, new, length) in enumerate(covers):
        following = covers[index + 1] if index + 1 < len(covers) else None
        next_new = following[1] if following else len(data)
        next_old = following[0] if following else old + length
        records.append((length, next_new - new - length, next_old - old - length))
        diffs.append(subtract(data[new : new + length], base[old : old + length]))
        extras.append(data[new + length : next_new])
    return Triplet(records, b"".join(diffs), b"".join(extras))
