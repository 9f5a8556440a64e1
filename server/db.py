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
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, UniqueConstraint, event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlmodel import Field, SQLModel, create_engine

from server.config import ConfigError

#: Environment variable naming the database (between --database-url and server.json).
DATABASE_URL_ENV = "UPTAKE_DATABASE_URL"
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
    """``text`` cut to :data:`MAX_STORED_TEXT` characters, marked with "…" when cut; a NUL,
    which PostgreSQL cannot store, becomes U+FFFD."""
    text = text.replace("\x00", "\ufffd")
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
    last_manifest_at: datetime | None = Field(default=None, index=True)
    manifests_accepted: int = Field(default=0, sa_type=BigInteger)
    manifests_rejected: int = Field(default=0, sa_type=BigInteger)
    last_rejection: str = Field(default="", max_length=MAX_STORED_TEXT)
    director_targets_version: int = 0
    #: set when an operator revoked the vehicle: every request with its certificates is refused
    revoked_at: datetime | None = None


class Ecu(SQLModel, table=True):
    # the fleet lists' "vehicles with an ECU of / running ..." look ECUs up by vehicle and
    # value; (vin, hardware_id) and hardware_id alone are the prefixes of the dashboard's
    # indexes (server.dashboard_tables)
    __table_args__ = (Index("ix_ecu_vin_installed_filepath", "vin", "installed_filepath"),)

    serial: str = Field(primary_key=True, max_length=128)
    vin: str = Field(foreign_key="vehicle.vin", index=True, max_length=128)
    hardware_id: str = Field(max_length=128)
    public_key: str  # *.pub.json format
    is_primary: bool = False
    installed_filepath: str = Field(default="", index=True)
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


class AssignmentStatus(enum.StrEnum):
    """Where an assignment is: it is directed to the vehicle while pending or installed."""

    PENDING = "pending"
    INSTALLED = "installed"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    #: withdrawn by an operator before the ECU installed it (:func:`server.fleet.cancel_assignment`)
    CANCELLED = "cancelled"


class Assignment(SQLModel, table=True):
    """What an ECU should install; ``status`` follows the vehicle's reports."""

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = Field(index=True, max_length=128)
    filepath: str = Field(max_length=512)
    status: str = "pending"  # an AssignmentStatus
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


class LedgerChange(enum.StrEnum):
    """What an accepted manifest changed for one ECU (one :class:`LedgerEntry` each)."""

    #: the ECU runs another image than before (or reported one for the first time)
    INSTALLED = "installed"
    #: the ECU reported a new outcome of its last install (``result``: success, or a failure)
    INSTALL_RESULT = "install_result"
    #: the ECU reported an attack it had not reported before
    ATTACK = "attack"
    #: the ECU no longer reports the attack it reported before
    ATTACK_CLEARED = "attack_cleared"


#: Largest manifest whose bytes the ledger keeps (larger ones: their hash and length only).
MAX_STORED_MANIFEST_BYTES = 64 * 1024


class StoredManifest(SQLModel, table=True):
    """An accepted vehicle manifest that changed the inventory ledger (:mod:`server.ledger`).

    Only manifests that changed something are kept, not every heartbeat; the
    bytes are those the vehicle signed, up to :data:`MAX_STORED_MANIFEST_BYTES`
    (``content`` is empty when larger, or pruned: see ``content_stored``).
    """

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    received_at: datetime = Field(default_factory=utcnow)
    sha256: str = Field(max_length=64)
    length: int = Field(sa_type=BigInteger)
    content_stored: bool = True
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class LedgerEntry(SQLModel, table=True):
    """One change of one ECU, as an accepted (stored) manifest reported it.

    The ECU's installed image is recorded in every entry (what it ran after the
    change), with the version the image repository gives that image, so that a
    vehicle's history and a release's uptake are each one indexed query.
    """

    id: int | None = Field(default=None, primary_key=True)
    vin: str = Field(index=True, max_length=128)
    ecu_serial: str = Field(index=True, max_length=128)
    hardware_id: str = Field(max_length=128)
    at: datetime = Field(default_factory=utcnow)
    change: str = Field(max_length=32, index=True)  # a LedgerChange
    filepath: str = Field(default="", max_length=512, index=True)
    version: str = Field(default="", max_length=128, index=True)
    sha256: str = Field(default="", max_length=64)
    length: int = Field(default=0, sa_type=BigInteger)
    #: install outcome (INSTALL_RESULT): the image it was about, the result, its detail
    install_filepath: str = Field(default="", max_length=512)
    install_result: str = Field(default="", max_length=64)
    detail: str = Field(default="", max_length=MAX_STORED_TEXT)
    manifest_id: int = Field(foreign_key="storedmanifest.id", index=True)


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


