"""Planning: uniform runs (fills), and which old bytes each new window diffs against.

bsdiff's suffix sort degrades badly on long runs of one byte (zeroed free
space in filesystem images, 0xFF flash padding): seconds become hours, or the
C stack overflows. Runs of whole aligned ``FILL_BLOCK`` blocks are therefore
taken out of both sides: in the new image they become *fills* that the
applier writes directly, in the old image they are simply left out of the
base extents.

For images too large to diff in one piece, the new image is cut into aligned
windows and each gets a base of at most ``base_budget`` bytes, chosen from a
block index of the old image: every ``MATCH_BLOCK``-aligned block of the new
window is looked up among the old image's aligned blocks; the matched old
blocks, and the old bytes lying *between* consecutive matches (where a
changed file usually sits when both images were laid out in the same order),
form the candidate extents, densest first. A window without any match falls
back to the old bytes at the same offset shifted by the last seen diagonal.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

FILL_BLOCK = 4096
MATCH_BLOCK = 512
_READ_CHUNK = 8 << 20

Extent = tuple[int, int]  # (old offset, length)
Fill = tuple[int, int, int]  # (offset in window, length, byte)


def find_fills(data: bytes, start: int = 0) -> list[Fill]:
    """Runs of aligned ``FILL_BLOCK`` blocks of one repeated byte in ``data``.

    ``start`` is the absolute offset of ``data``; blocks are aligned on it.
    Offsets returned are relative to ``data``.
    """
    fills: list[Fill] = []
    first = (-start) % FILL_BLOCK
    view = memoryview(data)
    run_start = -1
    run_byte = -1
    pos = first
    while pos + FILL_BLOCK <= len(data):
        block = view[pos : pos + FILL_BLOCK]
        byte = block[0]
        uniform = block.tobytes().count(bytes((byte,))) == FILL_BLOCK
        if uniform and run_start >= 0 and byte == run_byte:
            pass
        else:
            if run_start >= 0:
                fills.append((run_start, pos - run_start, run_byte))
                run_start = -1
            if uniform:
                run_start, run_byte = pos, byte
        pos += FILL_BLOCK
    if run_start >= 0:
        fills.append((run_start, pos - run_start, run_byte))
    return fills


def strip_fills(data: bytes, fills: list[Fill]) -> bytes:
    """``data`` without its fills: what the window's segment must produce."""
    parts = []
    cursor = 0
    for offset, length, _ in fills:
        parts.append(data[cursor:offset])
        cursor = offset + length
    parts.append(data[cursor:])
    return b"".join(parts)


def without_uniform(old: BinaryIO, extents: list[Extent]) -> list[Extent]:
    """``extents`` of ``old`` minus their aligned uniform blocks."""
    kept: list[Extent] = []
    for offset, length in extents:
        old.seek(offset)
        data = old.read(length)
        cursor = 0
        for fill_offset, fill_length, _ in find_fills(data, offset):
            if fill_offset > cursor:
                kept.append((offset + cursor, fill_offset - cursor))
            cursor = fill_offset + fill_length
        if cursor < len(data):
            kept.append((offset + cursor, len(data) - cursor))
    return _merge(kept)


def read_extents(old: BinaryIO, extents: list[Extent]) -> bytes:
    """The base: ``extents`` of ``old`` concatenated."""
    parts = []
    for offset, length in extents:
        old.seek(offset)
        parts.append(old.read(length))
    return b"".join(parts)


def _merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for offset, length in extents:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((offset, length))
    return merged


