"""Who may call which route: operators by token, vehicles by certificate.

Every route of the API declares one :data:`Access` in the route table
(:class:`Route`), and :func:`access_middleware` enforces it before the
handler runs:

* :attr:`Audience.PUBLIC`: anyone (the image repository's metadata, health);
* :attr:`Audience.VEHICLE`: a vehicle whose identity is the ``{vin}`` of the
  URL (director metadata and targets, manifest upload, certificate
  renewal), and image downloads when ``images_require_client_cert`` is set;
* a :class:`~server.roles.Permission`: an operator token (``Authorization:
  Bearer …``) whose role grants it; no or a bad token answers 401, a role
  without the permission 403. Routes under ``/dashboard/`` also take a
  dashboard session cookie (:mod:`server.web_sessions`) in place of the
  token, and then every request other than GET must pass the CSRF check
  (:func:`check_csrf`: same-site by ``Sec-Fetch-Site`` and ``Origin``, and
  the session's CSRF token in the form field ``csrf`` or the header
  ``X-CSRF-Token``) before its permission is even looked at. The API takes
  no cookies, so a cross-site page can never act on it.

A route the application serves but the table does not declare is refused
(403): access fails closed. Only paths no route matches fall through, to
aiohttp's 404 or 405.

A vehicle's identity is the VIN of its TLS client certificate
(:func:`server.certificates.vin_of`), read from this server's own TLS
connection, or, behind a proxy that terminates TLS (nginx), from the
verified certificate the proxy passes in ``X-Client-Cert`` with
``X-Client-Verify: SUCCESS``, believed only from the configured
``trusted_proxies`` addresses. The certificate must be unexpired on every
request (not only at the TLS handshake of a kept-alive connection), and not
revoked or retired, nor the one it was renewed from, nor its vehicle. The
first request with a renewed certificate retires the one it was renewed
from (:func:`server.identities.retire_parent`). A certificate of an
operator's CA (``client_ca_bundle``) that a registered vehicle presents for
the first time is recorded then
(:func:`server.identities.record_seen_certificate`), so that it can be
listed and revoked like the device CA's; one of the device CA without a row
(a database restored from before it was issued, another server sharing the
CA) is refused, never recorded (:class:`FirstSeenIssuers`). Whatever is
wrong (no certificate, another VIN, an unknown VIN, a revoked one), the
answer is the same 403, so nobody learns which VINs exist. ``vehicle_identity = "none"`` turns the check off, for plain-HTTP
development on loopback only.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import msgspec
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import and_, bindparam
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from server.accounts import authenticate
from server.api.boundary import ApiError, read_body, url_vin, vehicle_work
from server.api.context import ENGINE
from server.certificates import CertificateError, certificate_key, issuer_key, vin_of
from server.config import ConfigError, ServerConfig, VehicleAccess, VehicleIdentityMode
from server.db import Vehicle, VehicleCertificate, as_utc
from server.identities import MAX_SERIAL_HEX, record_seen_certificate, retire_parent
from server.roles import Operator, Permission
from server.web_sessions import (
    DASHBOARD_PREFIX,
    SESSION_COOKIE,
    WebSession,
    csrf_matches,
    operator_of_session,
)
from signing.names import InvalidNameError

log = logging.getLogger("server.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Audience(enum.Enum):
    PUBLIC = "public"
    VEHICLE = "vehicle"


Access = Audience | Permission


@dataclass(frozen=True)
class Route:
    """One route: method, path, handler, who may call it, and what it is for (OpenAPI).

    ``body`` and ``query`` are the Structs its handler reads the request body and the
    query parameters as; ``response`` the Struct of its JSON answer, where declared
    (:mod:`server.api.openapi` documents all three).
    """

    method: str
    path: str
    handler: Handler
    access: Access
    summary: str
    body: type[msgspec.Struct] | None = None
    query: type[msgspec.Struct] | None = None
    response: type[msgspec.Struct] | None = None


ROUTE_TABLE: web.AppKey[dict[tuple[str, str], Route]] = web.AppKey("route_table", dict)
VEHICLE_ACCESS: web.AppKey[VehicleAccess] = web.AppKey("vehicle_access", VehicleAccess)
_OPERATOR = "uptake.operator"
_WEB_SESSION = "uptake.web_session"
#: The form field (or header) a dashboard POST carries its session's CSRF token in.
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
_VEHICLE = "uptake.vehicle"
_CERTIFICATE = "uptake.vehicle_certificate"
#: The one answer to every vehicle whose identity does not fit the request.
NOT_THIS_VEHICLE = "a valid, unrevoked client certificate of this vehicle is required"
PROXY_CERT_HEADER = "X-Client-Cert"
PROXY_VERIFY_HEADER = "X-Client-Verify"


def operator_of(request: web.Request) -> Operator:
    """The operator the middleware authenticated for this request."""
    operator = request.get(_OPERATOR)
    if not isinstance(operator, Operator):
        raise ApiError(401, "this route needs an operator token")
    return operator


def operator_from_request(request: web.Request) -> Operator | None:
    """The operator the middleware authenticated, or None (a public route, a vehicle)."""
    operator = request.get(_OPERATOR)
    return operator if isinstance(operator, Operator) else None


def web_session_of(request: web.Request) -> WebSession | None:
    """The dashboard session this request came with (None: a bearer token, or nobody)."""
    found = request.get(_WEB_SESSION)
    return found if isinstance(found, WebSession) else None


def actor_of(request: web.Request) -> str:
    """Who is asking, as the audit log names it."""
    operator = request.get(_OPERATOR)
    if isinstance(operator, Operator):
        return f"operator:{operator.name}"
    vin = request.get(_VEHICLE)
    return f"vehicle:{vin}" if isinstance(vin, str) else "anonymous"


def _route_of(request: web.Request) -> Route | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    # build_app registers HEAD with every GET route: it has the GET route's access
    method = "GET" if request.method == "HEAD" else request.method
    return request.app[ROUTE_TABLE].get((method, resource.canonical))


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""


@dataclass(frozen=True)
class PresentedIdentity:
    """What a verified vehicle certificate says: its VIN ("" if none readable) and its key in
    the fleet database (serial, issuer)."""

    vin: str
    key: tuple[str, str]
    not_after: datetime.datetime


@functools.lru_cache(maxsize=4096)
def _identity_of_der(der: bytes) -> PresentedIdentity:
    """Parsed once per certificate, not once per request (vehicles reuse connections)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        vin = vin_of(cert)
    except CertificateError:
        vin = ""
    return PresentedIdentity(vin, certificate_key(cert), cert.not_valid_after_utc)


