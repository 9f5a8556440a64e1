"""What the dashboard's pages show, read with bounded queries.

Every count is aggregated by the database (``count``/``sum`` with ``GROUP
BY``), every list is a page (keyset paging on an indexed key), so that a
page read touches indexes and a bounded number of rows, whatever the
fleet's size. Nothing here writes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import and_, exists, func
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from server.audit import AuditVerification
from server.audit import verify as verify_audit
from server.campaign_states import PartState
from server.campaign_tables import Campaign, CampaignVehicle, Release, VehicleAttributes
from server.db import (
    Assignment,
    AuditRecord,
    Ecu,
    LedgerEntry,
    SecurityEvent,
    SecurityEventKind,
    StoredManifest,
    Vehicle,
    as_utc,
    utcnow,
)
from server.ledger import entry_dict, manifest_record

#: A vehicle "seen recently" sent an accepted manifest within this time.
RECENT = timedelta(hours=24)
#: Rows of the installed-images table on the overview (the most common first).
MAX_IMAGE_ROWS = 100
LATEST_ATTACKS = 10
PAGE_SIZE = 50
_T = TypeVar("_T")


@dataclass(frozen=True)
class ImageCount:
    hardware_id: str
    filepath: str  # "" when the ECU has reported nothing yet
    ecus: int


@dataclass(frozen=True)
class AttackRow:
    vin: str
    ecu_serial: str
    detail: str
    count: int
    last_at: datetime


@dataclass
class FleetOverview:
    vehicles: int = 0
    seen_recently: int = 0
    never_reported: int = 0
    revoked: int = 0
    vehicles_with_attacks: int = 0
    vehicles_with_failures: int = 0
    images: list[ImageCount] = field(default_factory=list)
    latest_attacks: list[AttackRow] = field(default_factory=list)
    generated_at: datetime = field(default_factory=utcnow)

    @property
    def not_seen_recently(self) -> int:
        return self.vehicles - self.seen_recently

    def live(self) -> dict[str, Any]:
        """The counters the page refreshes while open."""
        return {
            "vehicles": self.vehicles,
            "seen_recently": self.seen_recently,
            "not_seen_recently": self.not_seen_recently,
            "never_reported": self.never_reported,
            "revoked": self.revoked,
            "vehicles_with_attacks": self.vehicles_with_attacks,
            "vehicles_with_failures": self.vehicles_with_failures,
        }


def fleet_overview(session: Session, now: datetime | None = None) -> FleetOverview:
    now = now or utcnow()
    since = now - RECENT

    def count(*where: Any) -> int:  # range counts on indexes, not a scan of the table
        return int(session.exec(select(func.count()).select_from(Vehicle).where(*where)).one())

    total = count()
    seen = count(col(Vehicle.last_manifest_at) >= since)
    never = count(col(Vehicle.last_manifest_at).is_(None))
    revoked = count(col(Vehicle.revoked_at).is_not(None))
    images = session.exec(
        select(Ecu.hardware_id, Ecu.installed_filepath, func.count())
        .group_by(col(Ecu.hardware_id), col(Ecu.installed_filepath))
        .order_by(col(Ecu.hardware_id), func.count().desc())
        .limit(MAX_IMAGE_ROWS)
    ).all()
    attacked = session.exec(
        select(func.count(func.distinct(SecurityEvent.vin))).where(
            SecurityEvent.kind == SecurityEventKind.ATTACK_REPORTED
        )
    ).one()
    failing = session.exec(
        select(func.count(func.distinct(Assignment.vin))).where(Assignment.status == "failed")
    ).one()
    latest = session.exec(
        select(SecurityEvent)
        .where(SecurityEvent.kind == SecurityEventKind.ATTACK_REPORTED)
        .order_by(col(SecurityEvent.last_at).desc())
        .limit(LATEST_ATTACKS)
    ).all()
    return FleetOverview(
        vehicles=int(total),
        seen_recently=int(seen),
        never_reported=int(never),
        revoked=int(revoked),
        vehicles_with_attacks=int(attacked),
        vehicles_with_failures=int(failing),
        images=[ImageCount(hw, path, int(n)) for hw, path, n in images],
        latest_attacks=[
            AttackRow(e.vin, e.ecu_serial, e.detail, e.count, as_utc(e.last_at)) for e in latest
        ],
        generated_at=now,
    )


class VehicleFilter:
    """The lists of the vehicles page (the ``show`` query parameter)."""

    ALL = "all"
    NOT_SEEN = "not-seen"
    ATTACKS = "attacks"
    FAILED = "failed"
    CHOICES = (ALL, NOT_SEEN, ATTACKS, FAILED)


@dataclass(frozen=True)
class VehicleRow:
    vin: str
    registered_at: datetime
    last_manifest_at: datetime | None
    manifests_accepted: int
    manifests_rejected: int
    revoked: bool


def vehicles_page(
    session: Session,
    *,
    show: str = VehicleFilter.ALL,
    image: str | None = None,
    after: str | None = None,
    limit: int = PAGE_SIZE,
    now: datetime | None = None,
) -> tuple[list[VehicleRow], str | None]:
    """One page of vehicles by VIN after ``after``; and the last VIN if more follow."""
    query = select(Vehicle).order_by(col(Vehicle.vin))
    if after is not None:
        query = query.where(col(Vehicle.vin) > after)
    if show == VehicleFilter.NOT_SEEN:
        since = (now or utcnow()) - RECENT
        query = query.where(
            (col(Vehicle.last_manifest_at).is_(None)) | (col(Vehicle.last_manifest_at) < since)
        )
    elif show == VehicleFilter.ATTACKS:
        query = query.where(
            col(Vehicle.vin).in_(
                select(SecurityEvent.vin).where(
                    SecurityEvent.kind == SecurityEventKind.ATTACK_REPORTED
                )
            )
        )
    elif show == VehicleFilter.FAILED:
        query = query.where(
            col(Vehicle.vin).in_(select(Assignment.vin).where(Assignment.status == "failed"))
        )
    if image is not None:
        query = query.where(
            col(Vehicle.vin).in_(select(Ecu.vin).where(Ecu.installed_filepath == image))
        )
    rows = session.exec(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [
        VehicleRow(
            v.vin,
            as_utc(v.registered_at),
            as_utc(v.last_manifest_at) if v.last_manifest_at else None,
            v.manifests_accepted,
            v.manifests_rejected,
            v.revoked_at is not None,
        )
        for v in rows
    ], (rows[-1].vin if more and rows else None)


@dataclass(frozen=True)
class AuditRow:
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: str


def audit_page(
    session: Session, *, before: int | None = None, limit: int = PAGE_SIZE
) -> tuple[list[AuditRow], int | None]:
    """Audit records newest first, below sequence number ``before``; and the next ``before``."""
    query = select(AuditRecord).order_by(col(AuditRecord.seq).desc())
    if before is not None:
        query = query.where(col(AuditRecord.seq) < before)
    rows = session.exec(query.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [
        AuditRow(r.seq, as_utc(r.at), r.actor, r.action, r.subject, _short_json(r.detail))
        for r in rows
    ], (rows[-1].seq if more and rows else None)


def _short_json(text: str, limit: int = 300) -> str:
    try:
        shown = json.dumps(json.loads(text), sort_keys=True)
    except ValueError:
        shown = text
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# -- attributes, releases, campaigns -------------------------------------------------------

MAX_MODEL_ROWS = 50
#: Named releases whose installed base the overview counts (the newest first).
MAX_RELEASE_ROWS = 20
#: Points of a campaign's outcome chart.
CHART_BUCKETS = 24
FAILED_PARTS_SHOWN = 20


@dataclass(frozen=True)
class ReleaseCount:
    name: str
    images: dict[str, str]
    vehicles: int


def vehicles_by_model(session: Session) -> list[tuple[str, int]]:
    """Vehicles per model (``""``: no attributes set), the most common first."""
    attributed = session.exec(
        select(VehicleAttributes.model, func.count())
        .group_by(col(VehicleAttributes.model))
        .order_by(func.count().desc())
        .limit(MAX_MODEL_ROWS)
    ).all()
    rows = [(model, int(n)) for model, n in attributed]
    total = session.exec(select(func.count()).select_from(Vehicle)).one()
    without = int(total) - int(
        session.exec(select(func.count()).select_from(VehicleAttributes)).one()
    )
    if without > 0:
        rows.append(("", without))
    return rows


def vehicles_by_release(session: Session) -> list[ReleaseCount]:
    """Vehicles running every image of each of the newest releases.

    One count per release over the covering index of (hardware id, image, VIN): the vehicles
    running its first image, each probed (index only) for the others.
    """
    releases = session.exec(
        select(Release).order_by(col(Release.created_at).desc()).limit(MAX_RELEASE_ROWS)
    ).all()
    result = []
    for release in releases:
        images: dict[str, str] = json.loads(release.images)
        if not images:
            continue
        (first_hw, first_path), *others = sorted(images.items())
        query = select(func.count(func.distinct(Ecu.vin))).where(
            Ecu.hardware_id == first_hw, Ecu.installed_filepath == first_path
        )
        for hw, path in others:
            other = aliased(Ecu)
            query = query.where(
                exists().where(
                    and_(
                        col(other.vin) == col(Ecu.vin),
                        col(other.hardware_id) == hw,
                        col(other.installed_filepath) == path,
                    )
                )
            )
        result.append(ReleaseCount(release.name, images, int(session.exec(query).one())))
    return result


@dataclass(frozen=True)
class OutcomePoint:
    at: datetime
    succeeded: int  # cumulative
    failed: int  # cumulative


def campaign_outcomes(
    session: Session, campaign_id: int, since: datetime, now: datetime | None = None
) -> list[OutcomePoint]:
    """Vehicles succeeded and failed so far, at :data:`CHART_BUCKETS` times from ``since``.

    Range counts on the index of (campaign, state, last change): each finished part is
    counted once, without a function call per row.
    """
    now = now or utcnow()
    since = as_utc(since)
    step = max(timedelta(seconds=1), (now - since) / CHART_BUCKETS)
    edges = [since + step * i for i in range(1, CHART_BUCKETS + 1)]
    if edges[-1] < now:
        edges[-1] = now
    state, updated = col(CampaignVehicle.state), col(CampaignVehicle.updated_at)
    finished = (PartState.SUCCEEDED, PartState.FAILED)

    def counts(*where: Any) -> dict[str, int]:
        rows = session.exec(
            select(CampaignVehicle.state, func.count())
            .where(CampaignVehicle.campaign_id == campaign_id, state.in_(finished), *where)
            .group_by(state)
        ).all()
        return {s: int(n) for s, n in rows}

    before = counts(updated < since)  # clock skew: counted from the first point on
    succeeded, failed = before.get(PartState.SUCCEEDED, 0), before.get(PartState.FAILED, 0)
    points, low = [], since
    for high in edges:
        last = high is edges[-1]
        step_counts = counts(updated >= low, *(() if last else (updated < high,)))
        succeeded += step_counts.get(PartState.SUCCEEDED, 0)
        failed += step_counts.get(PartState.FAILED, 0)
        points.append(OutcomePoint(high, succeeded, failed))
        low = high
    return points


@dataclass(frozen=True)
class PartRow:
    vin: str
    phase: int
    state: str
    detail: str
    updated_at: datetime


def failed_parts(
    session: Session, campaign_id: int, limit: int = FAILED_PARTS_SHOWN
) -> list[PartRow]:
    """The latest failed vehicles of a campaign and why (index on campaign and state)."""
    rows = session.exec(
        select(CampaignVehicle)
        .where(
            CampaignVehicle.campaign_id == campaign_id,
            CampaignVehicle.state == PartState.FAILED,
        )
        .order_by(col(CampaignVehicle.updated_at).desc())
        .limit(limit)
    ).all()
    return [PartRow(p.vin, p.phase, p.state, p.detail, as_utc(p.updated_at)) for p in rows]


def campaign_id_of(session: Session, name: str) -> int | None:
    return session.exec(select(Campaign.id).where(Campaign.name == name)).first()


@dataclass(frozen=True)
class VehiclePart:
    campaign: str
    campaign_state: str
    phase: int
    state: str
    detail: str
    updated_at: datetime


def parts_of_vehicle(session: Session, vin: str, limit: int = 20) -> list[VehiclePart]:
    """The vehicle's parts in campaigns, the latest first (index on the part's VIN)."""
    rows = session.exec(
        select(CampaignVehicle, Campaign.name, Campaign.state)
        .join(Campaign, col(Campaign.id) == col(CampaignVehicle.campaign_id))
        .where(CampaignVehicle.vin == vin)
        .order_by(col(CampaignVehicle.updated_at).desc())
        .limit(limit)
    ).all()
    return [
        VehiclePart(name, state, p.phase, p.state, p.detail, as_utc(p.updated_at))
        for p, name, state in rows
    ]


# -- the fleet summary, shared between requests ----------------------------------------------

#: Seconds the fleet overview's aggregates are reused before they are computed again.
SUMMARY_TTL = 10.0


@dataclass(frozen=True)
class FleetSummary:
    """Everything the fleet overview shows, and how long the database took to count it."""

    overview: FleetOverview
    models: list[tuple[str, int]]
    releases: list[ReleaseCount]
    seconds: float


def fleet_summary(session: Session) -> FleetSummary:
    start = time.perf_counter()
    overview = fleet_overview(session)
    models = vehicles_by_model(session)
    releases = vehicles_by_release(session)
    return FleetSummary(overview, models, releases, time.perf_counter() - start)


class SharedResult(Generic[_T]):
    """A whole-table result computed at most once per ``ttl`` seconds per server process.

    Exact counts over a whole fleet read every vehicle's index entries (about a third of a
    second at 100,000 vehicles, see ``bench/dashboard_render.py``), and verifying the audit
    log hashes every record; open pages poll every few seconds, so they share one result
    instead of each computing its own. One request computes while the others wait for its
    result (never two computations at once). ``computed_at`` says how old it is.
    """

    def __init__(self, compute: Callable[[Session], _T], ttl: float) -> None:
        self._compute, self._ttl = compute, ttl
        self._lock = threading.Lock()
        self._value: _T | None = None
        self._computed = 0.0
        self.computed_at: datetime | None = None

    def get(self, engine: Engine) -> _T:
        with self._lock:
            if self._value is None or time.monotonic() - self._computed >= self._ttl:
                with Session(engine) as session:
                    self._value = self._compute(session)
                self._computed, self.computed_at = time.monotonic(), utcnow()
            return self._value


class FleetSummaryCache(SharedResult[FleetSummary]):
    """The fleet overview's counts, shared for :data:`SUMMARY_TTL` seconds."""

    def __init__(self, ttl: float = SUMMARY_TTL) -> None:
        super().__init__(fleet_summary, ttl)


