"""Uptane partial verification (Uptane Standard 2.x, section 5.4.4.1).

What a secondary ECU that cannot afford full verification checks before it
accepts an image from the primary:

1. the director targets metadata is signed by a threshold of the director
   targets keys named in the ECU's trusted director root;
2. it has not expired, and its version is not below the last one the ECU
   accepted (rollback/freeze of metadata);
3. it was made for this vehicle (VIN) and lists an image for this ECU's
   serial with this ECU's hardware id;
4. (by the caller, after transfer) the image has exactly the length and
   hashes that entry names.

When the director's online keys are rotated (:mod:`server.rotation`), the
primary hands the secondary the newer director roots it verified, and the
secondary moves its trusted root along them with :func:`follow_root_chain`
(each version signed by the previous one's root keys and its own, as TUF's
client does) before it checks the director targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from signing.exceptions import AttackDetected
from signing.metadata import MetadataFormatError, director_ecus, director_vin


class PartialVerificationError(AttackDetected):
    """Director metadata failed partial verification (always evidence of an attack)."""


def follow_root_chain(trusted: Metadata[Root], newer_roots: Sequence[bytes]) -> Metadata[Root]:
    """The newest root reachable from ``trusted`` through ``newer_roots``, one version at a time."""
    candidates: dict[int, Metadata[Root]] = {}
    for data in newer_roots:
        try:
            md = Metadata[Root].from_bytes(data)
        except DeserializationError as exc:
            raise PartialVerificationError(f"director root metadata is malformed: {exc}") from exc
        if not isinstance(md.signed, Root):
            raise PartialVerificationError(
                f"expected director root metadata, got {md.signed.type!r}"
            )
        candidates[md.signed.version] = md
    current = trusted
    while (new := candidates.get(current.signed.version + 1)) is not None:
        try:
            current.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise PartialVerificationError(
                f"director root v{new.signed.version} is not signed by the v{current.signed.version} and "
                f"v{new.signed.version} root keys: {exc}"
            ) from exc
        current = new
    return current


@dataclass(frozen=True)
class PartiallyVerified:
    version: int
    target: TargetFile | None  # None: nothing for this ECU


def verify_director_targets(
    data: bytes,
    trusted_root: Metadata[Root],
    *,
    vin: str,
    ecu_serial: str,
    hardware_id: str,
    min_version: int,
) -> PartiallyVerified:
    try:
        md = Metadata[Targets].from_bytes(data)
    except DeserializationError as exc:
        raise PartialVerificationError(f"director targets metadata is malformed: {exc}") from exc
    if not isinstance(md.signed, Targets):
        raise PartialVerificationError("expected director targets metadata")
    try:
        trusted_root.signed.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise PartialVerificationError(f"director targets signature: {exc}") from exc
    if md.signed.is_expired():
        raise PartialVerificationError(
            f"director targets v{md.signed.version} expired at {md.signed.expires}"
        )
    if md.signed.version < min_version:
        raise PartialVerificationError(
            f"director targets v{md.signed.version} is older than v{min_version} already accepted (rollback)"
        )
    try:
        if director_vin(md.signed) != vin:
            raise PartialVerificationError(
                f"director targets are for VIN {director_vin(md.signed)!r}, not {vin!r}"
            )
        for target in md.signed.targets.values():
            ecus = director_ecus(target)
            if ecu_serial in ecus:
                if ecus[ecu_serial] != hardware_id:
                    raise PartialVerificationError(
                        f"director target {target.path!r} says ECU {ecu_serial} is {ecus[ecu_serial]!r}, it is {hardware_id!r}"
                    )
                return PartiallyVerified(md.signed.version, target)
    except MetadataFormatError as exc:
        raise PartialVerificationError(str(exc)) from exc
    return PartiallyVerified(md.signed.version, None)
