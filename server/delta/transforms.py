"""Transforms worth applying before diffing: expanded streams, filtered machine code.

A delta between two compressed images is as large as the compressed image,
because a change early in a compressed stream changes every byte after it.
Diffing the *expanded* streams instead, and having the applier recompress,
is what Google's archive-patcher does for APKs; it only works when the
applier can reproduce the compressed bytes exactly, so every stream is
verified here by recompressing it completely with the parameters found.

Executable code has the same problem at a smaller scale: an inserted function
changes the relative target of every call across it. BCJ filters (xz's, via
``pybcj``) rewrite relative branch targets as absolute ones first. Whether
that helps depends on the image, so the creator tries it as one more
candidate and keeps the smaller delta.

:func:`plan_transforms` returns the candidate transforms for a pair; each is a
:class:`TransformPlan` whose maps are encoded as the ``transformed`` method's
region lists (:mod:`signing.delta_format`) and which writes the transformed
images for the inner diff.
"""

from __future__ import annotations

import lzma
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from signing import delta_format as fmt
from signing.branch_filters import branch_encoder
from signing.compressor_versions import library_name

_MIN_STREAM = 16 << 10  # smaller streams are not worth their parameters
_MAX_STREAMS = 32
_MAX_CANDIDATE_OFFSETS = 256  # magic numbers tried per codec (random data holds some)
_SEARCH_SECONDS = 120.0
_PREFIX = 4 << 20  # expanded bytes compressed to test a parameter set before the full check

_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_ELF_ARCH = {
    3: fmt.ARCH_X86,
    62: fmt.ARCH_X86,
    40: fmt.ARCH_ARMT,
    20: fmt.ARCH_PPC,
    2: fmt.ARCH_SPARC,
    183: fmt.ARCH_ARM64,
}
ARCH_BY_NAME = {name: number for number, name in fmt.ARCH_NAMES.items()}
_XZ_BCJ_ARCH = {
    lzma.FILTER_X86: fmt.ARCH_X86,
    lzma.FILTER_ARM: fmt.ARCH_ARM,
    lzma.FILTER_ARMTHUMB: fmt.ARCH_ARMT,
}


@dataclass(frozen=True)
class Stream:
    """A compressed stream found in an image; ``params`` set when it recompresses exactly."""

    offset: int
    length: int
    codec: int
    expanded: bytes
    params: tuple[int, ...] | None = None
    blob: bytes = b""
    arch_hint: int = fmt.ARCH_NONE


@dataclass
class TransformPlan:
    """One candidate: how both images are transformed, and what to call it."""

    name: str
    old_streams: list[Stream] = field(default_factory=list)
    new_streams: list[Stream] = field(default_factory=list)
    old_arch: int = fmt.ARCH_NONE  # filter over the raw bytes of the whole image
    new_arch: int = fmt.ARCH_NONE
    stream_arch: int = fmt.ARCH_NONE  # filter over expanded stream content

    def encode_maps(self, old_length: int, new_length: int) -> bytes:
        return _encode_map(self.old_streams, old_length, self.old_arch, self.stream_arch, False) + (
            _encode_map(self.new_streams, new_length, self.new_arch, self.stream_arch, True)
        )

    def write_old(self, data: bytes, out: BinaryIO) -> None:
        _write_transformed(data, self.old_streams, self.old_arch, self.stream_arch, out)

    def write_new(self, data: bytes, out: BinaryIO) -> None:
        _write_transformed(data, self.new_streams, self.new_arch, self.stream_arch, out)


def plan_transforms(
    old: bytes, new: bytes, arch_hint: str | None = None, budget: float = _SEARCH_SECONDS
) -> list[TransformPlan]:
    """Candidate transforms for this pair (none when nothing applies)."""
    deadline = time.monotonic() + budget
    plans = []
    new_streams = [s for s in find_streams(new, deadline, reproduce=True) if s.params is not None]
    if new_streams:
        old_streams = find_streams(old, deadline, reproduce=False)
        # A stream compressed with a BCJ filter (an xz kernel) says its content is machine
        # code of that architecture: filtering it again after expansion is what made the
        # compressor's job easier, and it makes the diff's too (vmlinuz: 1 % smaller).
        inner_arch = next((s.arch_hint for s in new_streams if s.arch_hint), fmt.ARCH_NONE)
        name = "streams expanded"
        if inner_arch:
            name += f", {fmt.ARCH_NAMES[inner_arch]} branches absolute"
        plans.append(TransformPlan(name, old_streams, new_streams, stream_arch=inner_arch))
    arch = ARCH_BY_NAME.get(arch_hint or "", fmt.ARCH_NONE) or detect_arch(new)
    if arch and not new_streams:
        plans.append(
            TransformPlan(f"{fmt.ARCH_NAMES[arch]} branches absolute", old_arch=arch, new_arch=arch)
        )
    return plans


