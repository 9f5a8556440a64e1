"""The fleet database (SQLModel; SQLite by default, PostgreSQL for fleets).

Tables are small and indexed by what the hot path looks up: a vehicle poll
reads one ``DirectorMetadata`` row by primary key.

What an unauthenticated client can make the server store is bounded here by
construction: text from vehicles is cut to :data:`MAX_STORED_TEXT`
characters (:func:`bounded_text`), counters that vehicles sign are 64-bit
columns (a value the manifest parser accepts always fits), and refused
manifests are aggregated into one :class:`SecurityEvent` per reason
(:mod:`server.fleet`) rather than a row per request.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, LargeBinary, event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlmodel import Field, SQLModel, create_engine

from server.config import ConfigError

#: Longest text the server stores from a vehicle or a request (details, rejections, attacks).
MAX_STORED_TEXT = 1000


class DatabaseUrlError(ConfigError):
    """A database URL names no database this server can open (unknown scheme, missing driver)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Datetimes come back naive from SQLite: they are UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def bounded_text(text: str) -> str:
    """``text`` cut to :data:`MAX_STORED_TEXT` characters, marked with "…" when cut."""
    return text if len(text) <= MAX_STORED_TEXT else text[: MAX_STORED_TEXT - 1] + "…"


class ReportCounterState(enum.StrEnum):
    """How the server checks the next report counter of an ECU (:mod:`server.fleet`)."""

    #: above the last accepted one, by at most ``MAX_REPORT_COUNTER_JUMP``
    BOUNDED = "bounded"
    #: an operator reset it: the next accepted report sets the baseline, whatever its counter
    REBASELINE = "rebaseline"


class SecurityEventKind(enum.StrEnum):
    ATTACK_REPORTED = "attack_reported"
    MANIFEST_REJECTED = "manifest_rejected"
    REPORT_COUNTER_RESET = "report_counter_reset"


class Vehicle(SQLModel, table=True):
    vin: str = Field(primary_key=True, max_length=128)
    primary_ecu_serial: str = Field(max_length=128)
    registered_at: datetime = Field(default_factory=utcnow)
    last_manifest_at: datetime | None = None
    manifests_accepted: int = Field(default=0, sa_type=BigInteger)
    manifests_rejected: int = Field(default=0, sa_type=BigInteger)
    last_rejection: str = Field(default="", max_length=MAX_STORED_TEXT)
    director_targets_version: int = 0
    #: set when an operator revoked the vehicle: every request with its certificates is refused
    revoked_at: datetime | None = None


class Ecu(SQLModel, table=True):
    serial: str = Field(primary_key=True, max_length=128)
    vin: str = Field(foreign_key="vehicle.vin", index=True, max_length=128)
    hardware_id: str = Field(max_length=128)
    public_key: str  # *.pub.json format
    is_primary: bool = False
    installed_filepath: str = ""
    installed_length: int = Field(default=0, sa_type=BigInteger)
    installed_sha256: str = ""
    report_counter: int = Field(default=-1, sa_type=BigInteger)
    report_counter_state: str = Field(default=ReportCounterState.BOUNDED, max_length=16)
    attacks_detected: str = Field(default="", max_length=MAX_STORED_TEXT)
    last_install_filepath: str = ""
    last_install_result: str = ""
    last_install_detail: str = Field(default="", max_length=MAX_STORED_TEXT)
    last_install_method: str = ""
    updated_at: datetime = Field(default_factory=utcnow)


class Assignment(SQLModel, table=True):
    """What an ECU should install; ``status`` follows the vehicle's reports."""

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = Field(index=True, max_length=128)
    filepath: str = Field(max_length=512)
    status: str = "pending"  # pending | installed | failed | superseded
    detail: str = Field(default="", max_length=MAX_STORED_TEXT)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SecurityEvent(SQLModel, table=True):
    """An attack an ECU reported, manifests the server refused, or an operator's reset.

    Refused manifests of one vehicle are counted in one row per ``reason``
    (and ECU): ``count`` of them between ``first_at`` and ``last_at``, the
    last one's ``detail`` kept; so a flood of garbage costs an update, not a row.
    """

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = Field(default="", max_length=128)
    kind: str = Field(max_length=32)  # a SecurityEventKind
    #: what class of refusal (:class:`server.fleet.RejectionReason`); "" for other kinds
    reason: str = Field(default="", max_length=32)
    detail: str = Field(max_length=MAX_STORED_TEXT)
    count: int = Field(default=1, sa_type=BigInteger)
    first_at: datetime = Field(default_factory=utcnow)
    last_at: datetime = Field(default_factory=utcnow, index=True)


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


