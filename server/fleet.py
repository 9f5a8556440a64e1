"""Vehicles, ECUs, assignments, and what vehicle manifests tell us.

Manifest processing (Uptane 5.3.2): the server believes a vehicle version
manifest only when

* it parses strictly (:mod:`signing.manifest`) and names the VIN it was
  posted for and that vehicle's primary ECU;
* the primary's key signed it, and each ECU report is signed by the key
  registered for that ECU of this vehicle (an unknown ECU fails the whole
  manifest);
* every report counter is larger than the last one accepted (replay), by
  at most :data:`MAX_REPORT_COUNTER_JUMP` (the first report after
  registration counts from -1): one report with a counter near 2**63, signed
  with a stolen key or by a bug, would otherwise refuse every later genuine
  report forever.

A refused manifest changes nothing but is recorded: the vehicle's rejection
count and last rejection, and one ``manifest_rejected`` security event per
:class:`RejectionReason` (and ECU) that counts its repetitions, so that
anyone who knows a VIN can make the server store at most a few rows.
:class:`RejectionLimiter` bounds how often that record is written per
vehicle; past it the answer is 429 and nothing is written. Only refusals
count: a genuine manifest is accepted however much garbage was posted
before it.

Resetting a report counter (:func:`reset_report_counter`, an operator's
recovery when a counter was pushed far ahead of the genuine ECU) puts the
ECU in :attr:`ReportCounterState.REBASELINE`: the next report accepted
from it may carry any counter and becomes the new baseline, from which the
jump bound applies again. Until then an old, genuinely signed report of the
ECU would be accepted too (it can only tell what the ECU once ran, and the
genuine ECU's next report, with a higher counter, supersedes it); an
attacker who holds the ECU's key can push the counter ahead again, so after
a key compromise the ECU must be re-keyed as well. The reset is recorded as
a ``report_counter_reset`` security event.

An accepted one updates each ECU's installed image, attacks detected and last
install outcome (and, when any of them changed, appends to the vehicle's
inventory ledger with the manifest that said so, :mod:`server.ledger`), and moves assignments along (pending → installed, or
failed when the ECU reports it refused or rolled back that image, or when an
image it required failed, see :mod:`server.compatibility`), which may change
what the director signs for the vehicle. A newly reported attack makes the
director re-sign the vehicle's metadata, superseding any forged copy the
vehicle was fed. Assignments that would leave the vehicle with an
incompatible combination of images are refused (409).
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func
from sqlmodel import Session, col, select

from server import ledger
from server.compatibility import check_assignment, fail_unmet_dependents
from server.db import (
    Assignment,
    AssignmentStatus,
    Ecu,
    EcuEncryptionKey,
    LedgerChange,
    ReportCounterState,
    SecurityEvent,
    SecurityEventKind,
    Vehicle,
    VehicleEncryption,
    as_utc,
    bounded_text,
    utcnow,
)
from server.director import DirectorRepository
from server.image_repository import ImageRepository
from server.metrics import ATTACKS_REPORTED, INSTALLS
from signing.encryption import EncryptionFormatError, parse_public_key
from signing.exceptions import UptakeError
from signing.keys import KeyFileError, public_key_from_dict, public_key_to_dict
from signing.manifest import (
    FAILED_RESULTS,
    EcuVersionReport,
    ManifestError,
    ManifestFormatError,
    ManifestSignatureError,
    SignedEnvelope,
    VehicleManifest,
    parse_vehicle_manifest,
)
from signing.metadata import image_custom

#: Largest step a report counter may take over the last accepted one (a vehicle
#: reporting every minute for 1.9 years takes 1,000,000 steps).
MAX_REPORT_COUNTER_JUMP = 1_000_000
#: Security events kept per vehicle; older ones (by last occurrence) are pruned.
MAX_EVENTS_PER_VEHICLE = 200
#: Latest assignments and security events :func:`vehicle_record` shows (the rest: paged lists).
SUMMARY_ITEMS = 20


#: key of process_manifest's result: whether the manifest changed what the director signs
STATE_CHANGED = "state_changed"


class FleetError(UptakeError):
    """A fleet request was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RejectionRateLimitedError(FleetError):
    """A manifest was refused, too soon after many others for the vehicle to record it (429)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message)
        self.retry_after = retry_after


class RejectionReason(enum.StrEnum):
    """Why a manifest was refused: the classes its security events are counted in."""

    MALFORMED = "malformed"
    OTHER_VIN = "other_vin"
    OTHER_PRIMARY = "other_primary"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_ECU = "unknown_ecu"
    REPLAYED_COUNTER = "replayed_counter"
    COUNTER_JUMP = "counter_jump"


class ManifestRejectedError(UptakeError):
    """A manifest the server does not believe: why (``reason``), with which HTTP status."""

    def __init__(
        self, reason: RejectionReason, message: str, status: int = 400, ecu_serial: str = ""
    ) -> None:
        super().__init__(message)
        self.reason, self.status, self.ecu_serial = reason, status, ecu_serial


class RejectionLimiter:
    """How often refused manifests of one vehicle are recorded: a token bucket per VIN.

    A vehicle's bucket holds ``burst`` tokens and gains ``per_minute`` a
    minute; recording a refusal takes one. Memory is bounded: past
    ``max_vehicles`` buckets the least recently used is forgotten (which
    only gives that vehicle a full bucket again). Thread-safe: manifests are
    processed in worker threads.
    """

    def __init__(
        self,
        burst: int = 20,
        per_minute: float = 6.0,
        max_vehicles: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self._rate = burst, per_minute / 60.0
        self._max_vehicles, self._clock = max_vehicles, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # vin -> tokens, at
        self._lock = threading.Lock()

    def take(self, vin: str) -> float:
        """0 when a refusal of ``vin`` may be recorded now (one token taken); else seconds to wait."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(vin, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self._rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self._rate
            self._buckets[vin] = (tokens, now)
            while len(self._buckets) > self._max_vehicles:
                self._buckets.popitem(last=False)
            return wait


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


