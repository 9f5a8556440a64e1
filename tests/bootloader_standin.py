"""Stand-ins for U-Boot and GRUB at power-on, running Uptake's real boot scripts.

A test cannot reboot the machine it runs on, so these play the bootloader's
part between two runs of the agent. They do not re-implement the A/B policy:
they *execute the shipped scripts* (``client/boot/uboot/boot.cmd`` as
compiled by ``mkimage`` into ``boot.scr``, and ``client/boot/grub/uptake.cfg``)
with an interpreter for exactly the commands those scripts use, with each
bootloader's own semantics (U-Boot's ``setexpr`` counts in hex, ``saveenv``
writes the whole environment; GRUB's ``save_env`` writes only the variables
it names), against the real environment stores, through the real tools
(``fw_printenv``/``fw_setenv`` on a redundant U-Boot environment image,
``grub-editenv`` on a grubenv block). A command outside that set is an error,
so a script change the stand-in cannot follow fails the test instead of
passing unexamined.

:func:`uboot_power_on` and :func:`grub_power_on` return the slot that boots.
"""

from __future__ import annotations

import re
import shlex
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

_UIMAGE_MAGIC = 0x27051956
_IH_TYPE_SCRIPT = 6
_HEADER = struct.Struct(">IIIIIIIBBBB32s")


class Booted(Exception):
    """The script handed over to a kernel: the stand-in's run is over."""


def _run(
    lines: Iterable[str], condition: Callable[[str], bool], command: Callable[[str], None]
) -> None:
    """Execute a line-oriented script: ``if C; then`` / ``elif C; then`` / ``else`` / ``fi``."""
    # each frame: [enclosing block active, a branch already taken, this branch active]
    stack: list[list[bool]] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        active = stack[-1][2] if stack else True
        if found := re.fullmatch(r"if (.+); then", line):
            taken = active and condition(found[1])
            stack.append([active, taken, taken])
        elif found := re.fullmatch(r"elif (.+); then", line):
            frame = stack[-1]
            taken = frame[0] and not frame[1] and condition(found[1])
            frame[1], frame[2] = frame[1] or taken, taken
        elif line == "else":
            frame = stack[-1]
            frame[1], frame[2] = True, frame[0] and not frame[1]
        elif line == "fi":
            stack.pop()
        elif active:
            command(line)
    assert not stack, "unbalanced if/fi"


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), text)


def _test(args: list[str]) -> bool:
    """U-Boot's ``test`` and GRUB's ``[``: -z, -n, =, !=, and integer comparisons."""
    if len(args) == 2 and args[0] in ("-z", "-n"):
        return (args[1] == "") == (args[0] == "-z")
    if len(args) == 3:
        left, op, right = args
        if op == "=":
            return left == right
        if op == "!=":
            return left != right
        numbers = {"-eq": int.__eq__, "-ne": int.__ne__, "-gt": int.__gt__, "-lt": int.__lt__}
        if op in numbers:
            return bool(numbers[op](int(left, 0), int(right, 0)))
    raise AssertionError(f"the stand-in cannot evaluate test {args}")


# -- U-Boot ---------------------------------------------------------------------------------


def script_of_uimage(image: Path) -> str:
    """The script inside a legacy U-Boot script image, after U-Boot's own checks."""
    data = image.read_bytes()
    fields = _HEADER.unpack_from(data)
    magic, header_crc, _, size, _, _, data_crc, _, _, image_type, _, _ = fields
    assert magic == _UIMAGE_MAGIC, "not a U-Boot legacy image"
    header = bytearray(data[: _HEADER.size])
    header[4:8] = b"\0\0\0\0"
    assert zlib.crc32(header) == header_crc, "header CRC"
    payload = data[_HEADER.size : _HEADER.size + size]
    assert zlib.crc32(payload) == data_crc, "data CRC"
    assert image_type == _IH_TYPE_SCRIPT, "not a script image"
    # a script image's data: the lengths of its parts (big-endian, 0-terminated), then them
    (length,) = struct.unpack_from(">I", payload)
    assert struct.unpack_from(">I", payload, 4) == (0,), "one part"
    return payload[8 : 8 + length].decode()


def _fw_printenv(config: Path) -> dict[str, str]:
    out = subprocess.run(
        ["fw_printenv", "-c", str(config)], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line)


