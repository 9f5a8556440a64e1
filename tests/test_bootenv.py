"""Boot environments against the real tools and real environment images.

The U-Boot tests build a redundant environment image with ``mkenvimage``
(u-boot-tools) and drive it with libubootenv's ``fw_printenv``/``fw_setenv``;
the GRUB tests use a block made by ``grub-editenv create``. Each is skipped,
naming the Debian package, when its tools are missing.
"""

from __future__ import annotations

import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from client.bootenv import (
    BootEnvironment,
    BootEnvironmentError,
    FileBootEnvironment,
    GrubEnvironment,
    UBootEnvironment,
    simulate_bootloader,
)

ENV_SIZE = 0x4000  # one copy of the redundant U-Boot environment

needs_uboot_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("fw_printenv", "fw_setenv", "mkenvimage")),
    reason="needs fw_printenv/fw_setenv (apt: libubootenv-tool) and mkenvimage (apt: u-boot-tools)",
)
needs_grub_editenv = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="needs grub-editenv (apt: grub-common)"
)

INITIAL = {"boot_slot": "a", "bootcount": "0", "bootlimit": "3", "upgrade_available": "0"}


def make_uboot_env(directory: Path, variables: dict[str, str]) -> Path:
    """Create a redundant U-Boot environment file and its fw_env.config; return the config."""
    text = directory / "env.txt"
    text.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    copy = directory / "copy.bin"
    subprocess.run(
        ["mkenvimage", "-s", hex(ENV_SIZE), "-r", "-o", str(copy), str(text)], check=True
    )
    image = directory / "uboot.env"
    image.write_bytes(copy.read_bytes() * 2)  # both copies valid, same flag
    config = directory / "fw_env.config"
    config.write_text(f"{image} 0x0 {hex(ENV_SIZE)}\n{image} {hex(ENV_SIZE)} {hex(ENV_SIZE)}\n")
    return config


def fw_printenv(config: Path) -> dict[str, str]:
    out = subprocess.run(
        ["fw_printenv", "-c", str(config)], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def redundant_copies(image: Path) -> list[tuple[bool, int, bytes]]:
    """(CRC valid, flag, variables area) of both copies, in mkenvimage -r's layout."""
    raw = image.read_bytes()
    copies = []
    for start in (0, ENV_SIZE):
        block = raw[start : start + ENV_SIZE]
        crc = int.from_bytes(block[:4], "little")
        data = block[5:]
        copies.append((zlib.crc32(data) == crc, block[4], data))
    return copies


def make_grub_env(directory: Path, variables: dict[str, str]) -> Path:
    path = directory / "grubenv"
    subprocess.run(["grub-editenv", str(path), "create"], check=True)
    subprocess.run(
        ["grub-editenv", str(path), "set", *(f"{k}={v}" for k, v in variables.items())],
        check=True,
    )
    return path


@needs_uboot_tools
def test_uboot_reads_and_writes_through_the_tools(tmp_path: Path) -> None:
    config = make_uboot_env(tmp_path, INITIAL)
    env = UBootEnvironment(config)
    assert env.read() == INITIAL

    env.write({"boot_slot": "b", "upgrade_available": "1", "new_var": "x y=z"})

    expected = {**INITIAL, "boot_slot": "b", "upgrade_available": "1", "new_var": "x y=z"}
    assert fw_printenv(config) == expected
    assert env.read() == expected
    # libubootenv wrote the other copy with a valid CRC and a newer flag; the
    # old copy is intact, which is what makes the update atomic.
    (old_ok, old_flag, old_data), (new_ok, new_flag, new_data) = redundant_copies(
        tmp_path / "uboot.env"
    )
    assert old_ok and new_ok
    assert new_flag == old_flag + 1
    assert b"boot_slot=a\0" in old_data
    assert b"boot_slot=b\0" in new_data


@needs_uboot_tools
def test_uboot_survives_a_torn_write_of_one_copy(tmp_path: Path) -> None:
    config = make_uboot_env(tmp_path, INITIAL)
    env = UBootEnvironment(config)
    env.write({"boot_slot": "b"})
    # A power cut in the middle of the next write leaves garbage in the copy
    # being written (the older one); the newest valid copy still wins.
    image = tmp_path / "uboot.env"
    raw = bytearray(image.read_bytes())
    raw[10:20] = b"\xaa" * 10
    image.write_bytes(bytes(raw))
    assert env.read()["boot_slot"] == "b"


@needs_uboot_tools
def test_uboot_corrupt_environment_is_a_clear_error(tmp_path: Path) -> None:
    config = make_uboot_env(tmp_path, INITIAL)
    image = tmp_path / "uboot.env"
    raw = bytearray(image.read_bytes())
    raw[0:4] = raw[ENV_SIZE : ENV_SIZE + 4] = b"\0\0\0\0"  # both CRCs wrong
    image.write_bytes(bytes(raw))
    env = UBootEnvironment(config)
    with pytest.raises(BootEnvironmentError, match=r"fw_printenv -c .* failed .*environment"):
        env.read()
    with pytest.raises(BootEnvironmentError, match="fw_setenv"):
        env.write({"boot_slot": "b"})


@needs_uboot_tools
def test_uboot_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BootEnvironmentError, match="Configuration file wrong"):
        UBootEnvironment(tmp_path / "nope.config").read()


