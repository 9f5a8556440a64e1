"""The Uptake delta container: a thin, versioned header around a delta payload.

A delta turns one exact image (the *base*, e.g. the firmware in a vehicle's
active slot) into another (the *result*). The server creates it
(``server.delta``), publishes it as its own signed TUF target, and the agent
applies it (``client.delta_apply``). The payload itself is a library format
(bsdiff control/diff/extra streams, a zstd frame, or a list of windows made of
those, see ``docs/delta-format.md``); this module only frames it so that the
applier knows, before touching any byte of the output, *what* the payload is,
*which* base it needs and *what* it must produce.

Layout (all integers big-endian)::

    offset  size  field
    0       8     magic             b"UPTDELTA"
    8       2     format_version    1
    10      1     method_length     1..64
    11      m     method            ASCII, [a-z0-9.+-], e.g. "bsdiff", "zstd-dict", "windows"
    11+m    8     base_length       bytes of the base image
            32    base_sha256
            8     result_length     bytes of the image the delta produces
            32    result_sha256
            8     payload_length    bytes of payload following the header
            32    payload_sha256    lets the applier tell a corrupted delta from a wrong one
            4     header_crc32      CRC-32 of every header byte before it
    ...     p     payload

Nothing may follow the payload. Every field is validated strictly by
:func:`decode_header`; a violation raises :class:`DeltaFormatError` naming the
field. Authenticity is not this format's job: the whole delta file is a TUF
target whose length and hashes the agent verifies before decoding it.

Format version 2 is the *thin* container the creator writes today: only what
the applier needs, so that a delta between nearly identical images is not
dominated by its header (52-60 bytes instead of 141+)::

    offset  size  field
    0       4     magic             b"UPT\x02"
    4       1     method id         1 bsdiff, 2 zstd-dict, 3 windows, 4 transformed
    5       v     base_length       LEB128
            8     base_sha256[:8]   tells a wrong base from a corrupted delta (diagnostic only)
            v     result_length     LEB128
            32    result_sha256     the image the delta must produce
    ...     p     payload           its bsdiff sections use varint control records
    end-4   4     crc32             CRC-32 of every byte before it

The result's full sha256 stays: it is what the applier checks the output
against. The base is named by a prefix only because the base is the vehicle's
own verified image: a delta for another base can only produce a wrong result,
which the result check refuses. Readers accept both versions.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from signing.exceptions import UptakeError

MAGIC = b"UPTDELTA"
FORMAT_VERSION = 1
MAGIC_V2 = b"UPT\x02"
THIN_VERSION = 2
KNOWN_VERSIONS = (FORMAT_VERSION, THIN_VERSION)
BASE_PREFIX_LENGTH = 8  # bytes of the base's sha256 a thin header keeps

# Method ids of the thin container (version 1 spells the name out).
METHOD_IDS = {"bsdiff": 1, "zstd-dict": 2, "windows": 3, "transformed": 4}
METHOD_NAMES = {number: name for name, number in METHOD_IDS.items()}

# Largest image either side may describe (1 TiB): rejects absurd lengths early.
MAX_IMAGE_LENGTH = 1 << 40

_METHOD_RE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_PREFIX = struct.Struct(">8sHB")  # magic, version, method length
_BODY = struct.Struct(">Q32sQ32sQ32s")  # base, result, payload (length + sha256 each)
_CRC = struct.Struct(">I")


class DeltaFormatError(UptakeError, ValueError):
    """A delta header is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid delta header field '{field}': {message}")
        self.field = field


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta needs and produces, and how its payload is encoded."""

    method: str
    base_length: int
    base_sha256: bytes
    result_length: int
    result_sha256: bytes
    payload_length: int
    payload_sha256: bytes
    format_version: int = FORMAT_VERSION
    crc32: int = 0
    """Version 2: CRC-32 of the whole file before its trailer (version 1 has payload_sha256)."""

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.format_version not in KNOWN_VERSIONS:
            raise DeltaFormatError("format_version", f"unsupported version {self.format_version}")
        thin = self.format_version == THIN_VERSION
        if thin and self.method not in METHOD_IDS:
            raise DeltaFormatError("method", f"{self.method!r} has no id in a thin container")
        for name in ("base", "result"):
            length = getattr(self, f"{name}_length")
            if not isinstance(length, int) or not 0 <= length <= MAX_IMAGE_LENGTH:
                raise DeltaFormatError(f"{name}_length", f"{length} out of range")
        if self.payload_length < 0:
            raise DeltaFormatError("payload_length", "negative")
        sizes = {
            "base_sha256": BASE_PREFIX_LENGTH if thin else 32,
            "result_sha256": 32,
            "payload_sha256": 0 if thin else 32,
        }
        for name, size in sizes.items():
            digest = getattr(self, name)
            if not isinstance(digest, bytes) or len(digest) != size:
                raise DeltaFormatError(name, f"must be {size} raw bytes")

    @property
    def encoded_length(self) -> int:
        """Size in bytes of the encoded header (the payload starts there)."""
        if self.format_version == THIN_VERSION:
            return len(self.encode())
        return _PREFIX.size + len(self.method) + _BODY.size + _CRC.size

    @property
    def trailer_length(self) -> int:
        """Bytes after the payload (the thin container's CRC-32)."""
        return _CRC.size if self.format_version == THIN_VERSION else 0

    def encode(self) -> bytes:
        """Serialize the header; the caller appends the payload (and, for v2, the trailer)."""
        if self.format_version == THIN_VERSION:
            return (
                MAGIC_V2
                + bytes([METHOD_IDS[self.method]])
                + encode_varint(self.base_length)
                + self.base_sha256
                + encode_varint(self.result_length)
                + self.result_sha256
            )
        method = self.method.encode("ascii")
        head = _PREFIX.pack(MAGIC, self.format_version, len(method)) + method
        head += _BODY.pack(
            self.base_length,
            self.base_sha256,
            self.result_length,
            self.result_sha256,
            self.payload_length,
            self.payload_sha256,
        )
        return head + _CRC.pack(zlib.crc32(head))


def _check_method(method: str) -> None:
    if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
        raise DeltaFormatError("method", f"{method!r} is not 1-64 chars of [a-z0-9.+-]")


def _read_exact(stream: BinaryIO, size: int, field: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DeltaFormatError(field, f"truncated: expected {size} bytes, got {len(data)}")
    return data


def decode_header(stream: BinaryIO) -> DeltaHeader:
    """Read and validate a header from the current position of ``stream``.

    On return the stream is positioned at the first payload byte. The payload
    itself (length, sha256, trailing data) is checked by the applier as it
    streams it; see :func:`check_payload` for a whole-file check.
    """
    first = _read_exact(stream, len(MAGIC_V2), "magic")
    if first == MAGIC_V2:
        return _decode_thin(stream)
    prefix = first + _read_exact(stream, _PREFIX.size - len(first), "magic")
    magic, version, method_length = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise DeltaFormatError("magic", f"expected {MAGIC!r}, got {magic!r}")
    if version != FORMAT_VERSION:
        raise DeltaFormatError(
            "format_version",
            f"version {version} not supported (this reader knows {FORMAT_VERSION})",
        )
    if not 1 <= method_length <= 64:
        raise DeltaFormatError("method", f"length {method_length} out of range 1..64")
    raw_method = _read_exact(stream, method_length, "method")
    body = _read_exact(stream, _BODY.size, "base_length")
    crc_bytes = _read_exact(stream, _CRC.size, "header_crc32")
    (expected_crc,) = _CRC.unpack(crc_bytes)
    if zlib.crc32(prefix + raw_method + body) != expected_crc:
        raise DeltaFormatError("header_crc32", "header checksum mismatch (corrupted header)")
    try:
        method = raw_method.decode("ascii")
    except UnicodeDecodeError:
        raise DeltaFormatError("method", "not ASCII") from None
    base_len, base_sha, result_len, result_sha, payload_len, payload_sha = _BODY.unpack(body)
    return DeltaHeader(
        method=method,
        base_length=base_len,
        base_sha256=base_sha,
        result_length=result_len,
        result_sha256=result_sha,
        payload_length=payload_len,
        payload_sha256=payload_sha,
        format_version=version,
    )


def _decode_thin(stream: BinaryIO) -> DeltaHeader:
    method_id = _read_exact(stream, 1, "method")[0]
    if method_id not in METHOD_NAMES:
        raise DeltaFormatError("method", f"unknown method id {method_id}")
    base_length = read_varint(stream, "base_length")
    base_prefix = _read_exact(stream, BASE_PREFIX_LENGTH, "base_sha256")
    result_length = read_varint(stream, "result_length")
    result_sha = _read_exact(stream, 32, "result_sha256")
    payload_start = stream.tell()
    end = stream.seek(0, 2)
    stream.seek(payload_start)
    payload_length = end - payload_start - _CRC.size
    if payload_length < 0:
        raise DeltaFormatError("crc32", "truncated: no room for the trailing CRC-32")
    for name, value in (("base_length", base_length), ("result_length", result_length)):
        if value > MAX_IMAGE_LENGTH:
            raise DeltaFormatError(name, f"{value} out of range")
    stream.seek(end - _CRC.size)
    (crc,) = _CRC.unpack(_read_exact(stream, _CRC.size, "crc32"))
    stream.seek(payload_start)
    return DeltaHeader(
        method=METHOD_NAMES[method_id],
        base_length=base_length,
        base_sha256=base_prefix,
        result_length=result_length,
        result_sha256=result_sha,
        payload_length=payload_length,
        payload_sha256=b"",
        format_version=THIN_VERSION,
        crc32=crc,
    )


def thin_header(
    method: str, base: tuple[int, bytes], result: tuple[int, bytes], payload_length: int
) -> DeltaHeader:
    """A version 2 header for full ``(length, sha256)`` pairs (the CRC is the caller's trailer)."""
    return DeltaHeader(
        method=method,
        base_length=base[0],
        base_sha256=base[1][:BASE_PREFIX_LENGTH],
        result_length=result[0],
        result_sha256=result[1],
        payload_length=payload_length,
        payload_sha256=b"",
        format_version=THIN_VERSION,
    )


def crc_trailer(crc: int) -> bytes:
    """The 4-byte trailer of a thin container whose preceding bytes have CRC-32 ``crc``."""
    return _CRC.pack(crc & 0xFFFFFFFF)


def encode_delta(
    method: str,
    base: tuple[int, bytes],
    result: tuple[int, bytes],
    payload: bytes,
    *,
    version: int = THIN_VERSION,
) -> bytes:
    """Build a complete delta: header for ``(length, sha256)`` pairs + payload (+ trailer)."""
    if version == THIN_VERSION:
        head = thin_header(method, base, result, len(payload)).encode() + payload
        return head + crc_trailer(zlib.crc32(head))
    header = DeltaHeader(
        method=method,
        base_length=base[0],
        base_sha256=base[1],
        result_length=result[0],
        result_sha256=result[1],
        payload_length=len(payload),
        payload_sha256=hashlib.sha256(payload).digest(),
    )
    return header.encode() + payload


def check_payload(stream: BinaryIO, header: DeltaHeader, chunk_size: int = 1 << 20) -> None:
    """Verify the payload that follows ``header`` in ``stream`` (length, checksum, no trailer).

    The stream must be positioned at the first payload byte.
    """
    if header.format_version == THIN_VERSION:
        _check_thin(stream, header, chunk_size)
        return
    digest = hashlib.sha256()
    remaining = header.payload_length
    while remaining:
        chunk = stream.read(min(chunk_size, remaining))
        if not chunk:
            raise DeltaFormatError(
                "payload_length",
                f"payload truncated: {header.payload_length - remaining} of "
                f"{header.payload_length} bytes present",
            )
        digest.update(chunk)
        remaining -= len(chunk)
    if stream.read(1):
        raise DeltaFormatError("payload_length", "unexpected data after the payload")
    if digest.digest() != header.payload_sha256:
        raise DeltaFormatError("payload_sha256", "payload does not match its sha256 (corrupted)")


def _check_thin(stream: BinaryIO, header: DeltaHeader, chunk_size: int) -> None:
    start = stream.tell()
    stream.seek(start - header.encoded_length)
    crc = zlib.crc32(_read_exact(stream, header.encoded_length, "magic"))
    remaining = header.payload_length
    while remaining:
        chunk = stream.read(min(chunk_size, remaining))
        if not chunk:
            raise DeltaFormatError("crc32", "delta truncated while checking it")
        crc = zlib.crc32(chunk, crc)
        remaining -= len(chunk)
    if crc != header.crc32:
        raise DeltaFormatError("crc32", "delta does not match its CRC-32 (corrupted or truncated)")
    stream.seek(start)


# --- Varints ----------------------------------------------------------------------
#
# LEB128: 7 bits per byte, least significant first, high bit = more. Signed
# values are zigzag-mapped first (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...).

MAX_VARINT_BYTES = 10  # 64-bit values


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned; zigzag-map signed values first")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value) << 1) - 1


def unzigzag(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


def read_varint(stream: BinaryIO, field: str) -> int:
    """Read one LEB128 value (at most 64 bits) from ``stream``."""
    value = 0
    for index in range(MAX_VARINT_BYTES):
        raw = stream.read(1)
        if not raw:
            raise DeltaFormatError(field, "truncated varint")
        value |= (raw[0] & 0x7F) << (7 * index)
        if not raw[0] & 0x80:
            if value >= 1 << 64:
                raise DeltaFormatError(field, "varint exceeds 64 bits")
            return value
    raise DeltaFormatError(field, f"varint longer than {MAX_VARINT_BYTES} bytes")


def decode_varint(data: bytes | memoryview, pos: int, field: str) -> tuple[int, int]:
    """``(value, next position)`` of the LEB128 value at ``data[pos]``."""
    value = 0
    for index in range(MAX_VARINT_BYTES):
        if pos >= len(data):
            raise DeltaFormatError(field, "truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if value >= 1 << 64:
                raise DeltaFormatError(field, "varint exceeds 64 bits")
            return value, pos
    raise DeltaFormatError(field, f"varint longer than {MAX_VARINT_BYTES} bytes")


# --- Payload layouts shared by the creator and the applier -----------------
#
# Method "bsdiff": the payload is one *bsdiff section* against the whole base.
# Method "zstd-dict": the payload is one zstd frame whose dictionary is the
#   whole base as raw content (the equivalent of ``zstd --patch-from``).
# Method "windows": the payload is a list of windows, each producing the next
#   ``new_length`` bytes of the result from its own small base (a list of old
#   extents), so that creation and application need bounded memory::
#
#     window_count u32
#     per window:
#       new_length u64
#       fill_count u32,   fill_count   x (offset u64, length u64, byte u8)
#       extent_count u32, extent_count x (old_offset u64, length u64)
#       segment_method u8, segment_length u64, segment bytes
#
#   Fills are runs of one repeated byte (zeroed free space, 0xFF flash
#   padding) at window offsets; the segment produces the remaining bytes (the
#   window minus its fills, in order) from the base = the extents concatenated.
#
# A bsdiff section is 3 x (codec u8, length u64) followed by the control,
# diff and extra streams. The decompressed control stream is bsdiff4's: 24-byte
# records of three sign-magnitude little-endian int64 (add x bytes base+diff,
# copy y bytes from extra, move the base position by z).

SEGMENT_STORED = 0
SEGMENT_BSDIFF = 1
SEGMENT_ZSTD_DICT = 2
SEGMENT_ZSTD = 3
SEGMENT_NAMES = {
    SEGMENT_STORED: "stored",
    SEGMENT_BSDIFF: "bsdiff",
    SEGMENT_ZSTD_DICT: "zstd-dict",
    SEGMENT_ZSTD: "zstd",
}

CODEC_STORED = 0
CODEC_BZ2 = 1
CODEC_LZMA2 = 2  # raw LZMA2, lc=3 lp=0 pb=2
CODEC_ZSTD = 3
CODEC_LZMA2_LC0 = 4  # raw LZMA2, lc=0 lp=0 pb=0 (better on bsdiff's sparse diff stream)
CODEC_NAMES = {
    CODEC_STORED: "stored",
    CODEC_BZ2: "bz2",
    CODEC_LZMA2: "xz",
    CODEC_ZSTD: "zstd",
    CODEC_LZMA2_LC0: "xz-lc0",
}

# Bounds that keep application memory small whatever the image size.
LZMA2_DICT_SIZE = 8 << 20
ZSTD_STREAM_WINDOW_LOG = 23  # zstd-compressed bsdiff streams and plain zstd segments
ZSTD_DICT_MAX_WINDOW_LOG = 26  # zstd-dict segments: the window spans base + output
MAX_DICT_BASE = 24 << 20  # a zstd-dict base is held in memory while applying
MAX_DICT_TOTAL = 40 << 20  # base + produced bytes of one zstd-dict segment
MAX_WINDOWS = 1 << 20
MAX_LIST_ENTRIES = 1 << 20  # fills or extents in one window
BSDIFF_RECORD_SIZE = 24

WINDOW_COUNT = struct.Struct(">I")
WINDOW_LENGTH = struct.Struct(">Q")
LIST_COUNT = struct.Struct(">I")
FILL = struct.Struct(">QQB")
EXTENT = struct.Struct(">QQ")
SEGMENT_HEAD = struct.Struct(">BQ")
STREAM_HEAD = struct.Struct(">BQ")


def lzma2_filters(codec: int) -> list[dict[str, int]]:
    """The raw LZMA2 filter chain of ``codec`` (decoder side; the creator adds presets)."""
    if codec == CODEC_LZMA2:
        return [{"id": 0x21, "dict_size": LZMA2_DICT_SIZE, "lc": 3, "lp": 0, "pb": 2}]
    if codec == CODEC_LZMA2_LC0:
        return [{"id": 0x21, "dict_size": LZMA2_DICT_SIZE, "lc": 0, "lp": 0, "pb": 0}]
    raise ValueError(f"codec {codec} is not LZMA2")


# --- Thin container (version 2) payload details -----------------------------------
#
# A bsdiff section in a thin container is *compact*::
#
#   3 x (codec u8, [props u8 when codec is CODEC_LZMA2_PROPS], length varint)
#   control, diff, extra stream bytes
#
# and its decompressed control stream holds varint records (add varint, copy
# varint, seek zigzag varint) instead of 24-byte int64 records. Windows
# payloads keep their layout; their bsdiff segments are compact sections.

CODEC_LZMA2_PROPS = 5  # raw LZMA2, 8 MiB dictionary, lc/lp/pb in the props byte that follows
MAX_CONTROL_RECORD = 3 * MAX_VARINT_BYTES


def lzma2_props_filters(props: int) -> list[dict[str, int]]:
    """The raw LZMA2 chain of a props byte ``(pb * 5 + lp) * 9 + lc`` (lc + lp <= 4)."""
    if props >= 9 * 5 * 5:
        raise ValueError(f"LZMA props byte {props} out of range")
    lc, rest = props % 9, props // 9
    lp, pb = rest % 5, rest // 5
    if lc + lp > 4 or pb > 4:
        raise ValueError(f"LZMA props byte {props}: lc={lc} lp={lp} pb={pb} not allowed")
    return [{"id": 0x21, "dict_size": LZMA2_DICT_SIZE, "lc": lc, "lp": lp, "pb": pb}]


def lzma2_props_byte(lc: int, lp: int, pb: int) -> int:
    return (pb * 5 + lp) * 9 + lc


# Method "transformed" (thin container only): the images are transformed
# before diffing, and the applier reverses it while streaming::
#
#   base map      region list: how the applier makes the transformed base from the base
#   result map    region list: how the transformed result maps back to the result
#   inner method  u8 (1 bsdiff, 2 zstd-dict, 3 windows), then its payload, which
#                 makes the transformed result from the transformed base
#
#   region list:  count varint, then per region: kind u8 and
#     REGION_RAW     length varint                        bytes as they are
#     REGION_FILTER  length varint, arch u8               branch targets made absolute (BCJ)
#     REGION_STREAM  codec u8, length varint (compressed), expanded varint, arch u8
#                    (a BCJ filter over the expanded bytes, 0 for none),
#                    params_length varint, params        a compressed stream, expanded
#
# Parameters of a result stream say how to recompress it exactly (their
# ``library`` field names the compressor and version the creator verified it
# with); base streams are only decompressed and carry none.

REGION_RAW = 0
REGION_FILTER = 1
REGION_STREAM = 2

STREAM_GZIP = 1
STREAM_XZ = 2
STREAM_ZSTD = 3
STREAM_NAMES = {STREAM_GZIP: "gzip", STREAM_XZ: "xz", STREAM_ZSTD: "zstd"}

ARCH_NONE = 0
ARCH_X86 = 1
ARCH_ARM = 2
ARCH_ARMT = 3
ARCH_PPC = 4
ARCH_SPARC = 5
ARCH_ARM64 = 6
ARCH_NAMES = {
    ARCH_X86: "x86",
    ARCH_ARM: "arm",
    ARCH_ARMT: "armt",
    ARCH_PPC: "ppc",
    ARCH_SPARC: "sparc",
    ARCH_ARM64: "arm64",
}

MAX_REGIONS = 4096
MAX_STREAM_PARAMS = 4096
MAX_EXPANDED_TOTAL = 1 << 30  # scratch bytes the applier may write for a transformed base
MAX_RECOMPRESS_MEMORY = 512 << 20  # what a recompressor may declare it needs
XZ_MAX_DICT = 64 << 20
ZSTD_MAX_WINDOW_LOG = 27
