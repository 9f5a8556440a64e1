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
  without the permission 403.

A vehicle's identity is the VIN of its TLS client certificate
(:func:`server.certificates.vin_of`), read from this server's own TLS
connection, or, behind a proxy that terminates TLS (nginx), from the
verified certificate the proxy passes in ``X-Client-Cert`` with
``X-Client-Verify: SUCCESS``, believed only from the configured
``trusted_proxies`` addresses. The certificate must not be revoked, nor
its vehicle. Whatever is wrong (no certificate, another VIN, an unknown
VIN, a revoked one), the answer is the same 403, so nobody learns which
VINs exist. ``vehicle_identity = "none"`` turns the check off, for plain-HTTP
development on loopback only.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import msgspec
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import and_
from sqlmodel import Session, col, select

from server.accounts import authenticate
from server.api.boundary import ApiError, url_vin
from server.api.context import ENGINE
from server.certificates import CertificateError, certificate_key, vin_of
from server.config import VehicleAccess, VehicleIdentityMode
from server.db import Vehicle, VehicleCertificate
from server.roles import Operator, Permission
from signing.names import InvalidNameError

log = logging.getLogger("server.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Audience(enum.Enum):
    PUBLIC = "public"
    VEHICLE = "vehicle"


Access = Audience | Permission


@dataclass(frozen=True)
class Route:
    """One route: method, path, handler, who may call it, and what it is for (OpenAPI)."""

    method: str
    path: str
    handler: Handler
    access: Access
    summary: str
    body: type[msgspec.Struct] | None = None


ROUTE_TABLE: web.AppKey[dict[tuple[str, str], Route]] = web.AppKey("route_table", dict)
VEHICLE_ACCESS: web.AppKey[VehicleAccess] = web.AppKey("vehicle_access", VehicleAccess)
_OPERATOR = "uptake.operator"
_VEHICLE = "uptake.vehicle"
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
    method = "GET" if request.method == "HEAD" else request.method  # aiohttp serves HEAD for GET
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


@functools.lru_cache(maxsize=4096)
def _identity_of_der(der: bytes) -> PresentedIdentity:
    """Parsed once per certificate, not once per request (vehicles reuse connections)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        vin = vin_of(cert)
    except CertificateError:
        vin = ""
    return PresentedIdentity(vin, certificate_key(cert))


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


def _vehicle_allowed(session: Session, identity: PresentedIdentity) -> bool:
    """The vehicle exists, is not revoked, and this certificate of it is not revoked (one query)."""
    serial, issuer = identity.key
    row = session.exec(
        select(Vehicle.revoked_at, VehicleCertificate.revoked_at, VehicleCertificate.vin)
        .select_from(Vehicle)
        .outerjoin(
            VehicleCertificate,
            and_(
                col(VehicleCertificate.serial) == serial,
                col(VehicleCertificate.issuer_sha256) == issuer,
            ),
        )
        .where(col(Vehicle.vin) == identity.vin)
    ).first()
    if row is None:
        return False
    vehicle_revoked, certificate_revoked, certified_vin = row
    if vehicle_revoked is not None or certificate_revoked is not None:
        return False
    return certified_vin is None or certified_vin == identity.vin


async def _identify_vehicle(request: web.Request, vin: str | None) -> str:
    """The VIN of the certificate presented, if it may act for ``vin`` (any vehicle if None)."""
    identity = presented_identity(request)
    if identity is None or not identity.vin or (vin is not None and identity.vin != vin):
        raise ApiError(403, NOT_THIS_VEHICLE)
    engine = request.app[ENGINE]

    def check() -> bool:
        with Session(engine) as session:
            return _vehicle_allowed(session, identity)

    if not await asyncio.to_thread(check):
        raise ApiError(403, NOT_THIS_VEHICLE)
    return identity.vin


async def _authenticate_operator(request: web.Request) -> Operator | None:
    token = _bearer(request)
    if not token:
        return None
    engine = request.app[ENGINE]

    def lookup() -> Operator | None:
        with Session(engine) as session:
            return authenticate(session, token)

    return await asyncio.to_thread(lookup)


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
    if route is None or route.access is Audience.PUBLIC:
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
