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
    GET  /api/v1/vehicles/{vin}            what the server knows of a vehicle: its ECUs, and the
                                           latest assignments and security events with their totals
    GET  /api/v1/vehicles/{vin}/assignments         all assignments (paged)
    GET  /api/v1/vehicles/{vin}/events              all security events (paged)
    POST /api/v1/vehicles/{vin}/assignments         {"ecu_serial", "filepath"}
    POST /api/v1/vehicles/{vin}/ecus/{serial}/report-counter/reset   {"reason"} (optional)
    GET  /api/v1/images                    published images (paged)
    GET  /api/v1/deltas                    published deltas and delta jobs (paged)
    PUT  /api/v1/image/uploads/{sha256}    stage image bytes before publishing
    POST /api/v1/image/targets             offline-signed image targets metadata

Lists are paged: ``?limit=N`` (1 to :data:`MAX_PAGE_LIMIT`, default
:data:`DEFAULT_PAGE_LIMIT`) and ``?cursor=C``, where C is the ``next`` of the
previous page (``null`` on the last page).

What comes from outside is checked once, here at the boundary: names in
URLs and bodies against :mod:`signing.names`, JSON with bounded size and depth
(:mod:`signing.json_limits`), bodies against a size limit and a deadline
(``body_timeout``; image uploads against ``upload_idle_timeout`` between
chunks), after which the client gets 408 and the connection is closed. A
client that goes away mid-request costs one log line, not a traceback.

Every error is a JSON body ``{"error": {"status": ..., "message": ...}}``
with a 4xx status; blocking work (database, signing) runs in a thread so
one slow request never stalls the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.config import ServerConfig
from server.deltas import DeltaPublisher
from server.director import DirectorRepository
from server.fleet import (
    EcuRegistration,
    FleetError,
    RejectionLimiter,
    RejectionRateLimitedError,
    assign,
    assignments_page,
    process_manifest,
    register_vehicle,
    reset_report_counter,
    security_events_page,
    vehicle_record,
)
from server.image_repository import ImageRepository, ImageRepositoryError
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.manifest import MAX_MANIFEST_BYTES
from signing.metadata import image_custom
from signing.names import InvalidNameError, check_name, check_sha256, check_target_path

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 4 * 1024**3
#: Largest JSON body of an admin request.
MAX_JSON_BODY = 1024 * 1024
#: Largest targets metadata a release engineer may upload.
MAX_TARGETS_BODY = 5_000_000
#: Most ECUs one vehicle may register.
MAX_ECUS = 256
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 500
_MAX_CURSOR = 1024

_Item = TypeVar("_Item")


@dataclass(frozen=True)
class BodyTimeouts:
    """How long clients may take to send request bodies (:class:`ServerConfig`)."""

    whole_body: float
    upload_idle: float


ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
IMAGE_REPO: web.AppKey[ImageRepository] = web.AppKey("image_repo", ImageRepository)
DIRECTOR: web.AppKey[DirectorRepository] = web.AppKey("director", DirectorRepository)
ADMIN_TOKEN: web.AppKey[str] = web.AppKey("admin_token", str)
DELTAS: web.AppKey[DeltaPublisher] = web.AppKey("deltas", DeltaPublisher)
REJECTIONS: web.AppKey[RejectionLimiter] = web.AppKey("rejections", RejectionLimiter)
TIMEOUTS: web.AppKey[BodyTimeouts] = web.AppKey("timeouts", BodyTimeouts)


class ApiError(UptakeError):
    """A request is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BodyTimeoutError(ApiError):
    """The client did not send its request body in time (408; the connection is closed)."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)


class ClientDisconnectedError(ApiError):
    """The client went away before sending its whole request body (nobody hears the answer)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}}, status=status)


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection at once.

    Otherwise aiohttp would linger, reading the rest of a body that a stalled
    client is not sending.
    """
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # gone meanwhile: closing is all that is left
    request.protocol.force_close()
    return response


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyTimeoutError as exc:
        log.info("%s %s from %s: %s", request.method, request.path, request.remote, exc)
        return await _answer_and_close(request, _error(exc.status, str(exc)))
    except (ClientDisconnectedError, ConnectionError) as exc:
        log.info(
            "%s %s from %s: client went away: %s", request.method, request.path, request.remote, exc
        )
        return _error(400, "client disconnected")
    except RejectionRateLimitedError as exc:
        response = _error(exc.status, str(exc))
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response
    except (ApiError, FleetError) as exc:
        return _error(exc.status, str(exc))
    except (ImageRepositoryError, InvalidNameError, UntrustedJsonError) as exc:
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


