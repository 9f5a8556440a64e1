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
window. A ``transformed`` delta (compressed streams expanded, executable code
filtered before diffing, :mod:`client.delta_transforms`) also writes its
transformed base to a scratch file (at most ``MAX_EXPANDED_TOTAL`` bytes) and
runs each recompressor it names, whose memory the delta declares and the
caller bounds (``recompress_memory_limit``). ``patch`` and ``old`` must be seekable; ``out`` is written strictly in
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
_METHODS = ("bsdiff", "zstd-dict", "windows", "transformed")
DEFAULT_RECOMPRESS_MEMORY_LIMIT = fmt.MAX_RECOMPRESS_MEMORY
"""Memory a transformed delta's recompressors may declare (a vehicle with less lowers it)."""
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


class DeltaNotStreamable(DeltaError):
    """The delta cannot be turned into base-relative operations (it needs the base itself)."""


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
    old: BinaryIO,
    patch: BinaryIO,
    out: BinaryIO,
    *,
    old_is_slot: bool = False,
    scratch_dir: Path | str | None = None,
    recompress_memory_limit: int = DEFAULT_RECOMPRESS_MEMORY_LIMIT,
) -> AppliedDelta:
    """Write to ``out`` the image that ``patch`` makes from ``old``, verified.

    With ``old_is_slot`` the base is the first ``base_length`` bytes of
    ``old`` (a slot partition is usually larger than the image in it);
    otherwise ``old`` must be exactly the base.

    Raises a :class:`DeltaError` subclass naming what failed. On error, ``out``
    may hold a partial image: callers writing to a slot mark it invalid; use
    :func:`apply_delta_file` for files. ``scratch_dir`` holds a transformed
    delta's temporary base (default: the system's temporary directory).
    """
    header = read_delta_header(patch)
    thin = header.format_version == fmt.THIN_VERSION
    if header.method not in _METHODS or (header.method == "transformed" and not thin):
        raise DeltaCorrupt(f"unknown delta method {header.method!r}")
    payload_start = patch.tell()
    try:
        fmt.check_payload(patch, header)
    except fmt.DeltaFormatError as exc:
        raise DeltaCorrupt(str(exc)) from exc
    _check_base(old, header, old_is_slot)

    sink = _VerifyingSink(out, header.result_length)
    payload = _Region(patch, payload_start, header.payload_length)
    if header.method == "transformed":
        from client import delta_transforms

        delta_transforms.apply_transformed(
            payload,
            old,
            header,
            sink,
            scratch_dir=scratch_dir,
            memory_limit=recompress_memory_limit,
            apply_inner=_apply_method,
        )
    else:
        _apply_method(
            header.method, payload, old, header.base_length, header.result_length, sink, thin
        )
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


def _apply_method(
    method: str,
    payload: _Region,
    old: BinaryIO,
    old_length: int,
    result_length: int,
    sink: _Sink,
    compact: bool,
) -> None:
    """Decode a bsdiff, zstd-dict or windows payload against ``old_length`` bytes of ``old``."""
    target = sink if isinstance(sink, _Operations) else _Writer(sink)
    if method == "bsdiff":
        _apply_bsdiff(payload, _Base(old, [(0, old_length)]), result_length, target, compact)
    elif method == "zstd-dict":
        if isinstance(target, _Operations):
            raise DeltaNotStreamable("a zstd-dict delta needs its base as a whole")
        _apply_zstd(payload, _Base(old, [(0, old_length)]), result_length, target)
    elif method == "windows":
        _apply_windows(payload, old, old_length, target, compact)
    else:
        raise DeltaCorrupt(f"unknown delta method {method!r}")