def cancel_assignment(
    session: Session, director: DirectorRepository, vin: str, assignment_id: int
) -> Assignment:
    """Withdraw a pending assignment: the director re-signs the vehicle's targets without it.

    An installed one is refused (409: the ECU already runs the image; assign
    another to change it), and so is one that is no longer directed
    (superseded, failed, cancelled). Pending assignments that needed the
    cancelled image (:mod:`server.compatibility`) end as failed with it.
    """
    _vehicle(session, vin)
    row = session.get(Assignment, assignment_id)
    if row is None or row.vin != vin:
        raise FleetError(404, f"vehicle {vin} has no assignment {assignment_id}")
    if row.status == AssignmentStatus.INSTALLED:
        raise FleetError(
            409, f"assignment {assignment_id} is already installed on {row.ecu_serial}: "
            "assign another image to change what it runs",
        )  # fmt: skip
    if row.status != AssignmentStatus.PENDING:
        raise FleetError(
            409,
            f"assignment {assignment_id} is {row.status}, no longer directed: nothing to cancel",
        )
    row.status, row.detail, row.updated_at = AssignmentStatus.CANCELLED, "", utcnow()
    session.add(row)
    session.flush()
    fail_unmet_dependents(session, director.image_repo, vin)
    director.update_vehicle(session, vin)
    return row


def _record_event(
    session: Session,
    vin: str,
    kind: SecurityEventKind,
    detail: str,
    *,
    ecu_serial: str = "",
    reason: str = "",
    aggregate: bool = False,
) -> None:
    """Add a security event, or with ``aggregate`` count it in the row of its kind and reason."""
    now = utcnow()
    row = (
        session.exec(
            select(SecurityEvent).where(
                SecurityEvent.vin == vin,
                SecurityEvent.kind == kind,
                SecurityEvent.reason == reason,
                SecurityEvent.ecu_serial == ecu_serial,
            )
        ).first()
        if aggregate
        else None
    )
    if row is not None:
        row.count += 1
        row.detail, row.last_at = bounded_text(detail), now
        session.add(row)
        return
    session.add(
        SecurityEvent(
            vin=vin,
            ecu_serial=ecu_serial,
            kind=kind,
            reason=reason,
            detail=bounded_text(detail),
            first_at=now,
            last_at=now,
        )
    )
    session.flush()
    # the oldest (by last occurrence) go first: the history of one vehicle stays bounded
    excess = session.exec(
        select(SecurityEvent.id)
        .where(SecurityEvent.vin == vin)
        .order_by(col(SecurityEvent.last_at).desc(), col(SecurityEvent.id).desc())
        .offset(MAX_EVENTS_PER_VEHICLE)
    ).all()
    if excess:
        session.exec(delete(SecurityEvent).where(col(SecurityEvent.id).in_(excess)))


