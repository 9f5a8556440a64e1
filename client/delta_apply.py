"""Apply an Uptake delta with bounded memory, streaming the result.

The agent calls this with ``old`` = the active slot (file or block device),
``patch`` = a delta it already verified as a TUF target, and ``out`` = the
inactive slot. The workflow is:

1. decode and validate the container header (:mod:`signing.delta_format`);
2. hash the payload and check it against the header, so a corrupted delta is
   refused (:class:`DeltaCorrupt`) before a byte is written;
3. hash ``old`` and check its length and sha256 (:class:`DeltaBaseMismatch`);
4. decode the payload and write the result sequentially to ``out``, hashing it
   on the way; the base is read with seeks, compressed streams are decoded
   incrementally, bsdiff's control/diff/extra streams are interpreted here in
   1 MiB pieces (``bsdiff4.patch`` would hold the whole image, ~3.3x);
5. check the result's length and sha256 (:class:`DeltaResultMismatch`).

Memory stays bounded whatever the image size: a few MiB of buffers, plus, for
zstd-dict segments only, their base (at most ``MAX_DICT_BASE``) and decoder
window. ``patch`` and ``old`` must be seekable; ``out`` is written strictly in
order. :func:`apply_delta_file` is the path-level form that writes the result
atomically, so a refused delta never leaves a half-written file.
"""

from __future__ import annotations

import bisect
import bz2
import hashlib
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

import bsdiff4
import zstandard

from signing import delta_format as fmt
from signing.atomic_file import atomic_writer
from signing.exceptions import UptakeError

_PIECE = 1 << 20  # unit of work for reads, adds and writes
# What the decompressors raise on bad input (bz2 reports it as OSError).
_DECODE_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError)
_INPUT_CHUNK = 1 << 16


class DeltaError(UptakeError):
    """A delta could not be applied; nothing trustworthy was produced."""


class DeltaCorrupt(DeltaError):
    """The delta is malformed, truncated, or does not match its own checksums."""


class DeltaBaseMismatch(DeltaError):
    """The delta was made for another base image than the one supplied."""


class DeltaResultMismatch(DeltaError):
    """Applying the delta did not produce the image its header promises."""


@dataclass(frozen=True)
class AppliedDelta:
    """Outcome of a successful application."""

    method: str
    result_sha256: str
    result_length: int


class _Sink(Protocol):
    def write(self, data: bytes) -> None: ...


def read_delta_header(patch: BinaryIO) -> fmt.DeltaHeader:
    """Decode the header at the start of ``patch``, as :class:`DeltaCorrupt` on error."""
    patch.seek(0)
    try:
        return fmt.decode_header(patch)
    except fmt.DeltaFormatError as exc:
        raise DeltaCorrupt(str(exc)) from exc


def apply_delta(
    old: BinaryIO, patch: BinaryIO, out: BinaryIO, *, old_is_slot: bool = False
) -> AppliedDelta:
    """Write to ``out`` the image that ``patch`` makes from ``old``, verified.

    With ``old_is_slot`` the base is the first ``base_length`` bytes of
    ``old`` (a slot partition is usually larger than the image in it);
    otherwise ``old`` must be exactly the base.

    Raises a :class:`DeltaError` subclass naming what failed. On error, ``out``
    may hold a partial image: callers writing to a slot mark it invalid; use
    :func:`apply_delta_file` for files.
    """
    header = read_delta_header(patch)
    if header.method not in ("bsdiff", "zstd-dict", "windows"):
        raise DeltaCorrupt(f"unknown delta method {header.method!r}")
    payload_start = patch.tell()
    try:
        fmt.check_payload(patch, header)
    except fmt.DeltaFormatError as exc:
        raise DeltaCorrupt(str(exc)) from exc
    _check_base(old, header, old_is_slot)

    sink = _VerifyingSink(out, header.result_length)
    payload = _Region(patch, payload_start, header.payload_length)
    old_length = header.base_length
    if header.method == "bsdiff":
        _apply_bsdiff(payload, _Base(old, [(0, old_length)]), header.result_length, sink)
    elif header.method == "zstd-dict":
        _apply_zstd(payload, _Base(old, [(0, old_length)]), header.result_length, sink)
    else:
        _apply_windows(payload, old, old_length, sink)
    if payload.remaining:
        raise DeltaCorrupt(f"{payload.remaining} unused payload bytes")

    if sink.length != header.result_length:
        raise DeltaResultMismatch(
            f"result is {sink.length} bytes, header says {header.result_length}"
        )
    digest = sink.sha256.digest()
    if digest != header.result_sha256:
        raise DeltaResultMismatch(
            f"result sha256 {digest.hex()} does not match header {header.result_sha256.hex()}"
        )
    return AppliedDelta(header.method, digest.hex(), sink.length)


