"""The request bodies of the HTTP API, declared once (msgspec).

Strict types (``"false"`` is not a boolean, ``"1"`` not a number), unknown
keys refused, names and target paths of the grammar of :mod:`signing.names`
(the patterns document it in the OpenAPI description, and ``__post_init__``
applies the one validator). A body that does not fit answers 400 with
msgspec's message, which names the field (``$.ecus[0].serial``).

Every datetime from outside, in a body or a query string, is a :data:`Moment`:
ISO 8601 with a time zone, checked by :func:`check_moment` to lie between
:data:`EARLIEST_MOMENT` and :data:`LATEST_MOMENT` and returned in UTC, so no
later arithmetic, comparison or database bind overflows
(``9999-12-31T23:00:00-05:00`` is past ``datetime.max`` in UTC). A moment that
sets when something happens (a token's ``expires_at``) must moreover lie within
a year back and ten years ahead (:func:`check_near_moment`).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from server.db import LedgerChange, SecurityEventKind
from server.roles import Role
from signing.names import (
    MAX_TARGET_PATH_LENGTH,
    NAME_PATTERN,
    TARGET_PATH_PATTERN,
    check_name,
    check_target_path,
)

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="VIN, ECU serial, id")]
TargetPath = Annotated[
    str, msgspec.Meta(pattern=TARGET_PATH_PATTERN, max_length=MAX_TARGET_PATH_LENGTH)
]
ShortText = Annotated[str, msgspec.Meta(max_length=1000)]
#: The earliest and latest datetime from outside (any body or query).
EARLIEST_MOMENT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_MOMENT = datetime(3000, 1, 1, tzinfo=UTC)
#: How far back and ahead a datetime that schedules something may lie.
MOMENT_PAST = timedelta(days=366)
MOMENT_FUTURE = timedelta(days=3653)
Moment = Annotated[
    datetime,
    msgspec.Meta(
        description="ISO 8601 with a time zone, from 1970 to 2999",
        extra_json_schema={"format": "date-time"},
    ),
]


def check_moment(value: datetime, where: str) -> datetime:
    """``value`` in UTC if it has a time zone and lies from :data:`EARLIEST_MOMENT` to before
    :data:`LATEST_MOMENT`; else ValueError naming ``where``."""
    if value.tzinfo is None:
        raise ValueError(f"{where} needs a time zone (e.g. 2027-01-01T00:00:00Z)")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST_MOMENT <= utc < LATEST_MOMENT:
        raise ValueError(
            f"{where}: {value.isoformat()} is out of range "
            f"({EARLIEST_MOMENT.year} to {LATEST_MOMENT.year - 1})"
        )
    return utc


def check_near_moment(value: datetime, where: str) -> datetime:
    """:func:`check_moment`, and within :data:`MOMENT_PAST` before now and
    :data:`MOMENT_FUTURE` after (a time that schedules something)."""
    utc = check_moment(value, where)
    now = datetime.now(UTC)
    if not now - MOMENT_PAST <= utc <= now + MOMENT_FUTURE:
        raise ValueError(
            f"{where} must lie between {MOMENT_PAST.days} days ago and "
            f"{MOMENT_FUTURE.days} days ahead, not {value.isoformat()}"
        )
    return utc


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class EcuRegistration(_Body):
    serial: Name
    hardware_id: Name
    #: the ECU's signing key, in the ``*.pub.json`` format
    public_key: dict[str, Any]
    #: X25519 public key (hex) for images encrypted to this ECU; "" when it cannot decrypt
    encryption_key: Annotated[str, msgspec.Meta(max_length=64)] = ""

    def __post_init__(self) -> None:
        check_name(self.serial, "ecus[].serial")
        check_name(self.hardware_id, f"ecus[{self.serial}].hardware_id")


ShortName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, max_length=64)]


class VehicleAttributes(_Body):
    """What campaigns select a vehicle by; names of the :mod:`signing.names` grammar."""

    model: ShortName | None = None
    year: Annotated[int, msgspec.Meta(ge=1900, le=2200)] | None = None
    region: ShortName | None = None
    tags: Annotated[list[ShortName], msgspec.Meta(max_length=32)] = []

    def __post_init__(self) -> None:
        for where, value in (("model", self.model), ("region", self.region)):
            if value is not None:
                check_name(value, where)
        for tag in self.tags:
            check_name(tag, "tags[]")


class VehicleRegistration(_Body):
    vin: Name
    primary_ecu_serial: Name
    ecus: Annotated[list[EcuRegistration], msgspec.Meta(min_length=1, max_length=256)]
    #: deliver this vehicle's images encrypted to each ECU's key
    encrypt_images: bool = False
    #: PEM certificate signing request of the vehicle's TLS key (subject CN = VIN)
    tls_csr: Annotated[str, msgspec.Meta(max_length=16384)] = ""
    #: model, year, region and tags, for campaigns' selections
    attributes: VehicleAttributes | None = None

    def __post_init__(self) -> None:
        check_name(self.vin, "vin")
        check_name(self.primary_ecu_serial, "primary_ecu_serial")


class AssignmentRequest(_Body):
    ecu_serial: Name
    filepath: TargetPath

    def __post_init__(self) -> None:
        check_name(self.ecu_serial, "ecu_serial")
        check_target_path(self.filepath, "filepath")


class ReportCounterReset(_Body):
    reason: ShortText = ""


class TokenRequest(_Body):
    name: Name
    role: Role
    #: suppliers only: the hardware ids whose images the token may publish
    hardware_ids: Annotated[list[Name], msgspec.Meta(max_length=64)] = []
    #: when the token stops working (ISO 8601 with a time zone); null: never
    expires_at: Moment | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for hw in self.hardware_ids:
            check_name(hw, "hardware_ids[]")
        if self.expires_at is not None:
            self.expires_at = check_near_moment(self.expires_at, "expires_at")


class CertificateRequest(_Body):
    """A vehicle asks for a (new) client certificate for a new key."""

    tls_csr: Annotated[str, msgspec.Meta(max_length=16384)]


class CertificateRevocation(_Body):
    """Which issuer's certificate of that serial (SHA-256 of its issuer name, as listed); "": any."""

    issuer_sha256: Annotated[str, msgspec.Meta(pattern="^([0-9a-f]{64})?$")] = ""