def detect_arch(data: bytes) -> int:
    """The BCJ filter for an ELF image's machine (0 for other images)."""
    if len(data) < 20 or data[:4] != b"\x7fELF":
        return fmt.ARCH_NONE
    little = data[5] == 1
    machine = int.from_bytes(data[18:20], "little" if little else "big")
    arch = _ELF_ARCH.get(machine, fmt.ARCH_NONE)
    if arch == fmt.ARCH_PPC and little:
        return fmt.ARCH_NONE  # xz's PowerPC filter is big-endian only
    return arch


# --- finding streams ---------------------------------------------------------------


def _offsets(data: bytes, magic: bytes) -> Iterator[int]:
    pos = data.find(magic)
    count = 0
    while pos >= 0 and count < _MAX_CANDIDATE_OFFSETS:
        yield pos
        count += 1
        pos = data.find(magic, pos + 1)


def find_streams(data: bytes, deadline: float, *, reproduce: bool) -> list[Stream]:
    """Non-overlapping compressed streams of ``data``; with ``reproduce``, their parameters."""
    found: list[Stream] = []
    candidates = sorted(
        [(o, fmt.STREAM_XZ) for o in _offsets(data, _XZ_MAGIC)]
        + [(o, fmt.STREAM_GZIP) for o in _offsets(data, _GZIP_MAGIC)]
        + [(o, fmt.STREAM_ZSTD) for o in _offsets(data, _ZSTD_MAGIC)]
    )
    end = 0
    for offset, codec in candidates:
        if offset < end or len(found) >= _MAX_STREAMS or time.monotonic() > deadline:
            continue
        stream = _decode(data, offset, codec)
        if stream is None or stream.length < _MIN_STREAM:
            continue
        if reproduce:
            stream = _reproduce(data, stream, deadline)
        found.append(stream)
        end = offset + stream.length
    return found


def _decode(data: bytes, offset: int, codec: int) -> Stream | None:
    """The stream starting at ``offset`` if it decodes cleanly (bounded output)."""
    limit = fmt.MAX_EXPANDED_TOTAL // 4
    try:
        if codec == fmt.STREAM_GZIP:
            inflater = zlib.decompressobj(wbits=31)
            expanded = inflater.decompress(data[offset:], limit)
            if not inflater.eof:
                return None
            length = len(data) - offset - len(inflater.unused_data)
            return Stream(offset, length, codec, expanded)
        if codec == fmt.STREAM_XZ:
            unxz = lzma.LZMADecompressor(
                format=lzma.FORMAT_XZ, memlimit=fmt.XZ_MAX_DICT + (16 << 20)
            )
            expanded = unxz.decompress(data[offset:], limit)
            if not unxz.eof:
                return None
            length = len(data) - offset - len(unxz.unused_data)
            return Stream(offset, length, codec, expanded)
        unzstd = zstandard.ZstdDecompressor(max_window_size=1 << fmt.ZSTD_MAX_WINDOW_LOG)
        obj = unzstd.decompressobj()
        expanded = obj.decompress(data[offset : offset + limit])
        if not obj.eof or len(expanded) > limit:
            return None
        length = min(len(data), offset + limit) - offset - len(obj.unused_data)
        return Stream(offset, length, codec, expanded)
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError, MemoryError):
        return None


def _reproduce(data: bytes, stream: Stream, deadline: float) -> Stream:
    compressed = data[stream.offset : stream.offset + stream.length]
    if stream.codec == fmt.STREAM_GZIP:
        return _reproduce_gzip(compressed, stream, deadline)
    if stream.codec == fmt.STREAM_XZ:
        return _reproduce_xz(compressed, stream, deadline)
    return _reproduce_zstd(compressed, stream, deadline)