def _record_rejection(
    session: Session, vehicle: Vehicle, limiter: RejectionLimiter, rejection: ManifestRejectedError
) -> FleetError:
    """Record a refused manifest (unless the vehicle's limit is reached) and the error to answer."""
    session.rollback()  # nothing of the refused manifest may stay in the transaction
    message = str(rejection)
    wait = limiter.take(vehicle.vin)
    if wait:
        return RejectionRateLimitedError(
            f"{message} (not recorded: more than {limiter.burst} manifests of {vehicle.vin} "
            f"refused recently; retry in {wait:.0f} s)",
            retry_after=wait,
        )
    vehicle.manifests_rejected += 1
    vehicle.last_rejection = bounded_text(message)
    session.add(vehicle)
    _record_event(
        session,
        vehicle.vin,
        SecurityEventKind.MANIFEST_REJECTED,
        message,
        ecu_serial=rejection.ecu_serial,
        reason=rejection.reason,
        aggregate=True,
    )
    session.commit()
    return FleetError(rejection.status, message)


def _check_counter(ecu: Ecu, report: EcuVersionReport) -> None:
    """Refuse a replayed report, and a counter jump that would lock the genuine ECU out."""
    counter, last = report.report_counter, ecu.report_counter
    if counter <= last:
        raise ManifestRejectedError(
            RejectionReason.REPLAYED_COUNTER,
            f"ECU report of {ecu.serial}: report counter {counter} is not above the last "
            f"accepted {last} (replayed report)",
            ecu_serial=ecu.serial,
        )
    if ecu.report_counter_state != ReportCounterState.REBASELINE and (
        counter - last > MAX_REPORT_COUNTER_JUMP
    ):
        raise ManifestRejectedError(
            RejectionReason.COUNTER_JUMP,
            f"ECU report of {ecu.serial}: report counter {counter} jumps more than "
            f"{MAX_REPORT_COUNTER_JUMP} above the last accepted {last} (refused: it would "
            "lock out the genuine ECU's later reports)",
            ecu_serial=ecu.serial,
        )


def _verified_reports(
    session: Session,
    vehicle: Vehicle,
    envelope: SignedEnvelope,
    manifest: VehicleManifest,
    ecus: dict[str, Ecu],
) -> dict[str, EcuVersionReport]:
    """The manifest's ECU reports, if the server believes them; else :class:`ManifestRejectedError`."""
    vin = vehicle.vin
    if manifest.vin != vin:
        raise ManifestRejectedError(
            RejectionReason.OTHER_VIN, f"manifest is for VIN {manifest.vin!r}, posted for {vin!r}"
        )
    if manifest.primary_ecu_serial != vehicle.primary_ecu_serial:
        raise ManifestRejectedError(
            RejectionReason.OTHER_PRIMARY,
            f"manifest names primary {manifest.primary_ecu_serial!r}, "
            f"vehicle's primary is {vehicle.primary_ecu_serial!r}",
        )
    try:
        envelope.verify(
            public_key_from_dict(json.loads(ecus[vehicle.primary_ecu_serial].public_key)),
            "vehicle manifest",
        )
    except ManifestSignatureError as exc:
        raise ManifestRejectedError(RejectionReason.BAD_SIGNATURE, str(exc), 403) from exc
    except ManifestError as exc:
        raise ManifestRejectedError(RejectionReason.MALFORMED, str(exc)) from exc
    reports = {}
    for serial, report_env in manifest.ecu_version_reports.items():
        ecu = ecus.get(serial)
        if ecu is None:
            raise ManifestRejectedError(
                RejectionReason.UNKNOWN_ECU,
                f"ECU report from {serial!r}, which is not an ECU of vehicle {vin}",
            )
        try:
            report_env.verify(
                public_key_from_dict(json.loads(ecu.public_key)), f"ECU report of {serial}"
            )
            report = report_env.ecu_report()
        except ManifestSignatureError as exc:
            raise ManifestRejectedError(
                RejectionReason.BAD_SIGNATURE, str(exc), 403, ecu_serial=serial
            ) from exc
        except ManifestError as exc:
            raise ManifestRejectedError(
                RejectionReason.MALFORMED, str(exc), ecu_serial=serial
            ) from exc
        _check_counter(ecu, report)
        reports[serial] = report
    return reports


