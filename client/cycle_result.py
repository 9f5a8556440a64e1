"""What one update cycle did, told truthfully to the CLI, the service log and scripts.

A cycle ends in one of three states (:class:`CycleStatus`), each with its
own exit code of ``uptake agent run --once``:

=========  ====  ==============================================================
status     exit  meaning
=========  ====  ==============================================================
ok         0     everything directed is installed, or there was nothing to do
postponed  75    a transient problem (server unreachable, download interrupted,
                 a precondition such as "parked" unmet): the next poll retries
failed     1     refused or failed: an attack was detected, an install failed
                 or rolled back, the server refused the manifest, or a
                 configuration or provisioning mistake (unknown VIN, wrong
                 trusted root) stops the vehicle from updating
=========  ====  ==============================================================

(75 is ``EX_TEMPFAIL`` of ``sysexits.h``; click uses 2 for usage errors.)
The worst of everything that happened in the cycle wins: failed over
postponed over ok.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from signing.manifest import FAILED_RESULTS, InstallOutcome, InstallResult


class ManifestDelivery(enum.Enum):
    """What became of the vehicle version manifest in this cycle."""

    #: sent, and the server verified and recorded it
    ACCEPTED = "accepted"
    #: not sent: the server already has this exact state and no heartbeat is due
    UNCHANGED = "unchanged"
    #: sent, and the server refused it (unknown vehicle, bad signature, replayed counter...)
    REFUSED = "refused"
    #: could not be sent (network, server down); sent again at the next poll
    UNREACHABLE = "unreachable"


class FailureKind(enum.Enum):
    """Why verification did not let the cycle install (the class of the failure, see
    :mod:`signing.exceptions`)."""

    ATTACK = "attack"
    TRANSIENT = "transient"
    CONFIGURATION = "configuration"


class CycleStatus(enum.Enum):
    """How a cycle ended; :attr:`exit_code` is what ``uptake agent run --once`` exits with."""

    OK = "ok"
    POSTPONED = "postponed"
    FAILED = "failed"

    @property
    def exit_code(self) -> int:
        return {CycleStatus.OK: 0, CycleStatus.POSTPONED: 75, CycleStatus.FAILED: 1}[self]


@dataclass
class CycleReport:
    """What one update cycle did (see module docstring)."""

    manifest: ManifestDelivery = ManifestDelivery.UNCHANGED
    manifest_problem: str = ""
    verification_error: str = ""
    verification_failure: FailureKind | None = None
    directed: list[str] = field(default_factory=list)
    outcomes: dict[str, InstallOutcome] = field(default_factory=dict)
    waiting: str = ""

    @property
    def manifest_accepted(self) -> bool:
        """Whether the server accepted a manifest sent in this cycle (not: "it was not needed")."""
        return self.manifest is ManifestDelivery.ACCEPTED

    @property
    def status(self) -> CycleStatus:
        failed = (
            self.verification_failure in (FailureKind.ATTACK, FailureKind.CONFIGURATION)
            or self.manifest is ManifestDelivery.REFUSED
            or any(o.result in FAILED_RESULTS for o in self.outcomes.values())
        )
        if failed:
            return CycleStatus.FAILED
        postponed = (
            self.verification_failure is FailureKind.TRANSIENT
            or self.manifest is ManifestDelivery.UNREACHABLE
            or bool(self.waiting)
            or any(o.result is InstallResult.POSTPONED for o in self.outcomes.values())
        )
        return CycleStatus.POSTPONED if postponed else CycleStatus.OK

    def reasons(self) -> list[str]:
        """Why the cycle did not end ``ok``, one line each (empty when it did)."""
        lines = []
        if self.verification_failure is not None:
            lines.append(
                f"verification {self.verification_failure.value}: {self.verification_error}"
            )
        if self.manifest in (ManifestDelivery.REFUSED, ManifestDelivery.UNREACHABLE):
            lines.append(f"manifest {self.manifest.value}: {self.manifest_problem}")
        if self.waiting:
            lines.append(f"waiting for precondition {self.waiting}")
        for serial, outcome in sorted(self.outcomes.items()):
            if outcome.result is not InstallResult.INSTALLED:
                detail = f": {outcome.detail}" if outcome.detail else ""
                lines.append(f"{serial} {outcome.result} {outcome.filepath}{detail}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "exit_code": self.status.exit_code,
            "manifest": self.manifest.value,
            "manifest_accepted": self.manifest_accepted,
            "manifest_problem": self.manifest_problem,
            "verification_error": self.verification_error,
            "verification_failure": (
                self.verification_failure.value if self.verification_failure else None
            ),
            "directed": self.directed,
            "outcomes": {k: v.to_dict() for k, v in self.outcomes.items()},
            "waiting": self.waiting,
            "reasons": self.reasons(),
        }