def apply_delta_file(
    old_path: Path | str,
    patch_path: Path | str,
    new_path: Path | str,
    *,
    recompress_memory_limit: int = DEFAULT_RECOMPRESS_MEMORY_LIMIT,
) -> AppliedDelta:
    """Apply ``patch_path`` to ``old_path`` and atomically create ``new_path``.

    ``new_path`` appears only once the result has been verified; a transformed
    delta's scratch file lives next to it and is always removed.
    """
    if Path(new_path).resolve() == Path(old_path).resolve():
        raise DeltaError("the output must not be the base image itself")
    with (
        open(old_path, "rb") as old,
        open(patch_path, "rb") as patch,
        atomic_writer(new_path) as out,
    ):
        return apply_delta(
            old,
            patch,
            out,
            scratch_dir=Path(new_path).resolve().parent,
            recompress_memory_limit=recompress_memory_limit,
        )


def walk_delta(
    patch: BinaryIO,
    on_add: Callable[[int, bytes], None],
    on_copy: Callable[[bytes], None],
) -> fmt.DeltaHeader:
    """Report a delta's operations without its base: for an applier elsewhere (an ECU).

    Every output byte is reported in order, either as ``on_add(old_offset, diff)`` (the
    base's bytes at ``old_offset`` plus ``diff``, byte-wise modulo 256) or as
    ``on_copy(data)``. Methods that need the base as a whole (zstd-dict, transformed)
    raise :class:`DeltaNotStreamable`. The payload's checksum is checked first.
    """
    header = read_delta_header(patch)
    if header.method not in ("bsdiff", "windows"):
        raise DeltaNotStreamable(f"a {header.method} delta needs its base as a whole")
    payload_start = patch.tell()
    try:
        fmt.check_payload(patch, header)
    except fmt.DeltaFormatError as exc:
        raise DeltaCorrupt(str(exc)) from exc
    payload = _Region(patch, payload_start, header.payload_length)
    counter = _CountingOperations(on_add, on_copy, header.result_length)
    thin = header.format_version == fmt.THIN_VERSION
    _apply_method(
        header.method, payload, patch, header.base_length, header.result_length, counter, thin
    )
    if payload.remaining:
        raise DeltaCorrupt(f"{payload.remaining} unused payload bytes")
    if counter.length != header.result_length:
        raise DeltaResultMismatch(
            f"operations produce {counter.length} bytes, header says {header.result_length}"
        )
    return header


# --- verification -----------------------------------------------------------


def _check_base(old: BinaryIO, header: fmt.DeltaHeader, old_is_slot: bool) -> None:
    # A thin header names the base by a sha256 prefix: enough to tell a wrong base from a
    # corrupted delta; the result's full sha256 is what makes the output trustworthy.
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
    if digest.digest()[: len(header.base_sha256)] != header.base_sha256:
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

    def read_varint(self, what: str) -> int:
        value = 0
        for index in range(fmt.MAX_VARINT_BYTES):
            byte = self.read_exact(1, what)[0]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                if value >= 1 << 64:
                    raise DeltaCorrupt(f"{what}: varint exceeds 64 bits")
                return value
        raise DeltaCorrupt(f"{what}: varint too long")

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

    def __init__(
        self, codec: int, region: _Region, what: str, zstd_window_log: int, props: int = 0
    ):
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
        elif codec == fmt.CODEC_LZMA2_PROPS:
            try:
                filters = fmt.lzma2_props_filters(props)
            except ValueError as exc:
                raise DeltaCorrupt(f"{what}: {exc}") from None
            self._decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
            self._codec = fmt.CODEC_LZMA2
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

    def locate(self, pos: int, size: int) -> list[tuple[int | None, int]]:
        """``(old image offset or None for zeros, length)`` pieces of base ``[pos, pos+size)``."""
        pieces: list[tuple[int | None, int]] = []
        if pos < 0:
            pieces.append((None, min(size, -pos)))
            size -= pieces[-1][1]
            pos = 0
        while size > 0 and pos < self.length:
            index = bisect.bisect_right(self._starts, pos) - 1
            old_offset, length = self._extents[index]
            skip = pos - self._starts[index]
            take = min(size, length - skip)
            pieces.append((old_offset + skip, take))
            pos += take
            size -= take
        if size > 0:
            pieces.append((None, size))
        return pieces

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