def _peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate (DER) this server's TLS verified (None without TLS or one)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    return ssl_object.getpeercert(binary_form=True) or None


def _proxied_certificate(request: web.Request) -> bytes | None:
    """The certificate (DER) a trusted proxy verified ($ssl_client_escaped_cert), else None."""
    if request.headers.get(PROXY_VERIFY_HEADER) != "SUCCESS":
        return None
    escaped = request.headers.get(PROXY_CERT_HEADER, "")
    if not escaped or len(escaped) > 32768:
        return None
    try:
        cert = x509.load_pem_x509_certificate(unquote(escaped).encode())
    except ValueError:
        return None
    return cert.public_bytes(serialization.Encoding.DER)


def presented_identity(request: web.Request) -> PresentedIdentity | None:
    """The vehicle certificate of this request, verified by this server's TLS or a trusted proxy."""
    access = request.app[VEHICLE_ACCESS]
    der = None
    if access.mode is VehicleIdentityMode.TLS:
        der = _peer_certificate(request)
    elif access.mode is VehicleIdentityMode.PROXY and access.from_trusted_proxy(request.remote):
        der = _proxied_certificate(request)
    # a header from anyone else is ignored
    return _identity_of_der(der) if der else None


@dataclass(frozen=True)
class FirstSeenIssuers:
    """Whose certificates without a row are recorded on first use (else refused).

    ``bundle``: SHA-256 of the subject names of ``client_ca_bundle``'s CAs (None: no bundle
    configured, a trusted proxy verifies against its own). ``device_ca``: this server's device
    CA, never: each of its certificates got its row when issued.
    """

    bundle: frozenset[str] | None = None
    device_ca: str = ""

    def may_record(self, issuer: str) -> bool:
        return issuer != self.device_ca and (self.bundle is None or issuer in self.bundle)

    @classmethod
    def of(cls, config: ServerConfig) -> FirstSeenIssuers:
        def subjects(path: Path) -> frozenset[str]:
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"CA certificates {path}: {exc}") from exc
            return frozenset(issuer_key(c.subject) for c in certs)

        device = config.device_ca_cert
        device_ca = min(subjects(device)) if device.exists() else ""
        bundle = subjects(config.path(config.client_ca_bundle)) if config.client_ca_bundle else None
        return cls(bundle, device_ca)


