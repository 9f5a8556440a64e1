"""Branch filters: relative branch targets made absolute before diffing, and back.

Machine code changes in every relative call when a function is inserted: each
call across it gets another offset. xz's BCJ filters rewrite the targets of
calls and branches from relative to absolute, so that unchanged calls stay
unchanged bytes; the delta creator (``server.delta.transforms``) encodes both
images before diffing and the applier (``client.delta_transforms``) decodes
the result. :func:`branch_encoder` and :func:`branch_decoder` give the
streaming coder of an architecture of :mod:`signing.delta_format`:

* x86/x86-64, ARM, ARM Thumb(-2), PowerPC, SPARC: ``pybcj`` (xz's filters),
  which the client and server extras install (the shared core does not need it);
* ARM64 (:class:`Arm64Encoder`): xz's ``--arm64`` filter, which liblzma added
  in 5.4 and neither pybcj nor Python's :mod:`lzma` (3.11) carries. It is the
  same conversion, byte for byte (the tests check it against the ``xz``
  command): ``BL`` targets (26-bit word offsets, +/-128 MiB) and ``ADRP`` page
  offsets (converted within +/-512 MiB). Each aligned little-endian word at
  stream offset ``pos`` is converted on its own, so the coders stream, keeping
  at most three bytes back between calls; candidate words are found by
  scanning the instructions' top bytes with a regular expression (C speed)
  rather than by a Python loop over every word.
"""

from __future__ import annotations

import re
from typing import Protocol

from signing import delta_format as fmt


class BranchEncoder(Protocol):
    def encode(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class BranchDecoder(Protocol):
    def decode(self, data: bytes, /) -> bytes: ...


def branch_encoder(arch: int) -> BranchEncoder:
    """A streaming encoder for ``arch`` (one of :data:`signing.delta_format.ARCH_NAMES`)."""
    if arch == fmt.ARCH_ARM64:
        return Arm64Encoder()
    import bcj  # pybcj comes with the client and server extras only

    encoders = {
        fmt.ARCH_X86: bcj.BCJEncoder,
        fmt.ARCH_ARM: bcj.ARMEncoder,
        fmt.ARCH_ARMT: bcj.ARMTEncoder,
        fmt.ARCH_PPC: bcj.PPCEncoder,
        fmt.ARCH_SPARC: bcj.SparcEncoder,
    }
    encoder: BranchEncoder = encoders[arch]()
    return encoder


def branch_decoder(arch: int, size: int) -> BranchDecoder:
    """A streaming decoder for ``arch`` of a stream of ``size`` bytes."""
    if arch == fmt.ARCH_ARM64:
        return Arm64Decoder(size)
    import bcj  # pybcj comes with the client and server extras only

    decoders = {
        fmt.ARCH_X86: bcj.BCJDecoder,
        fmt.ARCH_ARM: bcj.ARMDecoder,
        fmt.ARCH_ARMT: bcj.ARMTDecoder,
        fmt.ARCH_PPC: bcj.PPCDecoder,
        fmt.ARCH_SPARC: bcj.SparcDecoder,
    }
    decoder: BranchDecoder = decoders[arch](size)
    return decoder


_MASK32 = 0xFFFFFFFF
# top byte of a BL (0b100101 in bits 26-31) or of an ADRP ((instr & 0x9F000000) == 0x90000000)
_CANDIDATE_TOP_BYTE = re.compile(rb"[\x90\x94-\x97\xb0\xd0\xf0]")


def _convert(buffer: bytearray, start: int, encoding: bool) -> None:
    """Convert the whole words of ``buffer`` (its length a multiple of 4) in place; the
    first is at stream offset ``start`` (a multiple of 4)."""
    for match in _CANDIDATE_TOP_BYTE.finditer(buffer[3::4]):  # the top byte of every word
        offset = match.start() * 4
        instr = int.from_bytes(buffer[offset : offset + 4], "little")
        pc = (start + offset) & _MASK32
        if instr >> 26 == 0x25:  # BL: the full 26-bit immediate
            step = pc >> 2
            if not encoding:
                step = -step
            instr = 0x94000000 | ((instr + step) & 0x03FFFFFF)
        else:  # ADRP, converted within +/-512 MiB
            src = ((instr >> 29) & 3) | ((instr >> 3) & 0x001FFFFC)
            if (src + 0x00020000) & 0x001C0000:
                continue
            step = pc >> 12
            if not encoding:
                step = -step
            dest = (src + step) & _MASK32
            instr = (
                (instr & 0x9000001F)
                | ((dest & 3) << 29)
                | ((dest & 0x0003FFFC) << 3)
                | ((-(dest & 0x00020000)) & 0x00E00000)
            )
        buffer[offset : offset + 4] = instr.to_bytes(4, "little")


class _Arm64Coder:
    def __init__(self, encoding: bool) -> None:
        self._encoding = encoding
        self._position = 0  # stream offset of the first byte held back
        self._held = b""

    def _code(self, data: bytes) -> bytes:
        buffer = bytearray(self._held)
        buffer += data
        whole = len(buffer) & ~3
        self._held = bytes(buffer[whole:])
        del buffer[whole:]
        _convert(buffer, self._position, self._encoding)
        self._position += whole
        return bytes(buffer)


class Arm64Encoder(_Arm64Coder):
    """Relative ``BL``/``ADRP`` targets made absolute (the interface of pybcj's encoders)."""

    def __init__(self) -> None:
        super().__init__(encoding=True)

    def encode(self, data: bytes) -> bytes:
        return self._code(data)

    def flush(self) -> bytes:
        """The last (fewer than four) bytes, unconverted as in xz."""
        held, self._held = self._held, b""
        return held


class Arm64Decoder(_Arm64Coder):
    """The reverse of :class:`Arm64Encoder` for a stream of ``size`` bytes (pybcj's interface:
    the bytes past the last whole word come out with the stream's last byte)."""

    def __init__(self, size: int) -> None:
        super().__init__(encoding=False)
        self._left = size

    def decode(self, data: bytes) -> bytes:
        self._left -= len(data)
        out = self._code(data)
        if self._left <= 0 and self._held:
            out += self._held
            self._held = b""
        return out