# The reads every manifest makes, built once: on a heartbeat, building an ORM statement
# and its cache key cost more CPU than the database's answer (profiled on PostgreSQL).
# One query reads the vehicle and its ECUs (an ECU-less vehicle comes back with None).
_VEHICLE_WITH_ECUS = (
    select(Vehicle, Ecu)
    .outerjoin(Ecu, col(Ecu.vin) == col(Vehicle.vin))
    .where(col(Vehicle.vin) == bindparam("vin"))
)
_PENDING_ASSIGNMENTS = select(Assignment).where(
    col(Assignment.vin) == bindparam("vin"), col(Assignment.status) == "pending"
)


def process_manifest(
    session: Session,
    director: DirectorRepository,
    vin: str,
    body: bytes,
    limiter: RejectionLimiter,
    after_accept: Callable[[Session, str], object] | None = None,
) -> dict[str, Any]:
    """Verify and record a vehicle version manifest (see module docstring).

    ``after_accept(session, vin)`` runs in the same transaction once the manifest is
    accepted and recorded (campaigns follow the vehicle there, :mod:`server.campaigns`).
    """
    rows = session.exec(_VEHICLE_WITH_ECUS, params={"vin": vin}).all()
    vehicle = rows[0][0] if rows else None
    try:
        envelope, manifest = parse_vehicle_manifest(body)
    except ManifestFormatError as exc:
        if vehicle is None:
            raise FleetError(400, f"malformed manifest: {exc}") from exc
        raise _record_rejection(
            session,
            vehicle,
            limiter,
            ManifestRejectedError(RejectionReason.MALFORMED, f"malformed manifest: {exc}"),
        ) from exc
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    ecus = {ecu.serial: ecu for _, ecu in rows if ecu is not None}
    try:
        reports = _verified_reports(session, vehicle, envelope, manifest, ecus)
    except ManifestRejectedError as exc:
        raise _record_rejection(session, vehicle, limiter, exc) from exc

    now = utcnow()
    # A heartbeat (nothing installed, attempted or assigned differently since the last
    # manifest) leaves what the director signs for the vehicle as it was: no re-check of
    # dependencies, no director update (its expiry upkeep happens on the poll).
    changed = False
    pending: dict[str, list[Assignment]] = {}  # one query for the vehicle, not one per ECU
    for row in session.exec(_PENDING_ASSIGNMENTS, params={"vin": vin}):
        pending.setdefault(row.ecu_serial, []).append(row)
    events = []
    ledger_changes: list[tuple[Ecu, list[LedgerChange]]] = []
    installs = []  # results reported for the first time (a heartbeat repeats the last one)
    for serial, report in reports.items():
        ecu = ecus[serial]
        image = report.installed_image
        # compared as stored: an over-long report must not count as a new attack on every poll
        attacks = bounded_text(report.attacks_detected)
        ledger_changes.append((ecu, ledger.changes_of(ecu, report, attacks)))
        before = (ecu.installed_filepath, ecu.installed_length, ecu.installed_sha256)
        if before != (image.filepath, image.length, image.hashes.get("sha256", "")):
            changed = True
        ecu.installed_filepath = image.filepath
        ecu.installed_length = image.length
        ecu.installed_sha256 = image.hashes.get("sha256", "")
        ecu.report_counter = report.report_counter
        ecu.report_counter_state = ReportCounterState.BOUNDED
        if attacks and attacks != ecu.attacks_detected:
            _record_event(
                session, vin, SecurityEventKind.ATTACK_REPORTED, attacks, ecu_serial=serial
            )
            events.append(serial)
        ecu.attacks_detected = attacks
        if report.last_install is not None:
            li = report.last_install
            if (li.filepath, li.result) != (ecu.last_install_filepath, ecu.last_install_result):
                installs.append(str(li.result))
                changed = True
            ecu.last_install_filepath, ecu.last_install_result = li.filepath, li.result
            ecu.last_install_detail = bounded_text(li.detail)
            ecu.last_install_method = li.method
        ecu.updated_at = now
        session.add(ecu)
        for row in pending.get(serial, ()):
            if _runs(director.image_repo, ecu.installed_sha256, row.filepath):
                row.status, row.detail, row.updated_at = "installed", "", now
                changed = True
            elif (
                report.last_install
                and report.last_install.filepath == row.filepath
                and report.last_install.result in FAILED_RESULTS
            ):
                row.status, changed = "failed", True
                row.detail = bounded_text(
                    f"{report.last_install.result}: {report.last_install.detail}"
                )
                row.updated_at = now
            session.add(row)
    vehicle.last_manifest_at = now
    vehicle.manifests_accepted += 1
    session.add(vehicle)
    session.flush()
    manifest_id = ledger.record(session, director.image_repo, vin, body, ledger_changes)
    if changed or events:
        fail_unmet_dependents(session, director.image_repo, vin)
        # a new attack report: re-sign, so that forged metadata the vehicle may hold is superseded
        director.update_vehicle(session, vin, force=bool(events))
    if after_accept is not None:
        after_accept(session, vin)
    session.commit()
    for result in installs:
        INSTALLS.labels(result).inc()
    ATTACKS_REPORTED.inc(len(events))
    return {
        "accepted": True,
        "vin": vin,
        "ecus": sorted(reports),
        "attacks_recorded": events,
        "ledger_manifest_id": manifest_id,
        # for the server itself (deltas to make), not sent to the vehicle
        STATE_CHANGED: changed or bool(events),
    }