# -- the boundary: names, bodies, pages ---------------------------------------------


def _url_name(request: web.Request, param: str) -> str:
    """A name (VIN, ECU serial, file name) from the URL, checked against the grammar."""
    return check_name(request.match_info[param], f"URL {param}")


def _vin(request: web.Request) -> str:
    return _url_name(request, "vin")


def _url_encrypted_copy_path(request: web.Request) -> str:
    """``SERIAL/dir/<sha256>.<name>``: an ECU serial, then where an image's copy is served."""
    value = request.match_info["path"]
    serial, _, served = value.partition("/")
    check_name(serial, "URL path: ECU serial")
    directory, slash, filename = served.rpartition("/")
    digest, _, name = filename.partition(".")
    check_sha256(digest, "URL path: digest before the image name")
    check_target_path(directory + slash + name, "URL path: image path")
    return value


async def _read_body(request: web.Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, refused with 413 past ``limit`` and with 408 past the body deadline."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"{what} larger than {limit} bytes")
    deadline = request.app[TIMEOUTS].whole_body
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline):
            # content.read(n) returns what has arrived so far, not n bytes: read to the end
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"{what} larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BodyTimeoutError(f"{what} not received within {deadline:g} s") from exc
    except ConnectionError as exc:
        raise ClientDisconnectedError(f"{what} cut off after {size} bytes") from exc
    return b"".join(chunks)


async def _idle_limited(
    chunks: AsyncIterator[bytes], idle: float, what: str
) -> AsyncIterator[bytes]:
    """``chunks``, refused with 408 when none arrives for ``idle`` seconds."""
    received = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise BodyTimeoutError(f"{what}: nothing received for {idle:g} s") from exc
        except ConnectionError as exc:
            raise ClientDisconnectedError(f"{what} cut off after {received} bytes") from exc
        received += len(chunk)
        yield chunk


async def _json_body(request: web.Request, limit: int = MAX_JSON_BODY) -> Any:
    body = await _read_body(request, limit)
    return parse_json(body, where="request body", max_bytes=limit)


def _field(obj: Any, name: str, typ: type, where: str = "") -> Any:
    if not isinstance(obj, dict):
        raise ApiError(400, f"{where or 'body'} must be a JSON object")
    value = obj.get(name)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ApiError(400, f"{where + '.' if where else ''}{name} must be a {typ.__name__}")
    return value


def _name_field(obj: Any, name: str, where: str = "") -> str:
    return check_name(_field(obj, name, str, where), f"{where + '.' if where else ''}{name}")


def _encode_cursor(position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).rstrip(b"=").decode()


def _page_query(request: web.Request) -> tuple[int, Any]:
    """``limit`` and the decoded ``cursor`` (None for the first page) of a paged list."""
    text = request.query.get("limit")
    limit = DEFAULT_PAGE_LIMIT
    if text is not None:
        if not (text.isascii() and text.isdigit() and len(text) <= 6) or not (
            1 <= int(text) <= MAX_PAGE_LIMIT
        ):
            raise ApiError(400, f"query limit must be an integer from 1 to {MAX_PAGE_LIMIT}")
        limit = int(text)
    cursor = request.query.get("cursor")
    if cursor is None:
        return limit, None
    try:
        if len(cursor) > _MAX_CURSOR or not cursor.isascii():
            raise ValueError("too long or not ASCII")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return limit, parse_json(raw, where="query cursor", max_bytes=_MAX_CURSOR, max_depth=4)
    except (ValueError, binascii.Error) as exc:
        raise ApiError(400, "query cursor is not a cursor this server gave out") from exc


def _id_cursor(position: Any) -> int | None:
    """A cursor of a list ordered by database id: the last id seen."""
    if position is None:
        return None
    if isinstance(position, int) and not isinstance(position, bool) and position >= 0:
        return position
    raise ApiError(400, "query cursor is not a cursor of this list")


def _key_cursor(position: Any) -> str | None:
    """A cursor of a list ordered by a text key: the last key seen."""
    if position is None or isinstance(position, str):
        return position
    raise ApiError(400, "query cursor is not a cursor of this list")