def _matches(compressed: bytes, make: object, expanded: bytes, prefix_only: bool) -> bool:
    compressor = make()  # type: ignore[operator]
    if prefix_only:
        out = compressor.compress(expanded[:_PREFIX])
        return not out or compressed.startswith(out)
    out = compressor.compress(expanded) + compressor.flush()
    return bool(out == compressed)


def _gzip_header_length(compressed: bytes) -> int | None:
    flags = compressed[3]
    pos = 10
    if flags & 0x04:
        pos += 2 + int.from_bytes(compressed[10:12], "little")
    for bit in (0x08, 0x10):
        if flags & bit:
            pos = compressed.index(b"\0", pos) + 1
    if flags & 0x02:
        pos += 2
    return pos if pos <= fmt.MAX_STREAM_PARAMS else None


def _reproduce_gzip(compressed: bytes, stream: Stream, deadline: float) -> Stream:
    header_length = _gzip_header_length(compressed)
    if header_length is None:
        return stream
    body = compressed[header_length:-8]
    for level in (6, 9, 1, 2, 3, 4, 5, 7, 8):
        for mem_level in (8, 9):
            if time.monotonic() > deadline:
                return stream

            def make(level: int = level, mem_level: int = mem_level) -> object:
                return zlib.compressobj(level, zlib.DEFLATED, -15, mem_level, 0)

            if _matches(body, make, stream.expanded, True) and _matches(
                body, make, stream.expanded, False
            ):
                return Stream(
                    stream.offset,
                    stream.length,
                    stream.codec,
                    stream.expanded,
                    (level, mem_level, 0),
                    compressed[:header_length],
                )
    return stream


