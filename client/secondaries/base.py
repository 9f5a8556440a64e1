"""What the primary needs from a secondary ECU, whatever the transport.

The primary hands a secondary the director targets metadata it fully
verified and the image file it downloaded and verified; the secondary does
its own (partial) verification, installs, and signs its own version report
with its own key, which the primary forwards unchanged in the vehicle
manifest: the primary cannot forge what a secondary says.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signing.exceptions import UptakeError
from signing.manifest import ImageInfo, InstallOutcome, SignedEnvelope


class SecondaryError(UptakeError):
    """A secondary could not be reached or answered nonsense; names the ECU and step."""


@dataclass(frozen=True)
class EcuStatus:
    """What an ECU runs and would report, read without making it sign anything."""

    installed: ImageInfo
    attacks_detected: str = ""
    last_install: InstallOutcome | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "installed": self.installed.to_dict(),
            "attacks_detected": self.attacks_detected,
            "last_install": self.last_install.to_dict() if self.last_install else None,
        }


@dataclass(frozen=True)
class SecondaryUpdate:
    filepath: str
    director_targets: bytes  # signed director targets, exactly as fetched
    image_path: Path
    #: director roots newer than version 1, as the primary verified them (key rotation)
    director_roots: tuple[bytes, ...] = ()
    #: the directed image's length and sha256 (from verified metadata)
    length: int = 0
    sha256: str = ""


class Secondary(ABC):
    ecu_serial: str
    hardware_id: str

    @abstractmethod
    def version_report(self) -> SignedEnvelope:
        """A fresh signed ECU version report (its counter grows on every call)."""

    def status(self) -> EcuStatus | None:
        """What the ECU runs and reports, if it can tell without signing (None: it cannot).

        The primary compares it with what it last reported to decide whether a
        manifest is due; an ECU that cannot tell changes only when the primary
        delivers to it, which the primary knows.
        """
        return None

    @abstractmethod
    def installed_sha256(self) -> str:
        """SHA-256 of the image the ECU runs ('' if none)."""

    def installed_image_path(self) -> Path | None:
        """Where the primary can read the image the ECU runs (to rebuild an update from a delta).

        ``None`` (the default) when the ECU's flash is out of the primary's reach: it then
        always gets the full image.
        """
        return None

    @abstractmethod
    def install(self, update: SecondaryUpdate) -> InstallOutcome:
        """Verify and install; the outcome is also kept for the ECU's next report."""

    def takes_deltas(self) -> bool:
        """Whether a delta from the image the ECU runs can help update it (verification then
        looks for one): the primary reads what it runs, or the ECU applies patches itself."""
        return self.installed_image_path() is not None

    def install_delta(
        self, update: SecondaryUpdate, delta: Path, scratch: Path, base_sha256: str
    ) -> InstallOutcome | None:
        """Install from ``delta`` (verified) if this ECU applies deltas itself, else None.

        ``scratch`` is a file name the secondary may use for a re-encoded patch.
        None means "use the full image" (the default: the primary rebuilds it).
        """
        return None
