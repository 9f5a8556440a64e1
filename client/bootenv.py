"""Boot environments: where the bootloader's A/B state lives.

The A/B model is U-Boot's: a handful of string variables shared between the
bootloader and the running system.

* ``boot_slot``: the slot the bootloader boots (``a`` or ``b``);
* ``upgrade_available``: ``1`` while a freshly installed slot is on trial;
* ``bootcount``: incremented by the bootloader on every boot while on trial;
* ``bootlimit``: when ``bootcount`` exceeds it the bootloader falls back to
  the other slot (U-Boot's ``altbootcmd``).

A :class:`BootEnvironment` only reads and writes those variables; the policy
(switch, commit, roll back) is in :mod:`client.installer` and is the same
whatever stores the variables: a JSON file for tests and development, the
U-Boot environment (``fw_printenv``/``fw_setenv``), or a GRUB environment
block (``grub-editenv``).

Backends:

* :class:`FileBootEnvironment`: JSON file, for tests and development;
* :class:`UBootEnvironment`: the U-Boot environment through libubootenv's
  ``fw_printenv`` and ``fw_setenv --script`` (one call per update, which
  libubootenv makes atomic on a redundant environment by writing the inactive
  copy and flipping its flag);
* :class:`GrubEnvironment`: a GRUB environment block through ``grub-editenv``
  (one ``set`` call per update; grub-editenv rewrites the 1 KiB block).

Both tool-backed backends refuse names and values the tools cannot round-trip
(no ``=`` or whitespace in names, no newlines in values) and read the
environment back after writing, so a tool that silently ignored a line is an
error rather than a lost update.

:func:`simulate_bootloader` plays the bootloader's part at power-on (U-Boot's
bootcount/bootlimit/altbootcmd logic) on any backend, so the agent's
install/commit/rollback policy can be tested against real environment stores.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

from client.config import AgentConfig, InstallerType
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError


class BootEnvironmentError(UptakeError):
    """The boot environment could not be read or written (says which and why)."""


class BootEnvironment(ABC):
    """Key/value variables shared with the bootloader."""

    @abstractmethod
    def read(self) -> dict[str, str]:
        """Return every variable currently set."""

    @abstractmethod
    def write(self, values: Mapping[str, str]) -> None:
        """Set all ``values`` in one atomic update (all or nothing)."""


class FileBootEnvironment(BootEnvironment):
    """A JSON file standing in for the bootloader environment (tests, development).

    Each update replaces the file atomically, like U-Boot's redundant
    environment does on flash.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, str]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BootEnvironmentError(f"cannot read boot environment {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise BootEnvironmentError(
                f"boot environment {self.path} is not valid JSON: {exc}"
            ) from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise BootEnvironmentError(f"boot environment {self.path} must map strings to strings")
        return dict(data)

    def write(self, values: Mapping[str, str]) -> None:
        current = self.read()
        current.update(values)
        write_atomic(self.path, json.dumps(current, sort_keys=True, indent=1).encode())


# Variable names both tools accept and print back unchanged.
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_TOOL_TIMEOUT = 30.0  # seconds; the tools touch a few KiB of flash or disk


def _check_values(values: Mapping[str, str], where: str) -> None:
    for name, value in values.items():
        if not _NAME_RE.fullmatch(name):
            raise BootEnvironmentError(f"{where}: invalid variable name {name!r}")
        if "\n" in value or "\0" in value:
            raise BootEnvironmentError(f"{where}: value of {name} contains a newline or NUL")


