"""A/B slot installation for the primary's own image.

:class:`SlotInstaller` owns two slots (files or block devices) and a
:class:`~client.bootenv.BootEnvironment`. Its operations are the steps of
the install state machine in :mod:`client.agent`; each is idempotent and
leaves the device bootable:

* :meth:`write` streams an image into the *inactive* slot (never the one
  running), fsyncs it and reads it back to check the hash;
* :meth:`arm` tells the bootloader to try that slot: ``boot_slot=<new>``,
  ``upgrade_available=1``, ``bootcount=0`` in one atomic env update;
* :meth:`commit` ends the trial (``upgrade_available=0``) after a healthy boot;
* if the trial is never committed, the bootloader's boot counter runs over
  ``bootlimit`` and it boots the previous slot again (rollback).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from client.bootenv import BootEnvironment, BootEnvironmentError, open_boot_environment
from client.config import AgentConfig, SlotType
from client.delta_apply import DeltaError, apply_delta, read_delta_header
from signing.exceptions import UptakeError

#: The two slots of an A/B device.
Slot = Literal["a", "b"]
SLOTS: tuple[Slot, ...] = ("a", "b")
_CHUNK = 1024 * 1024


class InstallError(UptakeError):
    """Writing or switching a slot failed, or a slot is unusable; names the slot and the problem."""


def check_slot(name: str, path: Path, slot_type: SlotType) -> None:
    """Refuse a slot that is not what its installer writes to, before anything is written.

    A mistyped partition (``/dev/mmcblk0p3`` that does not exist) must stop the
    agent, not become a regular file in ``/dev`` that is "installed" and
    committed while the bootloader boots something else.
    """
    where = f"installer.slot_{name} = {str(path)!r}"
    if slot_type is SlotType.BLOCK:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise InstallError(f"{where}: no such block device") from None
        except OSError as exc:
            raise InstallError(f"{where}: cannot check it: {exc.strerror}") from exc
        if not stat.S_ISBLK(mode):
            raise InstallError(
                f'{where}: not a block device (slot_type = "block"; use slot_type = "file" '
                "only for image files)"
            )
        return
    if Path(os.path.realpath(path)).is_relative_to("/dev"):
        raise InstallError(f"{where}: a file slot in /dev is a mistyped device; set slot_type")
    if path.exists() and not path.is_file():
        raise InstallError(f'{where}: exists and is not a regular file (slot_type = "file")')


@dataclass(frozen=True)
class BootState:
    boot_slot: Slot
    upgrade_available: bool
    bootcount: int
    bootlimit: int


def other_slot(slot: Slot) -> Slot:
    return "b" if slot == "a" else "a"


class SlotInstaller:
    """The primary's two slots and the boot environment that chooses between them."""

    @classmethod
    def from_config(cls, config: AgentConfig) -> SlotInstaller:
        """The slots, boot environment and bootlimit ``[installer]`` names (nothing checked yet)."""
        installer = config.installer
        return cls(
            {"a": config.path(installer.slot_a), "b": config.path(installer.slot_b)},
            open_boot_environment(config),
            installer.bootlimit,
            installer.slots_are,
        )

    def check_slots(self) -> list[str]:
        """What is wrong with the slots (empty: both are what the installer writes to)."""
        problems = []
        for name, path in self.slots.items():
            try:
                check_slot(name, path, self.slot_type)
            except InstallError as exc:
                problems.append(str(exc))
        return problems

    def __init__(
        self,
        slots: dict[Slot, Path],
        env: BootEnvironment,
        bootlimit: int,
        slot_type: SlotType = SlotType.FILE,
    ) -> None:
        self.slots = slots
        self.env = env
        self.bootlimit = bootlimit
        self.slot_type = slot_type

    def initialize(self) -> None:
        """First start on a factory-fresh device: boot slot a, nothing on trial."""
        if "boot_slot" not in self.env.read():
            self.env.write(
                {
                    "boot_slot": "a",
                    "upgrade_available": "0",
                    "bootcount": "0",
                    "bootlimit": str(self.bootlimit),
                }
            )

    def state(self) -> BootState:
        env = self.env.read()
        slot = env.get("boot_slot", "a")
        if slot not in SLOTS:
            raise BootEnvironmentError(f"boot_slot={slot!r} is neither 'a' nor 'b'")
        try:
            return BootState(
                "a" if slot == "a" else "b",
                env.get("upgrade_available", "0") == "1",
                int(env.get("bootcount", "0")),
                int(env.get("bootlimit", str(self.bootlimit))),
            )
        except ValueError as exc:
            raise BootEnvironmentError(
                f"boot environment has a non-numeric counter: {exc}"
            ) from exc

    def write(self, slot: Slot, source: BinaryIO, length: int, sha256: str) -> None:
        """Stream ``length`` bytes from ``source`` into ``slot`` and verify the read-back hash."""
        path = self.slots[slot]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._open_slot(slot) as out:
                remaining = length
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise InstallError(f"slot {slot}: source ended {remaining} bytes early")
                    out.write(chunk)
                    remaining -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            raise InstallError(f"slot {slot} ({path}): write failed: {exc.strerror}") from exc
        actual = self.slot_sha256(slot, length)
        if actual != sha256:
            raise InstallError(
                f"slot {slot} ({path}): read-back sha256 {actual} differs from the image's {sha256}"
            )

    def write_delta(
        self, slot: Slot, base_slot: Slot, patch: Path, length: int, sha256: str
    ) -> str:
        """Apply ``patch`` to the image in ``base_slot``, streaming the result into ``slot``.

        Memory stays bounded whatever the image size (see :mod:`client.delta_apply`);
        the result is checked against the delta's header while writing and
        against ``sha256`` by read-back. Returns the delta method used.
        """
        if slot == base_slot:
            raise InstallError(f"slot {slot}: a delta cannot overwrite its own base")
        path = self.slots[slot]
        try:
            with open(patch, "rb") as delta:
                # before writing a byte: the header's promise bounds the output, so it must be
                # exactly the image the offline-signed metadata names
                header = read_delta_header(delta)
                if header.result_length != length or header.result_sha256.hex() != sha256:
                    raise InstallError(
                        f"slot {slot}: delta {patch.name} produces an image other than {sha256[:16]}…"
                    )
                with open(self.slots[base_slot], "rb") as old, self._open_slot(slot) as out:
                    applied = apply_delta(old, delta, out, old_is_slot=True)
                    out.flush()
                    os.fsync(out.fileno())
        except DeltaError as exc:
            raise InstallError(f"slot {slot}: delta {patch.name}: {exc}") from exc
        except OSError as exc:
            raise InstallError(f"slot {slot} ({path}): delta write failed: {exc.strerror}") from exc
        if applied.result_length != length or self.slot_sha256(slot, length) != sha256:
            raise InstallError(
                f"slot {slot}: the delta produced an image other than {sha256[:16]}…"
            )
        return applied.method

    def _open_slot(self, slot: Slot) -> BinaryIO:
        """Open a slot for writing: a block device is overwritten in place (never created), a
        file replaced."""
        path = self.slots[slot]
        check_slot(slot, path, self.slot_type)
        if self.slot_type is SlotType.BLOCK:
            return open(path, "r+b")
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")

    def slot_sha256(self, slot: Slot, length: int) -> str:
        digest = hashlib.sha256()
        with open(self.slots[slot], "rb") as f:
            remaining = length
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
        return digest.hexdigest()

    def arm(self, slot: Slot) -> None:
        self.env.write(
            {
                "boot_slot": slot,
                "upgrade_available": "1",
                "bootcount": "0",
                "bootlimit": str(self.bootlimit),
            }
        )

    def commit(self) -> None:
        self.env.write({"upgrade_available": "0", "bootcount": "0"})
