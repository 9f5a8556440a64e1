"""Vehicles, ECUs, assignments, and what vehicle manifests tell us.

Manifest processing (Uptane 5.3.2): the server believes a vehicle version
manifest only when

* it parses strictly (:mod:`signing.manifest`) and names the VIN it was
  posted for and that vehicle's primary ECU;
* the primary's key signed it, and each ECU report is signed by the key
  registered for that ECU of this vehicle (an unknown ECU fails the whole
  manifest);
* every report counter is larger than the last one accepted (replay).

A refused manifest changes nothing but is recorded as a security event. An
accepted one updates each ECU's installed image, attacks detected and last
install outcome, and moves assignments along (pending → installed, or
failed when the ECU reports it refused or rolled back that image, or when an
image it required failed, see :mod:`server.compatibility`), which may change
what the director signs for the vehicle. A newly reported attack makes the
director re-sign the vehicle's metadata, superseding any forged copy the
vehicle was fed. Assignments that would leave the vehicle with an
incompatible combination of images are refused (409).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from server.compatibility import check_assignment, fail_unmet_dependents
from server.db import (
    Assignment,
    Ecu,
    EcuEncryptionKey,
    SecurityEvent,
    Vehicle,
    VehicleEncryption,
    utcnow,
)
from server.director import DirectorRepository
from server.image_repository import ImageRepository
from signing.encryption import EncryptionFormatError, parse_public_key
from signing.keys import KeyFileError, public_key_from_dict, public_key_to_dict
from signing.manifest import (
    FAILED_RESULTS,
    ManifestError,
    ManifestFormatError,
    ManifestSignatureError,
    parse_vehicle_manifest,
)
from signing.metadata import image_custom


class FleetError(Exception):
    """A fleet request was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EcuRegistration:
    serial: str
    hardware_id: str
    public_key: dict[str, Any]
    is_primary: bool = False
    #: X25519 public key (hex) for per-ECU image encryption; "" when the ECU cannot decrypt
    encryption_key: str = ""


def register_vehicle(
    session: Session,
    director: DirectorRepository,
    vin: str,
    primary_serial: str,
    ecus: list[EcuRegistration],
    *,
    encrypt_images: bool = False,
) -> None:
    """Add a vehicle and its ECUs, and sign its first (empty) director metadata."""
    if session.get(Vehicle, vin) is not None:
        raise FleetError(409, f"vehicle {vin} is already registered")
    if primary_serial not in {e.serial for e in ecus}:
        raise FleetError(400, f"primary_ecu_serial {primary_serial!r} is not among the ECUs")
    if len({e.serial for e in ecus}) != len(ecus):
        raise FleetError(400, "ecus: serials must be unique")
    session.add(Vehicle(vin=vin, primary_ecu_serial=primary_serial))
    session.flush()
    for e in ecus:
        if session.get(Ecu, e.serial) is not None:
            raise FleetError(409, f"ECU {e.serial} is already registered to a vehicle")
        try:
            key = public_key_from_dict(e.public_key, where=f"ecus.{e.serial}.public_key")
        except KeyFileError as exc:
            raise FleetError(400, str(exc)) from exc
        session.add(
            Ecu(
                serial=e.serial,
                vin=vin,
                hardware_id=e.hardware_id,
                public_key=json.dumps(public_key_to_dict(key)),
                is_primary=e.serial == primary_serial,
            )
        )
        if e.encryption_key:
            try:
                parse_public_key(e.encryption_key, where=f"ecus.{e.serial}.encryption_key")
            except EncryptionFormatError as exc:
                raise FleetError(400, str(exc)) from exc
            session.add(EcuEncryptionKey(ecu_serial=e.serial, vin=vin, public_key=e.encryption_key))
    if encrypt_images:
        session.add(VehicleEncryption(vin=vin, encrypt_images=True))
    session.flush()
    director.update_vehicle(session, vin, force=True)


def _runs(image_repo: ImageRepository, installed_sha256: str, filepath: str) -> bool:
    """Does an ECU running ``installed_sha256`` run the published image ``filepath``? (By content, not name.)"""
    target = image_repo.find_target(filepath)
    return (
        bool(installed_sha256)
        and target is not None
        and target.hashes.get("sha256") == installed_sha256
    )


def _vehicle(session: Session, vin: str) -> Vehicle:
    vehicle = session.get(Vehicle, vin)
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    return vehicle


