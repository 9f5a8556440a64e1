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

    def __post_init__(self) -> None:
        _check_method(self.method)
        if self.format_version != FORMAT_VERSION:
            raise DeltaFormatError("format_version", f"unsupported version {self.format_version}")
        for name in ("base", "result"):
            length = getattr(self, f"{name}_length")
            if not 0 <= length <= MAX_IMAGE_LENGTH:
                raise DeltaFormatError(f"{name}_length", f"{length} out of range")
        if self.payload_length < 0:
            raise DeltaFormatError("payload_length", "negative")
        for name in ("base_sha256", "result_sha256", "payload_sha256"):
            digest = getattr(self, name)
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise DeltaFormatError(name, "must be 32 raw bytes")

    @property
    def encoded_length(self) -> int:
        """Size in bytes of the encoded header (the payload starts there)."""
        return _PREFIX.size + len(self.method) + _BODY.size + _CRC.size

    def encode(self) -> bytes:
        """Serialize the header; the payload is appended by the caller."""
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
    prefix = _read_exact(stream, _PREFIX.size, "magic")
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


def encode_delta(
    method: str,
    base: tuple[int, bytes],
    result: tuple[int, bytes],
    payload: bytes,
) -> bytes:
    """Build a complete delta: header for ``(length, sha256)`` pairs + payload."""
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
    """Verify the payload that follows ``header`` in ``stream`` (length, sha256, no trailer)."""
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
