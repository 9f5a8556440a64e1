"""Fuzz delta decoding and application (signing.delta_format, client.delta_apply).

Deltas are TUF targets, so a tampered one is normally stopped by its hash
before it is decoded; these tests assume the worst (a compromised image
repository signs a malicious delta) and check the applier itself: only
``DeltaError`` subclasses, and never an output file unless the result is
exactly what the header promised. The payload is mutated *and its header
re-encoded* (payload length, sha256, CRC) so the fuzz reaches the bsdiff,
zstd and windows decoders instead of stopping at the payload hash.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.delta_apply import DeltaError, apply_delta_file
from server.delta import create_delta, encoders
from signing import delta_format as fmt
from tests.fuzz import fuzz_settings
from tests.uptake_fixtures import sample

OLD = sample("rpi-gateway", "1.0.0").read_bytes()
NEW = sample("rpi-gateway", "1.1.0").read_bytes()
# The transformed method needs images with a compressed stream: the same programs gzipped
# behind a loader, and as x86 ELF code (BCJ filter regions).
_NOISE = random.Random(16).randbytes(24_000)  # keeps the stream above the creator's minimum
GZ_OLD = OLD[:4096] + gzip.compress(OLD * 8 + _NOISE, 9, mtime=0) + OLD[-512:]
GZ_NEW = OLD[:4096] + gzip.compress(NEW * 8 + _NOISE, 9, mtime=0) + OLD[-512:]
METHODS = [
    "bsdiff", "zstd-dict", "windows", "transformed", "transformed-bcj", "transformed-arm64",
    "bsdiff-v1",
]  # fmt: skip


def _base(method: str) -> bytes:
    return GZ_OLD if method == "transformed" else OLD


def _make(tmp: Path, method: str) -> bytes:
    (tmp / "old").write_bytes(_base(method))
    (tmp / "new").write_bytes(GZ_NEW if method == "transformed" else NEW * 8)
    options: dict[str, object] = {"methods": [method]}
    if method == "windows":
        options = {"whole_limit": 0, "window_size": 4096, "base_budget": 8192}
    elif method == "transformed-bcj":
        options = {"methods": ["transformed"], "arch_hint": "x86"}
    elif method == "transformed-arm64":
        options = {"methods": ["transformed"], "arch_hint": "arm64"}
    elif method == "bsdiff-v1":  # what servers published before the thin container
        return fmt.encode_delta(
            "bsdiff",
            (len(OLD), hashlib.sha256(OLD).digest()),
            (len(NEW) * 8, hashlib.sha256(NEW * 8).digest()),
            encoders.bsdiff_section(OLD, NEW * 8),
            version=fmt.FORMAT_VERSION,
        )
    create_delta(tmp / "old", tmp / "new", tmp / method, workers=1, **options)  # type: ignore[arg-type]
    return (tmp / method).read_bytes()


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("deltas")
    made = {m: _make(tmp, m) for m in METHODS}
    for method, data in made.items():
        expected = method.removesuffix("-bcj").removesuffix("-arm64").removesuffix("-v1")
        assert fmt.decode_header(io.BytesIO(data)).method == expected, method
    return made


def _apply(tmp: Path, patch: bytes, base: bytes = OLD) -> None:
    (tmp / "old").write_bytes(base)
    (tmp / "patch").write_bytes(patch)
    out = tmp / "out"
    out.unlink(missing_ok=True)
    try:
        applied = apply_delta_file(tmp / "old", tmp / "patch", out)
    except DeltaError:
        assert not out.exists(), "a refused delta left an output file"
        return
    header = fmt.decode_header(io.BytesIO(patch))
    result = out.read_bytes()
    assert (
        len(result) == header.result_length
        and hashlib.sha256(result).digest() == header.result_sha256
    )
    assert applied is not None


def _reframed(original: bytes, payload: bytes) -> bytes:
    header = fmt.decode_header(io.BytesIO(original))
    if header.format_version == fmt.THIN_VERSION:
        head = header.encode() + payload
        return head + fmt.crc_trailer(zlib.crc32(head))
    return fmt.encode_delta(
        header.method,
        (header.base_length, header.base_sha256),
        (header.result_length, header.result_sha256),
        payload,
        version=header.format_version,
    )


@st.composite
def _payload_edit(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[at : at + 8] = draw(
                st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff"])
            )
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def test_valid_deltas_apply(tmp_path: Path, deltas: dict[str, bytes]) -> None:
    for method, patch in deltas.items():
        _apply(tmp_path, patch, _base(method))
        assert (tmp_path / "out").read_bytes() == (GZ_NEW if method == "transformed" else NEW * 8)


@fuzz_settings
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_mutated_payload_reframed(
    tmp_path: Path, deltas: dict[str, bytes], method: str, data: st.DataObject
) -> None:
    original = deltas[method]
    header = fmt.decode_header(io.BytesIO(original))
    payload = original[header.encoded_length : len(original) - header.trailer_length]
    _apply(tmp_path, _reframed(original, data.draw(_payload_edit(payload))), _base(method))


@fuzz_settings
@given(data=st.data())
def test_mutated_header_fields(
    tmp_path: Path, deltas: dict[str, bytes], data: st.DataObject
) -> None:
    method = data.draw(st.sampled_from(sorted(deltas)))
    original = deltas[method]
    header = fmt.decode_header(io.BytesIO(original))
    payload = original[header.encoded_length : len(original) - header.trailer_length]
    lengths = st.integers(0, fmt.MAX_IMAGE_LENGTH) | st.sampled_from(
        [0, len(OLD), len(NEW) * 8, len(NEW) * 8 + 1]
    )
    digests = st.binary(min_size=32, max_size=32) | st.sampled_from(
        [header.base_sha256, header.result_sha256, hashlib.sha256(OLD).digest()]
    )
    try:
        patch = fmt.encode_delta(
            data.draw(
                st.sampled_from(["bsdiff", "zstd-dict", "windows", "transformed", "stored", "zz"])
            ),
            (data.draw(lengths | st.just(header.base_length)), data.draw(digests)),
            (data.draw(lengths | st.just(header.result_length)), data.draw(digests)),
            payload,
            version=data.draw(st.sampled_from(fmt.KNOWN_VERSIONS)),
        )
    except fmt.DeltaFormatError:
        return
    _apply(tmp_path, patch, _base(method))


@fuzz_settings
@given(st.binary(max_size=512), st.integers(0, 200))
def test_raw_bytes(tmp_path: Path, junk: bytes, keep: int) -> None:
    magic = fmt.MAGIC if keep % 2 else fmt.MAGIC_V2
    _apply(tmp_path, magic[: keep % (len(magic) + 1)] + junk)


# --- the ECU's sequential patch (client.secondaries.ecu_patch) ------------------------------


@pytest.fixture(scope="module")
def ecu_patch(tmp_path_factory: pytest.TempPathFactory, deltas: dict[str, bytes]) -> bytes:
    from client.secondaries.uds_delta import ecu_patch_from_delta

    tmp = tmp_path_factory.mktemp("ecu-patch")
    (tmp / "delta").write_bytes(deltas["windows"])
    ecu_patch_from_delta(
        tmp / "delta",
        tmp / "patch",
        hashlib.sha256(OLD).digest(),
        (len(NEW) * 8, hashlib.sha256(NEW * 8).digest()),
        16,
    )
    return (tmp / "patch").read_bytes()


def _feed_ecu(patch: bytes, cuts: list[int]) -> bytes | None:
    """Apply ``patch`` in blocks cut at ``cuts`` as the ECU does; the image, or None if refused."""
    from client.secondaries.ecu_patch import EcuPatchLimits, PatchApplier, PatchError

    written = bytearray()
    limits = EcuPatchLimits(max_dict_log=16, bank_size=len(NEW) * 8 + 4096)

    def write(data: bytes) -> None:
        written.extend(data)
        assert len(written) <= limits.bank_size, "the patch wrote past the bank"

    applier = PatchApplier(
        lambda offset, size: OLD[offset : offset + size],
        write,
        (len(OLD), hashlib.sha256(OLD).digest()),
        limits,
    )
    try:
        start = 0
        for cut in [*sorted(cuts), len(patch)]:
            applier.feed(patch[start:cut])
            start = max(start, cut)
        applier.finish()
    except PatchError:
        return None
    return bytes(written)


def test_valid_ecu_patch_applies_in_any_blocks(ecu_patch: bytes) -> None:
    assert _feed_ecu(ecu_patch, []) == NEW * 8
    assert _feed_ecu(ecu_patch, list(range(1, len(ecu_patch), 97))) == NEW * 8


@fuzz_settings
@given(data=st.data())
def test_mutated_ecu_patch(ecu_patch: bytes, data: st.DataObject) -> None:
    # A compromised primary (or deltas key) sends a malicious patch: the ECU refuses it with
    # PatchError, or what it produced is exactly the image the patch's sha256 names.
    patch = data.draw(_payload_edit(ecu_patch))
    cuts = data.draw(st.lists(st.integers(0, max(1, len(patch))), max_size=6))
    result = _feed_ecu(patch, cuts)
    if result is not None:
        from client.secondaries.ecu_patch import decode_header

        header, _ = decode_header(patch)
        assert len(result) == header.result_length
        assert hashlib.sha256(result).digest() == header.result_sha256
