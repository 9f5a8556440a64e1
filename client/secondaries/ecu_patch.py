"""Sequential patches an MCU applies from its active bank into its inactive bank in bounded RAM.

The primary turns the Uptake delta it downloaded (verified as a TUF target)
into this format and sends it over UDS in place of the image; the ECU applies
it *while the blocks arrive*, reading its active bank (memory-mapped flash on
an MCU, so random reads are free) and writing the inactive bank strictly in
order, and checks the result's sha256 before it may switch banks.

Layout (integers are LEB128 varints unless sized)::

    magic          4   b"UPS\\x01"
    lzma_props     1   (pb * 5 + lp) * 9 + lc, lc + lp <= 4
    dict_log       1   LZMA2 dictionary = 2**dict_log bytes (12 <= dict_log <= the ECU's limit)
    base_length    v,  base_sha256   32   what the active bank must hold
    result_length  v,  result_sha256 32   what the inactive bank must end up holding
    body               one raw LZMA2 stream of records:
                         seek (zigzag varint: move the base position first),
                         add (varint), copy (varint),
                         then ``add`` diff bytes (base byte + diff byte, modulo 256, written)
                         then ``copy`` literal bytes (written)

One stream with one decoder is what keeps the ECU's RAM bounded: the LZMA2
dictionary (:data:`DEFAULT_DICT_LOG`: 64 KiB), the decoder's probability
tables (about 16 KiB for lc + lp <= 3, 28 KiB at most), one record's varints,
a piece of decoded bytes (:data:`PIECE`, 4 KiB) and the UDS block being
received. :data:`RAM_BOUND` states it for the default dictionary.

The applier here is the reference a C implementation follows; the HIL
simulator runs it. It refuses, naming the reason: a wrong magic, parameters
beyond the ECU's limits, a base that is not the active bank, records that run
past the announced result, a stream that ends early or carries trailing bytes,
and a result whose sha256 differs.
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import bsdiff4

from signing import delta_format as fmt

MAGIC = b"UPS\x01"
DEFAULT_DICT_LOG = 16
MIN_DICT_LOG = 12
PIECE = 4096
LZMA_STATE_MAX = 28 << 10
RAM_BOUND = (1 << DEFAULT_DICT_LOG) + LZMA_STATE_MAX + PIECE + 64
"""ECU RAM for applying a patch with the default dictionary, besides the UDS block buffer."""
_HEADER_MAX = 4 + 1 + 1 + 2 * (fmt.MAX_VARINT_BYTES + 32)


class PatchError(Exception):
    """The patch cannot be applied; nothing in the active bank was touched."""


@dataclass(frozen=True)
class PatchHeader:
    props: int
    dict_log: int
    base_length: int
    base_sha256: bytes
    result_length: int
    result_sha256: bytes

    def encode(self) -> bytes:
        return (
            MAGIC
            + bytes([self.props, self.dict_log])
            + fmt.encode_varint(self.base_length)
            + self.base_sha256
            + fmt.encode_varint(self.result_length)
            + self.result_sha256
        )


def _add_bytes(old: bytes, diff: bytes) -> bytes:
    """``old + diff`` byte-wise modulo 256 (bsdiff's add step, in C)."""
    control = bsdiff4.core.encode_int64(len(diff)) + bytes(16)
    result: bytes = bsdiff4.core.patch(old, len(diff), control, diff, b"")
    return result


def _filters(props: int, dict_log: int) -> list[dict[str, int]]:
    filters = fmt.lzma2_props_filters(props)
    filters[0]["dict_size"] = 1 << dict_log
    return filters


def decode_header(raw: bytes) -> tuple[PatchHeader, int]:
    """The header at the start of ``raw`` and its length; IndexError while incomplete."""
    if raw[:4] != MAGIC:
        raise PatchError("not an Uptake ECU patch (bad magic)")
    props, dict_log = raw[4], raw[5]
    try:
        base_length, pos = fmt.decode_varint(raw, 6, "base_length")
        base_sha = raw[pos : pos + 32]
        result_length, pos = fmt.decode_varint(raw, pos + 32, "result_length")
    except fmt.DeltaFormatError:
        raise IndexError from None
    result_sha = raw[pos : pos + 32]
    if len(result_sha) != 32:
        raise IndexError
    return PatchHeader(props, dict_log, base_length, base_sha, result_length, result_sha), (
        pos + 32
    )


# --- the primary's side ---------------------------------------------------------------


class PatchWriter:
    """Writes a patch to ``out`` from ``add``/``copy`` operations in result order."""

    def __init__(self, out: BinaryIO, header: PatchHeader) -> None:
        self._out = out
        self.header = header
        out.write(header.encode())
        filters = _filters(header.props, header.dict_log)
        filters[0]["preset"] = 9 | lzma.PRESET_EXTREME
        self._lzma = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=filters)
        self._base_pos = 0
        self._pending: tuple[int, bytearray, bytearray] | None = None  # seek, diff, literal
        self.written = 0

    def add(self, old_offset: int, diff: bytes) -> None:
        if not diff:
            return
        if self._pending is not None and (self._pending[2] or old_offset != self._base_pos):
            self._flush()
        if self._pending is None:
            self._pending = (old_offset - self._base_pos, bytearray(), bytearray())
        self._pending[1].extend(diff)
        self._base_pos = old_offset + len(diff)
        if len(self._pending[1]) >= 1 << 20:
            self._flush()

    def copy(self, data: bytes) -> None:
        if not data:
            return
        if self._pending is None:
            self._pending = (0, bytearray(), bytearray())
        self._pending[2].extend(data)
        if len(self._pending[2]) >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._pending is None:
            return
        seek, diff, literal = self._pending
        self._pending = None
        record = (
            fmt.encode_varint(fmt.zigzag(seek))
            + fmt.encode_varint(len(diff))
            + fmt.encode_varint(len(literal))
        )
        self._emit(record + bytes(diff) + bytes(literal))

    def _emit(self, data: bytes) -> None:
        packed = self._lzma.compress(data)
        self._out.write(packed)
        self.written += len(packed)

    def finish(self) -> None:
        self._flush()
        tail = self._lzma.flush()
        self._out.write(tail)
        self.written += len(tail)


