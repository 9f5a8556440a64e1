"""Dashboard tables and indexes: passwords, sessions, and what the pages aggregate by.

Imported by :mod:`server.db`, so that create_all and migrations see them.

An operator account is a named token (:class:`server.db.OperatorToken`);
:class:`OperatorPassword` lets the same account log in to the dashboard with
a password instead of pasting the token (:mod:`server.operator_passwords`),
and :class:`DashboardSession` is one logged-in browser
(:mod:`server.web_sessions`). Both keep only hashes: a leaked database gives
neither a password nor a usable session cookie.

The indexes at the end serve the dashboard's ``GROUP BY`` counts and
filters (:mod:`server.dashboard.queries`) at fleet scale: installed images
per hardware id, vehicles with attacks, vehicles with failed installs, a vehicle's
campaigns, a campaign's finished vehicles over time.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Table, event
from sqlmodel import Field, SQLModel, col

from server.db import Assignment, Ecu, SecurityEvent, Vehicle, utcnow


class OperatorPassword(SQLModel, table=True):
    """The scrypt hash of an operator account's dashboard password."""

    name: str = Field(primary_key=True, max_length=128)  # the OperatorToken's name
    #: ``scrypt$N$r$p$salt-hex$hash-hex``
    password_hash: str = Field(max_length=256)
    updated_at: datetime = Field(default_factory=utcnow)
    updated_by: str = Field(default="", max_length=160)


class DashboardSession(SQLModel, table=True):
    """One logged-in browser: the SHA-256 of its cookie, whose account, its CSRF token."""

    id_sha256: str = Field(primary_key=True, max_length=64)
    operator: str = Field(index=True, max_length=128)  # the OperatorToken's name
    csrf_token: str = Field(max_length=64)
    #: how the operator logged in: "token" or "password"
    method: str = Field(max_length=16)
    address: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)


# covering: ECUs per installed image, and the vehicles running one (counted without the table)
Index(
    "ix_ecu_hardware_id_installed",
    col(Ecu.hardware_id), col(Ecu.installed_filepath), col(Ecu.vin),
)  # fmt: skip
# covering: does this vehicle's ECU of that hardware id run that image (vehicles by release)
Index("ix_ecu_vin_installed", col(Ecu.vin), col(Ecu.hardware_id), col(Ecu.installed_filepath))
# revoked vehicles: a range count instead of a scan (last_manifest_at has its index in server.db)
Index("ix_vehicle_revoked_at", col(Vehicle.revoked_at))
Index("ix_securityevent_kind_vin", col(SecurityEvent.kind), col(SecurityEvent.vin))
Index("ix_assignment_status_vin", col(Assignment.status), col(Assignment.vin))


def _index_parts(table: Table) -> None:
    # (parts by VIN: server.campaign_tables' own index) a campaign's finished vehicles over time: range counts per state and time bucket
    Index("ix_campaignvehicle_campaign_state_updated", table.c.campaign_id, table.c.state,
          table.c.updated_at)  # fmt: skip


def _index_attributes(table: Table) -> None:
    Index("ix_vehicleattributes_model", table.c.model)


# Indexes on server.campaign_tables' tables. That module imports server.db, which imports this
# one: whichever of the two is imported first, each index is added once its table exists.
_LATER = {"campaignvehicle": _index_parts, "vehicleattributes": _index_attributes}
_pending = {}
for _name, _add in _LATER.items():
    if (_table := SQLModel.metadata.tables.get(_name)) is not None:
        _add(_table)
    else:
        _pending[_name] = _add
if _pending:

    @event.listens_for(Table, "after_parent_attach")
    def _on_table(table: Table, metadata: object) -> None:
        add = _pending.pop(table.name, None) if metadata is SQLModel.metadata else None
        if add is not None:
            add(table)