class OperatorToken(SQLModel, table=True):
    """A named API token of an operator (:mod:`server.accounts`); only its SHA-256 is kept."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    role: str = Field(max_length=32)  # a server.roles.Role
    hardware_ids: str = Field(default="[]", max_length=MAX_STORED_TEXT)  # JSON list (suppliers)
    token_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = Field(default="", max_length=160)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str = Field(default="", max_length=160)


class VehicleCertificate(SQLModel, table=True):
    """A TLS client certificate that identifies a vehicle (:mod:`server.certificates`).

    Issued by the server's device CA, or by an operator's CA and seen since;
    a revoked one is refused on the next request.
    """

    serial: str = Field(primary_key=True, max_length=64)  # hex serial number
    issuer_sha256: str = Field(primary_key=True, max_length=64)  # SHA-256 of the issuer name
    vin: str = Field(index=True, max_length=128)
    not_after: datetime
    issued_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    revoked_by: str = Field(default="", max_length=160)


class AuditRecord(SQLModel, table=True):
    """One state change, who made it and when; hash-chained (:mod:`server.audit`)."""

    seq: int = Field(primary_key=True, sa_type=BigInteger)
    at: datetime = Field(default_factory=utcnow)
    actor: str = Field(max_length=160)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(default="", max_length=MAX_STORED_TEXT, index=True)
    detail: str = Field(default="{}", max_length=4 * MAX_STORED_TEXT)  # canonical JSON
    prev_hash: str = Field(max_length=64, unique=True)
    hash: str = Field(max_length=64, unique=True)


class AuditHead(SQLModel, table=True):
    """The one row naming the latest audit record: appends lock it, so the chain never forks."""

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0, sa_type=BigInteger)
    hash: str = Field(default="0" * 64, max_length=64)


def shown_database_url(database_url: str) -> str:
    """``database_url`` fit for messages and logs: its password hidden."""
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return database_url  # not a URL, so no password in it either


def check_database_url(database_url: str) -> None:
    """Refuse, before anything is created, a URL whose database this server cannot open.

    Raises :class:`DatabaseUrlError` for text that is no URL, an unknown
    scheme, an asyncio driver (the server's database calls are synchronous,
    run in threads) or a driver that is not installed.
    """
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise DatabaseUrlError(
            f"database URL {database_url!r} is not a URL (e.g. sqlite:////srv/uptake/uptake.db, "
            "postgresql+psycopg://user@host/db)"
        ) from exc
    shown = shown_database_url(database_url)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError as exc:
        raise DatabaseUrlError(
            f"database URL {shown!r}: unknown database {url.drivername!r} "
            "(use sqlite:///PATH or postgresql+psycopg://user@host/db)"
        ) from exc
    if getattr(dialect, "is_async", False):
        raise DatabaseUrlError(
            f"database URL {shown!r}: {url.drivername!r} is an asyncio driver; the server needs "
            f"a synchronous one (e.g. {url.get_backend_name()}+psycopg:// for PostgreSQL)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = (
            "for PostgreSQL use postgresql+psycopg:// and install uptake[postgres]"
            if url.get_backend_name() == "postgresql"
            else "install that driver, or use sqlite:/// or postgresql+psycopg://"
        )
        raise DatabaseUrlError(
            f"database URL {shown!r}: its driver ({exc.name or url.drivername}) is not "
            f"installed; {hint}"
        ) from exc


def make_engine(database_url: str) -> Engine:
    """Create the engine and the tables (idempotent)."""
    check_database_url(database_url)
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
