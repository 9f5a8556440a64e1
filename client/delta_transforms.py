"""Reversing a ``transformed`` delta's transforms while it is applied.

The creator diffs *transformed* images (compressed streams expanded, machine
code with relative branch targets made absolute) because a small change in a
compressed kernel changes every compressed byte after it, and an inserted
function changes every relative call across it. The applier:

1. reads the two region maps (:mod:`signing.delta_format`) and checks them
   against the header's lengths and the bounds, before any work;
2. builds the transformed base in a scratch file: raw regions copied, filter
   regions BCJ-encoded (:mod:`signing.branch_filters`), stream regions decompressed to exactly
   their announced size (decoders run with memory limits);
3. applies the inner delta against that file into a :class:`RecompressingSink`
   that turns the transformed result back into the image on the fly: filter
   regions BCJ-decoded, stream regions recompressed with the parameters the
   creator verified (gzip through zlib, xz through liblzma, zstd through
   libzstd).

A recompressor that does not reproduce the compressed bytes exactly (another
library version, say) ends in :class:`DeltaResultMismatch`, and the caller
falls back to the full image. Memory: the scratch base is on disk (at most
``MAX_EXPANDED_TOTAL``); decoders are bounded by their dictionary or window,
encoders by :func:`recompress_memory` (a 32 MiB-dictionary xz kernel needs
about 350 MiB), which must fit the caller's limit.
"""

from __future__ import annotations

import lzma
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from client.delta_apply import DeltaCorrupt, DeltaResultMismatch
from signing import delta_format as fmt
from signing.branch_filters import branch_decoder, branch_encoder
from signing.compressor_versions import library_name

_PIECE = 1 << 20


class _Payload(Protocol):
    remaining: int

    def read(self, size: int = -1) -> bytes: ...
    def read_exact(self, size: int, what: str) -> bytes: ...
    def read_varint(self, what: str) -> int: ...


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Region:
    """One region of an image map: ``length`` image bytes, ``expanded`` transformed bytes."""

    kind: int
    length: int
    expanded: int
    arch: int = fmt.ARCH_NONE
    codec: int = 0
    params: tuple[int, ...] = ()
    library: str = ""
    blob: bytes = b""


def read_map(payload: _Payload, what: str, image_length: int) -> list[Region]:
    """A region list, checked: it covers exactly ``image_length`` bytes, within the bounds."""
    count = payload.read_varint(f"{what} count")
    if count > fmt.MAX_REGIONS:
        raise DeltaCorrupt(f"{what}: {count} regions exceed {fmt.MAX_REGIONS}")
    regions = []
    covered = 0
    expanded = 0
    for index in range(count):
        where = f"{what} region {index}"
        kind = payload.read_exact(1, where)[0]
        if kind == fmt.REGION_RAW:
            length = payload.read_varint(where)
            region = Region(kind, length, length)
        elif kind == fmt.REGION_FILTER:
            length = payload.read_varint(where)
            region = Region(kind, length, length, _arch(payload.read_exact(1, where)[0], where))
        elif kind == fmt.REGION_STREAM:
            codec = payload.read_exact(1, where)[0]
            if codec not in fmt.STREAM_NAMES:
                raise DeltaCorrupt(f"{where}: unknown stream codec {codec}")
            length = payload.read_varint(where)
            size = payload.read_varint(where)
            arch = payload.read_exact(1, where)[0]
            if arch != fmt.ARCH_NONE:
                _arch(arch, where)
            params, library, blob = _read_params(payload, where)
            region = Region(kind, length, size, arch, codec, params, library, blob)
        else:
            raise DeltaCorrupt(f"{where}: unknown region kind {kind}")
        covered += region.length
        expanded += region.expanded
        if covered > image_length or expanded > fmt.MAX_EXPANDED_TOTAL:
            raise DeltaCorrupt(f"{what}: regions exceed the image or the expansion bound")
        regions.append(region)
    if covered != image_length:
        raise DeltaCorrupt(f"{what}: regions cover {covered} of {image_length} bytes")
    return regions


def _arch(arch: int, where: str) -> int:
    if arch not in fmt.ARCH_NAMES:
        raise DeltaCorrupt(f"{where}: unknown architecture filter {arch}")
    return arch


