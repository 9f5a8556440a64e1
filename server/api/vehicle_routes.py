"""Routes vehicles (and CDNs) call: repositories' metadata and images, manifests, certificates."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from sqlmodel import Session

from server.api.access import Audience, Route, actor_of
from server.api.boundary import (
    ApiError,
    in_session,
    json_body,
    read_body,
    url_name,
    url_vin,
)
from server.api.context import DELTAS, DIRECTOR, ENGINE, IMAGE_REPO, ISSUER, REJECTIONS
from server.api.schemas import CertificateRequest
from server.fleet import process_manifest
from server.identities import issue_certificate
from signing.manifest import MAX_MANIFEST_BYTES
from signing.names import check_name, check_sha256, check_target_path

_IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


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
    director = request.app[DIRECTOR]
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

    def run() -> Any:
        with Session(engine) as session:
            return process_manifest(session, director, vin, body, limiter)

    result = await asyncio.to_thread(run)
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(result)


async def renew_certificate(request: web.Request) -> web.Response:
    """A new client certificate for a new key, asked for over mutual TLS with the current one."""
    vin = url_vin(request)
    body = await json_body(request, CertificateRequest)
    issuer, actor = request.app[ISSUER], actor_of(request)
    pem = await in_session(
        request,
        lambda s: issue_certificate(
            s, issuer.ca, vin, body.tls_csr, actor=actor, lifetime=issuer.lifetime
        ),
    )
    return web.json_response({"vin": vin, "tls_certificate": pem}, status=201)


ROUTES = [
    Route("GET", "/health", health, Audience.PUBLIC, "Liveness: the process answers"),
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