class CertificateSource(enum.StrEnum):
    """Who issued a vehicle certificate the fleet database knows."""

    DEVICE_CA = "device-ca"  # this server, at registration or renewal
    OPERATOR_CA = "operator-ca"  # an operator's own CA: recorded when first seen or revoked


class VehicleCertificate(SQLModel, table=True):
    """A TLS client certificate that identifies a vehicle (:mod:`server.certificates`).

    Issued by the server's device CA, or by an operator's CA and seen since;
    a revoked one is refused on the next request, and so is every certificate
    renewed from it (``renewed_from_*`` names the certificate that asked).
    """

    serial: str = Field(primary_key=True, max_length=64)  # hex serial number
    issuer_sha256: str = Field(primary_key=True, max_length=64)  # SHA-256 of the issuer name
    vin: str = Field(index=True, max_length=128)
    not_after: datetime
    issued_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    revoked_by: str = Field(default="", max_length=160)
    source: CertificateSource = Field(default=CertificateSource.DEVICE_CA, max_length=16)
    #: the certificate (serial, issuer) whose holder renewed into this one; "" if none
    renewed_from_serial: str = Field(default="", max_length=64, index=True)
    renewed_from_issuer: str = Field(default="", max_length=64)


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


class DeltaJobState(enum.StrEnum):
    """Where a delta job is (:mod:`server.deltas`); the values are the API's strings."""

    QUEUED = "queued"
    RUNNING = "running"
    PUBLISHED = "published"
    NOT_WORTH_IT = "not_worth_it"
    FAILED = "failed"


class DeltaJob(SQLModel, table=True):
    """A delta to make from one image to another, claimed by any server process.

    Rows are made only for images this repository published (both ends), so
    their number is bounded by the published images, whoever asks.
    """

    __table_args__ = (UniqueConstraint("base_sha256", "result_filepath"),)

    id: int | None = Field(default=None, primary_key=True)
    base_sha256: str = Field(max_length=64)
    result_filepath: str = Field(max_length=512)
    status: str = Field(default=DeltaJobState.QUEUED, max_length=16, index=True)
    detail: str = Field(default="", max_length=MAX_STORED_TEXT)
    delta_length: int = Field(default=0, sa_type=BigInteger)
    result_length: int = Field(default=0, sa_type=BigInteger)
    #: "host:pid" of the process making it (while running)
    claimed_by: str = Field(default="", max_length=160)
    claimed_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)

    def to_dict(self) -> dict[str, object]:
        return {
            "base_sha256": self.base_sha256,
            "result_filepath": self.result_filepath,
            "status": self.status,
            "detail": self.detail,
            "delta_length": self.delta_length,
            "result_length": self.result_length,
        }


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


@dataclass(frozen=True)
class PoolSettings:
    """Connection pool of an engine (server.json ``database_pool_*``; pre-ping and recycling
    on PostgreSQL only).

    Each server process keeps up to ``size + max_overflow`` connections:
    size PostgreSQL's ``max_connections`` for every replica. ``pre_ping``
    tests a pooled connection before use, so a database restart costs no
    failed request.
    """

    size: int = 10
    max_overflow: int = 10
    pre_ping: bool = True
    #: seconds after which a pooled connection is replaced (proxies drop idle ones)
    recycle: int = 1800


def make_engine(
    database_url: str, pool: PoolSettings | None = None, *, prepare: bool = True
) -> Engine:
    """The engine of ``database_url``; with ``prepare``, its schema checked (:mod:`server.schema`).

    An empty database is created at the code's schema revision; one behind it
    is refused with :class:`server.schema.SchemaOutdatedError`.
    """
    check_database_url(database_url)
    pool = pool or PoolSettings()
    if database_url.startswith("sqlite"):
        # a file's pool sized as PostgreSQL's: every server thread may hold a connection
        # (an in-memory database keeps SQLAlchemy's one connection per thread)
        in_memory = make_url(database_url).database in (None, "", ":memory:")
        sizes = {} if in_memory else {"pool_size": pool.size, "max_overflow": pool.max_overflow}
        engine = create_engine(
            database_url, connect_args={"check_same_thread": False, "timeout": 30}, **sizes
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(
            database_url,
            pool_size=pool.size,
            max_overflow=pool.max_overflow,
            pool_pre_ping=pool.pre_ping,
            pool_recycle=pool.recycle,
        )
    if prepare:
        from server.schema import prepare as prepare_schema

        try:
            prepare_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


# the campaign tables live in their own module; imported here so that every table is
# registered (create_all, migrations) whenever the database is
import server.campaign_tables  # noqa: E402

# the password and dashboard-session tables live in their own module; imported here so that
# every table is registered (create_all, migrations) whenever the database is
import server.dashboard_tables  # noqa: E402, F401