def _read_params(payload: _Payload, where: str) -> tuple[tuple[int, ...], str, bytes]:
    count = payload.read_varint(where)
    if count > 16:
        raise DeltaCorrupt(f"{where}: {count} parameters")
    params = tuple(payload.read_varint(where) for _ in range(count))
    texts = []
    for _ in range(2):
        size = payload.read_varint(where)
        if size > fmt.MAX_STREAM_PARAMS:
            raise DeltaCorrupt(f"{where}: parameter of {size} bytes")
        texts.append(payload.read_exact(size, where))
    try:
        library = texts[0].decode("ascii")
    except UnicodeDecodeError:
        raise DeltaCorrupt(f"{where}: library name is not ASCII") from None
    return params, library, texts[1]


def expanded_length(regions: list[Region]) -> int:
    return sum(r.expanded for r in regions)


# --- filters -----------------------------------------------------------------


class _Encoder:
    """Streaming BCJ encoding of ``size`` bytes (relative branch targets made absolute)."""

    def __init__(self, arch: int, sink: _Sink):
        self._encoder = branch_encoder(arch)
        self._sink = sink

    def write(self, data: bytes) -> None:
        self._sink.write(self._encoder.encode(data))

    def finish(self) -> None:
        self._sink.write(self._encoder.flush())


class _Decoder:
    """Streaming BCJ decoding of ``size`` bytes."""

    def __init__(self, arch: int, size: int, sink: _Sink):
        self._decoder = branch_decoder(arch, size)
        self._sink = sink

    def write(self, data: bytes) -> None:
        self._sink.write(self._decoder.decode(data))

    def finish(self) -> None:
        pass


# --- decompression of base streams --------------------------------------------------


class _Bounded:
    """The next ``left`` bytes of ``stream`` as a file (what a zstd reader may consume)."""

    def __init__(self, stream: BinaryIO, left: int):
        self._stream = stream
        self.left = left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self._stream.read(size)
        self.left -= len(data)
        return data


def _expand_stream(old: BinaryIO, region: Region, sink: _Sink, where: str) -> None:
    """Decompress ``region.length`` bytes of ``old`` (at its position) to exactly ``expanded``.

    Output is produced at most ``_PIECE`` bytes at a time and never beyond the announced
    size; decoders run with their memory bounded (xz memlimit, zstd window limit).
    """
    produced = 0

    def emit(data: bytes) -> None:
        nonlocal produced
        produced += len(data)
        if produced > region.expanded:
            raise DeltaCorrupt(f"{where}: stream expands beyond {region.expanded} bytes")
        sink.write(data)

    source = _Bounded(old, region.length)
    ended = False
    try:
        if region.codec == fmt.STREAM_ZSTD:
            decoder = zstandard.ZstdDecompressor(max_window_size=1 << fmt.ZSTD_MAX_WINDOW_LOG)
            reader = decoder.stream_reader(
                cast(IO[bytes], source), read_size=1 << 16, read_across_frames=False
            )
            while chunk := reader.read(_PIECE):
                emit(chunk)
            ended = True
        elif region.codec == fmt.STREAM_GZIP:
            inflater = zlib.decompressobj(wbits=31)
            while data := source.read(1 << 16):
                while data:
                    emit(inflater.decompress(data, _PIECE))
                    data = inflater.unconsumed_tail
            emit(inflater.flush())
            ended = inflater.eof and not inflater.unused_data
        else:
            unxz = lzma.LZMADecompressor(
                format=lzma.FORMAT_XZ, memlimit=fmt.XZ_MAX_DICT + (16 << 20)
            )
            while data := source.read(1 << 16):
                emit(unxz.decompress(data, _PIECE))
                while not unxz.needs_input and not unxz.eof:
                    emit(unxz.decompress(b"", _PIECE))
            ended = unxz.eof and not unxz.unused_data
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError, OSError) as exc:
        raise DeltaCorrupt(f"{where}: cannot expand the base's stream: {exc}") from None
    if source.left:
        raise DeltaCorrupt(f"{where}: base image ends inside the stream")
    if not ended or produced != region.expanded:
        raise DeltaCorrupt(
            f"{where}: the base's stream expands to {produced} bytes, not {region.expanded}"
        )


def build_base(old: BinaryIO, regions: list[Region], out: BinaryIO) -> None:
    """Write the transformed base of ``old`` to ``out``."""
    old.seek(0)
    for index, region in enumerate(regions):
        where = f"base region {index}"
        sink: Any = out
        finisher: _Encoder | None = None
        if region.kind == fmt.REGION_FILTER or region.arch != fmt.ARCH_NONE:
            finisher = _Encoder(region.arch, out)
            sink = finisher
        if region.kind == fmt.REGION_STREAM:
            _expand_stream(old, region, sink, where)
        else:
            left = region.length
            while left:
                data = old.read(min(_PIECE, left))
                if not data:
                    raise DeltaCorrupt(f"{where}: base image ends early")
                sink.write(data)
                left -= len(data)
        if finisher is not None:
            finisher.finish()


