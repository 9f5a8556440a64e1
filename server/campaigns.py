"""Campaigns: a release rolled out in phases to the vehicles a selection matches.

The workflow of an operator::

    uptake release create fw-2 --image stm32f4-bms=stm32f4-bms/1.1.0/bms.bin
    uptake campaign create spring --release fw-2 --phase 1:0.9:0.2 --phase 10 --phase 100 \\
        --model roadster --region eu
    uptake campaign approve spring      # by someone else than its creator
    uptake campaign start spring
    uptake campaign show spring --watch

How it stays cheap at fleet scale: starting a campaign writes a handful of
rows, whatever the fleet's size. Membership is resolved lazily, per vehicle:

* **Phases by hash.** Each vehicle has a stable bucket per campaign,
  ``sha256("<campaign id>:<VIN>") mod 10000``; phase *i* holds the vehicles
  whose bucket is below ``percent_i * 100`` (and above the previous phase's).
  A vehicle takes part once the campaign's current phase reaches its phase.
* **First contact.** When a vehicle's manifest is accepted
  (:func:`on_manifest`, inside the manifest's transaction), the running and
  paused campaigns (an indexed lookup; few) are checked: one primary-key
  read of the vehicle's part each. A vehicle in an open phase that the
  selection matches joins: its :class:`~server.campaign_tables.CampaignVehicle`
  row is written, it is resolved (below) and, within a maintenance window,
  offered (assignments made, the director re-signs). Vehicles registered
  after the start join the same way on their first manifest.
* **The sweep** (:func:`sweep_once`, a background task) walks the fleet by
  VIN in bounded batches for the vehicles that have reported but not
  posted since the phase opened, offers parts that waited for a
  maintenance window, finishes withdrawing a cancelled campaign, and judges
  phases when no report arrives.
* **Counters.** Each phase's counters (joined, offered, succeeded, failed,
  skipped, cancelled) are updated by SQL increments as parts change state;
  a phase is judged from them, never by counting parts.

Resolution of one vehicle (:func:`resolve`) from its latest verified
manifest (the ``Ecu.installed_*`` columns): each ECU whose hardware id the
release has an image for gets that image, unless it runs it already; a
vehicle with no such ECU, an ECU whose installed image has a higher release
counter (never a rollback), or a combination that breaks an image's
``requires`` (:mod:`server.compatibility`) is skipped as incompatible. The
images are assigned in dependency order (what others require first) in
one transaction: both, in order, or neither.

Phases judge themselves (:func:`_judge`): when more than
``failure_threshold`` of a phase's finished vehicles failed (after
``min_finished`` finished), the campaign aborts (or pauses, ``on_failure``);
when the sweep has covered the fleet for the current phase and at least
``success_threshold`` of its eligible vehicles succeeded, the next phase
opens, and after the last one the campaign completes.

Approval: a campaign must be approved before it starts, by an operator who
is not its creator (four eyes; the approver is recorded). The state
machines are in :mod:`server.campaign_states`; every change is audited
(:mod:`server.audit`), the engine's own under the actor ``campaign-engine``.

Cancel withdraws the parts not yet finished: their pending assignments end
as ``cancelled`` and the director re-signs those vehicles' targets without
the images. Up to :data:`WITHDRAW_BATCH` vehicles are withdrawn in the
cancelling request, the rest by the sweep (``withdrawing`` shows it).
Pause stops new offers and phase changes; what was offered stays offered.

Install on consent: a campaign created with ``install_on_consent`` marks
its director targets ``"installOnConsent": true`` (:mod:`signing.metadata`);
the agent downloads and verifies them at once and installs only when its
``consent`` precondition holds (:mod:`client.preconditions`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time
from functools import partial
from typing import Any

from sqlalchemy import and_, bindparam, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from server import audit
from server.campaign_states import (
    CampaignAction,
    CampaignState,
    CampaignTransitionError,
    PartEvent,
    PartState,
    campaign_transition,
    part_transition,
)
from server.campaign_tables import (
    Campaign,
    CampaignPhase,
    CampaignVehicle,
    Release,
    VehicleAttributes,
)
from server.compatibility import check_combination
from server.db import Assignment, Ecu, Vehicle, as_utc, bounded_text, utcnow
from server.director import DirectorRepository
from server.fleet import FleetError, assign
from server.image_repository import ImageRepository
from signing.exceptions import UptakeError
from signing.manifest import InstallResult
from signing.metadata import MetadataFormatError, image_custom, parse_requires

log = logging.getLogger(__name__)

#: The actor the engine's own changes are audited under.
ENGINE_ACTOR = "campaign-engine"
#: Buckets of the phase hash: a phase's percent has a resolution of 0.01 %.
BUCKETS = 10_000
#: Vehicles the sweep reads per batch, and joins at most per batch.
SWEEP_BATCH = 1000
SWEEP_JOINS = 25
#: Vehicles withdrawn in a cancelling request (the sweep withdraws the rest).
WITHDRAW_BATCH = 200
MAX_PHASES = 10
MAX_RELEASE_IMAGES = 64


class CampaignError(FleetError):
    """A campaign or release request was refused; ``status`` is the HTTP status."""


# -- values -------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which vehicles a campaign targets; an empty field matches every vehicle."""

    models: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    #: every one of these tags
    tags: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None
    #: hardware id -> version spec (``requires`` grammar) that its ECUs must run now
    installed: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "regions": list(self.regions),
            "tags": list(self.tags),
            "year_min": self.year_min,
            "year_max": self.year_max,
            "installed": dict(sorted(self.installed.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        return cls(
            tuple(data.get("models", ())),
            tuple(data.get("regions", ())),
            tuple(data.get("tags", ())),
            data.get("year_min"),
            data.get("year_max"),
            dict(data.get("installed", {})),
        )

    def needs_attributes(self) -> bool:
        return bool(
            self.models
            or self.regions
            or self.tags
            or self.year_min is not None
            or self.year_max is not None
        )


@dataclass(frozen=True)
class PhaseSpec:
    percent: float
    success_threshold: float = 1.0
    failure_threshold: float = 0.0
    on_failure: str = "abort"
    min_finished: int = 1


@dataclass(frozen=True)
class MaintenanceWindow:
    """A daily UTC time range (``end`` before ``start`` spans midnight)."""

    start: time
    end: time

    def contains(self, at: time) -> bool:
        if self.start <= self.end:
            return self.start <= at < self.end
        return at >= self.start or at < self.end

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M")}


def parse_window(start: str, end: str, where: str) -> MaintenanceWindow:
    try:
        return MaintenanceWindow(time.fromisoformat(start), time.fromisoformat(end))
    except ValueError as exc:
        raise CampaignError(400, f"{where}: times must be HH:MM (UTC)") from exc


def in_window(windows: Sequence[MaintenanceWindow], now: datetime) -> bool:
    at = as_utc(now).time()
    return not windows or any(w.contains(at) for w in windows)


def bucket_of(campaign_id: int, vin: str) -> int:
    """The vehicle's stable bucket (0 to 9999) in one campaign."""
    digest = hashlib.sha256(f"{campaign_id}:{vin}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def phase_of(bucket: int, percents: Sequence[float]) -> int:
    """The index of the first phase whose percent covers ``bucket`` (the last one otherwise)."""
    for index, percent in enumerate(percents):
        if bucket < round(percent * BUCKETS / 100):
            return index
    return len(percents) - 1


# -- vehicle attributes -------------------------------------------------------------


def set_attributes(
    session: Session, vin: str, *, model: str, year: int | None, region: str, tags: Sequence[str]
) -> dict[str, Any]:
    """Replace what campaigns select ``vin`` by (its model, year, region and tags)."""
    if session.get(Vehicle, vin) is None:
        raise CampaignError(404, f"unknown vehicle {vin}")
    row = session.get(VehicleAttributes, vin) or VehicleAttributes(vin=vin)
    row.model, row.year, row.region = model, year, region
    row.tags = json.dumps(sorted(set(tags)))
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return attributes_dict(row)


def attributes_dict(row: VehicleAttributes | None) -> dict[str, Any]:
    if row is None:
        return {"model": "", "year": None, "region": "", "tags": []}
    return {
        "model": row.model,
        "year": row.year,
        "region": row.region,
        "tags": json.loads(row.tags),
    }


def attributes_of(session: Session, vin: str) -> dict[str, Any]:
    return attributes_dict(session.get(VehicleAttributes, vin))


# -- releases -----------------------------------------------------------------------


def create_release(
    session: Session,
    image_repo: ImageRepository,
    name: str,
    images: dict[str, str],
    description: str,
    actor: str,
) -> dict[str, Any]:
    """Name a set of published images, one per hardware id (each must be published for it)."""
    if session.get(Release, name) is not None:
        raise CampaignError(409, f"release {name} already exists")
    if not images:
        raise CampaignError(400, "images: a release needs at least one image")
    for hardware_id, filepath in sorted(images.items()):
        target = image_repo.find_target(filepath)
        if target is None:
            raise CampaignError(
                404, f"images.{hardware_id}: {filepath!r} is not published in the image repository"
            )
        custom = image_custom(target)
        if hardware_id not in custom.hardware_ids:
            raise CampaignError(
                400,
                f"images.{hardware_id}: {filepath!r} is for {', '.join(custom.hardware_ids)}, "
                f"not {hardware_id}",
            )
    row = Release(
        name=name,
        images=json.dumps(dict(sorted(images.items()))),
        description=description,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    audit.append(session, actor, "release.create", name, images=images, description=description)
    return release_dict(row, image_repo)


def release_dict(row: Release, image_repo: ImageRepository) -> dict[str, Any]:
    images = []
    for hardware_id, filepath in json.loads(row.images).items():
        target = image_repo.find_target(filepath)
        entry: dict[str, Any] = {"hardware_id": hardware_id, "filepath": filepath}
        if target is None:
            entry["published"] = False
        else:
            custom = image_custom(target)
            entry.update(
                published=True,
                version=custom.version,
                release_counter=custom.release_counter,
                length=target.length,
                sha256=target.hashes.get("sha256", ""),
                requires={r.hardware_id: r.spec for r in custom.requires},
            )
        images.append(entry)
    return {
        "name": row.name,
        "description": row.description,
        "images": images,
        "created_by": row.created_by,
        "created_at": as_utc(row.created_at).isoformat(),
    }


def get_release(session: Session, image_repo: ImageRepository, name: str) -> dict[str, Any]:
    row = session.get(Release, name)
    if row is None:
        raise CampaignError(404, f"unknown release {name}")
    return release_dict(row, image_repo)


def releases_page(
    session: Session, image_repo: ImageRepository, *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Releases by name above ``after``; and the cursor of the next page (None: the last)."""
    query = select(Release)
    if after is not None:
        query = query.where(col(Release.name) > after)
    rows = session.exec(query.order_by(col(Release.name)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [release_dict(r, image_repo) for r in rows], (rows[-1].name if more else None)


# -- campaigns: operators' actions --------------------------------------------------


def _campaign(session: Session, name: str) -> Campaign:
    row = session.exec(select(Campaign).where(Campaign.name == name)).first()
    if row is None:
        raise CampaignError(404, f"unknown campaign {name}")
    return row


def create_campaign(
    session: Session,
    *,
    name: str,
    release: str,
    phases: Sequence[PhaseSpec],
    selection: Selection,
    windows: Sequence[MaintenanceWindow],
    install_on_consent: bool,
    description: str,
    actor: str,
) -> dict[str, Any]:
    """A draft campaign: one row and one per phase, whatever the fleet's size."""
    if session.exec(select(Campaign.id).where(Campaign.name == name)).first() is not None:
        raise CampaignError(409, f"campaign {name} already exists")
    if session.get(Release, release) is None:
        raise CampaignError(404, f"release: unknown release {release}")
    _check_phases(phases)
    for hardware_id, version_spec in selection.installed.items():
        try:
            parse_requires({hardware_id: version_spec}, "selection.installed")
        except MetadataFormatError as exc:
            raise CampaignError(400, str(exc)) from exc
    row = Campaign(
        name=name,
        release=release,
        description=description,
        state=CampaignState.DRAFT,
        selection=json.dumps(selection.to_dict(), sort_keys=True),
        maintenance_windows=json.dumps([w.to_dict() for w in windows]),
        install_on_consent=install_on_consent,
        created_by=actor,
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    for index, spec in enumerate(phases):
        session.add(
            CampaignPhase(
                campaign_id=row.id,
                index=index,
                percent=spec.percent,
                success_threshold=spec.success_threshold,
                failure_threshold=spec.failure_threshold,
                on_failure=spec.on_failure,
                min_finished=spec.min_finished,
            )
        )
    session.flush()
    audit.append(
        session, actor, "campaign.create", name, release=release,
        phases=[p.__dict__ for p in phases], selection=selection.to_dict(),
        maintenance_windows=[w.to_dict() for w in windows], install_on_consent=install_on_consent,
    )  # fmt: skip
    return campaign_record(session, name)


def _check_phases(phases: Sequence[PhaseSpec]) -> None:
    if not 1 <= len(phases) <= MAX_PHASES:
        raise CampaignError(400, f"phases: 1 to {MAX_PHASES} phases")
    previous = 0.0
    for i, p in enumerate(phases):
        where = f"phases[{i}]"
        if not previous < p.percent <= 100:
            raise CampaignError(
                400, f"{where}.percent: must grow from phase to phase, above 0 and at most 100"
            )
        if not (0 <= p.success_threshold <= 1 and 0 <= p.failure_threshold <= 1):
            raise CampaignError(400, f"{where}: thresholds are shares from 0 to 1")
        if p.on_failure not in ("abort", "pause"):
            raise CampaignError(400, f'{where}.on_failure: "abort" or "pause"')
        previous = p.percent
    if phases[-1].percent != 100:
        raise CampaignError(400, "phases: the last phase must reach 100 percent")


@dataclass
class ActionResult:
    """What an action changed: the campaign, and vehicles whose director metadata changed."""

    record: dict[str, Any]
    changed_vins: list[str]


def act(
    session: Session,
    director: DirectorRepository,
    name: str,
    action: CampaignAction,
    actor: str,
    reason: str = "",
) -> ActionResult:
    """Approve, start, pause, resume or cancel ``name`` (see :mod:`server.campaign_states`)."""
    if action in (CampaignAction.COMPLETE, CampaignAction.ABORT):
        raise CampaignError(400, f"{action} is the campaign engine's, not an operator's")
    row = _campaign(session, name)
    state = CampaignState(row.state)
    paused_from = CampaignState(row.paused_from) if row.paused_from else None
    try:
        new_state = campaign_transition(state, action, paused_from)
    except CampaignTransitionError as exc:
        raise CampaignError(409, f"campaign {name}: {exc}") from exc
    if action == CampaignAction.APPROVE and actor == row.created_by:
        raise CampaignError(
            409, f"campaign {name}: its creator {actor} cannot approve it (four eyes)"
        )
    now = utcnow()
    values: dict[str, Any] = {"state": new_state, "updated_at": now}
    if reason:
        values["reason"] = bounded_text(reason)
    if action == CampaignAction.APPROVE:
        values.update(approved_by=actor, approved_at=now)
    elif action == CampaignAction.START:
        values.update(started_at=now, current_phase=0, sweep_after="", swept_phase=-1)
    elif action == CampaignAction.PAUSE:
        values["paused_from"] = state
    elif action == CampaignAction.RESUME:
        values["paused_from"] = ""
    elif action == CampaignAction.CANCEL:
        values.update(finished_at=now, withdrawing=True, paused_from="")
    if not _move(session, row, state, values):
        raise CampaignError(409, f"campaign {name} changed meanwhile; look again and retry")
    if action == CampaignAction.START:
        session.exec(
            update(CampaignPhase)
            .where(col(CampaignPhase.campaign_id) == row.id, col(CampaignPhase.index) == 0)
            .values(started_at=now)
        )
    audit.append(
        session, actor, f"campaign.{action}", name, state_from=state, state_to=new_state,
        reason=reason,
    )  # fmt: skip
    changed: list[str] = []
    if action == CampaignAction.CANCEL:
        assert row.id is not None
        changed = withdraw(session, director, row.id, name, WITHDRAW_BATCH)
    session.flush()
    session.expire_all()
    return ActionResult(campaign_record(session, name), changed)


def _move(session: Session, row: Campaign, state: str, values: dict[str, Any]) -> bool:
    """Change the campaign only if it is still in ``state`` (concurrent engines and operators)."""
    result = session.exec(
        update(Campaign)
        .where(col(Campaign.id) == row.id, col(Campaign.state) == state)
        .values(**values)
    )
    return bool(result.rowcount)


def withdraw(
    session: Session, director: DirectorRepository, campaign_id: int, name: str, limit: int
) -> list[str]:
    """Cancel up to ``limit`` unfinished parts: their pending assignments end, targets re-signed."""
    parts = session.exec(
        select(CampaignVehicle)
        .where(
            CampaignVehicle.campaign_id == campaign_id,
            col(CampaignVehicle.state).in_(
                (PartState.PENDING, PartState.OFFERED, PartState.AWAITING_CONSENT)
            ),
        )
        .limit(limit + 1)
    ).all()
    done = []
    for part in parts[:limit]:
        ids = json.loads(part.assignments)
        withdrawn = []
        for assignment in (
            session.exec(select(Assignment).where(col(Assignment.id).in_(ids))).all() if ids else ()
        ):
            if assignment.status == "pending":
                assignment.status, assignment.updated_at = "cancelled", utcnow()
                assignment.detail = f"campaign {name} cancelled"
                session.add(assignment)
                withdrawn.append(assignment.filepath)
        _part_event(session, part, PartEvent.CANCEL, f"campaign {name} cancelled")
        session.flush()
        if withdrawn:
            director.update_vehicle(session, part.vin)
            audit.append(
                session, ENGINE_ACTOR, "campaign.withdraw", part.vin, campaign=name,
                filepaths=withdrawn,
            )  # fmt: skip
        done.append(part.vin)
    if len(parts) <= limit:
        session.exec(
            update(Campaign).where(col(Campaign.id) == campaign_id).values(withdrawing=False)
        )
    return done


# -- views --------------------------------------------------------------------------


def _phase_dict(p: CampaignPhase) -> dict[str, Any]:
    finished = p.succeeded + p.failed
    eligible = p.joined - p.skipped - p.cancelled
    return {
        "index": p.index,
        "percent": p.percent,
        "success_threshold": p.success_threshold,
        "failure_threshold": p.failure_threshold,
        "on_failure": p.on_failure,
        "min_finished": p.min_finished,
        "joined": p.joined,
        "offered": p.offered,
        "succeeded": p.succeeded,
        "failed": p.failed,
        "skipped": p.skipped,
        "cancelled": p.cancelled,
        "in_progress": max(0, eligible - finished),
        "success_rate": round(p.succeeded / eligible, 4) if eligible else None,
        "failure_rate": round(p.failed / finished, 4) if finished else None,
        "started_at": as_utc(p.started_at).isoformat() if p.started_at else None,
        "finished_at": as_utc(p.finished_at).isoformat() if p.finished_at else None,
    }


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value else None


def campaign_dict(row: Campaign, phases: Iterable[CampaignPhase]) -> dict[str, Any]:
    phase_list = [_phase_dict(p) for p in sorted(phases, key=lambda p: p.index)]
    totals = {
        k: sum(p[k] for p in phase_list)
        for k in ("joined", "offered", "succeeded", "failed", "skipped", "cancelled", "in_progress")
    }
    return {
        "name": row.name,
        "release": row.release,
        "description": row.description,
        "state": row.state,
        "paused_from": row.paused_from or None,
        "reason": row.reason,
        "selection": json.loads(row.selection),
        "maintenance_windows": json.loads(row.maintenance_windows),
        "install_on_consent": row.install_on_consent,
        "current_phase": row.current_phase,
        "sweep": {"phase_covered": row.swept_phase, "after": row.sweep_after},
        "withdrawing": row.withdrawing,
        "created_by": row.created_by,
        "created_at": _iso(row.created_at),
        "approved_by": row.approved_by or None,
        "approved_at": _iso(row.approved_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "updated_at": _iso(row.updated_at),
        "phases": phase_list,
        "totals": totals,
    }


def _phases(session: Session, campaign_id: int | None) -> list[CampaignPhase]:
    return list(
        session.exec(
            select(CampaignPhase)
            .where(CampaignPhase.campaign_id == campaign_id)
            .order_by(col(CampaignPhase.index))
            .execution_options(populate_existing=True)
        ).all()
    )


def campaign_record(session: Session, name: str) -> dict[str, Any]:
    row = session.exec(
        select(Campaign).where(Campaign.name == name).execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise CampaignError(404, f"unknown campaign {name}")
    return campaign_dict(row, _phases(session, row.id))


def campaigns_page(
    session: Session, *, state: CampaignState | None, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Campaigns (newest last) with ids above ``after``, optionally in one state; next cursor."""
    query = select(Campaign)
    if state is not None:
        query = query.where(Campaign.state == state)
    if after is not None:
        query = query.where(col(Campaign.id) > after)
    rows = session.exec(query.order_by(col(Campaign.id)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [campaign_dict(r, _phases(session, r.id)) for r in rows], (rows[-1].id if more else None)


def parts_page(
    session: Session, name: str, *, state: PartState | None, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """The vehicles' parts in ``name`` by VIN above ``after``; and the next cursor."""
    row = _campaign(session, name)
    query = select(CampaignVehicle).where(CampaignVehicle.campaign_id == row.id)
    if state is not None:
        query = query.where(CampaignVehicle.state == state)
    if after is not None:
        query = query.where(col(CampaignVehicle.vin) > after)
    parts = session.exec(query.order_by(col(CampaignVehicle.vin)).limit(limit + 1)).all()
    more = len(parts) > limit
    parts = parts[:limit]
    return [
        {
            "vin": p.vin,
            "phase": p.phase,
            "state": p.state,
            "assignments": json.loads(p.assignments),
            "detail": p.detail,
            "updated_at": _iso(p.updated_at),
        }
        for p in parts
    ], (parts[-1].vin if more else None)


# -- the engine ---------------------------------------------------------------------

_COUNTER = {
    PartState.OFFERED: "offered",
    PartState.SUCCEEDED: "succeeded",
    PartState.FAILED: "failed",
    PartState.SKIPPED_INCOMPATIBLE: "skipped",
    PartState.CANCELLED: "cancelled",
}


def _count(session: Session, campaign_id: int, phase: int, counter: str, delta: int = 1) -> None:
    column = getattr(CampaignPhase, counter)
    session.exec(
        update(CampaignPhase)
        .where(col(CampaignPhase.campaign_id) == campaign_id, col(CampaignPhase.index) == phase)
        .values({counter: column + delta})
    )


def _part_event(session: Session, part: CampaignVehicle, event: PartEvent, detail: str) -> None:
    new_state = part_transition(PartState(part.state), event)
    part.state, part.updated_at = new_state, utcnow()
    if detail:
        part.detail = bounded_text(detail)
    session.add(part)
    counter = _COUNTER.get(new_state)
    if counter:
        _count(session, part.campaign_id, part.phase, counter)


class IncompatibleVehicleError(UptakeError):
    """The release cannot go to this vehicle (hardware, dependencies or rollback)."""


def resolve(
    session: Session, image_repo: ImageRepository, images: dict[str, str], vin: str
) -> list[tuple[str, str]]:
    """What ``vin``'s ECUs need of the release, ``[(ecu serial, filepath)]`` in install order.

    Empty: the vehicle runs the release already. Raises :class:`IncompatibleVehicleError`.
    """
    ecus = session.exec(select(Ecu).where(Ecu.vin == vin).order_by(col(Ecu.serial))).all()
    matching = [e for e in ecus if e.hardware_id in images]
    if not matching:
        raise IncompatibleVehicleError(
            f"no ECU of hardware id {', '.join(sorted(images))} (has {', '.join(sorted({e.hardware_id for e in ecus}))})"
        )
    plan: dict[str, str] = {}
    needs: dict[str, set[str]] = {}
    hardware: dict[str, str] = {}
    for ecu in matching:
        filepath = images[ecu.hardware_id]
        target = image_repo.find_target(filepath)
        if target is None:
            raise IncompatibleVehicleError(f"{filepath!r} is no longer published")
        if ecu.installed_sha256 and target.hashes.get("sha256") == ecu.installed_sha256:
            continue
        custom = image_custom(target)
        installed = (
            image_repo.find_target(ecu.installed_filepath) if ecu.installed_filepath else None
        )
        if (
            installed is not None
            and image_custom(installed).release_counter > custom.release_counter
        ):
            raise IncompatibleVehicleError(
                f"{ecu.serial} runs {ecu.installed_filepath!r}, of a higher release counter than "
                f"{filepath!r} (no rollback)"
            )
        plan[ecu.serial] = filepath
        needs[ecu.serial] = {r.hardware_id for r in custom.requires}
        hardware[ecu.serial] = ecu.hardware_id
    if not plan:
        return []
    problems = check_combination(session, image_repo, vin, plan)
    if problems:
        raise IncompatibleVehicleError("dependencies not met: " + "; ".join(problems))
    # what others require first: the director checks each assignment against those before it
    ordered: list[str] = []
    while len(ordered) < len(plan):
        placed = {hardware[s] for s in ordered}
        ready = [
            s
            for s in sorted(plan)
            if s not in ordered
            and all(hw in placed or hw not in hardware.values() for hw in needs[s] - {hardware[s]})
        ]
        if not ready:
            raise IncompatibleVehicleError(
                "the release's images require each other in a circle: no install order"
            )
        ordered.extend(ready)
    return [(serial, plan[serial]) for serial in ordered]


# What every accepted manifest reads, built once (building an ORM statement costs more
# CPU than the database's answer on a heartbeat): each running campaign with the vehicle's
# part in it, if any (one query, not one a campaign), and the vehicle's unfinished parts
_RUNNING_CAMPAIGNS_WITH_PART = (
    select(Campaign, CampaignVehicle)
    .outerjoin(
        CampaignVehicle,
        and_(
            col(CampaignVehicle.campaign_id) == col(Campaign.id),
            col(CampaignVehicle.vin) == bindparam("vin"),
        ),
    )
    .where(col(Campaign.state) == CampaignState.RUNNING)
)
_UNFINISHED_PARTS = select(CampaignVehicle).where(
    col(CampaignVehicle.vin) == bindparam("vin"),
    col(CampaignVehicle.state).in_(
        (PartState.PENDING, PartState.OFFERED, PartState.AWAITING_CONSENT)
    ),
)


def _percents(session: Session, campaign_id: int | None) -> list[float]:
    return list(
        session.exec(
            select(CampaignPhase.percent)
            .where(CampaignPhase.campaign_id == campaign_id)
            .order_by(col(CampaignPhase.index))
        ).all()
    )


def _matches(session: Session, image_repo: ImageRepository, campaign: Campaign, vin: str) -> str:
    """ "" when the selection matches ``vin``; else why not."""
    selection = Selection.from_dict(json.loads(campaign.selection))
    if selection.needs_attributes():
        attrs = attributes_of(session, vin)
        if selection.models and attrs["model"] not in selection.models:
            return "model"
        if selection.regions and attrs["region"] not in selection.regions:
            return "region"
        if not set(selection.tags) <= set(attrs["tags"]):
            return "tags"
        year = attrs["year"]
        if selection.year_min is not None and (year is None or year < selection.year_min):
            return "year"
        if selection.year_max is not None and (year is None or year > selection.year_max):
            return "year"
    if selection.installed:
        ecus = session.exec(select(Ecu).where(Ecu.vin == vin)).all()
        # one function reads requires specs: reuse it on what the ECUs run now
        requirements = parse_requires(selection.installed, "selection.installed")
        for req in requirements:
            for ecu in (e for e in ecus if e.hardware_id == req.hardware_id):
                target = (
                    image_repo.find_target(ecu.installed_filepath)
                    if ecu.installed_filepath
                    else None
                )
                if target is None or not req.allows(image_custom(target).version):
                    return "installed"
    return ""


def _join(
    session: Session,
    director: DirectorRepository,
    campaign: Campaign,
    vin: str,
    phase: int,
    now: datetime,
) -> CampaignVehicle | None:
    """Make ``vin``'s part if the selection matches it, and offer it when possible."""
    if _matches(session, director.image_repo, campaign, vin):
        return None
    assert campaign.id is not None
    part = CampaignVehicle(campaign_id=campaign.id, vin=vin, phase=phase, state=PartState.PENDING)
    session.add(part)
    _count(session, campaign.id, phase, "joined")
    session.flush()
    _offer(session, director, campaign, part, now)
    return part


def _offer(
    session: Session,
    director: DirectorRepository,
    campaign: Campaign,
    part: CampaignVehicle,
    now: datetime,
) -> bool:
    """Resolve and assign a pending part, if the campaign runs and a window is open."""
    if campaign.state != CampaignState.RUNNING:
        return False
    windows = [
        parse_window(w["start"], w["end"], "maintenance_windows")
        for w in json.loads(campaign.maintenance_windows)
    ]
    if not in_window(windows, now):
        return False
    release = session.get(Release, campaign.release)
    images = json.loads(release.images) if release else {}
    try:
        plan = resolve(session, director.image_repo, images, part.vin)
    except IncompatibleVehicleError as exc:
        _part_event(session, part, PartEvent.SKIP, str(exc))
        audit.append(
            session, ENGINE_ACTOR, "campaign.skip", part.vin, campaign=campaign.name,
            reason=str(exc),
        )  # fmt: skip
        return True
    ids: list[int] = []
    nested = session.begin_nested()
    try:
        for serial, filepath in plan:
            row = assign(session, director, director.image_repo, part.vin, serial, filepath)
            assert row.id is not None
            ids.append(row.id)
    except FleetError as exc:  # both, in order, or neither
        nested.rollback()
        _part_event(session, part, PartEvent.SKIP, str(exc))
        audit.append(
            session, ENGINE_ACTOR, "campaign.skip", part.vin, campaign=campaign.name,
            reason=str(exc),
        )  # fmt: skip
        return True
    nested.commit()
    part.assignments = json.dumps(ids)
    _part_event(session, part, PartEvent.OFFER, "")
    audit.append(
        session, ENGINE_ACTOR, "campaign.assign", part.vin, campaign=campaign.name,
        assignments=[{"ecu_serial": s, "filepath": f} for s, f in plan],
        install_on_consent=campaign.install_on_consent,
    )  # fmt: skip
    if not plan:
        _part_event(session, part, PartEvent.SUCCEED, "runs the release already")
    return True


def _follow(session: Session, part: CampaignVehicle) -> None:
    """Move an offered part along what its assignments became (after a manifest)."""
    ids = json.loads(part.assignments)
    rows = session.exec(select(Assignment).where(col(Assignment.id).in_(ids))).all() if ids else []
    statuses = {r.status for r in rows}
    if "failed" in statuses:
        failed = next(r for r in rows if r.status == "failed")
        _part_event(session, part, PartEvent.FAIL, f"{failed.ecu_serial}: {failed.detail}")
    elif statuses & {"superseded", "cancelled"}:
        _part_event(session, part, PartEvent.CANCEL, "an assignment was superseded or cancelled")
    elif statuses <= {"installed"}:
        _part_event(session, part, PartEvent.SUCCEED, "")
    elif part.state == PartState.OFFERED:
        waiting = {
            e.last_install_filepath
            for e in session.exec(select(Ecu).where(Ecu.vin == part.vin))
            if e.last_install_result == InstallResult.POSTPONED
        }
        if any(r.filepath in waiting for r in rows if r.status == "pending"):
            _part_event(session, part, PartEvent.POSTPONE, "downloaded; waiting for a precondition")


def on_manifest(session: Session, director: DirectorRepository, vin: str) -> list[int]:
    """After ``vin``'s manifest was accepted: move its parts, join running campaigns, judge.

    O(1) in the fleet's size, two queries: the vehicle's unfinished parts (an index
    lookup on VIN), and the running campaigns (an indexed lookup; few) each with the
    vehicle's part in it, if any. Parts are followed whatever their
    campaign's state, so a straggler that finishes after its campaign
    completed is still counted. Returns the ids of campaigns whose counters changed.
    """
    touched: list[int] = []
    now = utcnow()
    unfinished = session.exec(_UNFINISHED_PARTS, params={"vin": vin}).all()
    for part in unfinished:
        move = partial(_move_part, session, director, part, now)
        _guarded(session, vin, part.campaign_id, move, touched)
    seen = {p.campaign_id for p in unfinished}
    for campaign, part in session.exec(_RUNNING_CAMPAIGNS_WITH_PART, params={"vin": vin}).all():
        assert campaign.id is not None
        if campaign.id in seen or part is not None:
            continue
        percents = _percents(session, campaign.id)
        phase = phase_of(bucket_of(campaign.id, vin), percents)
        if phase > campaign.current_phase:
            continue
        join = partial(_join_and_judge, session, director, campaign, vin, phase, now)
        _guarded(session, vin, campaign.id, join, touched)
    return touched


def _move_part(
    session: Session, director: DirectorRepository, part: CampaignVehicle, now: datetime
) -> bool:
    if part.state == PartState.PENDING:
        campaign = session.get(Campaign, part.campaign_id)
        if campaign is None or not _offer(session, director, campaign, part, now):
            return False
    else:
        _follow(session, part)
    session.flush()
    _judge(session, part.campaign_id, part.phase)
    return True


def _join_and_judge(
    session: Session,
    director: DirectorRepository,
    campaign: Campaign,
    vin: str,
    phase: int,
    now: datetime,
) -> bool:
    if _join(session, director, campaign, vin, phase, now) is None:
        return False
    session.flush()
    assert campaign.id is not None
    _judge(session, campaign.id, phase)
    return True


def _guarded(
    session: Session, vin: str, campaign_id: int, work: Callable[[], bool], touched: list[int]
) -> None:
    """Run one campaign's share of a manifest in a savepoint: its failure never refuses the manifest.

    A conflict with a concurrent writer (the sweep joining the same vehicle, a
    deadlock on a phase's counters) rolls back only the campaign's part of
    the transaction; the sweep or the vehicle's next manifest does it again.
    """
    nested = session.begin_nested()
    try:
        changed = work()
    except SQLAlchemyError as exc:
        nested.rollback()
        log.warning("campaign %s: vehicle %s left for the sweep: %s", campaign_id, vin, exc)
        return
    nested.commit()
    if changed:
        touched.append(campaign_id)


def _judge(session: Session, campaign_id: int, part_phase: int) -> None:
    """Abort or pause on failures of ``part_phase``; open the next phase or complete."""
    campaign = session.exec(
        select(Campaign)
        .where(col(Campaign.id) == campaign_id)
        .execution_options(populate_existing=True)
    ).one()
    if campaign.state != CampaignState.RUNNING:
        return
    phases = _phases(session, campaign_id)
    now = utcnow()
    for phase in (phases[part_phase],) if part_phase < len(phases) else ():
        finished = phase.succeeded + phase.failed
        if (
            finished >= phase.min_finished
            and finished
            and phase.failed / finished > phase.failure_threshold
        ):
            action = CampaignAction.ABORT if phase.on_failure == "abort" else CampaignAction.PAUSE
            new_state = campaign_transition(CampaignState.RUNNING, action)
            why = (
                f"phase {phase.index}: {phase.failed} of {finished} finished vehicles failed "
                f"({phase.failed / finished:.0%} > {phase.failure_threshold:.0%})"
            )
            values: dict[str, Any] = {"state": new_state, "reason": why, "updated_at": now}
            if new_state == CampaignState.PAUSED:
                values["paused_from"] = CampaignState.RUNNING
            else:
                values["finished_at"] = now
            if _move(session, campaign, CampaignState.RUNNING, values):
                audit.append(
                    session, ENGINE_ACTOR, f"campaign.{action}", campaign.name,
                    state_from=CampaignState.RUNNING, state_to=new_state, reason=why,
                )  # fmt: skip
            return
    current = phases[campaign.current_phase]
    if campaign.swept_phase < current.index:
        return  # the fleet is not yet covered for this phase
    eligible = current.joined - current.skipped - current.cancelled
    if eligible and current.succeeded < math.ceil(current.success_threshold * eligible - 1e-9):
        return
    if current.index + 1 < len(phases):
        moved = session.exec(
            update(Campaign)
            .where(
                col(Campaign.id) == campaign_id,
                col(Campaign.state) == CampaignState.RUNNING,
                col(Campaign.current_phase) == current.index,
            )
            .values(current_phase=current.index + 1, sweep_after="", updated_at=now)
        ).rowcount
        if moved:
            for index, values in ((current.index, {"finished_at": now}),
                                  (current.index + 1, {"started_at": now})):  # fmt: skip
                session.exec(
                    update(CampaignPhase)
                    .where(
                        col(CampaignPhase.campaign_id) == campaign_id,
                        col(CampaignPhase.index) == index,
                    )
                    .values(**values)
                )
            audit.append(
                session, ENGINE_ACTOR, "campaign.phase", campaign.name,
                phase=current.index + 1, percent=phases[current.index + 1].percent,
                succeeded=current.succeeded, eligible=eligible,
            )  # fmt: skip
        return
    values = {"state": CampaignState.COMPLETED, "finished_at": now, "updated_at": now}
    campaign_transition(CampaignState.RUNNING, CampaignAction.COMPLETE)
    if _move(session, campaign, CampaignState.RUNNING, values):
        session.exec(
            update(CampaignPhase)
            .where(
                col(CampaignPhase.campaign_id) == campaign_id,
                col(CampaignPhase.index) == current.index,
            )
            .values(finished_at=now)
        )
        audit.append(
            session, ENGINE_ACTOR, "campaign.complete", campaign.name,
            state_from=CampaignState.RUNNING, state_to=CampaignState.COMPLETED,
            succeeded=current.succeeded, eligible=eligible,
        )  # fmt: skip


@dataclass
class SweepResult:
    """What one sweep step did: vehicles whose director metadata changed; more work waiting."""

    changed_vins: list[str] = field(default_factory=list)
    more: bool = False


def sweep_once(engine: Engine, director: DirectorRepository) -> SweepResult:
    """One bounded step of the background sweep over every open or withdrawing campaign."""
    result = SweepResult()
    with Session(engine) as session:
        ids = session.exec(
            select(Campaign.id).where(
                col(Campaign.state).in_((CampaignState.RUNNING, CampaignState.PAUSED))
                | col(Campaign.withdrawing)
            )
        ).all()
    for campaign_id in ids:
        assert campaign_id is not None
        with Session(engine) as session:
            step = _sweep_campaign(session, director, campaign_id)
            session.commit()
        result.changed_vins += step.changed_vins
        result.more = result.more or step.more
    return result


def _sweep_campaign(
    session: Session, director: DirectorRepository, campaign_id: int
) -> SweepResult:
    campaign = session.get(Campaign, campaign_id)
    result = SweepResult()
    if campaign is None:
        return result
    if campaign.withdrawing:
        result.changed_vins = withdraw(
            session, director, campaign_id, campaign.name, WITHDRAW_BATCH
        )
        result.more = True
        return result
    if campaign.state != CampaignState.RUNNING:
        return result
    now = utcnow()
    # parts that waited for a maintenance window
    for part in session.exec(
        select(CampaignVehicle)
        .where(
            CampaignVehicle.campaign_id == campaign_id,
            CampaignVehicle.state == PartState.PENDING,
        )
        .limit(SWEEP_JOINS)
    ).all():
        if not _offer(session, director, campaign, part, now):
            break
        result.changed_vins.append(part.vin)
    if campaign.swept_phase < campaign.current_phase:
        percents = _percents(session, campaign_id)
        rows = session.exec(
            select(Vehicle.vin, Vehicle.last_manifest_at)
            .where(col(Vehicle.vin) > campaign.sweep_after)
            .order_by(col(Vehicle.vin))
            .limit(SWEEP_BATCH)
        ).all()
        due = [
            (vin, phase)
            for vin, reported in rows
            if reported is not None
            and (phase := phase_of(bucket_of(campaign_id, vin), percents)) <= campaign.current_phase
        ]
        known = (
            set(
                session.exec(
                    select(CampaignVehicle.vin).where(
                        CampaignVehicle.campaign_id == campaign_id,
                        col(CampaignVehicle.vin).in_([vin for vin, _ in due]),
                    )
                ).all()
            )
            if due
            else set()
        )
        phases_of = dict(due)
        last, joins, stopped = campaign.sweep_after, 0, False
        for vin, _reported in rows:
            if vin in phases_of and vin not in known:
                if joins >= SWEEP_JOINS:
                    stopped = True
                    break
                if _join(session, director, campaign, vin, phases_of[vin], now) is not None:
                    result.changed_vins.append(vin)
                joins += 1
            last = vin
        covered = len(rows) < SWEEP_BATCH and not stopped
        values: dict[str, Any] = {"sweep_after": last}
        if covered:
            values["swept_phase"] = campaign.current_phase
        session.exec(
            update(Campaign)
            .where(
                col(Campaign.id) == campaign_id,
                col(Campaign.current_phase) == campaign.current_phase,
            )
            .values(**values)
        )
        session.flush()
        result.more = not covered
    _judge(session, campaign_id, campaign.current_phase)
    if result.changed_vins:
        result.more = True
    return result


__all__ = [
    "CampaignError",
    "MaintenanceWindow",
    "PhaseSpec",
    "Selection",
    "act",
    "bucket_of",
    "campaign_record",
    "campaigns_page",
    "create_campaign",
    "create_release",
    "on_manifest",
    "resolve",
    "sweep_once",
]
