"""The agent's persistent state and install journal.

One JSON document (``STATE_DIR/state.json``), replaced atomically on every
change, holds what must survive a power cut:

* per ECU: the next report counter (never reused), the release counter of
  the installed image (anti-rollback), attacks detected since the last clean
  verification, and the outcome of the last install attempt (kept until the
  server has acknowledged a manifest carrying it);
* per slot: which image it holds (``None`` while being written);
* the **journal** of the install in progress: its phase and everything
  needed to resume or roll back from that phase after a restart.

The journal is written *before* each side effect it announces, and each
side effect is idempotent or detectable (see :mod:`client.agent`), which is
what makes a SIGKILL at any instant recoverable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signing.atomic_file import write_atomic
from signing.manifest import ImageInfo, InstallOutcome, ManifestError


class StateError(Exception):
    """The state file is unreadable or corrupt (names the file and problem)."""


@dataclass
class EcuState:
    report_counter: int = 0
    release_counter: int = 0
    attacks_detected: str = ""
    last_install: InstallOutcome | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_counter": self.report_counter,
            "release_counter": self.release_counter,
            "attacks_detected": self.attacks_detected,
            "last_install": self.last_install.to_dict() if self.last_install else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EcuState:
        last = d.get("last_install")
        return cls(
            int(d["report_counter"]),
            int(d["release_counter"]),
            str(d["attacks_detected"]),
            InstallOutcome.from_dict(last, "last_install") if last else None,
        )


@dataclass
class Journal:
    """An install of the primary's own image in progress."""

    phase: str  # download → write → arm → reboot → trial (then the journal is cleared)
    filepath: str
    length: int
    sha256: str
    release_counter: int
    target_slot: str
    from_slot: str
    method: str = "full"  # "delta" while a delta is used, "full" otherwise
    health_failures: list[str] = field(default_factory=list)
    #: the delta chosen (its target path and sha256), and why it was abandoned if it was
    delta_filepath: str = ""
    delta_length: int = 0
    delta_sha256: str = ""
    delta_failure: str = ""
    #: /proc/sys/kernel/random/boot_id when a real reboot was asked for
    boot_id: str = ""

    def image(self) -> ImageInfo:
        return ImageInfo(self.filepath, self.length, {"sha256": self.sha256})


@dataclass
class AgentState:
    ecus: dict[str, EcuState] = field(default_factory=dict)
    slot_images: dict[str, ImageInfo | None] = field(default_factory=dict)
    journal: Journal | None = None
    #: what the server last acknowledged (reports without their counters) and when
    manifest_digest: str = ""
    manifest_sent_at: float = 0.0

    def ecu(self, serial: str) -> EcuState:
        return self.ecus.setdefault(serial, EcuState())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "ecus": {s: e.to_dict() for s, e in sorted(self.ecus.items())},
            "slot_images": {
                s: (i.to_dict() if i else None) for s, i in sorted(self.slot_images.items())
            },
            "journal": None if self.journal is None else self.journal.__dict__,
            "manifest_digest": self.manifest_digest,
            "manifest_sent_at": self.manifest_sent_at,
        }


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
        try:
            d = json.loads(raw)
            journal = d.get("journal")
            return AgentState(
                ecus={s: EcuState.from_dict(e) for s, e in d["ecus"].items()},
                slot_images={
                    s: ImageInfo.from_dict(i, f"slot_images.{s}") if i else None
                    for s, i in d["slot_images"].items()
                },
                journal=Journal(**journal) if journal else None,
                manifest_digest=str(d.get("manifest_digest", "")),
                manifest_sent_at=float(d.get("manifest_sent_at", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, ManifestError) as exc:
            raise StateError(f"agent state {self.path} is corrupt: {exc!r}") from exc

    def save(self, state: AgentState) -> None:
        write_atomic(self.path, json.dumps(state.to_dict(), indent=1, sort_keys=True).encode())