@needs_grub_editenv
def test_grub_reads_and_writes_through_the_tool(tmp_path: Path) -> None:
    path = make_grub_env(tmp_path, INITIAL)
    env = GrubEnvironment(path)
    assert env.read() == INITIAL
    env.write({"boot_slot": "b", "upgrade_available": "1"})
    listing = subprocess.run(
        ["grub-editenv", str(path), "list"], check=True, capture_output=True, text=True
    ).stdout
    assert "boot_slot=b\n" in listing and "upgrade_available=1\n" in listing
    assert env.read() == {**INITIAL, "boot_slot": "b", "upgrade_available": "1"}
    assert path.stat().st_size == 1024  # still a valid GRUB environment block


@needs_grub_editenv
def test_grub_corrupt_or_missing_block_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "grubenv"
    bad.write_bytes(b"not a grub environment block\n")
    with pytest.raises(
        BootEnvironmentError, match=r"grub-editenv .* list failed.*invalid environment block"
    ):
        GrubEnvironment(bad).read()
    with pytest.raises(BootEnvironmentError, match=r"does not exist.*grub-editenv .* create"):
        GrubEnvironment(tmp_path / "missing").read()
    assert not (tmp_path / "missing").exists()


@needs_grub_editenv
def test_grub_block_full_is_a_clear_error(tmp_path: Path) -> None:
    env = GrubEnvironment(make_grub_env(tmp_path, INITIAL))
    with pytest.raises(
        BootEnvironmentError, match=r"grub-editenv .* set big=x+\.\.\. failed .*too small"
    ):
        env.write({"big": "x" * 2000})
    assert env.read() == INITIAL


def test_missing_tool_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no tools at all
    with pytest.raises(BootEnvironmentError, match=r"fw_printenv not found.*libubootenv-tool"):
        UBootEnvironment(tmp_path / "fw_env.config").read()
    grubenv = tmp_path / "grubenv"
    grubenv.write_bytes(b"")
    with pytest.raises(BootEnvironmentError, match=r"grub-editenv not found.*grub-common"):
        GrubEnvironment(grubenv).write({"boot_slot": "a"})


def test_names_and_values_the_tools_cannot_store_are_refused(tmp_path: Path) -> None:
    env = GrubEnvironment(tmp_path / "grubenv")
    with pytest.raises(BootEnvironmentError, match="invalid variable name"):
        env.write({"a b": "1"})
    with pytest.raises(BootEnvironmentError, match="newline"):
        UBootEnvironment(tmp_path / "fw_env.config").write({"boot_slot": "a\nb"})


# The bootloader simulator on every backend ---------------------------------

BackendFactory = Callable[[Path], BootEnvironment]


def _file_backend(directory: Path) -> BootEnvironment:
    env = FileBootEnvironment(directory / "bootenv.json")
    env.write(INITIAL)
    return env


def _uboot_backend(directory: Path) -> BootEnvironment:
    if not all(shutil.which(t) for t in ("fw_printenv", "fw_setenv", "mkenvimage")):
        pytest.skip("needs libubootenv-tool and u-boot-tools (apt)")
    return UBootEnvironment(make_uboot_env(directory, INITIAL))


def _grub_backend(directory: Path) -> BootEnvironment:
    if shutil.which("grub-editenv") is None:
        pytest.skip("needs grub-editenv (apt: grub-common)")
    return GrubEnvironment(make_grub_env(directory, INITIAL))


BACKENDS = pytest.mark.parametrize(
    "backend", [_file_backend, _uboot_backend, _grub_backend], ids=["file", "uboot", "grub"]
)


@BACKENDS
def test_uncommitted_trial_rolls_back_after_bootlimit_boots(
    backend: BackendFactory, tmp_path: Path
) -> None:
    env = backend(tmp_path)
    assert simulate_bootloader(env) == "a"  # no trial: bootcount untouched
    assert env.read()["bootcount"] == "0"

    # The agent installed slot b and switched to it on trial.
    env.write({"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"})
    booted = [simulate_bootloader(env) for _ in range(4)]

    # bootlimit=3: three trial boots of b, the fourth falls back to a.
    assert booted == ["b", "b", "b", "a"]
    state = env.read()
    assert state["boot_slot"] == "a"
    assert state["upgrade_available"] == "0"
    assert state["bootcount"] == "0"
    assert simulate_bootloader(env) == "a"  # and stays there


@BACKENDS
def test_committed_trial_stays(backend: BackendFactory, tmp_path: Path) -> None:
    env = backend(tmp_path)
    env.write({"boot_slot": "b", "upgrade_available": "1", "bootcount": "0"})
    assert simulate_bootloader(env) == "b"
    env.write({"upgrade_available": "0", "bootcount": "0"})  # the agent commits
    assert [simulate_bootloader(env) for _ in range(5)] == ["b"] * 5
    assert env.read()["bootcount"] == "0"


def test_simulator_rejects_a_garbled_environment(tmp_path: Path) -> None:
    env = FileBootEnvironment(tmp_path / "bootenv.json")
    env.write({"boot_slot": "c"})
    with pytest.raises(BootEnvironmentError, match="boot_slot"):
        simulate_bootloader(env)
    env.write({"boot_slot": "a", "upgrade_available": "1", "bootlimit": "three"})
    with pytest.raises(BootEnvironmentError, match="bootlimit"):
        simulate_bootloader(env)


def test_unset_bootlimit_means_no_fallback(tmp_path: Path) -> None:
    env = FileBootEnvironment(tmp_path / "bootenv.json")
    env.write({"boot_slot": "b", "upgrade_available": "1"})
    assert [simulate_bootloader(env) for _ in range(20)] == ["b"] * 20
    assert env.read()["bootcount"] == "20"
