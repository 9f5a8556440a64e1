"""The thin container (format version 2) and the transformed method, created and applied for real.

Images are built here: firmware-like code with small edits, wrapped in real
gzip/xz/zstd streams (made by the same libraries a build system uses) and
real ELF headers, so that the creator's stream search, its exact
recompression, the BCJ filters and the applier's reversal are all exercised.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from client.delta_apply import (
    DeltaBaseMismatch,
    DeltaCorrupt,
    DeltaError,
    DeltaResultMismatch,
    apply_delta_file,
    read_delta_header,
)
from server.delta import create_delta, encoders
from signing import delta_format as fmt


def _code(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _edited(data: bytes, seed: int, edits: int = 20) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(edits):
        pos = rng.randrange(len(out) - 64)
        out[pos : pos + rng.randint(1, 30)] = rng.randbytes(rng.randint(1, 30))
    cut = rng.randrange(len(out) // 2)
    out[cut:cut] = _code(seed + 100, 2000)
    return bytes(out)


def _roundtrip(tmp_path: Path, old: bytes, new: bytes, **options: object) -> tuple[Path, object]:
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    delta = tmp_path / "delta"
    report = create_delta(tmp_path / "old", tmp_path / "new", delta, workers=1, **options)  # type: ignore[arg-type]
    assert report.delta_length == delta.stat().st_size
    applied = apply_delta_file(tmp_path / "old", delta, tmp_path / "result")
    assert (tmp_path / "result").read_bytes() == new
    assert applied.result_sha256 == hashlib.sha256(new).hexdigest()
    return delta, report


# --- container ----------------------------------------------------------------------


def test_creator_writes_the_thin_container(tmp_path: Path) -> None:
    old = _code(1, 100_000)
    delta, _ = _roundtrip(tmp_path, old, _edited(old, 2))
    with open(delta, "rb") as stream:
        header = read_delta_header(stream)
    assert header.format_version == fmt.THIN_VERSION
    assert header.encoded_length + header.trailer_length <= 60


def test_nearly_identical_pair_costs_little_more_than_zstd_patch_from(tmp_path: Path) -> None:
    # The fixed overhead must not dominate: within 64 bytes of zstd --patch-from -19 (the
    # zstd CLI writes the same frame with a 4-byte checksum, so this is the stricter bound).
    old = _code(3, 200_000)
    new = bytearray(old)
    new[123_456] ^= 0x01
    delta, _ = _roundtrip(tmp_path, old, bytes(new))
    params = zstandard.ZstdCompressionParameters.from_level(
        19, window_log=19, enable_ldm=True, source_size=len(new)
    )
    peer = zstandard.ZstdCompressor(
        dict_data=zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
        compression_params=params,
    ).compress(bytes(new))
    assert delta.stat().st_size <= len(peer) + 64, (delta.stat().st_size, len(peer))


def test_thin_refusals_name_what_failed(tmp_path: Path) -> None:
    old = _code(4, 80_000)
    new = _edited(old, 5)
    delta, _ = _roundtrip(tmp_path, old, new)
    data = delta.read_bytes()
    out = tmp_path / "out"

    def refused(patch: bytes, base: bytes, error: type[DeltaError]) -> str:
        (tmp_path / "p").write_bytes(patch)
        (tmp_path / "b").write_bytes(base)
        with pytest.raises(error) as caught:
            apply_delta_file(tmp_path / "b", tmp_path / "p", out)
        assert not out.exists()
        return str(caught.value)

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    assert "crc32" in refused(bytes(flipped), old, DeltaCorrupt)
    assert "crc32" in refused(data[:-7], old, DeltaCorrupt)
    assert "base" in refused(data, new, DeltaBaseMismatch)
    wrong = fmt.encode_delta(
        "bsdiff",
        (len(old), hashlib.sha256(old).digest()),
        (len(new), hashlib.sha256(b"another image").digest()),
        data[read_delta_header(io.BytesIO(data)).encoded_length : -4],
    )
    assert "sha256" in refused(wrong, old, DeltaResultMismatch)
    with pytest.raises(fmt.DeltaFormatError) as caught:
        fmt.decode_header(io.BytesIO(fmt.MAGIC_V2 + b"\x09" + bytes(60)))
    assert caught.value.field == "method"


def test_compact_section_picks_the_smaller_matcher(tmp_path: Path) -> None:
    old = _code(6, 150_000)
    new = _edited(old, 7, edits=60)
    both = encoders.compact_section(old, new)
    only_bsdiff = encoders.compact_section(old, new, use_hdiffpatch=False)
    only_hdiff = encoders.compact_section(old, new, use_bsdiff=False)
    assert len(both) == min(len(only_bsdiff), len(only_hdiff))
    for section in (only_bsdiff, only_hdiff):
        patch = fmt.encode_delta(
            "bsdiff",
            (len(old), hashlib.sha256(old).digest()),
            (len(new), hashlib.sha256(new).digest()),
            section,
        )
        (tmp_path / "old").write_bytes(old)
        (tmp_path / "patch").write_bytes(patch)
        apply_delta_file(tmp_path / "old", tmp_path / "patch", tmp_path / "new")
        assert (tmp_path / "new").read_bytes() == new


# --- transformed: compressed streams ---------------------------------------------------------


def _wrapped(payload: bytes, codec: str) -> bytes:
    """An image holding a compressed payload between a loader and a trailer, like a bzImage."""
    loader = _code(50, 20_000)
    if codec == "xz":
        stream = lzma.compress(
            payload,
            format=lzma.FORMAT_XZ,
            check=lzma.CHECK_CRC32,
            filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}],
        )
    elif codec == "gzip":
        stream = gzip.compress(payload, compresslevel=9, mtime=1_700_000_000)
    else:
        stream = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(payload)
    return loader + stream + b"\x00" * 512 + _code(51, 3000)


@pytest.mark.parametrize("codec", ["xz", "gzip", "zstd"])
def test_compressed_payload_is_diffed_expanded_and_recompressed_exactly(
    tmp_path: Path, codec: str
) -> None:
    inner_old = _code(10, 400_000)
    inner_new = _edited(inner_old, 11)
    old, new = _wrapped(inner_old, codec), _wrapped(inner_new, codec)
    delta, report = _roundtrip(tmp_path, old, new)
    assert report.method == "transformed", report.as_dict()  # type: ignore[attr-defined]
    assert "streams expanded" in report.detail  # type: ignore[attr-defined]
    plain = min(v for k, v in report.candidates.items() if k in ("bsdiff", "windows", "zstd-dict"))  # type: ignore[attr-defined]
    assert delta.stat().st_size < plain / 3


def test_recompression_that_differs_is_refused_without_output(tmp_path: Path) -> None:
    inner_old = _code(12, 200_000)
    old, new = _wrapped(inner_old, "gzip"), _wrapped(_edited(inner_old, 13), "gzip")
    delta, _ = _roundtrip(tmp_path, old, new, methods=["transformed"])
    data = bytearray(delta.read_bytes())
    header = read_delta_header(io.BytesIO(bytes(data)))
    payload = bytes(data[header.encoded_length : -4])
    # the result map's gzip parameters (3 varints: level, memLevel 8, strategy 0) get another
    # level: what a vehicle with a different compressor would produce
    level, marker = next(
        (level, payload.find(bytes([3, level, 8, 0])))
        for level in range(1, 10)
        if payload.find(bytes([3, level, 8, 0])) > 0
    )
    other = 1 if level != 1 else 9
    tampered = payload[:marker] + bytes([3, other, 8, 0]) + payload[marker + 4 :]
    patch = fmt.encode_delta(
        "transformed",
        (len(old), hashlib.sha256(old).digest()),
        (len(new), hashlib.sha256(new).digest()),
        tampered,
    )
    (tmp_path / "tampered").write_bytes(patch)
    with pytest.raises(DeltaResultMismatch, match="recompression"):
        apply_delta_file(tmp_path / "old", tmp_path / "tampered", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".uptake-delta-base")]


def test_recompression_memory_is_bounded_by_the_applier(tmp_path: Path) -> None:
    inner_old = _code(14, 200_000)
    old, new = _wrapped(inner_old, "xz"), _wrapped(_edited(inner_old, 15), "xz")
    delta, _ = _roundtrip(tmp_path, old, new, methods=["transformed"])
    with pytest.raises(DeltaCorrupt, match="MiB"):
        apply_delta_file(
            tmp_path / "old", delta, tmp_path / "out", recompress_memory_limit=16 << 20
        )
    assert not (tmp_path / "out").exists()


def test_creator_leaves_streams_compressed_that_need_more_memory_than_the_fleet_has(
    tmp_path: Path,
) -> None:
    # 'uptake delta create --max-recompress-mib' (the server's delta_max_recompress_mib): an
    # xz stream with an 8 MiB dictionary needs about 96 MiB to recompress on the vehicle
    inner_old = _code(16, 200_000)
    (tmp_path / "old").write_bytes(_wrapped(inner_old, "xz"))
    (tmp_path / "new").write_bytes(_wrapped(_edited(inner_old, 17), "xz"))

    def create(*limit: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "uptake", "delta", "create", str(tmp_path / "old"),
             str(tmp_path / "new"), "-o", str(tmp_path / "d"), "--json", "--workers", "1", *limit],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        report: dict[str, object] = json.loads(done.stdout)
        return report

    assert "streams expanded" in str(create()["detail"])
    bounded = create("--max-recompress-mib", "64")
    assert "streams expanded" not in str(bounded["detail"]), bounded
    assert not any("streams expanded" in k for k in bounded["candidate_payload_bytes"])  # type: ignore[attr-defined]


# --- transformed: executable code ------------------------------------------------------------


def _elf(machine: int, body: bytes) -> bytes:
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 1  # 64-bit, little-endian
    header[18:20] = machine.to_bytes(2, "little")
    return bytes(header) + body


def _calls(seed: int, count: int, shift: int) -> bytes:
    # x86 code whose relative calls all target one function placed after an inserted gap
    rng = random.Random(seed)
    out = bytearray()
    target = 600_000
    for _ in range(count):
        out += rng.randbytes(rng.randint(3, 20))
        position = len(out) + shift
        out += b"\xe8" + (target - (position + 5)).to_bytes(4, "little", signed=True)
    return bytes(out)


def test_executable_is_filtered_when_that_is_smaller(tmp_path: Path) -> None:
    old = _elf(62, _calls(20, 20_000, 0))
    new = _elf(62, b"\x90" * 64 + _calls(20, 20_000, 64))
    _, report = _roundtrip(tmp_path, old, new)
    assert any(k.startswith("x86 branches absolute") for k in report.candidates)  # type: ignore[attr-defined]
    assert report.method == "transformed", report.as_dict()  # type: ignore[attr-defined]
    # an arch hint does the same for a raw image; a bad hint is refused clearly
    _roundtrip(tmp_path, old[64:], new[64:], arch_hint="x86", methods=["transformed"])
    from server.delta import DeltaCreationError

    with pytest.raises(DeltaCreationError, match="architecture"):
        create_delta(tmp_path / "old", tmp_path / "new", tmp_path / "d", arch_hint="z80")


def _arm64_calls(seed: int, count: int, shift: int) -> bytes:
    # AArch64 code: BL and ADRP to one function and one page placed after an inserted gap
    rng = random.Random(seed)
    words = []
    for _ in range(count):
        words += [rng.getrandbits(32) & 0x7FFFFFFF for _ in range(rng.randint(1, 6))]
        pc = len(words) * 4 + shift
        if rng.random() < 0.7:
            words.append(0x94000000 | (((4_000_000 - pc) >> 2) & 0x03FFFFFF))
        else:
            page = ((8 << 20) >> 12) - (pc >> 12)
            words.append(0x90000000 | ((page & 3) << 29) | (((page >> 2) & 0x7FFFF) << 5) | 3)
    return b"".join(w.to_bytes(4, "little") for w in words)


@pytest.mark.skipif(shutil.which("xz") is None, reason="needs the xz command (xz-utils)")
def test_arm64_filter_is_xz_arm64_filter_byte_for_byte() -> None:
    from signing.branch_filters import Arm64Decoder, Arm64Encoder

    elf = (
        Path(__file__).parent.parent / "firmware-samples" / "rpi-gateway" / "1.0.0" / "gateway.elf"
    ).read_bytes()
    for data in (elf, random.Random(7).randbytes(100_003), _arm64_calls(3, 5_000, 0) + b"\x01"):
        xz = subprocess.run(
            ["xz", "--format=raw", "--arm64", "--lzma2=preset=0", "-c"],
            input=data, capture_output=True, check=True,
        ).stdout  # fmt: skip
        expected = lzma.decompress(
            xz, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}]
        )
        assert expected != data  # something was converted
        for piece in (1, 3, 4096, len(data)):  # streaming: any split gives the same bytes
            encoder = Arm64Encoder()
            encoded = b"".join(
                encoder.encode(data[i : i + piece]) for i in range(0, len(data), piece)
            )
            assert encoded + encoder.flush() == expected
            decoder = Arm64Decoder(len(expected))
            decoded = b"".join(
                decoder.decode(expected[i : i + piece]) for i in range(0, len(expected), piece)
            )
            assert decoded == data


def test_arm64_executable_is_filtered(tmp_path: Path) -> None:
    old = _elf(183, _arm64_calls(21, 20_000, 0))
    new = _elf(183, b"\x1f\x20\x03\xd5" * 16 + _arm64_calls(21, 20_000, 64))
    _, report = _roundtrip(tmp_path, old, new)
    candidates = report.candidates  # type: ignore[attr-defined]
    filtered = next(v for k, v in candidates.items() if k.startswith("arm64 branches absolute"))
    plain = min(v for k, v in candidates.items() if "branches absolute" not in k)
    assert filtered < plain / 2, candidates
    assert report.method == "transformed", report.as_dict()  # type: ignore[attr-defined]


# --- the ECU's sequential patch, from every streamable payload ---------------------------------


@pytest.mark.parametrize("method", ["bsdiff", "windows"])
def test_ecu_patch_from_a_delta_rebuilds_the_image_in_bounded_pieces(
    tmp_path: Path, method: str
) -> None:
    from client.secondaries.ecu_patch import EcuPatchLimits, PatchApplier
    from client.secondaries.uds_delta import ecu_patch_from_delta

    old = _code(30, 300_000) + b"\xff" * 70_000 + bytes(50_000)  # flash padding, zeroed space
    new = _edited(_code(30, 300_000), 31) + b"\xff" * 60_000 + bytes(60_000)
    delta, _ = _roundtrip(tmp_path, old, new, methods=[method])  # windows: with fills
    result = (len(new), hashlib.sha256(new).digest())
    size = ecu_patch_from_delta(delta, tmp_path / "patch", hashlib.sha256(old).digest(), result, 16)
    assert size < len(new) / 5
    written = bytearray()
    applier = PatchApplier(
        lambda offset, n: old[offset : offset + n],
        written.extend,
        (len(old), hashlib.sha256(old).digest()),
        EcuPatchLimits(),
    )
    patch = (tmp_path / "patch").read_bytes()
    for start in range(0, len(patch), 4093):  # TransferData blocks
        applier.feed(patch[start : start + 4093])
    applier.finish()
    assert bytes(written) == new


def test_a_delta_that_needs_its_whole_base_is_not_streamed(tmp_path: Path) -> None:
    from client.delta_apply import DeltaNotStreamable, walk_delta

    old = _code(32, 50_000)
    delta, _ = _roundtrip(tmp_path, old, _edited(old, 33), methods=["zstd-dict"])
    with open(delta, "rb") as stream, pytest.raises(DeltaNotStreamable):
        walk_delta(stream, lambda offset, diff: None, lambda data: None)


def test_ecu_refuses_a_patch_for_another_image(tmp_path: Path) -> None:
    from client.secondaries.ecu_patch import EcuPatchLimits, PatchApplier, PatchError
    from client.secondaries.uds_delta import ecu_patch_from_delta

    old = _code(34, 80_000)
    new = _edited(old, 35)
    delta, _ = _roundtrip(tmp_path, old, new)
    result = (len(new), hashlib.sha256(new).digest())
    ecu_patch_from_delta(delta, tmp_path / "patch", hashlib.sha256(old).digest(), result, 16)
    other = _code(36, 80_000)
    applier = PatchApplier(
        lambda offset, n: other[offset : offset + n],
        lambda data: None,
        (len(other), hashlib.sha256(other).digest()),
        EcuPatchLimits(),
    )
    with pytest.raises(PatchError, match="another image"):
        applier.feed((tmp_path / "patch").read_bytes())
    small = PatchApplier(
        lambda offset, n: old[offset : offset + n],
        lambda data: None,
        (len(old), hashlib.sha256(old).digest()),
        EcuPatchLimits(max_dict_log=12),
    )
    with pytest.raises(PatchError, match="dictionary"):
        small.feed((tmp_path / "patch").read_bytes())
