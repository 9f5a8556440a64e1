"""Payload encoders: bsdiff sections with recompressed streams, zstd frames.

Each function turns ``(base, data)`` bytes into the bytes of one segment as
laid out in :mod:`signing.delta_format`. bsdiff4 computes the control, diff
and extra streams; each stream is then compressed with every codec in
``codecs`` and the smallest kept, which is where most of the gain over
bsdiff4's own bz2 output comes from (xz with lc=0 suits the mostly-zero diff
stream). Compression parameters respect the applier's memory bounds (8 MiB
LZMA2 dictionary, zstd windows of at most 2**23 bytes for streams).
"""

from __future__ import annotations

import bz2
import lzma
import math

import bsdiff4
import zstandard

from signing import delta_format as fmt

ALL_CODECS = (fmt.CODEC_LZMA2_LC0, fmt.CODEC_LZMA2, fmt.CODEC_BZ2, fmt.CODEC_ZSTD)
FAST_CODECS = (fmt.CODEC_LZMA2_LC0, fmt.CODEC_LZMA2, fmt.CODEC_BZ2)


def compress(codec: int, data: bytes) -> bytes:
    """Compress ``data`` so that the applier's ``codec`` decoder reads it back."""
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


def bsdiff_section_codecs(section: bytes) -> str:
    """Human summary of a section's stream codecs, e.g. ``xz-lc0/xz-lc0/bz2``."""
    names = []
    for i in range(3):
        codec, _ = fmt.STREAM_HEAD.unpack_from(section, i * fmt.STREAM_HEAD.size)
        names.append(fmt.CODEC_NAMES.get(codec, "?"))
    return "/".join(names)


def zstd_dict_frame(base: bytes, data: bytes, level: int = 19) -> bytes:
    """A zstd frame of ``data`` with ``base`` as raw-content dictionary (``--patch-from``)."""
    window_log = max(10, math.ceil(math.log2(len(base) + len(data) + 1)))
    window_log = min(window_log, fmt.ZSTD_DICT_MAX_WINDOW_LOG)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=window_log,
        enable_ldm=True,
        source_size=len(data),
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