class CertificatePemRevocation(_Body):
    """A vehicle certificate to revoke, as PEM (recorded first if the server never saw it)."""

    certificate: Annotated[str, msgspec.Meta(max_length=16384)]


HexKeyId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$", description="TUF key id")]


class DetachedSignature(_Body):
    """One key's signature over a staged release's ``signed`` (securesystemslib's format)."""

    keyid: HexKeyId
    sig: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]+$", min_length=2, max_length=2048)]


class StagedSignatures(_Body):
    """Signatures made offline over the staged targets of ``targets_version``."""

    targets_version: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    signatures: Annotated[list[DetachedSignature], msgspec.Meta(min_length=1, max_length=64)]


class ReleaseRequest(_Body):
    """A named set of published images: hardware id -> image repository target path."""

    name: Name
    images: Annotated[dict[Name, TargetPath], msgspec.Meta(min_length=1, max_length=64)]
    description: ShortText = ""

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for hw, path in self.images.items():
            check_name(hw, "images key")
            check_target_path(path, f"images.{hw}")


Share = Annotated[float, msgspec.Meta(ge=0, le=1)]


class PhaseRequest(_Body):
    """One phase: the share of the fleet it reaches (cumulative) and when it moves on or stops."""

    #: cumulative percent of the selected fleet (e.g. 1, 10, 100); the last one is 100
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)]
    #: share of the phase's eligible vehicles that must succeed before the next phase
    success_threshold: Share = 1.0
    #: share of finished vehicles that may fail; above it the campaign aborts (or pauses)
    failure_threshold: Share = 0.0
    on_failure: Literal["abort", "pause"] = "abort"
    #: finished vehicles before the failure rate counts
    min_finished: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1


