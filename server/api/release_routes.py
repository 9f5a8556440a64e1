"""Routes release engineers and suppliers call: images, uploads, targets, deltas."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from sqlmodel import Session
from tuf.api.metadata import Metadata, Targets

from server import audit
from server.api.access import Route, actor_of, operator_of
from server.api.boundary import (
    ApiError,
    encode_cursor,
    idle_limited,
    in_session,
    key_cursor,
    page_by_key,
    page_query,
    read_body,
)
from server.api.context import DELTAS, IMAGE_REPO, TIMEOUTS
from server.image_repository import ImageRepository
from server.roles import Permission
from signing.metadata import MetadataFormatError, image_custom
from signing.names import check_sha256

MAX_UPLOAD_BYTES = 4 * 1024**3
#: Largest targets metadata a release engineer may upload.
MAX_TARGETS_BODY = 5_000_000


async def list_images(request: web.Request) -> web.Response:
    limit, position = page_query(request)
    targets = request.app[IMAGE_REPO].targets.signed.targets
    paths, _, more = page_by_key(
        [(path, path) for path in sorted(targets)], key_cursor(position), limit
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
    return web.json_response({"images": images, "next": encode_cursor(paths[-1]) if more else None})


async def upload_image(request: web.Request) -> web.Response:
    sha256 = check_sha256(request.match_info["sha256"], "URL sha256")
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"image larger than {MAX_UPLOAD_BYTES} bytes")
    chunks = idle_limited(
        request.content.iter_chunked(1024 * 1024),
        request.app[TIMEOUTS].upload_idle,
        f"upload of {sha256}",
    )
    length = await request.app[IMAGE_REPO].store_upload(sha256, chunks, MAX_UPLOAD_BYTES)
    actor = actor_of(request)
    await in_session(
        request, lambda s: audit.append(s, actor, "image.upload", sha256, length=length)
    )
    return web.json_response({"sha256": sha256, "length": length}, status=201)


def _changed_hardware_ids(repo: ImageRepository, data: bytes) -> set[str]:
    """Hardware ids of the images a targets upload adds or changes (what a supplier must own)."""
    try:
        new = Metadata[Targets].from_bytes(data).signed.targets
    except Exception:  # malformed: accept_targets says exactly why, with its own checks
        return set()
    current = repo.targets.signed.targets
    hardware_ids: set[str] = set()
    for path, target in new.items():
        if current.get(path) == target:
            continue
        try:
            hardware_ids.update(image_custom(target).hardware_ids)
        except MetadataFormatError:
            continue  # refused by accept_targets anyway
    for path in set(current) - set(new):  # removing an image is changing it too
        hardware_ids.update(image_custom(current[path]).hardware_ids)
    return hardware_ids


async def publish_targets(request: web.Request) -> web.Response:
    operator = operator_of(request)
    data = await read_body(request, MAX_TARGETS_BODY, "targets metadata")
    image_repo = request.app[IMAGE_REPO]
    changed = await asyncio.to_thread(_changed_hardware_ids, image_repo, data)
    if not operator.may_publish_for(changed):
        raise ApiError(
            403, f"supplier token {operator.name!r} may publish images for "
            f"{', '.join(operator.hardware_ids)} only; this targets metadata changes images for "
            f"{', '.join(sorted(changed - set(operator.hardware_ids)))}",
        )  # fmt: skip
    before = set(image_repo.targets.signed.targets)
    md = await asyncio.to_thread(image_repo.accept_targets, data)
    added = sorted(set(md.signed.targets) - before)
    actor = actor_of(request)

    def record(session: Session) -> None:
        audit.append(
            session, actor, "targets.publish", f"targets v{md.signed.version}",
            version=md.signed.version, added=added[:100], hardware_ids=sorted(changed),
        )  # fmt: skip

    await in_session(request, record)
    await request.app[DELTAS].on_published(added)
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
    limit, position = page_query(request)
    published_after, jobs_after = _deltas_cursor(position)
    repo = request.app[IMAGE_REPO]
    deltas = repo.deltas.signed.targets if repo.deltas is not None else {}
    published, published_last, more_published = page_by_key(
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
    jobs, jobs_last, more_jobs = page_by_key(jobs_by_key, jobs_after, limit)
    more = more_published or more_jobs
    return web.json_response(
        {
            "published": published,
            "jobs": jobs,
            "next": encode_cursor([published_last, jobs_last]) if more else None,
        }
    )


ROUTES = [
    Route("GET", "/api/v1/images", list_images, Permission.READ_RELEASES,
          "Published images (paged)"),
    Route("PUT", "/api/v1/image/uploads/{sha256}", upload_image, Permission.PUBLISH,
          "Stage an image's bytes, named by their SHA-256, before publishing"),
    Route("POST", "/api/v1/image/targets", publish_targets, Permission.PUBLISH,
          "Publish offline-signed image targets metadata (suppliers: their hardware ids only)"),
    Route("GET", "/api/v1/deltas", list_deltas, Permission.READ_RELEASES,
          "Published deltas and delta jobs (paged)"),
]  # fmt: skip