def _xz_chain(compressed: bytes) -> tuple[int, int, int] | None:
    """(check, BCJ filter id or 0, LZMA2 dictionary) of a one-block xz stream we can redo."""
    check = compressed[7] & 0x0F
    size = (compressed[12] + 1) * 4
    block = compressed[12 : 12 + size]
    flags = block[1]
    if flags & 0xC0:  # compressed/uncompressed sizes in the header: not what xz(1) writes
        return None
    filters = []
    pos = 2
    for _ in range((flags & 3) + 1):
        filter_id = block[pos]
        props_size = block[pos + 1]
        filters.append((filter_id, block[pos + 2 : pos + 2 + props_size]))
        pos += 2 + props_size
    if filters[-1][0] != 0x21 or len(filters[-1][1]) != 1 or len(filters) > 2:
        return None
    bits = filters[-1][1][0]
    if bits > 40:
        return None
    dict_size = 0xFFFFFFFF if bits == 40 else (2 | (bits & 1)) << (bits // 2 + 11)
    bcj_filter = 0
    if len(filters) == 2:
        if filters[0][0] not in _XZ_BCJ_ARCH or filters[0][1]:
            return None
        bcj_filter = filters[0][0]
    return check, bcj_filter, dict_size


def _reproduce_xz(compressed: bytes, stream: Stream, deadline: float) -> Stream:
    chain = _xz_chain(compressed)
    if chain is None:
        return stream
    check, bcj_filter, dict_size = chain
    if not 4096 <= dict_size <= fmt.XZ_MAX_DICT:
        return stream
    for preset in (6, 9, 6 | 0x80, 9 | 0x80, 0, 1, 2, 3, 4, 5, 7, 8):
        if time.monotonic() > deadline:
            return stream
        filters: list[dict[str, int]] = [{"id": bcj_filter}] if bcj_filter else []
        filters.append({"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size})

        def make(filters: list[dict[str, int]] = filters) -> object:
            return lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=check, filters=filters)

        if _matches(compressed, make, stream.expanded, True) and _matches(
            compressed, make, stream.expanded, False
        ):
            return Stream(
                stream.offset,
                stream.length,
                stream.codec,
                stream.expanded,
                (check, preset, bcj_filter, dict_size),
                arch_hint=_XZ_BCJ_ARCH.get(bcj_filter, fmt.ARCH_NONE),
            )
    return stream


def _reproduce_zstd(compressed: bytes, stream: Stream, deadline: float) -> Stream:
    descriptor = compressed[4]
    if descriptor & 0x03:  # a dictionary id: not reproducible without that dictionary
        return stream
    checksum = (descriptor >> 2) & 1
    content_size = 1 if descriptor >> 6 or descriptor & 0x20 else 0
    for level in (3, 19, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18):
        if time.monotonic() > deadline:
            return stream

        def make(level: int = level) -> object:
            compressor = zstandard.ZstdCompressor(
                level=level, write_checksum=bool(checksum), write_content_size=bool(content_size)
            )
            return compressor.compressobj(size=len(stream.expanded))

        if _matches(compressed, make, stream.expanded, True) and _matches(
            compressed, make, stream.expanded, False
        ):
            return Stream(
                stream.offset,
                stream.length,
                stream.codec,
                stream.expanded,
                (level, checksum, content_size),
            )
    return stream


# --- encoding maps, writing transformed images -----------------------------------------


def _regions(streams: list[Stream], length: int) -> Iterator[tuple[int, int, Stream | None]]:
    """(offset, length, stream or None for raw bytes) covering the image in order."""
    cursor = 0
    for stream in streams:
        if stream.offset > cursor:
            yield cursor, stream.offset - cursor, None
        yield stream.offset, stream.length, stream
        cursor = stream.offset + stream.length
    if cursor < length:
        yield cursor, length - cursor, None


def _encode_map(
    streams: list[Stream], length: int, arch: int, stream_arch: int, with_params: bool
) -> bytes:
    parts = list(_regions(streams, length))
    out = bytearray(fmt.encode_varint(len(parts)))
    for _, size, stream in parts:
        if stream is None:
            if arch:
                out += bytes([fmt.REGION_FILTER]) + fmt.encode_varint(size) + bytes([arch])
            else:
                out += bytes([fmt.REGION_RAW]) + fmt.encode_varint(size)
            continue
        out += bytes([fmt.REGION_STREAM, stream.codec])
        out += fmt.encode_varint(size) + fmt.encode_varint(len(stream.expanded))
        out += bytes([stream_arch])
        params = stream.params if with_params and stream.params is not None else ()
        out += fmt.encode_varint(len(params)) + b"".join(fmt.encode_varint(p) for p in params)
        library = library_name(stream.codec).encode("ascii") if with_params else b""
        blob = stream.blob if with_params else b""
        out += fmt.encode_varint(len(library)) + library + fmt.encode_varint(len(blob)) + blob
    return bytes(out)


def _bcj(arch: int, data: bytes) -> bytes:
    encoder = branch_encoder(arch)
    return bytes(encoder.encode(data) + encoder.flush())


def _write_transformed(
    data: bytes, streams: list[Stream], arch: int, stream_arch: int, out: BinaryIO
) -> None:
    for offset, size, stream in _regions(streams, len(data)):
        if stream is None:
            chunk = data[offset : offset + size]
            out.write(_bcj(arch, chunk) if arch else chunk)
        else:
            out.write(_bcj(stream_arch, stream.expanded) if stream_arch else stream.expanded)


def transformed_files(
    plan: TransformPlan, old: bytes, new: bytes, directory: Path
) -> tuple[Path, Path]:
    """Write the transformed images of ``plan`` into ``directory``."""
    old_path, new_path = directory / "old.t", directory / "new.t"
    with open(old_path, "wb") as out:
        plan.write_old(old, out)
    with open(new_path, "wb") as out:
        plan.write_new(new, out)
    return old_path, new_path


def recompress_memory(plan: TransformPlan) -> int:
    """What the vehicle's largest recompressor needs for ``plan`` (the applier's estimate)."""
    worst = 0
    for stream in plan.new_streams:
        assert stream.params is not None
        if stream.codec == fmt.STREAM_GZIP:
            need = 1 << 20
        elif stream.codec == fmt.STREAM_XZ:
            _check, preset, _bcj_filter, dict_size = stream.params
            need = dict_size * (8 if (preset & 0x1F) <= 3 else 12) + (8 << 20)
        else:
            params = zstandard.ZstdCompressionParameters.from_level(
                stream.params[0], source_size=len(stream.expanded)
            )
            need = (4 << params.window_log) + (8 << 20)
        worst = max(worst, need)
    return worst
