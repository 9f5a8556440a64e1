"""The agent's persistent state and the primary's install journal.

One JSON document (``STATE_DIR/state.json``), replaced atomically on every
change, holds what must survive a power cut:

* per ECU: the next report counter (never reused), the release counter of
  the installed image (anti-rollback), attacks detected since the last clean
  verification, and the outcome of the last install attempt (kept until the
  server has acknowledged a manifest carrying it);
* per slot: which image it holds (``None`` while being written);
* the **journal** of the primary's install in progress: its
  :class:`JournalPhase` and everything needed to resume or roll back from
  that phase after a restart (:mod:`client.primary_install`);
* what the server last acknowledged (:mod:`client.reporting`).

The document is declared once, as the :class:`AgentState` schema (msgspec):
strict types, unknown keys refused, names checked against
:mod:`signing.names`. A file that does not match is a :class:`StateError`
naming the file and the field, never a half-loaded state.

A cycle loads the state once (:meth:`StateStore.load`), every module of the
cycle works on that one object, and :meth:`StateStore.save` writes it at each
journal step. The journal is written *before* each side effect it announces,
and each side effect is idempotent or detectable, which is what makes a
SIGKILL at any instant recoverable.
"""

from __future__ import annotations

import enum
from pathlib import Path

import msgspec

from client.installer import Slot
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.manifest import ImageInfo, InstallMethod, InstallOutcome
from signing.names import check_name, check_sha256, check_target_path

_MAX_STATE_BYTES = 4 * 1024 * 1024


class StateError(UptakeError):
    """The state file is unreadable or corrupt (names the file and problem)."""


class JournalPhase(enum.StrEnum):
    """Where the primary's install stands; each phase is journaled before its side effect."""

    #: fetching the image or delta (nothing written to a slot yet)
    DOWNLOAD = "download"
    #: writing the inactive slot (its recorded image is cleared first)
    WRITE = "write"
    #: telling the bootloader to try the new slot
    ARM = "arm"
    #: rebooting into the new slot
    REBOOT = "reboot"
    #: booted (or about to boot) the new slot: health check, then commit or roll back
    TRIAL = "trial"


class EcuState(msgspec.Struct, forbid_unknown_fields=True):
    report_counter: int = 0
    release_counter: int = 0
    attacks_detected: str = ""
    last_install: InstallOutcome | None = None


class Journal(msgspec.Struct, forbid_unknown_fields=True):
    """An install of the primary's own image in progress."""

    phase: JournalPhase
    filepath: str
    length: int
    sha256: str
    release_counter: int
    target_slot: Slot
    from_slot: Slot
    method: InstallMethod = InstallMethod.FULL
    health_failures: list[str] = msgspec.field(default_factory=list)
    #: the delta chosen (its target path and sha256), and why it was abandoned if it was
    delta_filepath: str = ""
    delta_length: int = 0
    delta_sha256: str = ""
    delta_failure: str = ""
    #: /proc/sys/kernel/random/boot_id when a real reboot was asked for
    boot_id: str = ""

    def __post_init__(self) -> None:
        check_target_path(self.filepath, "filepath")
        check_sha256(self.sha256, "sha256")
        if self.delta_sha256:
            check_sha256(self.delta_sha256, "delta_sha256")

    def image(self) -> ImageInfo:
        return ImageInfo.of(self.filepath, self.length, {"sha256": self.sha256})


class AgentState(msgspec.Struct, forbid_unknown_fields=True):
    version: int = 1
    ecus: dict[str, EcuState] = msgspec.field(default_factory=dict)
    slot_images: dict[Slot, ImageInfo | None] = msgspec.field(default_factory=dict)
    journal: Journal | None = None
    #: what the server last acknowledged (reports without their counters) and when
    manifest_digest: str = ""
    manifest_sent_at: float = 0.0

    def __post_init__(self) -> None:
        for serial in self.ecus:
            check_name(serial, f"ecus key {serial!r}")

    def ecu(self, serial: str) -> EcuState:
        return self.ecus.setdefault(serial, EcuState())


def encode_state(state: AgentState) -> bytes:
    """The state file's bytes (sorted keys, one field a line: diffable by hand)."""
    return msgspec.json.format(msgspec.json.encode(state, order="sorted"), indent=1)


def decode_state(data: bytes, where: str) -> AgentState:
    """Parse a state file; :class:`StateError` names ``where`` and the field."""
    if len(data) > _MAX_STATE_BYTES:
        raise StateError(f"agent state {where} is larger than {_MAX_STATE_BYTES} bytes")
    try:
        return msgspec.json.decode(data, type=AgentState, strict=True)
    except msgspec.ValidationError as exc:
        raise StateError(f"agent state {where} is corrupt: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise StateError(f"agent state {where} is not JSON: {exc}") from exc


class StateStore:
    """Loads and atomically saves :class:`AgentState` at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState()
        except OSError as exc:
            raise StateError(f"cannot read agent state {self.path}: {exc.strerror}") from exc
        return decode_state(raw, str(self.path))

    def save(self, state: AgentState) -> None:
        write_atomic(self.path, encode_state(state))