def _fw_saveenv(config: Path, env: dict[str, str]) -> None:
    """U-Boot's ``saveenv``: the whole environment, every variable set now."""
    stored = _fw_printenv(config)
    script = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
    script += "".join(f"{k}\n" for k in sorted(set(stored) - set(env)))  # deleted ones
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(script)
        f.flush()
        subprocess.run(["fw_setenv", "-c", str(config), "--script", f.name], check=True)


def uboot_power_on(boot_scr: Path, fw_env_config: Path, log: list[str] | None = None) -> str:
    """Run ``boot.scr`` as U-Boot's ``source`` would at power-on; return the slot booted."""
    env = _fw_printenv(fw_env_config)
    env.setdefault("kernel_addr_r", "0x00080000")
    env.setdefault("fdt_addr", "0x2eff8e00")
    volatile = {"kernel_addr_r", "fdt_addr"}  # set by the board, not stored
    loaded: list[str] = []

    def condition(text: str) -> bool:
        args = shlex.split(_expand(text, env))
        assert args[0] == "test", text
        return _test(args[1:])

    def command(line: str) -> None:
        args = shlex.split(_expand(line, env))
        name = args[0]
        if name == "setenv":
            if len(args) == 2:
                env.pop(args[1], None)
            else:
                env[args[1]] = " ".join(args[2:])
        elif name == "setexpr":
            assert len(args) == 5 and args[3] == "+", line
            env[args[1]] = f"{int(args[2], 16) + int(args[4], 16):x}"  # U-Boot's hex arithmetic
        elif name == "saveenv":
            _fw_saveenv(fw_env_config, {k: v for k, v in env.items() if k not in volatile})
        elif name == "echo":
            (log if log is not None else []).append(" ".join(args[1:]))
        elif name == "load":
            loaded.append(" ".join(args[1:]))
        elif name == "booti":
            raise Booted
        else:
            raise AssertionError(f"the U-Boot stand-in does not know {name!r}")

    try:
        _run(script_of_uimage(boot_scr).splitlines(), condition, command)
    except Booted:
        assert loaded, "booti before loading a kernel"
        part = {env.get("uptake_part_a") or "2": "a", env.get("uptake_part_b") or "3": "b"}
        return part[loaded[-1].split()[1].split(":")[1]]
    raise AssertionError("the boot script ended without booting")


# -- GRUB -----------------------------------------------------------------------------------


def _grub_list(grubenv: Path) -> dict[str, str]:
    out = subprocess.run(
        ["grub-editenv", str(grubenv), "list"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if line)


def grub_power_on(cfg: Path, grubenv: Path, log: list[str] | None = None) -> str:
    """Run ``uptake.cfg`` as GRUB would at power-on (``prefix`` holds grubenv); return the slot."""
    env: dict[str, str] = {"prefix": str(grubenv.parent)}
    entries: dict[str, list[str]] = {}
    lines = cfg.read_text().splitlines()
    body: list[str] | None = None
    script: list[str] = []
    for line in lines:  # menu entries are definitions, not commands: set them aside
        if body is not None:
            if line.strip() == "}":
                body = None
            else:
                body.append(line)
        elif found := re.search(r"--id (\S+) \{$", line.strip()):
            body = entries.setdefault(found[1], [])
        else:
            script.append(line)

    def options(args: list[str]) -> tuple[Path, list[str]]:
        assert args[1] == "--file", args
        return Path(args[2]), args[3:]

    def condition(text: str) -> bool:
        args = shlex.split(_expand(text, env))
        assert args[0] == "[" and args[-1] == "]", text
        return _test(args[1:-1])

    def command(line: str) -> None:
        args = shlex.split(_expand(line, env))
        name = args[0]
        if name == "load_env":
            path, names = options(args)
            stored = _grub_list(path)
            env.update({k: stored[k] for k in names if k in stored})
        elif name == "save_env":  # only the variables it names
            path, names = options(args)
            subprocess.run(
                ["grub-editenv", str(path), "set", *(f"{k}={env.get(k, '')}" for k in names)],
                check=True,
            )
        elif name == "set":
            key, _, value = args[1].partition("=")
            env[key] = value
        elif name == "echo":
            (log if log is not None else []).append(" ".join(args[1:]))
        elif name == "export":
            pass  # every variable reaches the entry below
        else:
            raise AssertionError(f"the GRUB stand-in does not know {name!r}")

    _run(script, condition, command)
    entry = entries[env["default"]]
    search = next(shlex.split(_expand(line, env)) for line in entry if "search" in line)
    label = search[-1]
    return {env["uptake_label_a"]: "a", env["uptake_label_b"]: "b"}[label]