def _page_by_key(
    items: Sequence[tuple[str, _Item]], after: str | None, limit: int
) -> tuple[list[_Item], str | None, bool]:
    """Up to ``limit`` items whose key is above ``after`` (``items`` sorted by key).

    Returns them, the last key returned (``after`` when none), and whether more follow.
    """
    rest = [(key, item) for key, item in items if after is None or key > after]
    page = rest[:limit]
    last = page[-1][0] if page else after
    return [item for _, item in page], last, len(rest) > limit


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
    name = _url_name(request, "file")
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
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def director_target(request: web.Request) -> web.StreamResponse:
    vin, name = _vin(request), _url_encrypted_copy_path(request)
    path = request.app[DIRECTOR].encrypted_image_path(vin, name)
    if path is None:
        raise ApiError(404, f"no encrypted image {name!r} for vehicle {vin}")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})


async def director_metadata(request: web.Request) -> web.Response:
    vin, filename = _vin(request), _url_name(request, "file")
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
    body = await _read_body(request, MAX_MANIFEST_BYTES, "manifest")
    director, engine, limiter = request.app[DIRECTOR], request.app[ENGINE], request.app[REJECTIONS]

    def run() -> Any:
        with Session(engine) as session:
            return process_manifest(session, director, vin, body, limiter)

    result = await asyncio.to_thread(run)
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(result)


# -- administration ---------------------------------------------------------------


def _registration(body: Any) -> tuple[str, str, list[EcuRegistration], bool]:
    """VIN, primary serial, ECUs and encryption choice of a registration body."""
    vin = _name_field(body, "vin")
    primary = _name_field(body, "primary_ecu_serial")
    ecus_raw = _field(body, "ecus", list)
    if not ecus_raw or len(ecus_raw) > MAX_ECUS:
        raise ApiError(400, f"ecus must list 1 to {MAX_ECUS} ECUs")
    ecus = []
    for i, e in enumerate(ecus_raw):
        where = f"ecus[{i}]"
        serial = _name_field(e, "serial", where)
        hardware_id = _name_field(e, "hardware_id", where)
        enc = e.get("encryption_key", "")
        if not isinstance(enc, str):
            raise ApiError(400, f"{where}.encryption_key must be a string (X25519 public key, hex)")
        public_key = _field(e, "public_key", dict, where)
        ecus.append(EcuRegistration(serial, hardware_id, public_key, encryption_key=enc))
    encrypt = body.get("encrypt_images", False)
    if not isinstance(encrypt, bool):
        raise ApiError(400, "encrypt_images must be true or false")
    return vin, primary, ecus, encrypt


async def add_vehicle(request: web.Request) -> web.Response:
    _require_admin(request)
    vin, primary, ecus, encrypt = _registration(await _json_body(request))
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


async def list_vehicle_events(request: web.Request) -> web.Response:
    _require_admin(request)
    vin = _vin(request)
    limit, position = _page_query(request)
    after = _id_cursor(position)
    events, last = await _in_session(
        request, lambda s: security_events_page(s, vin, after=after, limit=limit)
    )
    return web.json_response(
        {"security_events": events, "next": None if last is None else _encode_cursor(last)}
    )


async def list_vehicle_assignments(request: web.Request) -> web.Response:
    _require_admin(request)
    vin = _vin(request)
    limit, position = _page_query(request)
    after = _id_cursor(position)
    rows, last = await _in_session(
        request, lambda s: assignments_page(s, vin, after=after, limit=limit)
    )
    return web.json_response(
        {"assignments": rows, "next": None if last is None else _encode_cursor(last)}
    )


async def add_assignment(request: web.Request) -> web.Response:
    _require_admin(request)
    vin = _vin(request)
    body = await _json_body(request)
    serial = _name_field(body, "ecu_serial")
    filepath = check_target_path(_field(body, "filepath", str), "filepath")
    director, image_repo = request.app[DIRECTOR], request.app[IMAGE_REPO]
    row = await _in_session(
        request,
        lambda s: assign(s, director, image_repo, vin, serial, filepath).model_dump(mode="json"),
    )
    director.invalidate(vin)
    await request.app[DELTAS].on_vehicle(vin)
    return web.json_response(row, status=201)


async def reset_ecu_report_counter(request: web.Request) -> web.Response:
    _require_admin(request)
    vin, serial = _vin(request), _url_name(request, "serial")
    body = await _read_body(request, MAX_JSON_BODY)
    options = parse_json(body, where="request body", max_bytes=MAX_JSON_BODY) if body else {}
    reason = options.get("reason", "") if isinstance(options, dict) else None
    if not isinstance(reason, str):
        raise ApiError(400, "body must be a JSON object whose optional reason is a string")
    result = await _in_session(request, lambda s: reset_report_counter(s, vin, serial, reason))
    log.warning("operator reset the report counter of %s/%s", vin, serial)
    return web.json_response(result)