# --- targets: what decoded operations turn into --------------------------------


class _Target(Protocol):
    """Receives a payload's operations: bytes of the base plus diff bytes, or literal bytes."""

    def add(self, base: _Base, pos: int, diff: bytes) -> None: ...
    def copy(self, data: bytes) -> None: ...
    def write(self, data: bytes) -> None: ...


class _Writer:
    """The applier's target: computes every byte and writes it to ``sink``."""

    def __init__(self, sink: _Sink):
        self._sink = sink

    def add(self, base: _Base, pos: int, diff: bytes) -> None:
        size = len(diff)
        self._sink.write(
            bsdiff4.core.patch(base.read(pos, size), size, _add_control(size), diff, b"")
        )

    def copy(self, data: bytes) -> None:
        self._sink.write(data)

    write = copy


class _Operations:
    """A target that reports operations in base-image coordinates instead of computing bytes.

    ``on_add(old_offset, diff)`` means "the base's bytes at ``old_offset`` plus ``diff``";
    bytes outside a window's base read as zeros, so they become literal ``diff`` bytes.
    """

    def __init__(
        self, on_add: Callable[[int, bytes], None], on_copy: Callable[[bytes], None]
    ) -> None:
        self._on_add = on_add
        self._on_copy = on_copy

    def add(self, base: _Base, pos: int, diff: bytes) -> None:
        done = 0
        for old_offset, length in base.locate(pos, len(diff)):
            piece = diff[done : done + length]
            if old_offset is None:
                self._on_copy(piece)
            else:
                self._on_add(old_offset, piece)
            done += length

    def copy(self, data: bytes) -> None:
        self._on_copy(data)

    write = copy


class _CountingOperations(_Operations):
    """Operations, refusing to produce more than the announced result length."""

    def __init__(
        self, on_add: Callable[[int, bytes], None], on_copy: Callable[[bytes], None], limit: int
    ) -> None:
        self.length = 0

        def counted_add(offset: int, diff: bytes) -> None:
            self._count(len(diff))
            on_add(offset, diff)

        def counted_copy(data: bytes) -> None:
            self._count(len(data))
            on_copy(data)

        super().__init__(counted_add, counted_copy)
        self._limit = limit

    def _count(self, size: int) -> None:
        self.length += size
        if self.length > self._limit:
            raise DeltaResultMismatch(
                f"operations produce more than the {self._limit} bytes announced"
            )


# --- segment decoders ---------------------------------------------------------


def _decode_offtout(raw: bytes) -> int:
    value = int.from_bytes(raw, "little")
    if value & (1 << 63):
        return -(value & ((1 << 63) - 1))
    return value


def _add_control(length: int) -> bytes:
    return bsdiff4.core.encode_int64(length) + bytes(16)  # type: ignore[no-any-return]


def _stream_heads(section: _Region, compact: bool) -> list[tuple[str, int, int, int]]:
    """``(name, codec, props, length)`` of a section's control, diff and extra streams."""
    heads = []
    for name in ("control", "diff", "extra"):
        what = f"bsdiff {name} stream header"
        if compact:
            codec = section.read_exact(1, what)[0]
            props = section.read_exact(1, what)[0] if codec == fmt.CODEC_LZMA2_PROPS else 0
            stream_length = section.read_varint(what)
        else:
            codec, stream_length = fmt.STREAM_HEAD.unpack(
                section.read_exact(fmt.STREAM_HEAD.size, what)
            )
            props = 0
        heads.append((name, codec, props, stream_length))
    return heads


