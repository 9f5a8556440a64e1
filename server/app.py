"""The HTTP API (aiohttp).

Public, read-only (what vehicles and CDNs fetch)::

    GET  /health
    GET  /image/metadata/{file}            N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    GET  /image/targets/{path}             images, as <dir>/<sha256>.<name> (Range supported)
    GET  /director/{vin}/metadata/{file}   the vehicle's director repository
    GET  /director/{vin}/targets/{path}    images encrypted per ECU, SERIAL/<dir>/<sha256>.<name>

Vehicles (authenticated by their signatures)::

    POST /api/v1/vehicles/{vin}/manifest   signed vehicle version manifest

Administration (``Authorization: Bearer <DATA/admin-token>``)::

    POST /api/v1/vehicles                  register a vehicle and its ECU keys
                                           (optional per ECU "encryption_key", and "encrypt_images")
    GET  /api/v1/vehicles/{vin}            what the server knows of a vehicle
    POST /api/v1/vehicles/{vin}/assignments {"ecu_serial", "filepath"}
    GET  /api/v1/images                    published images
    GET  /api/v1/deltas                    published deltas and delta jobs
    PUT  /api/v1/image/uploads/{sha256}    stage image bytes before publishing
    POST /api/v1/image/targets             offline-signed image targets metadata

Every error is a JSON body ``{"error": {"status": ..., "message": ...}}``
with a 4xx status for bad requests; blocking work (database, signing) runs
in a thread so one slow request never stalls the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.config import ServerConfig
from server.deltas import DeltaPublisher
from server.director import DirectorRepository
from server.fleet import (
    EcuRegistration,
    FleetError,
    assign,
    process_manifest,
    register_vehicle,
    vehicle_record,
)
from server.image_repository import ImageRepository, ImageRepositoryError
from signing.metadata import image_custom

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 4 * 1024**3
_VIN_RE = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_SERIAL_RE = _VIN_RE

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
IMAGE_REPO: web.AppKey[ImageRepository] = web.AppKey("image_repo", ImageRepository)
DIRECTOR: web.AppKey[DirectorRepository] = web.AppKey("director", DirectorRepository)
ADMIN_TOKEN: web.AppKey[str] = web.AppKey("admin_token", str)
DELTAS: web.AppKey[DeltaPublisher] = web.AppKey("deltas", DeltaPublisher)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, FleetError) as exc:
        return _error(exc.status, str(exc))
    except ImageRepositoryError as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error(500, "internal error (logged on the server)")


def _require_admin(request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    token = header.removeprefix("Bearer ").strip()
    # compare bytes: compare_digest refuses non-ASCII str, and the header is the client's choice
    if not token or not hmac.compare_digest(
        token.encode(errors="replace"), request.app[ADMIN_TOKEN].encode()
    ):
        raise ApiError(
            401, "missing or wrong admin token (Authorization: Bearer <DATA/admin-token>)"
        )


def _vin(request: web.Request) -> str:
    vin = request.match_info["vin"]
    if not _VIN_RE.match(vin):
        raise ApiError(400, "VIN must be 1-128 letters, digits, '.', '_' or '-'")
    return vin


async def _read_body(request: web.Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"{what} larger than {limit} bytes")
    # content.read(n) returns what has arrived so far, not n bytes: read to the end
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: web.Request, limit: int = 1024 * 1024) -> Any:
    body = await _read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc


def _field(obj: Any, name: str, typ: type, where: str = "") -> Any:
    if not isinstance(obj, dict):
        raise ApiError(400, f"{where or 'body'} must be a JSON object")
    value = obj.get(name)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ApiError(400, f"{where + '.' if where else ''}{name} must be a {typ.__name__}")
    return value


async def _in_session(request: web.Request, fn: Callable[[Session], Any]) -> Any:
    engine = request.app[ENGINE]

    def run() -> Any:
        with Session(engine) as session:
            result = fn(session)
            session.commit()
            return result

    return await asyncio.to_thread(run)


# -- public -------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def image_metadata(request: web.Request) -> web.StreamResponse:
    path = request.app[IMAGE_REPO].metadata_path(request.match_info["file"])
    if path is None:
        raise ApiError(404, f"no image repository metadata {request.match_info['file']!r}")
    return web.FileResponse(
        path, headers={"Cache-Control": "no-cache", "Content-Type": "application/json"}
    )


async def image_target(request: web.Request) -> web.StreamResponse:
    path = request.app[IMAGE_REPO].target_path(request.match_info["path"])
    if path is None:
        raise ApiError(404, f"no image {request.match_info['path']!r}")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def director_target(request: web.Request) -> web.StreamResponse:
    vin = _vin(request)
    path = request.app[DIRECTOR].encrypted_image_path(vin, request.match_info["path"])
    if path is None:
        raise ApiError(404, f"no encrypted image {request.match_info['path']!r} for vehicle {vin}")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def director_metadata(request: web.Request) -> web.Response:
    vin, filename = _vin(request), request.match_info["file"]
    director = request.app[DIRECTOR]
    data = await _in_session(request, lambda s: director.metadata(s, vin, filename))
    if data is None:
        raise ApiError(404, f"no director metadata {filename!r} for vehicle {vin}")
    return web.Response(
        body=data, content_type="application/json", headers={"Cache-Control": "no-cache"}
    )


# -- vehicles -------------------------------------------------------------------


async def upload_manifest(request: web.Request) -> web.Response:
    vin = _vin(request)
    body = await _read_body(request, 1024 * 1024, "manifest")
    director, engine = request.app[DIRECTOR], request.app[ENGINE]

    def run() -> Any:
        with Session(engine) as session:
            return process_manifest(session, director, vin, body)

    result = await asyncio.to_thread(run)
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(result)


# -- administration ---------------------------------------------------------------


async def add_vehicle(request: web.Request) -> web.Response:
    _require_admin(request)
    body = await _json_body(request)
    vin = _field(body, "vin", str)
    if not _VIN_RE.match(vin):
        raise ApiError(400, "vin must be 1-128 letters, digits, '.', '_' or '-'")
    primary = _field(body, "primary_ecu_serial", str)
    ecus_raw = _field(body, "ecus", list)
    if not ecus_raw or len(ecus_raw) > 256:
        raise ApiError(400, "ecus must list 1 to 256 ECUs")
    ecus = []
    for i, e in enumerate(ecus_raw):
        where = f"ecus[{i}]"
        serial = _field(e, "serial", str, where)
        if not _SERIAL_RE.match(serial):
            raise ApiError(400, f"{where}.serial must be 1-128 letters, digits, '.', '_' or '-'")
        hw = _field(e, "hardware_id", str, where)
        if not _SERIAL_RE.match(hw):
            raise ApiError(
                400, f"{where}.hardware_id must be 1-128 letters, digits, '.', '_' or '-'"
            )
        enc = e.get("encryption_key", "")
        if not isinstance(enc, str):
            raise ApiError(400, f"{where}.encryption_key must be a string (X25519 public key, hex)")
        ecus.append(
            EcuRegistration(serial, hw, _field(e, "public_key", dict, where), encryption_key=enc)
        )
    encrypt = body.get("encrypt_images", False)
    if not isinstance(encrypt, bool):
        raise ApiError(400, "encrypt_images must be true or false")
    director = request.app[DIRECTOR]
    await _in_session(
        request, lambda s: register_vehicle(s, director, vin, primary, ecus, encrypt_images=encrypt)
    )
    director.invalidate(vin)
    return web.json_response({"registered": vin}, status=201)


async def get_vehicle(request: web.Request) -> web.Response:
    _require_admin(request)
    vin = _vin(request)
    return web.json_response(await _in_session(request, lambda s: vehicle_record(s, vin)))


async def add_assignment(request: web.Request) -> web.Response:
    _require_admin(request)
    vin = _vin(request)
    body = await _json_body(request)
    serial, filepath = _field(body, "ecu_serial", str), _field(body, "filepath", str)
    director, image_repo = request.app[DIRECTOR], request.app[IMAGE_REPO]
    row = await _in_session(
        request,
        lambda s: assign(s, director, image_repo, vin, serial, filepath).model_dump(mode="json"),
    )
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(row, status=201)


async def list_images(request: web.Request) -> web.Response:
    _require_admin(request)

    images = []
    for path, target in sorted(request.app[IMAGE_REPO].targets.signed.targets.items()):
        custom = image_custom(target)
        images.append(
            {
                "filepath": path,
                "hardware_ids": list(custom.hardware_ids),
                "version": custom.version,
                "release_counter": custom.release_counter,
                "length": target.length,
                "sha256": target.hashes["sha256"],
            }
        )
    return web.json_response(images)


async def upload_image(request: web.Request) -> web.Response:
    _require_admin(request)
    sha256 = request.match_info["sha256"]
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"image larger than {MAX_UPLOAD_BYTES} bytes")
    length = await request.app[IMAGE_REPO].store_upload(
        sha256, request.content.iter_chunked(1024 * 1024), MAX_UPLOAD_BYTES
    )
    return web.json_response({"sha256": sha256, "length": length}, status=201)


async def publish_targets(request: web.Request) -> web.Response:
    _require_admin(request)
    data = await _read_body(request, 5_000_000, "targets metadata")
    image_repo = request.app[IMAGE_REPO]
    before = set(image_repo.targets.signed.targets)
    md = await asyncio.to_thread(image_repo.accept_targets, data)
    await request.app[DELTAS].on_published(sorted(set(md.signed.targets) - before))
    return web.json_response(
        {"targets_version": md.signed.version, "targets": sorted(md.signed.targets)}, status=201
    )


async def list_deltas(request: web.Request) -> web.Response:
    _require_admin(request)
    repo = request.app[IMAGE_REPO]
    published = []
    if repo.deltas is not None:
        for path, target in sorted(repo.deltas.signed.targets.items()):
            published.append({"filepath": path, "length": target.length, "custom": target.custom})
    jobs = [job.to_dict() for job in request.app[DELTAS].jobs.values()]
    return web.json_response({"published": published, "jobs": jobs})


async def _refresh_online_metadata(app: web.Application) -> None:
    """Keep timestamps/snapshots fresh even when nothing is published."""
    while True:
        try:
            await asyncio.to_thread(app[IMAGE_REPO].refresh_online_metadata)
        except Exception:
            log.exception("could not refresh image repository online metadata")
        await asyncio.sleep(600)


async def _background(app: web.Application) -> Any:
    tasks = [
        asyncio.create_task(_refresh_online_metadata(app)),
        asyncio.create_task(app[DELTAS].run()),
    ]
    yield
    for task in tasks:
        task.cancel()


def build_app(
    config: ServerConfig,
    engine: Engine,
    image_repo: ImageRepository,
    director: DirectorRepository,
    admin_token: str,
) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_UPLOAD_BYTES)
    app[ENGINE], app[IMAGE_REPO], app[DIRECTOR], app[ADMIN_TOKEN] = (
        engine,
        image_repo,
        director,
        admin_token,
    )
    app[DELTAS] = DeltaPublisher(image_repo, engine, config.data_dir / "delta-work")
    app.router.add_get("/health", health)
    app.router.add_get("/image/metadata/{file}", image_metadata)
    app.router.add_get("/image/targets/{path:.+}", image_target)
    app.router.add_get("/director/{vin}/metadata/{file}", director_metadata)
    app.router.add_get("/director/{vin}/targets/{path:.+}", director_target)
    app.router.add_post("/api/v1/vehicles/{vin}/manifest", upload_manifest)
    app.router.add_post("/api/v1/vehicles", add_vehicle)
    app.router.add_get("/api/v1/vehicles/{vin}", get_vehicle)
    app.router.add_post("/api/v1/vehicles/{vin}/assignments", add_assignment)
    app.router.add_get("/api/v1/images", list_images)
    app.router.add_put("/api/v1/image/uploads/{sha256}", upload_image)
    app.router.add_post("/api/v1/image/targets", publish_targets)
    app.router.add_get("/api/v1/deltas", list_deltas)
    app.cleanup_ctx.append(_background)
    return app