#: Seconds an audit-log verification is shown before the chain is walked again.
AUDIT_VERIFY_TTL = 60.0


class AuditVerificationCache(SharedResult[AuditVerification]):
    """:func:`server.audit.verify`, shared for :data:`AUDIT_VERIFY_TTL` seconds."""

    def __init__(self, ttl: float = AUDIT_VERIFY_TTL) -> None:
        super().__init__(verify_audit, ttl)


# -- a vehicle's ledger ---------------------------------------------------------------------

LEDGER_SHOWN = 30


def ledger_latest(session: Session, vin: str, limit: int = LEDGER_SHOWN) -> list[dict[str, Any]]:
    """The vehicle's latest ledger entries, newest first (index on the entry's VIN)."""
    rows = session.exec(
        select(LedgerEntry)
        .where(LedgerEntry.vin == vin)
        .order_by(col(LedgerEntry.id).desc())
        .limit(limit)
    ).all()
    return [entry_dict(r) for r in rows]


def last_manifest(session: Session, vin: str) -> dict[str, Any] | None:
    """The latest stored manifest of the vehicle (the last one that changed its ledger)."""
    latest = session.exec(
        select(StoredManifest.id)
        .where(StoredManifest.vin == vin)
        .order_by(col(StoredManifest.id).desc())
        .limit(1)
    ).first()
    return manifest_record(session, vin, latest) if latest is not None else None