class SelectionRequest(_Body):
    """Which vehicles: every non-empty field must match (tags: all of them)."""

    models: Annotated[list[ShortName], msgspec.Meta(max_length=64)] = []
    regions: Annotated[list[ShortName], msgspec.Meta(max_length=64)] = []
    tags: Annotated[list[ShortName], msgspec.Meta(max_length=32)] = []
    year_min: Annotated[int, msgspec.Meta(ge=1900, le=2200)] | None = None
    year_max: Annotated[int, msgspec.Meta(ge=1900, le=2200)] | None = None
    #: hardware id -> version spec its ECUs must run now, e.g. {"stm32f4-bms": "<1.1.0"}
    installed: Annotated[
        dict[Name, Annotated[str, msgspec.Meta(min_length=1, max_length=256)]],
        msgspec.Meta(max_length=16),
    ] = {}

    def __post_init__(self) -> None:
        for value in (*self.models, *self.regions, *self.tags, *self.installed):
            check_name(value, "selection")


HourMinute = Annotated[str, msgspec.Meta(pattern="^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class MaintenanceWindowRequest(_Body):
    """A daily UTC time range in which vehicles are offered the release (end < start: overnight)."""

    start: HourMinute
    end: HourMinute


class CampaignRequest(_Body):
    name: Name
    release: Name
    phases: Annotated[list[PhaseRequest], msgspec.Meta(min_length=1, max_length=10)] = (
        msgspec.field(default_factory=lambda: [PhaseRequest(percent=100)])
    )
    selection: SelectionRequest = msgspec.field(default_factory=SelectionRequest)
    maintenance_windows: Annotated[list[MaintenanceWindowRequest], msgspec.Meta(max_length=24)] = []
    #: download at once, install when the vehicle's consent precondition holds
    install_on_consent: bool = False
    description: ShortText = ""

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_name(self.release, "release")


class CampaignActionRequest(_Body):
    reason: ShortText = ""


class PasswordRequest(_Body):
    """A dashboard password for an operator account (:mod:`server.operator_passwords`)."""

    password: Annotated[str, msgspec.Meta(min_length=12, max_length=1024)]


# -- query parameters (``server.api.boundary.query_params``) ---------------------------

#: Paged lists: the default and largest ``limit`` (:mod:`server.api.boundary`).
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 500
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_LIMIT, description="items per page")]
Cursor = Annotated[
    str,
    msgspec.Meta(
        max_length=1024, pattern="^[A-Za-z0-9_-]*$", description="the `next` of the previous page"
    ),
]


class _Query(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def _moment(value: datetime | None, name: str) -> datetime | None:
    return None if value is None else check_moment(value, name)


class PageQuery(_Query):
    limit: Limit = DEFAULT_PAGE_LIMIT
    cursor: Cursor | None = None


class VehicleQuery(PageQuery):
    """Vehicles with an ECU of ``hardware_id``, or running ``image``; seen (a manifest
    accepted) since or not since a time; revoked or not; with or without attacks."""

    hardware_id: Name | None = None
    image: TargetPath | None = None
    seen_since: Moment | None = None
    not_seen_since: Moment | None = None
    revoked: bool | None = None
    has_attacks: bool | None = None

    def __post_init__(self) -> None:
        self.seen_since = _moment(self.seen_since, "seen_since")
        self.not_seen_since = _moment(self.not_seen_since, "not_seen_since")


class EcuQuery(PageQuery):
    vin: Name | None = None
    hardware_id: Name | None = None
    image: TargetPath | None = None
    has_attacks: bool | None = None
    last_install_result: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class EventQuery(PageQuery):
    vin: Name | None = None
    kind: SecurityEventKind | None = None
    since: Moment | None = None

    def __post_init__(self) -> None:
        self.since = _moment(self.since, "since")


class LedgerQuery(PageQuery):
    """Entries of one ECU, of one kind of change; ``failed``: only failed installs (or none)."""

    ecu: Name | None = None
    change: LedgerChange | None = None
    failed: bool | None = None


class ExportFormat(enum.StrEnum):
    CSV = "csv"
    JSON = "json"


class LedgerExportQuery(_Query):
    """Exactly one of ``vin`` (a vehicle's history) or ``image`` / ``version`` (a release's)."""

    vin: Name | None = None
    image: TargetPath | None = None
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    format: ExportFormat = ExportFormat.JSON

    def __post_init__(self) -> None:
        given = [n for n in ("vin", "image", "version") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of vin, image or version")


class AuditQuery(PageQuery):
    action: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    subject: ShortText | None = None


class AuditVerifyQuery(_Query):
    expected_head: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")] | None = None
