"""The committed sample firmware and the firmware-info reader.

Every image under ``firmware-samples/<hardware-id>/<version>/`` must carry a
firmware-info block that agrees with its path, be listed in SHA256SUMS with
the right hash, and pass the ``selftest`` health check, except the 2.0.0
images, which are the demo's deliberately broken releases and must fail it.
The reader itself is tested on hand-made files for every way a block can be
missing or malformed.  When the cross toolchains are installed, the images
are rebuilt and must come out byte-identical; when ``qemu-aarch64`` is
installed, the gateway ELFs are run and their own self-test must agree with
their info block.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from uptake.firmware_info import (
    BLOCK_SIZE,
    FAULT_INJECTED_FLAG,
    MAGIC,
    FirmwareInfoError,
    read_firmware_info,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "firmware-samples"
IMAGE_FILE = {"stm32f4-bms": "bms.bin", "rpi-gateway": "gateway.elf"}
VERSIONS = ("1.0.0", "1.1.0", "2.0.0")
BROKEN_VERSION = "2.0.0"

IMAGES = [SAMPLES / hw / version / name for hw, name in IMAGE_FILE.items() for version in VERSIONS]


def _image_id(image: Path) -> str:
    return f"{image.parent.parent.name}-{image.parent.name}"


def _run_firmware_info(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uptake.firmware_info", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def _block(
    hardware_id: bytes = b"test-ecu", version: bytes = b"1.2.3", self_test: int = 0, flags: int = 0
) -> bytes:
    return struct.pack("<8s32s16sII", MAGIC, hardware_id, version, self_test, flags)


# --- the committed images ---------------------------------------------------


def test_layout_is_exactly_two_hardware_ids_in_three_versions() -> None:
    committed = sorted(
        path.relative_to(SAMPLES).as_posix()
        for hardware_id in IMAGE_FILE
        for path in (SAMPLES / hardware_id).rglob("*")
        if path.is_file()
    )
    assert committed == sorted(image.relative_to(SAMPLES).as_posix() for image in IMAGES)


@pytest.mark.parametrize("image", IMAGES, ids=_image_id)
def test_image_info_matches_its_path(image: Path) -> None:
    info = read_firmware_info(image)
    assert info.hardware_id == image.parent.parent.name
    assert info.version == image.parent.name
    broken = info.version == BROKEN_VERSION
    assert (info.self_test != 0) == broken
    assert bool(info.build_flags & FAULT_INJECTED_FLAG) == broken
    # Small enough for quick tests and demos, big enough to be real code.
    assert 1024 < image.stat().st_size < 64 * 1024


def test_versions_differ_in_code_not_just_the_version_string() -> None:
    for hardware_id, name in IMAGE_FILE.items():
        old = (SAMPLES / hardware_id / "1.0.0" / name).read_bytes()
        new = (SAMPLES / hardware_id / "1.1.0" / name).read_bytes()
        differing = sum(a != b for a, b in zip(old, new, strict=False)) + abs(len(old) - len(new))
        assert differing > 64, f"{hardware_id}: 1.0.0 and 1.1.0 differ in only {differing} bytes"
        flags = {read_firmware_info(SAMPLES / hardware_id / v / name).build_flags for v in VERSIONS}
        assert len(flags) == len(VERSIONS), (
            f"{hardware_id}: feature flags should change per version"
        )


def test_sha256sums_lists_every_image_with_its_hash() -> None:
    listed: dict[str, str] = {}
    for line in (SAMPLES / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    actual = {
        image.relative_to(SAMPLES).as_posix(): hashlib.sha256(image.read_bytes()).hexdigest()
        for image in IMAGES
    }
    assert listed == actual


@pytest.mark.parametrize("image", IMAGES, ids=_image_id)
def test_selftest_command_passes_good_and_fails_broken_images(image: Path) -> None:
    hardware_id = image.parent.parent.name
    result = _run_firmware_info("selftest", image, "--hardware-id", hardware_id)
    if image.parent.name == BROKEN_VERSION:
        assert result.returncode == 1
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "fails its power-on self-test (code 0x" in lines[0]
        assert str(image) in lines[0]
    else:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "passes" in result.stdout


def test_selftest_command_rejects_an_image_for_other_hardware() -> None:
    image = SAMPLES / "stm32f4-bms" / "1.0.0" / "bms.bin"
    result = _run_firmware_info("selftest", image, "--hardware-id", "rpi-gateway")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "built for hardware id 'stm32f4-bms', expected 'rpi-gateway'" in result.stderr


def test_selftest_command_reports_a_missing_image_in_one_line(tmp_path: Path) -> None:
    result = _run_firmware_info("selftest", tmp_path / "absent.bin")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "absent.bin: cannot read image" in result.stderr
    assert "Traceback" not in result.stderr


def test_show_json_for_scripts() -> None:
    image = SAMPLES / "rpi-gateway" / "1.1.0" / "gateway.elf"
    result = _run_firmware_info("show", image, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["hardware_id"] == "rpi-gateway"
    assert shown["version"] == "1.1.0"
    assert shown["self_test"] == 0


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="needs qemu-aarch64 (qemu-user)")
@pytest.mark.parametrize("version", VERSIONS)
def test_gateway_runs_and_its_own_selftest_agrees_with_its_info_block(version: str) -> None:
    image = SAMPLES / "rpi-gateway" / version / "gateway.elf"
    run = subprocess.run(
        ["qemu-aarch64", str(image), "--selftest"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    info = read_firmware_info(image)
    if info.self_test == 0:
        assert run.returncode == 0, run.stderr
        assert f"rpi-gateway {version}: power-on self-test passed" in run.stdout
    else:
        assert run.returncode == 1
        assert f"FAILED, code 0x{info.self_test:08x}" in run.stderr


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("arm-none-eabi-gcc", "aarch64-linux-gnu-gcc")),
    reason="needs gcc-arm-none-eabi and gcc-aarch64-linux-gnu",
)
def test_build_script_reproduces_the_committed_images() -> None:
    # --check builds in a scratch directory: the committed files are not touched.
    result = subprocess.run(
        [str(SAMPLES / "build.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the reader on hand-made files -----------------------------------------


@pytest.mark.parametrize(
    "offset",
    # Including both sides of the 64 KiB read-chunk boundary, so the magic
    # (and the block) straddles two chunks.
    [0, 1, 65536 - 8, 65536 - 5, 65536 - 1, 65536, 3 * 65536 + 17],
)
def test_reader_finds_the_block_anywhere(tmp_path: Path, offset: int) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(b"\xff" * offset + _block(self_test=7, flags=0x80000001) + b"\0" * 100)
    info = read_firmware_info(image)
    assert (info.hardware_id, info.version, info.self_test, info.build_flags) == (
        "test-ecu",
        "1.2.3",
        7,
        0x80000001,
    )
    assert not info.self_test_passed


def test_reader_accepts_a_block_ending_exactly_at_end_of_file(tmp_path: Path) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(b"\0" * 10 + _block())
    assert read_firmware_info(image).self_test_passed


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "no firmware-info block"),
        (b"\0" * 200_000, "no firmware-info block"),
        (b"\0" * 70_000 + MAGIC[:5], "no firmware-info block"),
        (b"\0" * 100 + _block()[: BLOCK_SIZE - 1], "truncated (63 of 64 bytes"),
        (b"\0" * 100 + MAGIC, "truncated (8 of 64 bytes"),
        (
            _block() + b"\0" * 70_000 + _block(),
            "a second firmware-info block at 0x111b0 (first at 0x0)",
        ),
        (MAGIC * 100_000, "a second firmware-info block at 0x8 (first at 0x0)"),
        (_block(hardware_id=b""), "hardware_id is empty"),
        (_block(version=b"1.0\0junk"), "version has bytes after its NUL terminator"),
        (_block(hardware_id=b"bad id"), "hardware_id b'bad id' is not printable ASCII"),
        (_block(version=b"\xff" * 16), "is not printable ASCII"),
    ],
    ids=[
        "empty",
        "zeros",
        "partial-magic",
        "truncated-block",
        "only-magic",
        "duplicate",
        "all-magic",
        "empty-hardware-id",
        "junk-after-nul",
        "space-in-id",
        "non-ascii",
    ],
)
def test_reader_rejects_missing_or_malformed_blocks(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(content)
    with pytest.raises(FirmwareInfoError, match=r"image\.bin") as raised:
        read_firmware_info(image)
    assert problem in str(raised.value)


def test_reader_names_an_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(FirmwareInfoError, match=r"absent\.bin: cannot read image"):
        read_firmware_info(tmp_path / "absent.bin")
    with pytest.raises(FirmwareInfoError, match="cannot read image"):
        read_firmware_info(tmp_path)
