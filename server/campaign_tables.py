"""The tables of vehicle attributes, releases and campaigns (imported by :mod:`server.db`).

Sized for a fleet of millions: nothing here has a row per vehicle until the
vehicle is reached. A campaign is one :class:`Campaign` row and one
:class:`CampaignPhase` per phase (whose counters are kept incrementally as
vehicles report); a :class:`CampaignVehicle` row is written when a vehicle
of the campaign is first contacted (its manifest, or the bounded background
sweep), never for the whole fleet in one request. The hot lookups are
indexed: running campaigns by ``state``; a vehicle's part by its primary key
``(campaign_id, vin)``; parts waiting for an offer by ``(campaign_id, state)``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index
from sqlmodel import Field, SQLModel

from server.db import MAX_STORED_TEXT, utcnow


class VehicleAttributes(SQLModel, table=True):
    """What campaigns select vehicles by: model, year, region and tags (JSON list of names)."""

    vin: str = Field(primary_key=True, max_length=128)
    model: str = Field(default="", max_length=64)
    year: int | None = None
    region: str = Field(default="", max_length=64)
    tags: str = Field(default="[]", max_length=MAX_STORED_TEXT)
    updated_at: datetime = Field(default_factory=utcnow)


class Release(SQLModel, table=True):
    """A named set of published images, one per hardware id (``images``: JSON object)."""

    name: str = Field(primary_key=True, max_length=128)
    images: str = Field(max_length=8 * MAX_STORED_TEXT)  # {"hardware id": "target path"}
    description: str = Field(default="", max_length=MAX_STORED_TEXT)
    created_by: str = Field(max_length=160)
    created_at: datetime = Field(default_factory=utcnow)


class Campaign(SQLModel, table=True):
    """A release rolled out in phases to the vehicles a selection matches (:mod:`server.campaigns`)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    release: str = Field(foreign_key="release.name", max_length=128)
    description: str = Field(default="", max_length=MAX_STORED_TEXT)
    state: str = Field(max_length=16, index=True)  # a CampaignState
    paused_from: str = Field(default="", max_length=16)
    #: why the campaign stopped or paused on its own, or the operator's reason
    reason: str = Field(default="", max_length=MAX_STORED_TEXT)
    selection: str = Field(default="{}", max_length=4 * MAX_STORED_TEXT)  # canonical JSON
    maintenance_windows: str = Field(default="[]", max_length=MAX_STORED_TEXT)  # JSON
    install_on_consent: bool = False
    current_phase: int = 0
    #: the background sweep's position (last VIN seen) and the phase it last swept in full
    sweep_after: str = Field(default="", max_length=128)
    swept_phase: int = -1
    #: parts still to withdraw after a cancel (the sweep finishes what a request left)
    withdrawing: bool = False
    created_by: str = Field(max_length=160)
    created_at: datetime = Field(default_factory=utcnow)
    approved_by: str = Field(default="", max_length=160)
    approved_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class CampaignPhase(SQLModel, table=True):
    """One phase: vehicles whose bucket is below ``percent``; its thresholds and live counters."""

    campaign_id: int = Field(foreign_key="campaign.id", primary_key=True)
    index: int = Field(primary_key=True)
    percent: float
    #: the share of the phase's eligible vehicles that must succeed before the next phase starts
    success_threshold: float
    #: the share of finished vehicles that may fail; above it the campaign aborts (or pauses)
    failure_threshold: float
    #: "abort" or "pause": what crossing ``failure_threshold`` does
    on_failure: str = Field(default="abort", max_length=8)
    #: finished vehicles needed before the failure rate is judged
    min_finished: int = 1
    joined: int = Field(default=0, sa_type=BigInteger)
    offered: int = Field(default=0, sa_type=BigInteger)
    succeeded: int = Field(default=0, sa_type=BigInteger)
    failed: int = Field(default=0, sa_type=BigInteger)
    skipped: int = Field(default=0, sa_type=BigInteger)
    cancelled: int = Field(default=0, sa_type=BigInteger)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class CampaignVehicle(SQLModel, table=True):
    """One vehicle's part in a campaign, written when the vehicle is first reached."""

    __table_args__ = (
        # (campaign_id, state) lookups use the prefix of the dashboard's
        # ix_campaignvehicle_campaign_state_updated (server.dashboard_tables)
        # the director looks up a vehicle's parts (install-on-consent targets)
        Index("ix_campaignvehicle_vin", "vin"),
    )

    campaign_id: int = Field(foreign_key="campaign.id", primary_key=True)
    vin: str = Field(primary_key=True, max_length=128)
    phase: int
    state: str = Field(max_length=24)  # a PartState
    #: the Assignment ids made for this vehicle (JSON list), in install order
    assignments: str = Field(default="[]", max_length=MAX_STORED_TEXT)
    detail: str = Field(default="", max_length=MAX_STORED_TEXT)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
