"""Delta engine: create (server.delta) then apply (client.delta_apply), for real.

Images are synthetic but shaped like firmware: code-like bytes that change in
places, shifted regions, 0xFF flash padding and zero-filled runs, so that every
method (bsdiff, zstd-dict, windows with fills) is exercised. Every apply must
give byte-identical output; every bad delta must be refused with its own
error type and leave no output file.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.delta_apply import (
    DeltaBaseMismatch,
    DeltaCorrupt,
    DeltaError,
    DeltaResultMismatch,
    apply_delta_file,
    read_delta_header,
)
from server.delta import DeltaCreationError, create_delta
from signing import delta_format as fmt

REPO = Path(__file__).resolve().parents[1]


def _code_like(rng: random.Random, size: int) -> bytes:
    # Repetitive but not uniform, like machine code with a small vocabulary.
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _image_pair(seed: int, size: int, pad: int = 0, zero_run: int = 0) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    old = bytearray(_code_like(rng, size))
    new = bytearray(old)
    for _ in range(20):  # small patches
        pos = rng.randrange(len(new) - 64)
        new[pos : pos + rng.randint(1, 40)] = rng.randbytes(rng.randint(1, 40))
    cut = rng.randrange(len(new) // 2)
    new[cut:cut] = _code_like(rng, 3000)  # an inserted function shifts what follows
    del new[-2000:]
    if zero_run:
        old[4096 : 4096 + zero_run] = bytes(zero_run)
        new[8192 : 8192 + zero_run] = bytes(zero_run)
    return bytes(old + b"\xff" * pad), bytes(new + b"\xff" * pad)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    old, new = _image_pair(1, 200_000, pad=64 * 1024)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    return tmp_path / "old", tmp_path / "new"


def _roundtrip(tmp_path: Path, old: Path, new: Path, **options: object) -> Path:
    delta = tmp_path / "delta"
    report = create_delta(old, new, delta, **options)  # type: ignore[arg-type]
    assert report.delta_length == delta.stat().st_size
    result = apply_delta_file(old, delta, tmp_path / "result")
    assert (tmp_path / "result").read_bytes() == new.read_bytes()
    assert result.result_sha256 == hashlib.sha256(new.read_bytes()).hexdigest()
    assert result.result_length == new.stat().st_size
    return delta


@pytest.mark.parametrize("method", ["bsdiff", "windows", "zstd-dict"])
def test_each_method_gives_identical_image(
    tmp_path: Path, pair: tuple[Path, Path], method: str
) -> None:
    delta = _roundtrip(tmp_path, *pair, methods=[method])
    with open(delta, "rb") as stream:
        assert read_delta_header(stream).method == method
    assert delta.stat().st_size < pair[1].stat().st_size / 5


def test_smallest_candidate_is_kept(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    delta = tmp_path / "delta"
    report = create_delta(*pair, delta)
    assert report.delta_length - min(report.candidates.values()) < 200  # header only
    assert set(report.candidates) >= {"windows", "zstd-dict"}


def test_windowed_large_image_mode(tmp_path: Path) -> None:
    old, new = _image_pair(2, 600_000, pad=100_000, zero_run=150_000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    delta = _roundtrip(
        tmp_path,
        tmp_path / "old",
        tmp_path / "new",
        whole_limit=0,
        window_size=64 * 1024,
        base_budget=128 * 1024,
    )
    with open(delta, "rb") as stream:
        assert read_delta_header(stream).method == "windows"
    assert delta.stat().st_size < len(new) / 4


def test_identical_and_empty_images(tmp_path: Path) -> None:
    data = _code_like(random.Random(3), 50_000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    delta = _roundtrip(tmp_path, tmp_path / "a", tmp_path / "a")
    assert delta.stat().st_size < 400
    _roundtrip(tmp_path, tmp_path / "empty", tmp_path / "a")
    _roundtrip(tmp_path, tmp_path / "a", tmp_path / "empty")


def test_unknown_method_rejected(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    with pytest.raises(DeltaCreationError, match="unknown methods"):
        create_delta(*pair, tmp_path / "d", methods=["xdelta"])


# --- refusals -------------------------------------------------------------------


@pytest.fixture
def made(tmp_path: Path, pair: tuple[Path, Path]) -> tuple[Path, Path, Path]:
    # A format-version-1 delta, as servers published before the thin container: vehicles
    # must keep reading them (tests/test_delta_thin.py covers what the creator writes now).
    from server.delta import encoders

    old, new = (p.read_bytes() for p in pair)
    delta = tmp_path / "delta"
    delta.write_bytes(
        fmt.encode_delta(
            "bsdiff",
            (len(old), hashlib.sha256(old).digest()),
            (len(new), hashlib.sha256(new).digest()),
            encoders.bsdiff_section(old, new),
            version=fmt.FORMAT_VERSION,
        )
    )
    return pair[0], pair[1], delta


def _refused(tmp_path: Path, old: Path, delta: Path, error: type[DeltaError]) -> str:
    out = tmp_path / "out" / "result"
    with pytest.raises(error) as caught:
        apply_delta_file(old, delta, out)
    # Never a half-written output: no file, no temporary left behind.
    assert not out.exists()
    assert not list(out.parent.glob("*")) if out.parent.exists() else True
    return str(caught.value)


def test_corrupted_payload_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, _, delta = made
    data = bytearray(delta.read_bytes())
    data[len(data) // 2] ^= 0x40
    delta.write_bytes(data)
    assert "payload_sha256" in _refused(tmp_path, old, delta, DeltaCorrupt)


def test_corrupted_header_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, _, delta = made
    data = bytearray(delta.read_bytes())
    data[30] ^= 0x01  # inside base_length/base_sha256
    delta.write_bytes(data)
    assert "header_crc32" in _refused(tmp_path, old, delta, DeltaCorrupt)


def test_truncated_delta_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, _, delta = made
    delta.write_bytes(delta.read_bytes()[:-10])
    assert "truncated" in _refused(tmp_path, old, delta, DeltaCorrupt)


def test_wrong_base_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    _, new, delta = made
    message = _refused(tmp_path, new, delta, DeltaBaseMismatch)
    assert "base" in message
    other = tmp_path / "other"
    data = bytearray(made[0].read_bytes())
    data[100] ^= 1  # same length, one bit off
    other.write_bytes(data)
    assert "sha256" in _refused(tmp_path, other, delta, DeltaBaseMismatch)


def _rewrite_header(delta: Path, **changes: object) -> None:
    with open(delta, "rb") as stream:
        header = fmt.decode_header(stream)
        payload = stream.read()
    fields = {
        "method": header.method,
        "base_length": header.base_length,
        "base_sha256": header.base_sha256,
        "result_length": header.result_length,
        "result_sha256": header.result_sha256,
        "payload_length": header.payload_length,
        "payload_sha256": header.payload_sha256,
    }
    fields.update(changes)
    delta.write_bytes(fmt.DeltaHeader(**fields).encode() + payload)  # type: ignore[arg-type]


def test_result_hash_mismatch_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, _, delta = made
    _rewrite_header(delta, result_sha256=hashlib.sha256(b"something else").digest())
    assert "result sha256" in _refused(tmp_path, old, delta, DeltaResultMismatch)


def test_result_length_mismatch_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, new, delta = made
    _rewrite_header(delta, result_length=new.stat().st_size + 1)
    _refused(tmp_path, old, delta, DeltaResultMismatch)


def test_well_signed_but_malformed_payload_refused(
    tmp_path: Path, made: tuple[Path, Path, Path]
) -> None:
    # A payload whose checksum is right but whose content lies: the decoder must
    # validate, not trust (here a control record with a negative length).
    old, _, delta = made
    heads = (
        fmt.STREAM_HEAD.pack(fmt.CODEC_STORED, 24)
        + fmt.STREAM_HEAD.pack(fmt.CODEC_STORED, 0)
        + fmt.STREAM_HEAD.pack(fmt.CODEC_STORED, 0)
    )
    record = (5 | (1 << 63)).to_bytes(8, "little") + bytes(16)
    payload = heads + record
    with open(delta, "rb") as stream:
        fmt.decode_header(stream)
        start = stream.tell()
    delta.write_bytes(delta.read_bytes()[:start] + payload)
    _rewrite_header(
        delta, payload_length=len(payload), payload_sha256=hashlib.sha256(payload).digest()
    )
    assert "control record" in _refused(tmp_path, old, delta, DeltaCorrupt)


def test_unknown_method_in_header_refused(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    old, _, delta = made
    _rewrite_header(delta, method="xdelta3")
    assert "xdelta3" in _refused(tmp_path, old, delta, DeltaCorrupt)


# --- container format -----------------------------------------------------------------


def _header() -> fmt.DeltaHeader:
    return fmt.DeltaHeader("bsdiff", 10, bytes(32), 20, bytes(32), 0, bytes(32))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b"XPTDELTA" + b[8:], "magic"),
        (lambda b: b[:8] + b"\x00\x02" + b[10:], "format_version"),
        (lambda b: b[:10] + b"\x00" + b[11:], "method"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "header_crc32"),
        (lambda b: b[:20], "base_length"),
        (lambda b: b[:5], "magic"),
    ],
)
def test_header_errors_name_the_field(mutate: Callable[[bytes], bytes], field: str) -> None:
    import io

    with pytest.raises(fmt.DeltaFormatError) as caught:
        fmt.decode_header(io.BytesIO(mutate(_header().encode())))
    assert caught.value.field == field
    assert field in str(caught.value)


def test_header_roundtrip_and_validation() -> None:
    import io

    header = _header()
    assert fmt.decode_header(io.BytesIO(header.encode())) == header
    assert header.encoded_length == len(header.encode())
    with pytest.raises(fmt.DeltaFormatError, match="method"):
        fmt.DeltaHeader("Bad Method", 1, bytes(32), 1, bytes(32), 0, bytes(32))
    with pytest.raises(fmt.DeltaFormatError, match="result_sha256"):
        fmt.DeltaHeader("bsdiff", 1, bytes(32), 1, bytes(31), 0, bytes(32))


# --- properties -------------------------------------------------------------------------


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    old=st.binary(max_size=3000),
    edits=st.lists(st.tuples(st.integers(0, 3000), st.binary(max_size=50)), max_size=5),
    method=st.sampled_from(["bsdiff", "windows", "zstd-dict"]),
)
def test_any_pair_roundtrips(
    tmp_path: Path, old: bytes, edits: list[tuple[int, bytes]], method: str
) -> None:
    new = bytearray(old)
    for pos, chunk in edits:
        new[pos : pos + len(chunk)] = chunk
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    _roundtrip(tmp_path, tmp_path / "old", tmp_path / "new", methods=[method], workers=1)


# --- command line -----------------------------------------------------------------------


def _uptake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uptake", "delta", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_create_apply(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    old, new = pair
    created = _uptake("create", str(old), str(new), "-o", str(tmp_path / "d"), "--json")
    assert created.returncode == 0, created.stderr
    import json

    report = json.loads(created.stdout)
    assert report["delta_bytes"] == (tmp_path / "d").stat().st_size
    assert report["method"] in {"bsdiff", "windows", "zstd-dict"}
    text = _uptake("create", str(old), str(new), "-o", str(tmp_path / "d2"))
    assert "method:" in text.stdout and "time:" in text.stdout
    applied = _uptake("apply", str(old), str(tmp_path / "d"), "-o", str(tmp_path / "r"))
    assert applied.returncode == 0, applied.stderr
    assert (tmp_path / "r").read_bytes() == new.read_bytes()
    assert "verified" in applied.stdout


def test_cli_refuses_wrong_base_without_output(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    old, new = pair
    assert _uptake("create", str(old), str(new), "-o", str(tmp_path / "d")).returncode == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    refused = _uptake("apply", str(new), str(tmp_path / "d"), "-o", str(out_dir / "r"))
    assert refused.returncode != 0
    assert "DeltaBaseMismatch" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert list(out_dir.iterdir()) == []


def test_cli_help_teaches() -> None:
    shown = _uptake("--help")
    assert shown.returncode == 0
    assert "create" in shown.stdout and "apply" in shown.stdout and "Examples" in shown.stdout


def test_engines_import_only_their_side() -> None:
    code = (
        "import sys, server.delta, client.delta_apply\n"
        "bad = {'aiohttp', 'sqlmodel'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    code = "import sys, client.delta_apply\nassert 'server' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_windows_payload_with_every_segment_kind(tmp_path: Path) -> None:
    # Hand-built to cover what the creator picks only on some inputs: a zstd-dict
    # segment over two extents, plain zstd, stored, bsdiff, fills of two bytes.
    from server.delta import encoders

    rng = random.Random(9)
    old = _code_like(rng, 300_000)
    pieces = [
        (
            old[10_000:40_000] + old[200_000:230_000],
            [(10_000, 30_000), (200_000, 30_000)],
            fmt.SEGMENT_ZSTD_DICT,
        ),
        (rng.randbytes(5000), [], fmt.SEGMENT_ZSTD),
        (rng.randbytes(3000), [], fmt.SEGMENT_STORED),
        (old[50_000:90_000], [(40_000, 60_000)], fmt.SEGMENT_BSDIFF),
    ]
    payload = bytearray(fmt.WINDOW_COUNT.pack(len(pieces)))
    new = bytearray()
    for number, (data, extents, method) in enumerate(pieces):
        base = b"".join(old[o : o + n] for o, n in extents)
        fills = [(0, 4096, 0x00), (4096 + len(data) // 2, 8192, 0xFF)] if number % 2 else []
        window = bytearray(data)
        for offset, length, byte in fills:
            window[offset:offset] = bytes([byte]) * length
        new += window
        if method == fmt.SEGMENT_ZSTD_DICT:
            segment = encoders.zstd_dict_frame(base, data)
        elif method == fmt.SEGMENT_ZSTD:
            segment = encoders.zstd_frame(data)
        elif method == fmt.SEGMENT_BSDIFF:
            segment = encoders.compact_section(base, data)
        else:
            segment = data
        payload += fmt.WINDOW_LENGTH.pack(len(window)) + fmt.LIST_COUNT.pack(len(fills))
        payload += b"".join(fmt.FILL.pack(*fill) for fill in fills)
        payload += fmt.LIST_COUNT.pack(len(extents))
        payload += b"".join(fmt.EXTENT.pack(*extent) for extent in extents)
        payload += fmt.SEGMENT_HEAD.pack(method, len(segment)) + segment
    (tmp_path / "old").write_bytes(old)
    delta = fmt.encode_delta(
        "windows",
        (len(old), hashlib.sha256(old).digest()),
        (len(new), hashlib.sha256(new).digest()),
        bytes(payload),
    )
    (tmp_path / "delta").write_bytes(delta)
    apply_delta_file(tmp_path / "old", tmp_path / "delta", tmp_path / "new")
    assert (tmp_path / "new").read_bytes() == bytes(new)


def test_slot_larger_than_base(tmp_path: Path, made: tuple[Path, Path, Path]) -> None:
    # An A/B slot partition is larger than the image in it: the base is its prefix.
    from client.delta_apply import apply_delta

    old, new, delta = made
    slot = tmp_path / "slot"
    slot.write_bytes(old.read_bytes() + b"\xff" * 100_000)
    with open(slot, "rb") as base, open(delta, "rb") as patch, open(tmp_path / "b", "wb") as out:
        applied = apply_delta(base, patch, out, old_is_slot=True)
    assert (tmp_path / "b").read_bytes() == new.read_bytes()
    assert applied.result_length == new.stat().st_size
    assert "length" in _refused(tmp_path, slot, delta, DeltaBaseMismatch)


def _sample_pairs() -> list[tuple[Path, Path]]:
    samples = REPO / "firmware-samples"
    pairs = []
    for product in sorted(p for p in samples.iterdir() if p.is_dir() and p.name != "src"):
        versions = sorted(v for v in product.iterdir() if v.is_dir())
        for older, newer in itertools.pairwise(versions):
            for image in older.iterdir():
                if (newer / image.name).is_file():
                    pairs.append((image, newer / image.name))
    return pairs


@pytest.mark.parametrize("images", _sample_pairs(), ids=lambda p: f"{p[0].parent.name}-{p[1]}")
def test_sample_firmware_roundtrip(tmp_path: Path, images: tuple[Path, Path]) -> None:
    old, new = images
    delta = _roundtrip(tmp_path, old, new)
    assert delta.stat().st_size < new.stat().st_size


def test_window_fallback_without_bsdiff_applies(tmp_path: Path) -> None:
    # What a window becomes when its bsdiff worker crashed: zstd/stored only.
    from server.delta import create as creation
    from server.delta import plan

    old, new = _image_pair(4, 300_000, pad=50_000, zero_run=60_000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    with open(tmp_path / "old", "rb") as o, open(tmp_path / "new", "rb") as n:
        windows = plan.plan_windows(o, n, len(old), len(new), 64 * 1024, 128 * 1024)
    payload = fmt.WINDOW_COUNT.pack(len(windows)) + b"".join(
        creation._encode_window(tmp_path / "old", tmp_path / "new", w, (), use_bsdiff=False)[0]
        for w in windows
    )
    (tmp_path / "delta").write_bytes(
        fmt.encode_delta(
            "windows",
            (len(old), hashlib.sha256(old).digest()),
            (len(new), hashlib.sha256(new).digest()),
            payload,
        )
    )
    apply_delta_file(tmp_path / "old", tmp_path / "delta", tmp_path / "result")
    assert (tmp_path / "result").read_bytes() == new