FIRST_SEEN_ISSUERS: web.AppKey[FirstSeenIssuers] = web.AppKey(
    "first_seen_issuers", FirstSeenIssuers
)


class IdentityCheck(enum.StrEnum):
    """What the database said of a presented vehicle certificate."""

    REFUSED = "refused"
    ALLOWED = "allowed"
    #: allowed, and it was the first use of a renewal: its parent was retired
    RETIRED_PARENT = "retired-parent"


# A vehicle's identity check, built once: building this statement (two outer joins, one of
# them through an alias) cost more CPU than the database's answer (profiled on PostgreSQL).
_PARENT = aliased(VehicleCertificate)
_IDENTITY_ROW = (
    select(Vehicle.revoked_at, VehicleCertificate, _PARENT.revoked_at, _PARENT.not_after)
    .select_from(Vehicle)
    .outerjoin(
        VehicleCertificate,
        and_(
            col(VehicleCertificate.serial) == bindparam("serial"),
            col(VehicleCertificate.issuer_sha256) == bindparam("issuer"),
        ),
    )
    .outerjoin(
        _PARENT,
        and_(
            col(_PARENT.serial) == col(VehicleCertificate.renewed_from_serial),
            col(_PARENT.issuer_sha256) == col(VehicleCertificate.renewed_from_issuer),
        ),
    )
    .where(col(Vehicle.vin) == bindparam("vin"))
)


def _vehicle_allowed(
    session: Session, identity: PresentedIdentity, issuers: FirstSeenIssuers
) -> IdentityCheck:
    """The vehicle exists and is not revoked, nor this certificate (nor expired or retired), nor
    the one it was renewed from (one query). A certificate without a row is recorded if its
    issuer may be (:class:`FirstSeenIssuers`), else refused. A renewed certificate's first use
    retires its parent."""
    serial, issuer = identity.key
    if len(serial) > MAX_SERIAL_HEX:  # no row could name it (RFC 5280: at most 20 octets)
        return IdentityCheck.REFUSED
    row = session.exec(
        _IDENTITY_ROW, params={"vin": identity.vin, "serial": serial, "issuer": issuer}
    ).first()
    if row is None:
        return IdentityCheck.REFUSED
    vehicle_revoked, certificate, parent_revoked, parent_until = row
    if vehicle_revoked is not None or parent_revoked is not None:
        return IdentityCheck.REFUSED
    if certificate is None:
        if not issuers.may_record(issuer):
            return IdentityCheck.REFUSED
        try:
            record_seen_certificate(session, identity.vin, identity.key, identity.not_after)
            session.commit()
        except IntegrityError:  # recorded meanwhile by a concurrent request: check that row
            session.rollback()
            return _vehicle_allowed(session, identity, issuers)
        return IdentityCheck.ALLOWED
    now = datetime.datetime.now(datetime.UTC)
    if (
        certificate.revoked_at is not None
        or certificate.vin != identity.vin
        or as_utc(certificate.not_after) <= now  # expired, or retired
    ):
        return IdentityCheck.REFUSED
    if parent_until is not None and as_utc(parent_until) > now:
        try:
            retire_parent(session, identity.vin, identity.key)
            session.commit()
        except IntegrityError:  # retired meanwhile by a concurrent first use
            session.rollback()
        return IdentityCheck.RETIRED_PARENT
    return IdentityCheck.ALLOWED