class _ControlRecords:
    """bsdiff control records from a decompressed stream: int64 triples, or varints (compact)."""

    def __init__(self, stream: _Stream, compact: bool):
        self._stream = stream
        self._compact = compact
        self._buffer = b""
        self._pos = 0

    def next(self) -> tuple[int, int, int] | None:
        if not self._compact:
            record = self._stream.read(fmt.BSDIFF_RECORD_SIZE)
            if not record:
                return None
            if len(record) < fmt.BSDIFF_RECORD_SIZE:
                record += self._stream.read_exact(fmt.BSDIFF_RECORD_SIZE - len(record))
            return (
                _decode_offtout(record[:8]),
                _decode_offtout(record[8:16]),
                _decode_offtout(record[16:]),
            )
        if len(self._buffer) - self._pos < fmt.MAX_CONTROL_RECORD:
            self._buffer = self._buffer[self._pos :] + self._stream.read(_INPUT_CHUNK)
            self._pos = 0
            if not self._buffer:
                return None
        values = []
        for _ in range(3):
            try:
                value, self._pos = fmt.decode_varint(self._buffer, self._pos, "control")
            except fmt.DeltaFormatError:
                raise DeltaCorrupt("bsdiff control stream: truncated or malformed record") from None
            values.append(value)
        return values[0], values[1], fmt.unzigzag(values[2])


def _apply_bsdiff(
    section: _Region, base: _Base, length: int, target: _Target, compact: bool = False
) -> None:
    heads = _stream_heads(section, compact)
    control, diff, extra = (
        _Stream(
            codec,
            section.sub(n, f"bsdiff {name} stream"),
            f"bsdiff {name} stream",
            fmt.ZSTD_STREAM_WINDOW_LOG,
            props,
        )
        for name, codec, props, n in heads
    )
    records = _ControlRecords(control, compact)
    new_pos = 0
    old_pos = 0
    empty = 0
    while (record := records.next()) is not None:
        add, copy, seek = record
        if not add and not copy:
            # A record that writes nothing only moves the base position; a flood of them
            # would spin the CPU on a tiny compressed control stream.
            empty += 1
            if empty > 16:
                raise DeltaCorrupt(f"bsdiff control: empty records at output offset {new_pos}")
        else:
            empty = 0
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
            target.add(base, old_pos + done, diff.read_exact(piece))
            done += piece
        new_pos += add
        old_pos += add
        done = 0
        while done < copy:
            piece = min(_PIECE, copy - done)
            target.copy(extra.read_exact(piece))
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


class _FillingTarget:
    """Interleaves a window's fills with the operations its segment produces."""

    def __init__(self, target: _Target, fills: list[tuple[int, int, int]]):
        self._target = target
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
                self._target.copy(block[:piece])
                left -= piece
            self.pos += length
            self._next += 1

    def _room(self, size: int) -> int:
        """How many of the next ``size`` bytes go before the next fill."""
        self._emit_due_fills()
        limit = self._fills[self._next][0] if self._next < len(self._fills) else None
        return size if limit is None else min(size, limit - self.pos)

    def add(self, base: _Base, pos: int, diff: bytes) -> None:
        done = 0
        while done < len(diff):
            take = self._room(len(diff) - done)
            self._target.add(base, pos + done, diff[done : done + take])
            done += take
            self.pos += take

    def copy(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = self._room(len(view))
            self._target.copy(bytes(view[:take]))
            self.pos += take
            view = view[take:]

    write = copy

    def finish(self) -> None:
        self._emit_due_fills()


def _apply_windows(
    payload: _Region, old: BinaryIO, old_length: int, target: _Target, compact: bool = False
) -> None:
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
        window_sink = _FillingTarget(target, fills)
        base = _Base(old, extents)
        if method == fmt.SEGMENT_BSDIFF:
            _apply_bsdiff(segment, base, data_length, window_sink, compact)
        elif method == fmt.SEGMENT_ZSTD_DICT:
            if isinstance(target, _Operations):
                raise DeltaNotStreamable(f"{what}: a zstd-dict segment needs its base as a whole")
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
    "DeltaNotStreamable",
    "DeltaResultMismatch",
    "apply_delta",
    "apply_delta_file",
    "read_delta_header",
    "walk_delta",
]
