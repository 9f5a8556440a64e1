"""Payload encoders: bsdiff sections with recompressed streams, zstd frames.

Each function turns ``(base, data)`` bytes into the bytes of one segment as
laid out in :mod:`signing.delta_format`. bsdiff4 computes the control, diff
and extra streams; each stream is then compressed with every codec in
``codecs`` and the smallest kept, which is where most of the gain over
bsdiff4's own bz2 output comes from (xz with lc=0 suits the mostly-zero diff
stream). Compression parameters respect the applier's memory bounds (8 MiB
LZMA2 dictionary, zstd windows of at most 2**23 bytes for streams).

Thin containers hold *compact* sections (:func:`compact_section`): varint
control records, and LZMA2 with any lc/lp/pb (``CODEC_LZMA2_PROPS``); their
records come from bsdiff4 or HDiffPatch's cover search
(:mod:`server.delta.matching`), whichever encodes smaller.
"""

from __future__ import annotations

import bz2
import lzma
import math

import bsdiff4
import zstandard

from server.delta import matching
from signing import delta_format as fmt

ALL_CODECS = (fmt.CODEC_LZMA2_LC0, fmt.CODEC_LZMA2, fmt.CODEC_BZ2, fmt.CODEC_ZSTD)
FAST_CODECS = (fmt.CODEC_LZMA2_LC0, fmt.CODEC_LZMA2, fmt.CODEC_BZ2)
# Extra LZMA2 literal/position settings tried on compact sections: (lc, lp, pb).
# lc=0-2 suit the sparse diff stream and varint control, lp/pb=2 4-byte aligned code.
ALL_LZMA_PROPS = ((1, 0, 0), (2, 0, 0), (4, 0, 0), (0, 2, 2), (0, 1, 0), (2, 0, 2))
FAST_LZMA_PROPS = ((2, 0, 0),)
ALL_MATCH_SCORES = (1, 3, 6)
FAST_MATCH_SCORES = (1, 6)
_NAMED_PROPS = {
    fmt.lzma2_props_byte(0, 0, 0): fmt.CODEC_LZMA2_LC0,
    fmt.lzma2_props_byte(3, 0, 2): fmt.CODEC_LZMA2,
}


def compress(codec: int, data: bytes, props: int = 0) -> bytes:
    """Compress ``data`` so that the applier's ``codec`` decoder reads it back."""
    if codec == fmt.CODEC_LZMA2_PROPS:
        filters = fmt.lzma2_props_filters(props)
        filters[0]["preset"] = 9 | lzma.PRESET_EXTREME
        filters[0]["dict_size"] = min(fmt.LZMA2_DICT_SIZE, max(4096, len(data)))
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
    if codec == fmt.CODEC_STORED:
        return data
    if codec == fmt.CODEC_BZ2:
        return bz2.compress(data, 9)
    if codec in (fmt.CODEC_LZMA2, fmt.CODEC_LZMA2_LC0):
        filters = fmt.lzma2_filters(codec)
        filters[0]["preset"] = 9 | lzma.PRESET_EXTREME
        filters[0]["dict_size"] = min(fmt.LZMA2_DICT_SIZE, max(4096, len(data)))
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)
    if codec == fmt.CODEC_ZSTD:
        params = zstandard.ZstdCompressionParameters.from_level(
            22, window_log=fmt.ZSTD_STREAM_WINDOW_LOG, source_size=len(data)
        )
        return zstandard.ZstdCompressor(compression_params=params).compress(data)
    raise ValueError(f"unknown codec {codec}")


def compress_smallest(data: bytes, codecs: tuple[int, ...]) -> tuple[int, bytes]:
    """The ``(codec, bytes)`` giving the smallest output (stored when nothing helps)."""
    best = (fmt.CODEC_STORED, data)
    for codec in codecs:
        packed = compress(codec, data)
        if len(packed) < len(best[1]):
            best = (codec, packed)
    return best


def bsdiff_section(base: bytes, data: bytes, codecs: tuple[int, ...] = ALL_CODECS) -> bytes:
    """A bsdiff section making ``data`` from ``base``, streams recompressed."""
    control, diff, extra = bsdiff4.core.diff(base, data)
    heads = []
    bodies = []
    for stream in (control, diff, extra):
        codec, packed = compress_smallest(stream, codecs)
        heads.append(fmt.STREAM_HEAD.pack(codec, len(packed)))
        bodies.append(packed)
    return b"".join(heads + bodies)


_LARGE_STREAM = 2 << 20  # above: only the fast codec set (xz -9e costs ~1 s per MiB)