def assign(
    session: Session,
    director: DirectorRepository,
    image_repo: ImageRepository,
    vin: str,
    ecu_serial: str,
    filepath: str,
) -> Assignment:
    """Direct ``ecu_serial`` of ``vin`` to install image ``filepath``."""
    _vehicle(session, vin)
    ecu = session.get(Ecu, ecu_serial)
    if ecu is None or ecu.vin != vin:
        raise FleetError(404, f"vehicle {vin} has no ECU {ecu_serial}")
    target = image_repo.find_target(filepath)
    if target is None:
        raise FleetError(404, f"image {filepath!r} is not published in the image repository")
    custom = image_custom(target)
    if ecu.hardware_id not in custom.hardware_ids:
        raise FleetError(
            409,
            f"image {filepath!r} is for {', '.join(custom.hardware_ids)}, ECU {ecu_serial} is {ecu.hardware_id}",
        )
    if ecu.installed_filepath:
        installed = image_repo.find_target(ecu.installed_filepath)
        if (
            installed is not None
            and image_custom(installed).release_counter > custom.release_counter
        ):
            raise FleetError(
                409,
                f"refusing rollback: {filepath!r} has a lower release counter than the installed "
                f"{ecu.installed_filepath!r}",
            )
    if director.encrypts(session, vin):
        if session.get(EcuEncryptionKey, ecu_serial) is None:
            raise FleetError(
                409,
                f"vehicle {vin} gets its images encrypted, and ECU {ecu_serial} registered "
                "no encryption key",
            )
        if (
            session.exec(
                select(Assignment).where(
                    Assignment.vin == vin,
                    Assignment.filepath == filepath,
                    Assignment.ecu_serial != ecu_serial,
                    col(Assignment.status).in_(("pending", "installed")),
                )
            ).first()
            is not None
        ):
            raise FleetError(
                409,
                f"{filepath!r} is already directed to another ECU of {vin}: encrypted "
                "copies are per ECU, one image path per vehicle",
            )
    problems = check_assignment(session, image_repo, vin, ecu_serial, filepath)
    if problems:
        raise FleetError(409, "incompatible combination of images: " + "; ".join(problems))
    for old in session.exec(
        select(Assignment).where(
            Assignment.ecu_serial == ecu_serial,
            col(Assignment.status).in_(("pending", "installed")),
        )
    ):
        old.status, old.updated_at = "superseded", utcnow()
        session.add(old)
    row = Assignment(vin=vin, ecu_serial=ecu_serial, filepath=filepath)
    if _runs(image_repo, ecu.installed_sha256, filepath):
        row.status = "installed"
    session.add(row)
    session.flush()
    director.update_vehicle(session, vin)
    return row


def _reject(
    session: Session, vin: str, vehicle: Vehicle | None, message: str, status: int = 400
) -> FleetError:
    if vehicle is not None:
        vehicle.manifests_rejected += 1
        vehicle.last_rejection = message
        session.add(vehicle)
        session.add(SecurityEvent(vin=vin, kind="manifest_rejected", detail=message))
        session.commit()
    return FleetError(status, message)