class AllowedIdentities:
    """Vehicle identities the database allowed in the last :data:`IDENTITY_CACHE_SECONDS`.

    A vehicle polls over and over with the same certificate; asking the database
    each time whether it is revoked made the idle poll a database round trip.
    Only allowed identities are remembered, each for a few seconds: a revocation
    made through this process is effective at once (:meth:`forget`, for that
    vehicle only), one made through another replica within
    :data:`IDENTITY_CACHE_SECONDS`.

    A check reads the database in a thread while a revocation may commit and
    :meth:`forget`: what the check saw is remembered only if nothing was
    forgotten since it began (take :meth:`generation` before, pass it to
    :meth:`remember`), so a revoked certificate is never remembered as allowed.
    """

    def __init__(self, seconds: float = 0.0, max_entries: int = 100_000) -> None:
        self.seconds = seconds
        self._max_entries = max_entries
        self._until: dict[str, dict[PresentedIdentity, float]] = {}
        self._entries = 0
        self._generation = 0

    def allowed(self, identity: PresentedIdentity) -> bool:
        until = self._until.get(identity.vin, {}).get(identity)
        return until is not None and until > time.monotonic()

    def generation(self) -> int:
        """Changes with every :meth:`forget`: take it before a database check."""
        return self._generation

    def remember(self, identity: PresentedIdentity, generation: int) -> None:
        """Remember what a check begun at ``generation`` allowed, unless forgotten since."""
        if self.seconds <= 0 or generation != self._generation:
            return
        if self._entries >= self._max_entries:  # bounded: start again rather than grow
            self._until.clear()
            self._entries = 0
        of_vehicle = self._until.setdefault(identity.vin, {})
        self._entries += identity not in of_vehicle
        of_vehicle[identity] = time.monotonic() + self.seconds

    def forget(self, vin: str) -> None:
        """After a revocation (or renewal) for ``vin``: its identities are checked again, and no
        check in flight is remembered."""
        self._generation += 1
        self._entries -= len(self._until.pop(vin, {}))


#: how long one process reuses a vehicle identity check (see :class:`AllowedIdentities`)
IDENTITY_CACHE_SECONDS = 5.0
ALLOWED_IDENTITIES: web.AppKey[AllowedIdentities] = web.AppKey(
    "allowed_identities", AllowedIdentities
)


async def _identify_vehicle(request: web.Request, vin: str | None) -> str:
    """The VIN of the certificate presented, if it may act for ``vin`` (any vehicle if None)."""
    identity = presented_identity(request)
    if identity is None or not identity.vin or (vin is not None and identity.vin != vin):
        raise ApiError(403, NOT_THIS_VEHICLE)
    if identity.not_after <= datetime.datetime.now(datetime.UTC):  # a kept-alive connection
        raise ApiError(403, NOT_THIS_VEHICLE)
    cache = request.app[ALLOWED_IDENTITIES]
    if cache.allowed(identity):
        request[_CERTIFICATE] = identity.key
        return identity.vin
    engine, issuers = request.app[ENGINE], request.app[FIRST_SEEN_ISSUERS]

    def check() -> IdentityCheck:
        with Session(engine) as session:
            return _vehicle_allowed(session, identity, issuers)

    generation = cache.generation()
    verdict = await vehicle_work(request, check)
    if verdict is IdentityCheck.REFUSED:
        raise ApiError(403, NOT_THIS_VEHICLE)
    if verdict is IdentityCheck.RETIRED_PARENT:
        cache.forget(identity.vin)  # the parent may be remembered as allowed
    cache.remember(identity, generation)
    request[_CERTIFICATE] = identity.key
    return identity.vin


def vehicle_certificate_of(request: web.Request) -> tuple[str, str] | None:
    """(serial, issuer) of the vehicle certificate the middleware accepted for this request."""
    key = request.get(_CERTIFICATE)
    return key if isinstance(key, tuple) else None


async def _authenticate_operator(request: web.Request) -> Operator | None:
    token = _bearer(request)
    if not token:
        return None
    engine = request.app[ENGINE]

    def lookup() -> Operator | None:
        with Session(engine) as session:
            return authenticate(session, token)

    return await asyncio.to_thread(lookup)


async def session_of_cookie(request: web.Request) -> WebSession | None:
    """The dashboard session of the request's cookie (None: no cookie, or not a live one)."""
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not cookie:
        return None
    engine = request.app[ENGINE]

    def lookup() -> WebSession | None:
        with Session(engine) as session:
            return operator_of_session(session, cookie)

    return await asyncio.to_thread(lookup)


def _same_origin(request: web.Request, origin: str) -> bool:
    scheme, _, host = origin.partition("://")
    return scheme in ("http", "https") and host == request.host


