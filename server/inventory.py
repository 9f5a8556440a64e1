"""The fleet's lists: vehicles, ECUs and security events, filtered and paged.

Every list is ordered by a unique key (a VIN, an ECU serial, an event id)
and paged by it: a page is the first ``limit`` rows above the last key of
the previous page, one indexed range scan however large the fleet, and a
row added or removed meanwhile shifts nothing. Filters are conditions on
indexed columns or ``EXISTS`` over a vehicle's ECUs, so no list loads the
fleet to filter it in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists
from sqlmodel import Session, col, select

from server.db import Ecu, SecurityEvent, Vehicle, as_utc
from server.fleet import ecu_dict, event_dict


def _time(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


@dataclass(frozen=True)
class VehicleFilter:
    """Which vehicles a list shows (None: no condition)."""

    hardware_id: str | None = None
    image: str | None = None
    seen_since: datetime | None = None
    not_seen_since: datetime | None = None
    revoked: bool | None = None
    has_attacks: bool | None = None


def vehicles_page(
    session: Session, where: VehicleFilter, *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Vehicles matching ``where`` with VINs above ``after``, by VIN; and the next cursor."""
    query = select(Vehicle)
    if where.hardware_id is not None:
        query = query.where(
            exists().where(
                col(Ecu.vin) == col(Vehicle.vin), col(Ecu.hardware_id) == where.hardware_id
            )
        )
    if where.image is not None:
        query = query.where(
            exists().where(
                col(Ecu.vin) == col(Vehicle.vin), col(Ecu.installed_filepath) == where.image
            )
        )
    if where.has_attacks is not None:
        attacked = exists().where(col(Ecu.vin) == col(Vehicle.vin), col(Ecu.attacks_detected) != "")
        query = query.where(attacked if where.has_attacks else ~attacked)
    if where.seen_since is not None:
        query = query.where(col(Vehicle.last_manifest_at) >= where.seen_since)
    if where.not_seen_since is not None:
        # never seen counts as not seen since
        query = query.where(
            col(Vehicle.last_manifest_at).is_(None)
            | (col(Vehicle.last_manifest_at) < where.not_seen_since)
        )
    if where.revoked is not None:
        query = query.where(
            col(Vehicle.revoked_at).is_not(None)
            if where.revoked
            else col(Vehicle.revoked_at).is_(None)
        )
    if after is not None:
        query = query.where(col(Vehicle.vin) > after)
    rows = session.exec(query.order_by(col(Vehicle.vin)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    attacked_vins = set(
        session.exec(
            select(Ecu.vin).where(
                col(Ecu.vin).in_([v.vin for v in rows]), col(Ecu.attacks_detected) != ""
            )
        ).all()
    ) if rows else set()  # fmt: skip
    vehicles = [
        {
            "vin": v.vin,
            "primary_ecu_serial": v.primary_ecu_serial,
            "registered_at": _time(v.registered_at),
            "last_manifest_at": _time(v.last_manifest_at),
            "manifests_accepted": v.manifests_accepted,
            "manifests_rejected": v.manifests_rejected,
            "director_targets_version": v.director_targets_version,
            "revoked": v.revoked_at is not None,
            "has_attacks": v.vin in attacked_vins,
        }
        for v in rows
    ]
    return vehicles, (rows[-1].vin if more else None)


@dataclass(frozen=True)
class EcuFilter:
    """Which ECUs a list shows (None: no condition)."""

    vin: str | None = None
    hardware_id: str | None = None
    image: str | None = None
    has_attacks: bool | None = None
    last_install_result: str | None = None


def ecus_page(
    session: Session, where: EcuFilter, *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """ECUs matching ``where`` with serials above ``after``, by serial; and the next cursor."""
    query = select(Ecu)
    if where.vin is not None:
        query = query.where(col(Ecu.vin) == where.vin)
    if where.hardware_id is not None:
        query = query.where(col(Ecu.hardware_id) == where.hardware_id)
    if where.image is not None:
        query = query.where(col(Ecu.installed_filepath) == where.image)
    if where.has_attacks is not None:
        query = query.where(
            (col(Ecu.attacks_detected) != "")
            if where.has_attacks
            else (col(Ecu.attacks_detected) == "")
        )
    if where.last_install_result is not None:
        query = query.where(col(Ecu.last_install_result) == where.last_install_result)
    if after is not None:
        query = query.where(col(Ecu.serial) > after)
    rows = session.exec(query.order_by(col(Ecu.serial)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [ecu_dict(e, fleet_wide=True) for e in rows], (rows[-1].serial if more else None)


@dataclass(frozen=True)
class EventFilter:
    """Which security events a list shows (None: no condition)."""

    vin: str | None = None
    kind: str | None = None
    since: datetime | None = None


def events_page(
    session: Session, where: EventFilter, *, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Security events of the whole fleet matching ``where``, by id; and the next cursor."""
    query = select(SecurityEvent)
    if where.vin is not None:
        query = query.where(col(SecurityEvent.vin) == where.vin)
    if where.kind is not None:
        query = query.where(col(SecurityEvent.kind) == where.kind)
    if where.since is not None:
        query = query.where(col(SecurityEvent.last_at) >= where.since)
    if after is not None:
        query = query.where(col(SecurityEvent.id) > after)
    rows = session.exec(query.order_by(col(SecurityEvent.id)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [{"vin": ev.vin, **event_dict(ev)} for ev in rows], (rows[-1].id if more else None)