# --- recompression of result streams --------------------------------------------------


def recompress_memory(region: Region) -> int:
    """Bytes a region's recompressor needs, from its parameters (never from the delta's word)."""
    if region.kind != fmt.REGION_STREAM:
        return 0
    if region.codec == fmt.STREAM_GZIP:
        return 1 << 20
    if region.codec == fmt.STREAM_XZ:
        _check, preset, _bcj, dict_size = _xz_params(region)
        # liblzma's match finders: hc4 (presets 0-3) about 7.5 x the dictionary, bt4 11.5 x.
        factor = 8 if (preset & 0x1F) <= 3 else 12
        return dict_size * factor + (8 << 20)
    level, _checksum, _content_size = _zstd_params(region)
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=region.expanded)
    return (4 << params.window_log) + (8 << 20)


def _xz_params(region: Region) -> tuple[int, int, int, int]:
    if len(region.params) != 4:
        raise DeltaCorrupt("xz stream: expected 4 parameters")
    check, preset, bcj_filter, dict_size = region.params
    if (
        check not in (lzma.CHECK_NONE, lzma.CHECK_CRC32, lzma.CHECK_CRC64, lzma.CHECK_SHA256)
        or (preset & 0x1F) > 9
        or preset & ~(0x1F | 0x80)
        or bcj_filter not in (0, lzma.FILTER_X86, lzma.FILTER_ARM, lzma.FILTER_ARMTHUMB)
        or not 4096 <= dict_size <= fmt.XZ_MAX_DICT
    ):
        raise DeltaCorrupt(f"xz stream: parameters {region.params} out of range")
    return check, preset, bcj_filter, dict_size


def _zstd_params(region: Region) -> tuple[int, int, int]:
    if len(region.params) != 3:
        raise DeltaCorrupt("zstd stream: expected 3 parameters")
    level, checksum, content_size = region.params
    if not 1 <= level <= 19 or checksum > 1 or content_size > 1:
        raise DeltaCorrupt(f"zstd stream: parameters {region.params} out of range")
    return level, checksum, content_size


def _gzip_params(region: Region) -> tuple[int, int, int]:
    if len(region.params) != 3 or not 10 <= len(region.blob) <= fmt.MAX_STREAM_PARAMS:
        raise DeltaCorrupt("gzip stream: expected 3 parameters and its header")
    level, mem_level, strategy = region.params
    if not 0 <= level <= 9 or not 1 <= mem_level <= 9 or strategy > 4:
        raise DeltaCorrupt(f"gzip stream: parameters {region.params} out of range")
    return level, mem_level, strategy


class _Recompressor:
    """Compresses one stream region's expanded bytes exactly as the creator verified."""

    def __init__(self, region: Region, sink: _Sink, where: str):
        self._sink = sink
        self._where = where
        self._region = region
        self._written = 0
        self._crc = 0
        self._size = 0
        if region.codec == fmt.STREAM_GZIP:
            level, mem_level, strategy = _gzip_params(region)
            self._deflate = zlib.compressobj(level, zlib.DEFLATED, -15, mem_level, strategy)
            self._emit(region.blob)
        elif region.codec == fmt.STREAM_XZ:
            check, preset, bcj_filter, dict_size = _xz_params(region)
            filters: list[dict[str, int]] = [{"id": bcj_filter}] if bcj_filter else []
            lzma2 = {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}
            self._xz = lzma.LZMACompressor(
                format=lzma.FORMAT_XZ, check=check, filters=[*filters, lzma2]
            )
        else:
            level, checksum, content_size = _zstd_params(region)
            compressor = zstandard.ZstdCompressor(
                level=level, write_checksum=bool(checksum), write_content_size=bool(content_size)
            )
            self._zstd = compressor.compressobj(size=region.expanded)

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._written += len(data)
        if self._written > self._region.length:
            raise DeltaResultMismatch(
                f"{self._where}: recompression with {library_name(self._region.codec)} does not "
                f"reproduce the {fmt.STREAM_NAMES[self._region.codec]} stream the delta was made "
                f"with ({self._region.library})"
            )
        self._sink.write(data)

    def write(self, data: bytes) -> None:
        codec = self._region.codec
        if codec == fmt.STREAM_GZIP:
            self._crc = zlib.crc32(data, self._crc)
            self._size += len(data)
            self._emit(self._deflate.compress(data))
        elif codec == fmt.STREAM_XZ:
            self._emit(self._xz.compress(data))
        else:
            self._emit(self._zstd.compress(data))

    def finish(self) -> None:
        codec = self._region.codec
        if codec == fmt.STREAM_GZIP:
            self._emit(self._deflate.flush())
            self._emit((self._crc & 0xFFFFFFFF).to_bytes(4, "little"))
            self._emit((self._size & 0xFFFFFFFF).to_bytes(4, "little"))
        elif codec == fmt.STREAM_XZ:
            self._emit(self._xz.flush())
        else:
            self._emit(self._zstd.flush())
        if self._written != self._region.length:
            raise DeltaResultMismatch(
                f"{self._where}: recompression gave {self._written} of {self._region.length} "
                f"bytes ({library_name(codec)}; made with {self._region.library})"
            )


