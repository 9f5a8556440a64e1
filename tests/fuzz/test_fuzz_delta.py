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

import hashlib
import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.delta_apply import DeltaError, apply_delta_file
from server.delta import create_delta
from signing import delta_format as fmt
from tests.fuzz import fuzz_settings
from tests.uptake_fixtures import sample

OLD = sample("rpi-gateway", "1.0.0").read_bytes()
NEW = sample("rpi-gateway", "1.1.0").read_bytes()


def _make(tmp: Path, method: str) -> bytes:
    (tmp / "old").write_bytes(OLD)
    (tmp / "new").write_bytes(NEW * 8)
    options = (
        {"whole_limit": 0, "window_size": 4096, "base_budget": 8192}
        if method == "windows"
        else {"methods": [method]}
    )
    create_delta(tmp / "old", tmp / "new", tmp / method, workers=1, **options)
    return (tmp / method).read_bytes()


@pytest.fixture(scope="module")
def deltas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("deltas")
    made = {m: _make(tmp, m) for m in ("bsdiff", "zstd-dict", "windows")}
    for method, data in made.items():
        assert fmt.decode_header(io.BytesIO(data)).method == method, method
    return made


def _apply(tmp: Path, patch: bytes) -> None:
    (tmp / "old").write_bytes(OLD)
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
    return fmt.encode_delta(
        header.method,
        (header.base_length, header.base_sha256),
        (header.result_length, header.result_sha256),
        payload,
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
    for patch in deltas.values():
        _apply(tmp_path, patch)
        assert (tmp_path / "out").read_bytes() == NEW * 8


@fuzz_settings
@pytest.mark.parametrize("method", ["bsdiff", "zstd-dict", "windows"])
@given(data=st.data())
def test_mutated_payload_reframed(
    tmp_path: Path, deltas: dict[str, bytes], method: str, data: st.DataObject
) -> None:
    original = deltas[method]
    start = fmt.decode_header(io.BytesIO(original)).encoded_length
    _apply(tmp_path, _reframed(original, data.draw(_payload_edit(original[start:]))))


@fuzz_settings
@given(data=st.data())
def test_mutated_header_fields(
    tmp_path: Path, deltas: dict[str, bytes], data: st.DataObject
) -> None:
    original = deltas[data.draw(st.sampled_from(sorted(deltas)))]
    header = fmt.decode_header(io.BytesIO(original))
    payload = original[header.encoded_length :]
    lengths = st.integers(0, fmt.MAX_IMAGE_LENGTH) | st.sampled_from(
        [0, len(OLD), len(NEW) * 8, len(NEW) * 8 + 1]
    )
    digests = st.binary(min_size=32, max_size=32) | st.sampled_from(
        [header.base_sha256, header.result_sha256, hashlib.sha256(OLD).digest()]
    )
    try:
        patch = fmt.encode_delta(
            data.draw(st.sampled_from(["bsdiff", "zstd-dict", "windows", "stored", "zz"])),
            (data.draw(lengths | st.just(header.base_length)), data.draw(digests)),
            (data.draw(lengths | st.just(header.result_length)), data.draw(digests)),
            payload,
        )
    except fmt.DeltaFormatError:
        return
    _apply(tmp_path, patch)


@fuzz_settings
@given(st.binary(max_size=512), st.integers(0, 200))
def test_raw_bytes(tmp_path: Path, junk: bytes, keep: int) -> None:
    _apply(tmp_path, fmt.MAGIC[: keep % 9] + junk)
