"""The Uptane parts of TUF metadata.

Uptane adds meaning to TUF's free-form ``custom`` fields. This module is the
one place that writes and reads them, so the server (which signs) and the
agent (which verifies) cannot disagree:

Image repository targets (one entry per firmware image)::

    "custom": {"hardwareIds": ["stm32f4-bms"], "releaseCounter": 3,
               "version": "1.1.0"}

Director repository targets (one entry per image to install)::

    "custom": {"ecuIdentifiers": {"<ecu serial>": {"hardwareId": "stm32f4-bms"}}}

and the director's targets metadata itself carries the vehicle it was made
for, also when it lists no image, so that targets for one vehicle can never
be replayed to another::

    "signed": {"_type": "targets", ..., "custom": {"vin": "WVW..."}}

Every parser raises :class:`MetadataFormatError` naming the target and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tuf.api.metadata import TargetFile, Targets

HARDWARE_IDS = "hardwareIds"
RELEASE_COUNTER = "releaseCounter"
VERSION = "version"
ECU_IDENTIFIERS = "ecuIdentifiers"
HARDWARE_ID = "hardwareId"
VIN = "vin"
#: Optional image-target field linking a delta to the full images it joins.
DELTA = "delta"

#: Top-level roles of both repositories.
TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")

#: Default metadata lifetimes: long for offline roles, short for online ones.
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=180),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
#: Director targets are online: a vehicle offline longer than this sees expired
#: metadata and must refresh, which is the freeze-attack defence.
DIRECTOR_TARGETS_EXPIRY = timedelta(days=7)


class MetadataFormatError(Exception):
    """Uptane custom metadata is missing or malformed; the message names where."""


def expiry(role: str, now: datetime | None = None) -> datetime:
    """Default expiry time for ``role`` metadata signed ``now``."""
    now = now or datetime.now(UTC)
    return (now + DEFAULT_EXPIRY[role]).replace(microsecond=0)


@dataclass(frozen=True)
class ImageCustom:
    """The Uptane fields of an image repository target."""

    hardware_ids: tuple[str, ...]
    release_counter: int
    version: str
    delta: dict[str, Any] | None = None

    def to_custom(self) -> dict[str, Any]:
        custom: dict[str, Any] = {
            HARDWARE_IDS: list(self.hardware_ids),
            RELEASE_COUNTER: self.release_counter,
            VERSION: self.version,
        }
        if self.delta is not None:
            custom[DELTA] = self.delta
        return custom


def _custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.custom
    if not isinstance(custom, dict):
        raise MetadataFormatError(f"target {target.path!r}: 'custom' must be an object")
    return custom


def image_custom(target: TargetFile) -> ImageCustom:
    """Parse the image-repository ``custom`` of ``target``."""
    custom = _custom_of(target)
    where = f"image target {target.path!r}"
    hw_ids = custom.get(HARDWARE_IDS)
    if (
        not isinstance(hw_ids, list)
        or not hw_ids
        or not all(isinstance(h, str) and h for h in hw_ids)
    ):
        raise MetadataFormatError(f"{where}: custom.{HARDWARE_IDS} must be a non-empty list of strings")
    counter = custom.get(RELEASE_COUNTER)
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise MetadataFormatError(f"{where}: custom.{RELEASE_COUNTER} must be an integer >= 0")
    version = custom.get(VERSION)
    if not isinstance(version, str) or not version:
        raise MetadataFormatError(f"{where}: custom.{VERSION} must be a non-empty string")
    delta = custom.get(DELTA)
    if delta is not None and not isinstance(delta, dict):
        raise MetadataFormatError(f"{where}: custom.{DELTA} must be an object")
    return ImageCustom(tuple(hw_ids), counter, version, delta)


def director_custom(ecus: dict[str, str]) -> dict[str, Any]:
    """``custom`` for a director target installing on ``ecus`` (serial -> hardware id)."""
    return {ECU_IDENTIFIERS: {serial: {HARDWARE_ID: hw} for serial, hw in sorted(ecus.items())}}


def director_ecus(target: TargetFile) -> dict[str, str]:
    """The ECUs (serial -> hardware id) a director target is meant for."""
    custom = _custom_of(target)
    where = f"director target {target.path!r}"
    ids = custom.get(ECU_IDENTIFIERS)
    if not isinstance(ids, dict) or not ids:
        raise MetadataFormatError(f"{where}: custom.{ECU_IDENTIFIERS} must be a non-empty object")
    ecus: dict[str, str] = {}
    for serial, entry in ids.items():
        hw = entry.get(HARDWARE_ID) if isinstance(entry, dict) else None
        if not isinstance(hw, str) or not hw:
            raise MetadataFormatError(
                f"{where}: custom.{ECU_IDENTIFIERS}.{serial}.{HARDWARE_ID} must be a non-empty string"
            )
        ecus[serial] = hw
    return ecus


def set_director_vin(targets: Targets, vin: str) -> None:
    """Bind director targets metadata to the vehicle ``vin``."""
    targets.unrecognized_fields["custom"] = {VIN: vin}


def director_vin(targets: Targets) -> str:
    """The VIN director targets metadata was signed for."""
    custom = targets.unrecognized_fields.get("custom")
    vin = custom.get(VIN) if isinstance(custom, dict) else None
    if not isinstance(vin, str):
        raise MetadataFormatError("director targets metadata: signed.custom.vin is missing")
    return vin
