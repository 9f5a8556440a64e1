"""The fleet database (SQLModel; SQLite by default, PostgreSQL for fleets).

Tables are small and indexed by what the hot path looks up: a vehicle poll
reads one ``DirectorMetadata`` row by primary key.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, LargeBinary, event
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel, create_engine


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Datetimes come back naive from SQLite: they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Vehicle(SQLModel, table=True):
    vin: str = Field(primary_key=True, max_length=128)
    primary_ecu_serial: str = Field(max_length=128)
    registered_at: datetime = Field(default_factory=utcnow)
    last_manifest_at: datetime | None = None
    manifests_accepted: int = 0
    manifests_rejected: int = 0
    last_rejection: str = ""
    director_targets_version: int = 0


class Ecu(SQLModel, table=True):
    serial: str = Field(primary_key=True, max_length=128)
    vin: str = Field(foreign_key="vehicle.vin", index=True, max_length=128)
    hardware_id: str = Field(max_length=128)
    public_key: str  # *.pub.json format
    is_primary: bool = False
    installed_filepath: str = ""
    installed_length: int = 0
    installed_sha256: str = ""
    report_counter: int = -1
    attacks_detected: str = ""
    last_install_filepath: str = ""
    last_install_result: str = ""
    last_install_detail: str = ""
    last_install_method: str = ""
    updated_at: datetime = Field(default_factory=utcnow)


class Assignment(SQLModel, table=True):
    """What an ECU should install; ``status`` follows the vehicle's reports."""

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = Field(index=True, max_length=128)
    filepath: str = Field(max_length=512)
    status: str = "pending"  # pending | installed | failed | superseded
    detail: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SecurityEvent(SQLModel, table=True):
    """An attack an ECU reported, or a manifest the server refused."""

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = ""
    kind: str  # attack_reported | manifest_rejected
    detail: str
    at: datetime = Field(default_factory=utcnow)


class EcuEncryptionKey(SQLModel, table=True):
    """An ECU's X25519 public key for per-ECU image encryption (:mod:`signing.encryption`)."""

    ecu_serial: str = Field(primary_key=True, max_length=128)
    vin: str = Field(index=True, max_length=128)
    public_key: str = Field(max_length=64)  # raw key, hex


class VehicleEncryption(SQLModel, table=True):
    """Vehicles whose images the director delivers encrypted per ECU (besides the global option)."""

    vin: str = Field(primary_key=True, max_length=128)
    encrypt_images: bool = True


class DirectorMetadata(SQLModel, table=True):
    """Signed director metadata of one vehicle, one row per role and version."""

    vin: str = Field(primary_key=True, max_length=128)
    role: str = Field(primary_key=True, max_length=16)
    version: int = Field(primary_key=True)
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    expires: datetime


def make_engine(database_url: str) -> Engine:
    """Create the engine and the tables (idempotent)."""
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(database_url, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine)
    return engine