def _blocks(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """Aligned non-uniform ``MATCH_BLOCK`` blocks of ``stream``: (offset, block)."""
    stream.seek(0)
    offset = 0
    while chunk := stream.read(_READ_CHUNK):
        for pos in range(0, len(chunk) - MATCH_BLOCK + 1, MATCH_BLOCK):
            block = chunk[pos : pos + MATCH_BLOCK]
            if block.count(block[:1]) != MATCH_BLOCK:
                yield offset + pos, block
        offset += len(chunk)


def index_old(old: BinaryIO) -> dict[int, int]:
    """Block hash -> first old offset holding that block."""
    index: dict[int, int] = {}
    for offset, block in _blocks(old):
        index.setdefault(hash(block), offset)
    return index


@dataclass(frozen=True)
class WindowPlan:
    """One window of the new image and the old extents it is diffed against."""

    new_offset: int
    new_length: int
    extents: list[Extent]


def plan_windows(
    old: BinaryIO,
    new: BinaryIO,
    old_length: int,
    new_length: int,
    window_size: int,
    base_budget: int,
) -> list[WindowPlan]:
    """Cut the new image into windows and choose each window's base extents."""
    index = index_old(old)
    matches: dict[int, list[tuple[int, int]]] = {}
    for offset, block in _blocks(new):
        old_offset = index.get(hash(block))
        if old_offset is not None:
            matches.setdefault(offset // window_size, []).append((offset, old_offset))
    del index
    plans = []
    diagonal = 0
    for number, start in enumerate(range(0, new_length, window_size)):
        length = min(window_size, new_length - start)
        found = matches.get(number, [])
        if found:
            diagonal = int(statistics.median(o - n for n, o in found))
        plans.append(
            WindowPlan(
                start,
                length,
                _choose_extents(found, start, length, diagonal, old_length, base_budget),
            )
        )
    return plans


def _choose_extents(
    found: list[tuple[int, int]],
    start: int,
    length: int,
    diagonal: int,
    old_length: int,
    budget: int,
) -> list[Extent]:
    # (density, old start, old end): matched blocks first, then the old bytes
    # between consecutive matches, then the diagonal fallback.
    candidates: list[tuple[float, int, int]] = []
    margin = FILL_BLOCK
    for _, o in found:
        candidates.append((2.0, o - margin, o + MATCH_BLOCK + margin))
    for (n1, o1), (n2, o2) in itertools.pairwise(found):
        gap_new = n2 - n1
        gap_old = o2 - o1
        if gap_new > MATCH_BLOCK and 0 < gap_old <= 4 * gap_new + (1 << 20):
            candidates.append((1.0, o1, o2 + MATCH_BLOCK))
    if found:
        n_first, o_first = found[0]
        n_last, o_last = found[-1]
        candidates.append((0.5, o_first - (n_first - start) - margin, o_first))
        candidates.append((0.5, o_last, o_last + (start + length - n_last) + margin))
    slack = max(0, (budget - length) // 2)
    candidates.append((0.1, start + diagonal - slack, start + diagonal + length + slack))

    chosen: list[Extent] = []
    total = 0
    for density in sorted({c[0] for c in candidates}, reverse=True):
        tier = sorted((max(0, lo), min(old_length, hi)) for d, lo, hi in candidates if d == density)
        for lo, hi in _merge_ranges(tier):
            for piece_lo, piece_hi in _subtract(lo, hi, chosen):
                room = budget - total
                if room <= 0:
                    break
                piece_hi = min(piece_hi, piece_lo + room)
                chosen.append((piece_lo, piece_hi - piece_lo))
                total += piece_hi - piece_lo
    chosen.sort()
    return _merge(chosen)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [lo, hi) ranges merged where they overlap or touch."""
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if hi <= lo:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(lo: int, hi: int, taken: list[Extent]) -> list[tuple[int, int]]:
    """Parts of [lo, hi) not covered by ``taken``."""
    pieces = [(lo, hi)] if hi > lo else []
    for offset, length in taken:
        t_lo, t_hi = offset, offset + length
        next_pieces = []
        for p_lo, p_hi in pieces:
            if t_hi <= p_lo or t_lo >= p_hi:
                next_pieces.append((p_lo, p_hi))
                continue
            if p_lo < t_lo:
                next_pieces.append((p_lo, t_lo))
            if t_hi < p_hi:
                next_pieces.append((t_hi, p_hi))
        pieces = next_pieces
    return pieces