# --- the ECU's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class EcuPatchLimits:
    """What an ECU accepts (it declares these to the primary)."""

    max_dict_log: int = DEFAULT_DICT_LOG
    bank_size: int = 2 << 20


class PatchApplier:
    """Applies a patch fed in blocks as they arrive over the bus.

    ``read_base(offset, size)`` reads the active bank; ``write(data)`` appends to the
    inactive bank. ``expected_base`` is the active bank's ``(length, sha256)``.
    """

    def __init__(
        self,
        read_base: Callable[[int, int], bytes],
        write: Callable[[bytes], None],
        expected_base: tuple[int, bytes],
        limits: EcuPatchLimits,
    ) -> None:
        self._read_base = read_base
        self._write = write
        self._expected_base = expected_base
        self._limits = limits
        self._head = b""
        self.header: PatchHeader | None = None
        self._lzma: lzma.LZMADecompressor | None = None
        self._buffer = b""  # decoded bytes not yet used (at most one record's varints + PIECE)
        self._state = "record"
        self._left = 0  # bytes left in the current add or copy run
        self._copy_after = 0
        self._base_pos = 0
        self._sha = hashlib.sha256()
        self.produced = 0

    def feed(self, block: bytes) -> None:
        if self.header is None:
            self._head += block
            if len(self._head) < _HEADER_MAX and not self._header_complete():
                return
            block = self._parse_header()
        assert self._lzma is not None
        if self._lzma.eof:
            if block:
                raise PatchError("data after the end of the patch stream")
            return
        data = block
        while True:
            try:
                out = self._lzma.decompress(data, PIECE)
            except lzma.LZMAError as exc:
                raise PatchError(f"patch stream cannot be decoded: {exc}") from None
            data = b""
            if out:
                self._buffer += out
                self._consume()
            if self._lzma.eof:
                if self._lzma.unused_data:
                    raise PatchError("data after the end of the patch stream")
                return
            if self._lzma.needs_input:
                return

    def _header_complete(self) -> bool:
        try:
            decode_header(self._head)
        except (IndexError, PatchError):
            return False
        return True

    def _parse_header(self) -> bytes:
        try:
            header, used = decode_header(self._head)
        except IndexError:
            raise PatchError("patch header truncated") from None
        if not MIN_DICT_LOG <= header.dict_log <= self._limits.max_dict_log:
            raise PatchError(
                f"dictionary 2**{header.dict_log} exceeds this ECU's 2**{self._limits.max_dict_log}"
            )
        try:
            filters = _filters(header.props, header.dict_log)
        except ValueError as exc:
            raise PatchError(str(exc)) from None
        if (header.base_length, header.base_sha256) != self._expected_base:
            raise PatchError("the patch was made for another image than the active bank's")
        if header.result_length > self._limits.bank_size:
            raise PatchError(f"result of {header.result_length} bytes exceeds the bank")
        self.header = header
        self._lzma = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=filters)
        rest, self._head = self._head[used:], b""
        return rest

    def _consume(self) -> None:
        assert self.header is not None
        while self._buffer:
            if self._state == "record":
                try:
                    seek, pos = fmt.decode_varint(self._buffer, 0, "seek")
                    add, pos = fmt.decode_varint(self._buffer, pos, "add")
                    copy, pos = fmt.decode_varint(self._buffer, pos, "copy")
                except fmt.DeltaFormatError:
                    if len(self._buffer) >= fmt.MAX_CONTROL_RECORD:
                        raise PatchError("malformed record") from None
                    return  # the record continues in the next decoded piece
                self._buffer = self._buffer[pos:]
                self._base_pos += fmt.unzigzag(seek)
                if self.produced + add + copy > self.header.result_length:
                    raise PatchError("records run past the announced result length")
                if add + copy == 0:
                    raise PatchError("a record that writes nothing")
                self._state, self._left, self._copy_after = "add", add, copy
                if not add:
                    self._state, self._left = "copy", copy
                continue
            take = min(self._left, len(self._buffer))
            piece, self._buffer = self._buffer[:take], self._buffer[take:]
            if self._state == "add":
                if self._base_pos < 0 or self._base_pos + take > self.header.base_length:
                    raise PatchError("record reads outside the active image")
                old = self._read_base(self._base_pos, take)
                piece = _add_bytes(old, piece)
                self._base_pos += take
            self._output(piece)
            self._left -= take
            if not self._left:
                if self._state == "add" and self._copy_after:
                    self._state, self._left = "copy", self._copy_after
                else:
                    self._state = "record"

    def _output(self, data: bytes) -> None:
        self._sha.update(data)
        self.produced += len(data)
        self._write(data)

    def finish(self) -> None:
        """Check that the whole patch arrived and produced exactly the announced image."""
        if self.header is None or self._lzma is None or not self._lzma.eof:
            raise PatchError("patch ended early")
        if self._state != "record" or self._buffer:
            raise PatchError("patch ends inside a record")
        if self.produced != self.header.result_length:
            raise PatchError(f"patch produced {self.produced} of {self.header.result_length} bytes")
        if self._sha.digest() != self.header.result_sha256:
            raise PatchError("the patched image's sha256 differs from the patch's")