def _compact_candidates(codecs: tuple[int, ...], size: int) -> list[tuple[int, int]]:
    if size > _LARGE_STREAM:
        codecs = tuple(c for c in codecs if c in FAST_CODECS)
    extra = ALL_LZMA_PROPS if fmt.CODEC_ZSTD in codecs else FAST_LZMA_PROPS
    candidates = [(codec, 0) for codec in codecs]
    if codecs:
        candidates += [(fmt.CODEC_LZMA2_PROPS, fmt.lzma2_props_byte(*p)) for p in extra]
    return candidates


def compact_stream(data: bytes, codecs: tuple[int, ...]) -> tuple[bytes, bytes]:
    """``(stream head, compressed bytes)`` of the smallest encoding of one compact stream."""
    best = (fmt.CODEC_STORED, 0, data)
    for codec, props in _compact_candidates(codecs, len(data)):
        packed = compress(codec, data, props)
        if len(packed) < len(best[2]):
            best = (codec, props, packed)
    codec, props, packed = best
    if codec == fmt.CODEC_LZMA2_PROPS and props in _NAMED_PROPS:
        codec = _NAMED_PROPS[props]
    head = bytes([codec]) + (bytes([props]) if codec == fmt.CODEC_LZMA2_PROPS else b"")
    return head + fmt.encode_varint(len(packed)), packed


def compact_control(records: list[matching.Record]) -> bytes:
    return b"".join(
        fmt.encode_varint(add) + fmt.encode_varint(copy) + fmt.encode_varint(fmt.zigzag(seek))
        for add, copy, seek in records
    )


def compact_section_of(triplet: matching.Triplet, codecs: tuple[int, ...]) -> bytes:
    heads = []
    bodies = []
    for stream in (compact_control(triplet.records), triplet.diff, triplet.extra):
        head, packed = compact_stream(stream, codecs)
        heads.append(head)
        bodies.append(packed)
    return b"".join(heads + bodies)


def compact_section(
    base: bytes,
    data: bytes,
    codecs: tuple[int, ...] = ALL_CODECS,
    *,
    use_bsdiff: bool = True,
    use_hdiffpatch: bool = True,
) -> bytes:
    """The smallest compact section making ``data`` from ``base`` over the matchers allowed."""
    triplets = []
    if use_bsdiff:
        triplets.append(matching.bsdiff_triplet(base, data))
    if use_hdiffpatch and matching.hdiffpatch_available():
        # HDiffPatch's match score trades more, shorter covers against fewer, longer ones;
        # firmware pairs prefer low scores (1: esp8266 -1.6 %, pieeprom -2.3 % against 6).
        scores = ALL_MATCH_SCORES if fmt.CODEC_ZSTD in codecs else FAST_MATCH_SCORES
        triplets += [matching.hdiffpatch_triplet(base, data, score) for score in scores]
    if not triplets:
        raise ValueError("no matcher allowed")
    sections = [compact_section_of(t, codecs) for t in triplets]
    return min(sections, key=len)


def bsdiff_section_codecs(section: bytes) -> str:
    """Human summary of a section's stream codecs, e.g. ``xz-lc0/xz-lc0/bz2``."""
    names = []
    for i in range(3):
        codec, _ = fmt.STREAM_HEAD.unpack_from(section, i * fmt.STREAM_HEAD.size)
        names.append(fmt.CODEC_NAMES.get(codec, "?"))
    return "/".join(names)


def compact_section_codecs(section: bytes) -> str:
    """Human summary of a compact section's stream codecs, e.g. ``xz-lc0/xz(2,0,0)/bz2``."""
    names = []
    pos = 0
    for _ in range(3):
        codec = section[pos]
        pos += 1
        if codec == fmt.CODEC_LZMA2_PROPS:
            props = section[pos]
            pos += 1
            names.append(f"xz({props % 9},{props // 9 % 5},{props // 45})")
        else:
            names.append(fmt.CODEC_NAMES.get(codec, "?"))
        _, pos = fmt.decode_varint(section, pos, "stream length")
    return "/".join(names)


def zstd_dict_frame(base: bytes, data: bytes, level: int = 19) -> bytes:
    """A zstd frame of ``data`` with ``base`` as raw-content dictionary (``--patch-from``)."""
    window_log = max(10, math.ceil(math.log2(len(base) + len(data) + 1)))
    window_log = min(window_log, fmt.ZSTD_DICT_MAX_WINDOW_LOG)
    # The container names the length and the result hash: no content size, checksum or dict id.
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=window_log,
        enable_ldm=True,
        source_size=len(data),
        write_content_size=0,
        write_checksum=0,
        write_dict_id=0,
    )
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    compressor = zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)
    return compressor.compress(data)


def zstd_frame(data: bytes, level: int = 19) -> bytes:
    """A plain zstd frame within the applier's stream window bound."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=fmt.ZSTD_STREAM_WINDOW_LOG, source_size=len(data)
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)