async def list_images(request: web.Request) -> web.Response:
    _require_admin(request)
    limit, position = _page_query(request)
    targets = request.app[IMAGE_REPO].targets.signed.targets
    paths, _, more = _page_by_key(
        [(path, path) for path in sorted(targets)], _key_cursor(position), limit
    )
    images = []
    for path in paths:
        target = targets[path]
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
    return web.json_response(
        {"images": images, "next": _encode_cursor(paths[-1]) if more else None}
    )


async def upload_image(request: web.Request) -> web.Response:
    _require_admin(request)
    sha256 = check_sha256(request.match_info["sha256"], "URL sha256")
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"image larger than {MAX_UPLOAD_BYTES} bytes")
    chunks = _idle_limited(
        request.content.iter_chunked(1024 * 1024),
        request.app[TIMEOUTS].upload_idle,
        f"upload of {sha256}",
    )
    length = await request.app[IMAGE_REPO].store_upload(sha256, chunks, MAX_UPLOAD_BYTES)
    return web.json_response({"sha256": sha256, "length": length}, status=201)


async def publish_targets(request: web.Request) -> web.Response:
    _require_admin(request)
    data = await _read_body(request, MAX_TARGETS_BODY, "targets metadata")
    image_repo = request.app[IMAGE_REPO]
    before = set(image_repo.targets.signed.targets)
    md = await asyncio.to_thread(image_repo.accept_targets, data)
    await request.app[DELTAS].on_published(sorted(set(md.signed.targets) - before))
    return web.json_response(
        {"targets_version": md.signed.version, "targets": sorted(md.signed.targets)}, status=201
    )


def _deltas_cursor(position: Any) -> tuple[str | None, str | None]:
    if position is None:
        return None, None
    if (
        isinstance(position, list)
        and len(position) == 2
        and all(p is None or isinstance(p, str) for p in position)
    ):
        return position[0], position[1]
    raise ApiError(400, "query cursor is not a cursor of this list")


async def list_deltas(request: web.Request) -> web.Response:
    """Published deltas and delta jobs, each list paged by the one cursor."""
    _require_admin(request)
    limit, position = _page_query(request)
    published_after, jobs_after = _deltas_cursor(position)
    repo = request.app[IMAGE_REPO]
    deltas = repo.deltas.signed.targets if repo.deltas is not None else {}
    published, published_last, more_published = _page_by_key(
        [
            (path, {"filepath": path, "length": target.length, "custom": target.custom})
            for path, target in sorted(deltas.items())
        ],
        published_after,
        limit,
    )
    # a space separates the two: neither a sha256 nor a target path holds one
    jobs_by_key = sorted(
        (f"{job.base_sha256} {job.result_filepath}", job.to_dict())
        for job in request.app[DELTAS].jobs.values()
    )
    jobs, jobs_last, more_jobs = _page_by_key(jobs_by_key, jobs_after, limit)
    more = more_published or more_jobs
    return web.json_response(
        {
            "published": published,
            "jobs": jobs,
            "next": _encode_cursor([published_last, jobs_last]) if more else None,
        }
    )


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
    app[REJECTIONS] = RejectionLimiter()
    app[TIMEOUTS] = BodyTimeouts(config.body_timeout, config.upload_idle_timeout)
    app.router.add_get("/health", health)
    app.router.add_get("/image/metadata/{file}", image_metadata)
    app.router.add_get("/image/targets/{path:.+}", image_target)
    app.router.add_get("/director/{vin}/metadata/{file}", director_metadata)
    app.router.add_get("/director/{vin}/targets/{path:.+}", director_target)
    app.router.add_post("/api/v1/vehicles/{vin}/manifest", upload_manifest)
    app.router.add_post("/api/v1/vehicles", add_vehicle)
    app.router.add_get("/api/v1/vehicles/{vin}", get_vehicle)
    app.router.add_get("/api/v1/vehicles/{vin}/events", list_vehicle_events)
    app.router.add_get("/api/v1/vehicles/{vin}/assignments", list_vehicle_assignments)
    app.router.add_post("/api/v1/vehicles/{vin}/assignments", add_assignment)
    app.router.add_post(
        "/api/v1/vehicles/{vin}/ecus/{serial}/report-counter/reset", reset_ecu_report_counter
    )
    app.router.add_get("/api/v1/images", list_images)
    app.router.add_put("/api/v1/image/uploads/{sha256}", upload_image)
    app.router.add_post("/api/v1/image/targets", publish_targets)
    app.router.add_get("/api/v1/deltas", list_deltas)
    app.cleanup_ctx.append(_background)
    return app