class RecompressingSink:
    """Turns the transformed result back into the image, region by region, as it streams."""

    def __init__(self, regions: list[Region], sink: _Sink):
        self._regions = regions
        self._sink = sink
        self._index = -1
        self._left = 0
        self._stage: Any = None
        self._chain: list[Any] = []
        self._advance()

    def _advance(self) -> None:
        for stage in self._chain:
            stage.finish()
        self._chain = []
        self._index += 1
        while self._index < len(self._regions) and self._regions[self._index].expanded == 0:
            self._open(self._regions[self._index])
            for stage in self._chain:
                stage.finish()
            self._chain = []
            self._index += 1
        if self._index < len(self._regions):
            self._open(self._regions[self._index])
            self._left = self._regions[self._index].expanded

    def _open(self, region: Region) -> None:
        where = f"result region {self._index}"
        target: Any = self._sink
        chain: list[Any] = []
        if region.kind == fmt.REGION_STREAM:
            target = _Recompressor(region, target, where)
            chain.append(target)
        if region.kind == fmt.REGION_FILTER or region.arch != fmt.ARCH_NONE:
            target = _Decoder(region.arch, region.expanded, target)
            chain.insert(0, target)
        self._stage = target
        self._chain = chain

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._index >= len(self._regions):
                raise DeltaResultMismatch("the inner delta produces more than the result map")
            take = min(len(view), self._left)
            self._stage.write(bytes(view[:take]))
            view = view[take:]
            self._left -= take
            if not self._left:
                self._advance()

    def finish(self) -> None:
        if self._index < len(self._regions):
            raise DeltaResultMismatch("the inner delta ends before the result map does")


InnerApply = Callable[[str, Any, BinaryIO, int, int, Any, bool], None]


def apply_transformed(
    payload: Any,
    old: BinaryIO,
    header: fmt.DeltaHeader,
    sink: _Sink,
    *,
    scratch_dir: Path | str | None,
    memory_limit: int,
    apply_inner: InnerApply,
) -> None:
    """Apply a ``transformed`` payload: build the transformed base, apply, reverse transforms."""
    base_map = read_map(payload, "base map", header.base_length)
    result_map = read_map(payload, "result map", header.result_length)
    need = max((recompress_memory(r) for r in result_map), default=0)
    if need > memory_limit:
        raise DeltaCorrupt(
            f"recompressing needs about {need >> 20} MiB, more than the {memory_limit >> 20} MiB "
            "allowed here"
        )
    inner = payload.read_exact(1, "inner method")[0]
    if inner not in (1, 2, 3):
        raise DeltaCorrupt(f"unknown inner method {inner}")
    with tempfile.TemporaryFile(dir=scratch_dir, prefix=".uptake-delta-base-") as scratch:
        build_base(old, base_map, cast(BinaryIO, scratch))
        base_length = scratch.tell()
        scratch.flush()
        recompressing = RecompressingSink(result_map, sink)
        apply_inner(
            fmt.METHOD_NAMES[inner],
            payload,
            cast(BinaryIO, scratch),
            base_length,
            expanded_length(result_map),
            recompressing,
            True,
        )
        recompressing.finish()


__all__ = [
    "RecompressingSink",
    "Region",
    "apply_transformed",
    "library_name",
    "read_map",
    "recompress_memory",
]