def process_manifest(
    session: Session, director: DirectorRepository, vin: str, body: bytes
) -> dict[str, Any]:
    """Verify and record a vehicle version manifest (see module docstring)."""
    vehicle = session.get(Vehicle, vin)
    try:
        envelope, manifest = parse_vehicle_manifest(body)
    except ManifestFormatError as exc:
        raise _reject(session, vin, vehicle, f"malformed manifest: {exc}") from exc
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    if manifest.vin != vin:
        raise _reject(
            session, vin, vehicle, f"manifest is for VIN {manifest.vin!r}, posted for {vin!r}"
        )
    if manifest.primary_ecu_serial != vehicle.primary_ecu_serial:
        raise _reject(
            session,
            vin,
            vehicle,
            f"manifest names primary {manifest.primary_ecu_serial!r}, "
            f"vehicle's primary is {vehicle.primary_ecu_serial!r}",
        )
    ecus = {e.serial: e for e in session.exec(select(Ecu).where(Ecu.vin == vin))}
    try:
        envelope.verify(
            public_key_from_dict(json.loads(ecus[vehicle.primary_ecu_serial].public_key)),
            "vehicle manifest",
        )
        reports = {}
        for serial, report_env in manifest.ecu_version_reports.items():
            ecu = ecus.get(serial)
            if ecu is None:
                raise ManifestError(
                    f"ECU report from {serial!r}, which is not an ECU of vehicle {vin}"
                )
            report_env.verify(
                public_key_from_dict(json.loads(ecu.public_key)), f"ECU report of {serial}"
            )
            report = report_env.ecu_report()
            if report.report_counter <= ecu.report_counter:
                raise ManifestError(
                    f"ECU report of {serial}: report counter {report.report_counter} is not above the last "
                    f"accepted {ecu.report_counter} (replayed report)"
                )
            reports[serial] = report
    except ManifestError as exc:
        status = 403 if isinstance(exc, ManifestSignatureError) else 400
        raise _reject(session, vin, vehicle, str(exc), status=status) from exc

    now = utcnow()
    events = []
    for serial, report in reports.items():
        ecu = ecus[serial]
        image = report.installed_image
        ecu.installed_filepath = image.filepath
        ecu.installed_length = image.length
        ecu.installed_sha256 = image.hashes.get("sha256", "")
        ecu.report_counter = report.report_counter
        if report.attacks_detected and report.attacks_detected != ecu.attacks_detected:
            session.add(
                SecurityEvent(
                    vin=vin,
                    ecu_serial=serial,
                    kind="attack_reported",
                    detail=report.attacks_detected,
                )
            )
            events.append(serial)
        ecu.attacks_detected = report.attacks_detected
        if report.last_install is not None:
            li = report.last_install
            ecu.last_install_filepath, ecu.last_install_result = li.filepath, li.result
            ecu.last_install_detail, ecu.last_install_method = li.detail, li.method
        ecu.updated_at = now
        session.add(ecu)
        for row in session.exec(
            select(Assignment).where(
                Assignment.ecu_serial == serial, Assignment.status == "pending"
            )
        ):
            if _runs(director.image_repo, ecu.installed_sha256, row.filepath):
                row.status, row.detail, row.updated_at = "installed", "", now
            elif (
                report.last_install
                and report.last_install.filepath == row.filepath
                and report.last_install.result in FAILED_RESULTS
            ):
                row.status = "failed"
                row.detail = f"{report.last_install.result}: {report.last_install.detail}"
                row.updated_at = now
            session.add(row)
    vehicle.last_manifest_at = now
    vehicle.manifests_accepted += 1
    session.add(vehicle)
    session.flush()
    fail_unmet_dependents(session, director.image_repo, vin)
    # a new attack report: re-sign, so that forged metadata the vehicle may hold is superseded
    director.update_vehicle(session, vin, force=bool(events))
    session.commit()
    return {"accepted": True, "vin": vin, "ecus": sorted(reports), "attacks_recorded": events}


def vehicle_record(session: Session, vin: str) -> dict[str, Any]:
    """Everything the server knows about one vehicle (the admin API's view)."""
    vehicle = _vehicle(session, vin)
    ecus = session.exec(select(Ecu).where(Ecu.vin == vin).order_by(col(Ecu.serial))).all()
    assignments = session.exec(
        select(Assignment).where(Assignment.vin == vin).order_by(col(Assignment.id))
    ).all()
    events = session.exec(
        select(SecurityEvent).where(SecurityEvent.vin == vin).order_by(col(SecurityEvent.id))
    ).all()
    return {
        "vin": vin,
        "primary_ecu_serial": vehicle.primary_ecu_serial,
        "registered_at": vehicle.registered_at.isoformat(),
        "last_manifest_at": vehicle.last_manifest_at.isoformat()
        if vehicle.last_manifest_at
        else None,
        "manifests_accepted": vehicle.manifests_accepted,
        "manifests_rejected": vehicle.manifests_rejected,
        "last_rejection": vehicle.last_rejection,
        "director_targets_version": vehicle.director_targets_version,
        "ecus": [
            {
                "serial": e.serial,
                "hardware_id": e.hardware_id,
                "is_primary": e.is_primary,
                "installed": {
                    "filepath": e.installed_filepath,
                    "length": e.installed_length,
                    "sha256": e.installed_sha256,
                },
                "report_counter": e.report_counter,
                "attacks_detected": e.attacks_detected,
                "last_install": {
                    "filepath": e.last_install_filepath,
                    "result": e.last_install_result,
                    "detail": e.last_install_detail,
                    "method": e.last_install_method,
                },
            }
            for e in ecus
        ],
        "assignments": [
            {
                "id": a.id,
                "ecu_serial": a.ecu_serial,
                "filepath": a.filepath,
                "status": a.status,
                "detail": a.detail,
            }
            for a in assignments
        ],
        "security_events": [
            {
                "at": ev.at.isoformat(),
                "ecu_serial": ev.ecu_serial,
                "kind": ev.kind,
                "detail": ev.detail,
            }
            for ev in events
        ],
    }