def apply_delta_file(
    old_path: Path | str, patch_path: Path | str, new_path: Path | str
) -> AppliedDelta:
    """Apply ``patch_path`` to ``old_path`` and atomically create ``new_path``.

    ``new_path`` appears only once the result has been verified.
    """
    if Path(new_path).resolve() == Path(old_path).resolve():
        raise DeltaError("the output must not be the base image itself")
    with (
        open(old_path, "rb") as old,
        open(patch_path, "rb") as patch,
        atomic_writer(new_path) as out,
    ):
        return apply_delta(old, patch, out)


# --- verification -----------------------------------------------------------


def _check_base(old: BinaryIO, header: fmt.DeltaHeader, old_is_slot: bool) -> None:
    old.seek(0)
    digest = hashlib.sha256()
    length = 0
    # Read one byte past the base, to tell "longer" from "exact" for files.
    limit = header.base_length + (0 if old_is_slot else 1)
    while length < limit and (chunk := old.read(min(_PIECE, limit - length))):
        digest.update(chunk[: header.base_length - length])
        length += len(chunk)
    if length != header.base_length:
        size = f"{length} bytes" if length < header.base_length else "longer"
        raise DeltaBaseMismatch(
            f"base image length differs from the delta's base: {size}, "
            f"expected {header.base_length} bytes"
        )
    if digest.digest() != header.base_sha256:
        raise DeltaBaseMismatch(
            f"base image sha256 {digest.hexdigest()} is not the delta's base "
            f"{header.base_sha256.hex()}"
        )


class _VerifyingSink:
    """Writes the result in order, hashing it and refusing to overrun it."""

    def __init__(self, out: BinaryIO, limit: int):
        self._out = out
        self._limit = limit
        self.sha256 = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> None:
        if self.length + len(data) > self._limit:
            raise DeltaResultMismatch(
                f"payload produces more than the header's {self._limit} bytes"
            )
        self.sha256.update(data)
        self.length += len(data)
        self._out.write(data)


# --- payload input ----------------------------------------------------------


