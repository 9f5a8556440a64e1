"""Routes vehicles (and CDNs) call: repositories' metadata and images, manifests, certificates."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web
from sqlmodel import Session

from server.api.access import (
    ALLOWED_IDENTITIES,
    NOT_THIS_VEHICLE,
    Audience,
    Route,
    actor_of,
    vehicle_certificate_of,
)
from server.api.boundary import (
    ApiError,
    in_session,
    json_body,
    read_body,
    url_name,
    url_vin,
    vehicle_work,
)
from server.api.context import (
    DELTAS,
    DIRECTOR,
    ENGINE,
    IMAGE_REPO,
    ISSUER,
    REJECTIONS,
    TIMESTAMP_VERSIONS,
)
from server.api.schemas import CertificateRequest
from server.campaigns import on_manifest
from server.fleet import STATE_CHANGED, FleetError, RejectionRateLimitedError, process_manifest
from server.identities import issue_certificate
from server.metrics import MANIFESTS, count_poll, log_event
from server.timestamp_versions import TimestampVersionsUnavailable
from signing.manifest import MAX_MANIFEST_BYTES
from signing.names import check_name, check_sha256, check_target_path

#: how a refused manifest is counted (uptake_manifests_total{outcome})
_REFUSALS: dict[type[FleetError], str] = {RejectionRateLimitedError: "rate-limited"}
_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


async def image_metadata(request: web.Request) -> web.StreamResponse:
    name = url_name(request, "file")
    path = request.app[IMAGE_REPO].metadata_path(name)
    if path is None:
        raise ApiError(404, f"no image repository metadata {name!r}")
    return web.FileResponse(
        path, headers={"Cache-Control": "no-cache", "Content-Type": "application/json"}
    )


async def image_target(request: web.Request) -> web.StreamResponse:
    # looked up among the published files, never turned into a path (ImageRepository.target_path)
    name = request.match_info["path"]
    path = request.app[IMAGE_REPO].target_path(name)
    if path is None:
        raise ApiError(404, f"no image or delta {name[:200]!r}")
    return web.FileResponse(path, headers=_IMMUTABLE)


def _encrypted_copy_path(request: web.Request) -> str:
    """``SERIAL/dir/<sha256>.<name>``: an ECU serial, then where an image's copy is served."""
    value = request.match_info["path"]
    serial, _, served = value.partition("/")
    check_name(serial, "URL path: ECU serial")
    directory, slash, filename = served.rpartition("/")
    digest, _, name = filename.partition(".")
    check_sha256(digest, "URL path: digest before the image name")
    check_target_path(directory + slash + name, "URL path: image path")
    return value


async def director_target(request: web.Request) -> web.StreamResponse:
    vin, name = url_vin(request), _encrypted_copy_path(request)
    path = request.app[DIRECTOR].encrypted_image_path(vin, name)
    if path is None:
        raise ApiError(404, f"no encrypted image {name!r} for vehicle {vin}")
    return web.FileResponse(path, headers=_IMMUTABLE)


async def director_metadata(request: web.Request) -> web.Response:
    vin, filename = url_vin(request), url_name(request, "file")
    count_poll(filename)
    director = request.app[DIRECTOR]
    # the idle poll on SQLite: cached signed bytes, no thread and no database (the vehicle's
    # identity was checked by the access middleware); with replicas on PostgreSQL the cached
    # bytes are served only while they are the database's newest version, read in one round
    # trip on the event loop (server.timestamp_versions)
    data = None
    if filename == "timestamp.json":
        data = director.cached_timestamp(vin)
        versions = request.app[TIMESTAMP_VERSIONS]
        if data is None and versions is not None:
            with contextlib.suppress(TimestampVersionsUnavailable):  # then through the ORM
                data = director.cached_timestamp_at(vin, await versions.latest(vin))
    if data is None:
        data = await in_session(request, lambda s: director.metadata(s, vin, filename))
    if data is None:
        raise ApiError(404, f"no director metadata {filename!r} for vehicle {vin}")
    return web.Response(
        body=data, content_type="application/json", headers={"Cache-Control": "no-cache"}
    )


async def upload_manifest(request: web.Request) -> web.Response:
    vin = url_vin(request)
    body = await read_body(request, MAX_MANIFEST_BYTES, "manifest")
    director, engine, limiter = request.app[DIRECTOR], request.app[ENGINE], request.app[REJECTIONS]

    campaigns_moved: list[int] = []  # a campaign may have assigned an image meanwhile

    def run() -> Any:
        with Session(engine) as session:
            return process_manifest(
                session, director, vin, body, limiter,
                after_accept=lambda s, v: campaigns_moved.extend(on_manifest(s, director, v)),
            )  # fmt: skip

    try:
        result = await vehicle_work(request, run)
    except FleetError as exc:
        outcome = _REFUSALS.get(type(exc), "unknown-vehicle" if exc.status == 404 else "rejected")
        MANIFESTS.labels(outcome).inc()
        log_event("manifest", vin=vin, outcome=outcome, status=exc.status, detail=str(exc)[:300])
        raise
    MANIFESTS.labels("accepted").inc()
    log_event("manifest", vin=vin, outcome="accepted", attacks=result["attacks_recorded"])
    if result.pop(STATE_CHANGED) or campaigns_moved:
        director.invalidate(vin)
        await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(result)


async def renew_certificate(request: web.Request) -> web.Response:
    """A new client certificate for a new key, asked for over mutual TLS with the current one."""
    vin = url_vin(request)
    current = vehicle_certificate_of(request)
    if current is None:  # vehicle_identity = "none": nothing to renew from, nothing issued
        raise ApiError(403, NOT_THIS_VEHICLE)
    body = await json_body(request, CertificateRequest)
    issuer, actor = request.app[ISSUER], actor_of(request)
    pem = await in_session(
        request,
        lambda s: issue_certificate(
            s, issuer.ca, vin, body.tls_csr, actor=actor, lifetime=issuer.lifetime,
            renewed_from=current,
        ),
    )  # fmt: skip
    request.app[ALLOWED_IDENTITIES].forget(vin)  # a renewal may revoke an earlier renewal
    return web.json_response({"vin": vin, "tls_certificate": pem}, status=201)


ROUTES = [
    Route(
        "GET", "/image/metadata/{file}", image_metadata, Audience.PUBLIC,
        "Image repository metadata: N.root.json, N.targets.json, N.snapshot.json, "
        "N.deltas.json, timestamp.json",
    ),
    Route(
        "GET", "/image/targets/{path:.+}", image_target, Audience.VEHICLE,
        "An image or delta, as <dir>/<sha256>.<name> (Range supported); needs a vehicle "
        "certificate when images_require_client_cert is set",
    ),
    Route(
        "GET", "/director/{vin}/metadata/{file}", director_metadata, Audience.VEHICLE,
        "The vehicle's director repository (N.root.json, N.targets.json, N.snapshot.json, "
        "timestamp.json)",
    ),
    Route(
        "GET", "/director/{vin}/targets/{path:.+}", director_target, Audience.VEHICLE,
        "An image encrypted for one ECU of the vehicle: SERIAL/<dir>/<sha256>.<name>",
    ),
    Route(
        "POST", "/api/v1/vehicles/{vin}/manifest", upload_manifest, Audience.VEHICLE,
        "Upload a signed vehicle version manifest",
    ),
    Route(
        "POST", "/api/v1/vehicles/{vin}/certificate", renew_certificate, Audience.VEHICLE,
        "Renew the vehicle's client certificate (a CSR for a new key)", CertificateRequest,
    ),
]  # fmt: skip