def _parse_listing(output: str, command: Sequence[str]) -> dict[str, str]:
    """Parse ``name=value`` lines as printed by fw_printenv and grub-editenv."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise BootEnvironmentError(
                f"unexpected line {line!r} in the output of {_describe(command)}"
            )
        values[name] = value
    return values


_TOOL_PACKAGES = {
    "fw_printenv": "libubootenv-tool",
    "fw_setenv": "libubootenv-tool",
    "grub-editenv": "grub-common",
}


def _describe(command: Sequence[str]) -> str:
    """The command line for error messages, long arguments shortened."""
    return shlex.join(arg if len(arg) <= 80 else arg[:77] + "..." for arg in command)


def _run_tool(command: Sequence[str]) -> str:
    """Run a boot environment tool; return its stdout or raise with its stderr."""
    if shutil.which(command[0]) is None:
        raise BootEnvironmentError(
            f"{command[0]} not found: install it (Debian: "
            f"{_TOOL_PACKAGES.get(command[0], 'the package that ships it')})"
        )
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BootEnvironmentError(f"{_describe(command)} failed: {exc}") from exc
    if done.returncode != 0:
        raise BootEnvironmentError(
            f"{_describe(command)} failed with exit code {done.returncode}: "
            f"{done.stderr.strip() or '(no error output)'}"
        )
    return done.stdout


def _verify_written(env: BootEnvironment, values: Mapping[str, str], where: str) -> None:
    current = env.read()
    # An empty value deletes a U-Boot variable: absent reads back as "".
    lost = {k: v for k, v in values.items() if current.get(k, "") != v}
    if lost:
        raise BootEnvironmentError(f"{where}: variables not stored after writing: {sorted(lost)}")


class UBootEnvironment(BootEnvironment):
    """The U-Boot environment, read and written with libubootenv's tools.

    ``config`` is the ``fw_env.config`` describing where the environment
    lives (device or file, offset, size; two lines for a redundant
    environment). Each :meth:`write` is a single ``fw_setenv --script``
    call: on a redundant environment libubootenv writes the inactive copy
    and only then marks it current, so a power cut leaves either the old or
    the new variables, never a mix.
    """

    def __init__(self, config: Path = Path("/etc/fw_env.config")) -> None:
        self.config = Path(config)

    def read(self) -> dict[str, str]:
        command = ["fw_printenv", "-c", str(self.config)]
        return _parse_listing(_run_tool(command), command)

    def write(self, values: Mapping[str, str]) -> None:
        where = f"U-Boot environment ({self.config})"
        _check_values(values, where)
        if not values:
            return
        # libubootenv's script format is one "name=value" per line; some
        # versions silently skip other lines, hence the read-back below.
        script = "".join(f"{name}={value}\n" for name, value in values.items())
        with tempfile.NamedTemporaryFile("w", prefix="uptake-fw_setenv.", suffix=".txt") as f:
            f.write(script)
            f.flush()
            _run_tool(["fw_setenv", "-c", str(self.config), "--script", f.name])
        _verify_written(self, values, where)


class GrubEnvironment(BootEnvironment):
    """A GRUB environment block (``grubenv``), read and written with ``grub-editenv``.

    The block must exist (``grub-editenv FILE create`` at provisioning):
    a missing one is an error rather than an empty environment, because
    grub-editenv would otherwise create it in a place GRUB may not read.
    """

    def __init__(self, path: Path = Path("/boot/grub/grubenv")) -> None:
        self.path = Path(path)

    def _require_block(self) -> None:
        if not self.path.is_file():
            raise BootEnvironmentError(
                f"GRUB environment block {self.path} does not exist "
                f"(create it with: grub-editenv {self.path} create)"
            )

    def read(self) -> dict[str, str]:
        self._require_block()
        command = ["grub-editenv", str(self.path), "list"]
        return _parse_listing(_run_tool(command), command)

    def write(self, values: Mapping[str, str]) -> None:
        where = f"GRUB environment {self.path}"
        _check_values(values, where)
        self._require_block()
        if not values:
            return
        assignments = [f"{name}={value}" for name, value in values.items()]
        _run_tool(["grub-editenv", str(self.path), "set", *assignments])
        _verify_written(self, values, where)


_OTHER_SLOT = {"a": "b", "b": "a"}


def _int_variable(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise BootEnvironmentError(f"boot variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise BootEnvironmentError(f"boot variable {name}={raw!r} is negative")
    return value


def simulate_bootloader(env: BootEnvironment) -> str:
    """Play the bootloader at power-on and return the slot it boots (``a`` or ``b``).

    This is U-Boot's bootcount logic with the usual A/B ``altbootcmd``:

    * while ``upgrade_available`` is ``1``, every boot increments
      ``bootcount``;
    * when ``bootcount`` exceeds ``bootlimit`` (``0`` or unset: no limit, as
      in U-Boot) the alternative boot runs instead: ``boot_slot`` switches
      to the other slot and ``upgrade_available`` and ``bootcount`` are reset
      to ``0``, so the previous, known-good slot boots from now on.

    Committing a trial (the agent setting ``upgrade_available=0`` after its
    health check) stops the counting. The variables are updated in one
    :meth:`BootEnvironment.write`, as the bootloader saves its environment
    once per boot.
    """
    current = env.read()
    slot = current.get("boot_slot", "a")
    if slot not in _OTHER_SLOT:
        raise BootEnvironmentError(f"boot variable boot_slot={slot!r} is not 'a' or 'b'")
    if current.get("upgrade_available", "0") != "1":
        return slot
    bootcount = _int_variable(current, "bootcount", 0) + 1
    bootlimit = _int_variable(current, "bootlimit", 0)
    if bootlimit and bootcount > bootlimit:
        slot = _OTHER_SLOT[slot]
        env.write({"boot_slot": slot, "upgrade_available": "0", "bootcount": "0"})
    else:
        env.write({"bootcount": str(bootcount)})
    return slot


def open_boot_environment(config: AgentConfig) -> BootEnvironment:
    """The boot environment ``[installer]`` names: ``boot_env`` read by the type's tools."""
    path = config.path(config.installer.boot_env)
    if config.installer.type is InstallerType.UBOOT:
        return UBootEnvironment(path)
    if config.installer.type is InstallerType.GRUB:
        return GrubEnvironment(path)
    return FileBootEnvironment(path)