class _Region:
    """A byte range of the patch, read in order; shares the file with other regions."""

    def __init__(self, patch: BinaryIO, start: int, length: int):
        self._patch = patch
        self._pos = start
        self.remaining = length

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self.remaining:
            size = self.remaining
        if size == 0:
            return b""
        self._patch.seek(self._pos)
        data = self._patch.read(size)
        if len(data) != size:
            raise DeltaCorrupt("delta file shrank while being applied")
        self._pos += size
        self.remaining -= size
        return data

    def read_exact(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise DeltaCorrupt(f"payload truncated in {what}")
        return self.read(size)

    def sub(self, length: int, what: str) -> _Region:
        """Split off the next ``length`` bytes as their own region."""
        if length > self.remaining:
            raise DeltaCorrupt(f"{what} length {length} exceeds the payload")
        region = _Region(self._patch, self._pos, length)
        self._pos += length
        self.remaining -= length
        return region


class _Stream:
    """Incremental decompression of one region with bounded output per call."""

    def __init__(self, codec: int, region: _Region, what: str, zstd_window_log: int):
        self._what = what
        self._region = region
        self._codec = codec
        self._pending = b""
        self._decompressor: bz2.BZ2Decompressor | lzma.LZMADecompressor | None = None
        self._zstd: Callable[[int], bytes] | None = None
        if codec == fmt.CODEC_BZ2:
            self._decompressor = bz2.BZ2Decompressor()
        elif codec in (fmt.CODEC_LZMA2, fmt.CODEC_LZMA2_LC0):
            self._decompressor = lzma.LZMADecompressor(
                format=lzma.FORMAT_RAW, filters=fmt.lzma2_filters(codec)
            )
        elif codec == fmt.CODEC_ZSTD:
            reader = zstandard.ZstdDecompressor(max_window_size=1 << zstd_window_log).stream_reader(
                cast(IO[bytes], region), read_size=_INPUT_CHUNK, read_across_frames=False
            )
            self._zstd = reader.read
        elif codec != fmt.CODEC_STORED:
            raise DeltaCorrupt(f"{what}: unknown codec {codec}")

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` only at the end of the stream."""
        if self._codec == fmt.CODEC_STORED:
            return self._region.read(size)
        try:
            if self._zstd is not None:
                return self._zstd(size)
            return self._read_decompressed(size)
        except _DECODE_ERRORS as exc:
            raise DeltaCorrupt(f"{self._what}: cannot decompress: {exc}") from exc

    def _read_decompressed(self, size: int) -> bytes:
        decompressor = self._decompressor
        assert decompressor is not None
        while True:
            if decompressor.eof:
                if decompressor.unused_data or self._region.remaining:
                    raise DeltaCorrupt(f"{self._what}: data after the end of the stream")
                return b""
            feed = self._region.read(_INPUT_CHUNK) if decompressor.needs_input else b""
            if decompressor.needs_input and not feed:
                raise DeltaCorrupt(f"{self._what}: compressed stream truncated")
            data = decompressor.decompress(feed, max_length=size)
            if data:
                return data

    def read_exact(self, size: int) -> bytes:
        parts = []
        missing = size
        while missing:
            data = self.read(missing)
            if not data:
                raise DeltaCorrupt(f"{self._what}: stream ends {missing} bytes early")
            parts.append(data)
            missing -= len(data)
        return b"".join(parts)

    def finish(self) -> None:
        if self.read(1):
            raise DeltaCorrupt(f"{self._what}: unused data at the end of the stream")
        if self._region.remaining and self._codec != fmt.CODEC_ZSTD:
            raise DeltaCorrupt(f"{self._what}: unused bytes after the stream")


# --- base access --------------------------------------------------------------


class _Base:
    """The concatenation of old-image extents, read with seeks.

    Positions outside the base read as zeros (bsdiff adds nothing there).
    """

    def __init__(self, old: BinaryIO, extents: list[tuple[int, int]]):
        self._old = old
        self._extents = extents
        self._starts: list[int] = []
        total = 0
        for _, length in extents:
            self._starts.append(total)
            total += length
        self.length = total

    def read(self, pos: int, size: int) -> bytes:
        if pos >= self.length or pos + size <= 0:
            return bytes(size)
        parts = []
        if pos < 0:
            parts.append(bytes(-pos))
            size += pos
            pos = 0
        tail = max(0, pos + size - self.length)
        size -= tail
        index = bisect.bisect_right(self._starts, pos) - 1
        while size:
            old_offset, length = self._extents[index]
            skip = pos - self._starts[index]
            take = min(size, length - skip)
            self._old.seek(old_offset + skip)
            data = self._old.read(take)
            if len(data) != take:
                raise DeltaBaseMismatch("base image shorter than the delta's extents")
            parts.append(data)
            pos += take
            size -= take
            index += 1
        if tail:
            parts.append(bytes(tail))
        return b"".join(parts)


# --- segment decoders ---------------------------------------------------------


def _decode_offtout(raw: bytes) -> int:
    value = int.from_bytes(raw, "little")
    if value & (1 << 63):
        return -(value & ((1 << 63) - 1))
    return value


def _add_control(length: int) -> bytes:
    return bsdiff4.core.encode_int64(length) + bytes(16)  # type: ignore[no-any-return]


def _apply_bsdiff(section: _Region, base: _Base, length: int, sink: _Sink) -> None:
    heads = []
    for name in ("control", "diff", "extra"):
        codec, stream_length = fmt.STREAM_HEAD.unpack(
            section.read_exact(fmt.STREAM_HEAD.size, f"bsdiff {name} stream header")
        )
        heads.append((name, codec, stream_length))
    control, diff, extra = (
        _Stream(
            codec,
            section.sub(n, f"bsdiff {name} stream"),
            f"bsdiff {name} stream",
            fmt.ZSTD_STREAM_WINDOW_LOG,
        )
        for name, codec, n in heads
    )
    new_pos = 0
    old_pos = 0
    while record := control.read(fmt.BSDIFF_RECORD_SIZE):
        if len(record) < fmt.BSDIFF_RECORD_SIZE:
            record += control.read_exact(fmt.BSDIFF_RECORD_SIZE - len(record))
        add = _decode_offtout(record[:8])
        copy = _decode_offtout(record[8:16])
        seek = _decode_offtout(record[16:])
        if add < 0 or copy < 0:
            raise DeltaCorrupt(f"bsdiff control record out of range at output offset {new_pos}")
        if new_pos + add + copy > length:
            raise DeltaResultMismatch(
                f"bsdiff control record at output offset {new_pos} runs past the "
                f"{length} bytes the header announces"
            )
        done = 0
        while done < add:
            piece = min(_PIECE, add - done)
            delta = diff.read_exact(piece)
            old = base.read(old_pos + done, piece)
            sink.write(bsdiff4.core.patch(old, piece, _add_control(piece), delta, b""))
            done += piece
        new_pos += add
        old_pos += add
        done = 0
        while done < copy:
            piece = min(_PIECE, copy - done)
            sink.write(extra.read_exact(piece))
            done += piece
        new_pos += copy
        old_pos += seek
    for stream in (diff, extra):
        stream.finish()
    if new_pos != length:
        raise DeltaResultMismatch(f"bsdiff produced {new_pos} of the {length} bytes announced")


def _apply_zstd(region: _Region, base: _Base | None, length: int, sink: _Sink) -> None:
    if base is not None and (
        base.length > fmt.MAX_DICT_BASE or base.length + length > fmt.MAX_DICT_TOTAL
    ):
        raise DeltaCorrupt(
            f"zstd-dict segment of {base.length}+{length} bytes exceeds the bounded-memory limit"
        )
    try:
        if base is not None:
            dictionary = zstandard.ZstdCompressionDict(
                base.read(0, base.length), dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
            decompressor = zstandard.ZstdDecompressor(
                dict_data=dictionary, max_window_size=1 << fmt.ZSTD_DICT_MAX_WINDOW_LOG
            )
        else:
            decompressor = zstandard.ZstdDecompressor(
                max_window_size=1 << fmt.ZSTD_STREAM_WINDOW_LOG
            )
        reader = decompressor.stream_reader(
            cast(IO[bytes], region), read_size=_INPUT_CHUNK, read_across_frames=False
        )
    except zstandard.ZstdError as exc:
        raise DeltaCorrupt(f"zstd segment cannot be decoded: {exc}") from exc
    produced = 0
    while produced <= length:
        try:
            data = reader.read(min(_PIECE, length - produced) or 1)
        except _DECODE_ERRORS as exc:
            raise DeltaCorrupt(f"zstd segment cannot be decompressed: {exc}") from exc
        if not data:
            break
        if produced + len(data) > length:
            raise DeltaResultMismatch("zstd segment produces more bytes than announced")
        sink.write(data)
        produced += len(data)
    if produced != length:
        raise DeltaResultMismatch(f"zstd segment ends after {produced} of {length} bytes")


def _apply_stored(region: _Region, length: int, sink: _Sink) -> None:
    if region.remaining != length:
        raise DeltaCorrupt("stored segment length does not match its window")
    while region.remaining:
        sink.write(region.read(_PIECE))


class _FillingSink:
    """Interleaves a window's fills with the bytes its segment produces."""

    def __init__(self, sink: _Sink, fills: list[tuple[int, int, int]]):
        self._sink = sink
        self._fills = fills
        self._next = 0
        self.pos = 0

    def _emit_due_fills(self) -> None:
        while self._next < len(self._fills) and self._fills[self._next][0] == self.pos:
            _, length, byte = self._fills[self._next]
            block = bytes([byte]) * min(length, _PIECE)
            left = length
            while left:
                piece = min(left, len(block))
                self._sink.write(block[:piece])
                left -= piece
            self.pos += length
            self._next += 1

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._emit_due_fills()
            limit = self._fills[self._next][0] if self._next < len(self._fills) else None
            take = len(view) if limit is None else min(len(view), limit - self.pos)
            self._sink.write(bytes(view[:take]))
            self.pos += take
            view = view[take:]

    def finish(self) -> None:
        self._emit_due_fills()


def _apply_windows(payload: _Region, old: BinaryIO, old_length: int, sink: _Sink) -> None:
    (count,) = fmt.WINDOW_COUNT.unpack(payload.read_exact(fmt.WINDOW_COUNT.size, "window count"))
    if count > fmt.MAX_WINDOWS:
        raise DeltaCorrupt(f"window count {count} exceeds {fmt.MAX_WINDOWS}")
    for number in range(count):
        what = f"window {number}"
        (new_length,) = fmt.WINDOW_LENGTH.unpack(payload.read_exact(fmt.WINDOW_LENGTH.size, what))
        fills = [
            fmt.FILL.unpack(payload.read_exact(fmt.FILL.size, f"{what} fills"))
            for _ in range(_read_count(payload, f"{what} fill count"))
        ]
        extents = [
            fmt.EXTENT.unpack(payload.read_exact(fmt.EXTENT.size, f"{what} extents"))
            for _ in range(_read_count(payload, f"{what} extent count"))
        ]
        data_length = new_length
        cursor = 0
        for offset, length, _ in fills:
            if offset < cursor or length == 0 or offset + length > new_length:
                raise DeltaCorrupt(f"{what}: fill at {offset} overlaps or exceeds the window")
            cursor = offset + length
            data_length -= length
        for offset, length in extents:
            if offset + length > old_length:
                raise DeltaCorrupt(f"{what}: extent at {offset} exceeds the base image")
        method, segment_length = fmt.SEGMENT_HEAD.unpack(
            payload.read_exact(fmt.SEGMENT_HEAD.size, f"{what} segment header")
        )
        segment = payload.sub(segment_length, f"{what} segment")
        window_sink = _FillingSink(sink, fills)
        base = _Base(old, extents)
        if method == fmt.SEGMENT_BSDIFF:
            _apply_bsdiff(segment, base, data_length, window_sink)
        elif method == fmt.SEGMENT_ZSTD_DICT:
            _apply_zstd(segment, base, data_length, window_sink)
        elif method == fmt.SEGMENT_ZSTD:
            _apply_zstd(segment, None, data_length, window_sink)
        elif method == fmt.SEGMENT_STORED:
            _apply_stored(segment, data_length, window_sink)
        else:
            raise DeltaCorrupt(f"{what}: unknown segment method {method}")
        window_sink.finish()
        if window_sink.pos != new_length:
            raise DeltaCorrupt(f"{what}: produced {window_sink.pos} of {new_length} bytes")


def _read_count(payload: _Region, what: str) -> int:
    (count,) = fmt.LIST_COUNT.unpack(payload.read_exact(fmt.LIST_COUNT.size, what))
    if count > fmt.MAX_LIST_ENTRIES:
        raise DeltaCorrupt(f"{what} {count} exceeds {fmt.MAX_LIST_ENTRIES}")
    return int(count)


__all__ = [
    "AppliedDelta",
    "DeltaBaseMismatch",
    "DeltaCorrupt",
    "DeltaError",
    "DeltaResultMismatch",
    "apply_delta",
    "apply_delta_file",
    "read_delta_header",
]