def reset_report_counter(
    session: Session, vin: str, ecu_serial: str, reason: str = ""
) -> dict[str, Any]:
    """Let the next report of ``ecu_serial`` set its counter's baseline (see module docstring)."""
    _vehicle(session, vin)
    ecu = session.get(Ecu, ecu_serial)
    if ecu is None or ecu.vin != vin:
        raise FleetError(404, f"vehicle {vin} has no ECU {ecu_serial}")
    previous = ecu.report_counter
    ecu.report_counter, ecu.report_counter_state = -1, ReportCounterState.REBASELINE
    session.add(ecu)
    _record_event(
        session,
        vin,
        SecurityEventKind.REPORT_COUNTER_RESET,
        f"operator reset the accepted report counter of ECU {ecu_serial} (was {previous}): "
        "the next report accepted from it sets the baseline"
        + (f"; reason: {reason}" if reason else ""),
        ecu_serial=ecu_serial,
    )
    return {
        "vin": vin,
        "ecu_serial": ecu_serial,
        "previous_report_counter": previous,
        "report_counter": ecu.report_counter,
        "report_counter_state": str(ecu.report_counter_state),
    }


def ecu_dict(e: Ecu, *, fleet_wide: bool) -> dict[str, Any]:
    """One ECU as the API shows it: in a fleet-wide list (``fleet_wide``, the inventory) with
    its vehicle and when it last changed; in its vehicle's record (:func:`vehicle_record`)
    with the state of its report counter instead."""
    summary: dict[str, Any] = {
        "serial": e.serial,
        "vin": e.vin,
        "hardware_id": e.hardware_id,
        "is_primary": e.is_primary,
        "installed": {
            "filepath": e.installed_filepath,
            "length": e.installed_length,
            "sha256": e.installed_sha256,
        },
        "report_counter": e.report_counter,
        "report_counter_state": e.report_counter_state,
        "attacks_detected": e.attacks_detected,
        "last_install": {
            "filepath": e.last_install_filepath,
            "result": e.last_install_result,
            "detail": e.last_install_detail,
            "method": e.last_install_method,
        },
        "updated_at": as_utc(e.updated_at).isoformat() if e.updated_at is not None else None,
    }
    for key in ("report_counter_state",) if fleet_wide else ("vin", "updated_at"):
        del summary[key]
    return summary