#: Largest form a dashboard page posts (a login, an action with a reason).
MAX_FORM_BYTES = 16 * 1024
_FORM = "uptake.form"


async def form_of(request: web.Request) -> dict[str, str]:
    """The request's HTML form (``application/x-www-form-urlencoded``), read once and bounded.

    Not aiohttp's ``request.post()``, which would buffer a body up to the server's
    upload limit; anyone may post the login form.
    """
    cached = request.get(_FORM)
    if isinstance(cached, dict):
        return cached
    if request.content_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "a dashboard form is application/x-www-form-urlencoded")
    body = await read_body(request, MAX_FORM_BYTES, "form")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the form is not URL-encoded text: {exc}") from exc
    form = dict(pairs)  # a repeated field: the last one counts
    request[_FORM] = form
    return form


async def check_csrf(request: web.Request, web_session: WebSession) -> None:
    """A browser's POST must come from a dashboard page of this server (see module docstring)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        raise ApiError(403, f"CSRF check failed: a {fetch_site} request may not act")
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(request, origin):
        raise ApiError(403, "CSRF check failed: the request comes from another origin")
    presented = request.headers.get(CSRF_HEADER)
    if presented is None and request.content_type == "application/x-www-form-urlencoded":
        presented = (await form_of(request)).get(CSRF_FIELD)
    if not csrf_matches(web_session.csrf_token, presented):
        raise ApiError(
            403, "CSRF check failed: the form's token is missing or stale; reload the page"
        )


async def _check_vehicle_route(request: web.Request, route: Route) -> None:
    access = request.app[VEHICLE_ACCESS]
    if access.mode is VehicleIdentityMode.NONE:
        return
    if "{vin}" in route.path:
        try:
            vin = url_vin(request)
        except InvalidNameError as exc:
            raise ApiError(403, NOT_THIS_VEHICLE) from exc
        request[_VEHICLE] = await _identify_vehicle(request, vin)
        return
    # image downloads: any vehicle, or an operator who may read releases
    operator = await _authenticate_operator(request)
    if operator is not None and operator.may(Permission.READ_RELEASES):
        request[_OPERATOR] = operator
        return
    request[_VEHICLE] = await _identify_vehicle(request, None)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Enforce the route's :data:`Access` (see module docstring)."""
    route = _route_of(request)
    if route is None:
        if request.match_info.http_exception is not None:
            return await handler(request)  # no such route (404) or method (405): aiohttp's answer
        # a route registered outside the route table declares no access: refused, not public
        raise ApiError(403, "this route declares no access in the route table")
    if route.access is Audience.PUBLIC:
        return await handler(request)
    if route.access is Audience.VEHICLE:
        if (
            route.path.startswith("/image/")
            and not request.app[VEHICLE_ACCESS].images_require_client_cert
        ):
            return await handler(request)
        await _check_vehicle_route(request, route)
        return await handler(request)
    assert isinstance(route.access, Permission)
    operator = await _authenticate_operator(request)
    if operator is None and route.path.startswith(DASHBOARD_PREFIX) and not _bearer(request):
        web_session = await session_of_cookie(request)
        if web_session is not None:
            request[_WEB_SESSION] = web_session
            operator = web_session.operator
            if request.method not in ("GET", "HEAD"):
                await check_csrf(request, web_session)
    if operator is None:
        raise ApiError(
            401, "missing, unknown, expired or revoked token (Authorization: Bearer TOKEN)"
        )
    if not operator.may(route.access):
        raise ApiError(
            403, f"the {operator.role.value} role of token {operator.name!r} may not "
            f"{route.access.value.replace('-', ' ')}",
        )  # fmt: skip
    request[_OPERATOR] = operator
    return await handler(request)


def canonical_path(path: str) -> str:
    """``/image/targets/{path:.+}`` → ``/image/targets/{path}``, as aiohttp names a resource."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def route_table(routes: Sequence[Route]) -> dict[tuple[str, str], Route]:
    table: dict[tuple[str, str], Route] = {}
    for route in routes:
        key = (route.method, canonical_path(route.path))
        if key in table:
            raise ValueError(f"route {route.method} {route.path} declared twice")
        table[key] = route
    return table