def event_dict(ev: SecurityEvent) -> dict[str, Any]:
    return {
        "id": ev.id,
        "kind": ev.kind,
        "reason": ev.reason,
        "ecu_serial": ev.ecu_serial,
        "detail": ev.detail,
        "count": ev.count,
        "first_at": as_utc(ev.first_at).isoformat(),
        "last_at": as_utc(ev.last_at).isoformat(),
    }


def _assignment_dict(a: Assignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "ecu_serial": a.ecu_serial,
        "filepath": a.filepath,
        "status": a.status,
        "detail": a.detail,
        "updated_at": as_utc(a.updated_at).isoformat(),
    }


def security_events_page(
    session: Session, vin: str, *, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Security events of ``vin`` with ids above ``after``, oldest first; and the next cursor."""
    _vehicle(session, vin)
    query = select(SecurityEvent).where(SecurityEvent.vin == vin)
    if after is not None:
        query = query.where(col(SecurityEvent.id) > after)
    rows = session.exec(query.order_by(col(SecurityEvent.id)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [event_dict(r) for r in rows], (rows[-1].id if more else None)


def assignments_page(
    session: Session, vin: str, *, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Assignments of ``vin`` with ids above ``after``, oldest first; and the next cursor."""
    _vehicle(session, vin)
    query = select(Assignment).where(Assignment.vin == vin)
    if after is not None:
        query = query.where(col(Assignment.id) > after)
    rows = session.exec(query.order_by(col(Assignment.id)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [_assignment_dict(r) for r in rows], (rows[-1].id if more else None)


def _count(session: Session, table: type[SecurityEvent] | type[Assignment], vin: str) -> int:
    return int(session.exec(select(func.count()).select_from(table).where(table.vin == vin)).one())


def vehicle_record(session: Session, vin: str) -> dict[str, Any]:
    """What the server knows about one vehicle, bounded (the admin API's view).

    Assignments and security events are the latest :data:`SUMMARY_ITEMS`
    of each (oldest first) with their totals; :func:`assignments_page` and
    :func:`security_events_page` list them all.
    """
    vehicle = _vehicle(session, vin)
    ecus = session.exec(select(Ecu).where(Ecu.vin == vin).order_by(col(Ecu.serial))).all()
    assignments = session.exec(
        select(Assignment)
        .where(Assignment.vin == vin)
        .order_by(col(Assignment.id).desc())
        .limit(SUMMARY_ITEMS)
    ).all()
    events = session.exec(
        select(SecurityEvent)
        .where(SecurityEvent.vin == vin)
        .order_by(col(SecurityEvent.last_at).desc(), col(SecurityEvent.id).desc())
        .limit(SUMMARY_ITEMS)
    ).all()
    return {
        "vin": vin,
        "primary_ecu_serial": vehicle.primary_ecu_serial,
        "registered_at": as_utc(vehicle.registered_at).isoformat(),
        "last_manifest_at": as_utc(vehicle.last_manifest_at).isoformat()
        if vehicle.last_manifest_at
        else None,
        "manifests_accepted": vehicle.manifests_accepted,
        "manifests_rejected": vehicle.manifests_rejected,
        "last_rejection": vehicle.last_rejection,
        "director_targets_version": vehicle.director_targets_version,
        "ecus": [ecu_dict(e, fleet_wide=False) for e in ecus],
        "assignments": [_assignment_dict(a) for a in reversed(assignments)],
        "assignments_total": _count(session, Assignment, vin),
        "security_events": [event_dict(ev) for ev in reversed(events)],
        "security_events_total": _count(session, SecurityEvent, vin),
    }
