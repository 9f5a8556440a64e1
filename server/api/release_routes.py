"""Routes release engineers and suppliers call: images, uploads, targets, deltas."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from securesystemslib.signer import Signature
from sqlmodel import Session
from tuf.api.metadata import Metadata, TargetFile, Targets

from server import audit
from server.api.access import Route, actor_of, operator_of
from server.api.boundary import (
    ApiError,
    BodyTimeoutError,
    ClientDisconnectedError,
    encode_cursor,
    idle_limited,
    in_session,
    json_body,
    key_cursor,
    page_by_key,
    page_query,
    read_body,
)
from server.api.context import DELTAS, IMAGE_REPO, TIMEOUTS
from server.api.responses import ImagePage
from server.api.schemas import PageQuery, StagedSignatures
from server.image_batch import MAX_BATCH_IMAGES, MAX_IMAGE_BYTES
from server.image_repository import (
    ImageRepository,
    ImageRepositoryError,
    NoStagedReleaseError,
    NoSuchDelegationError,
    OutsideDelegationError,
)
from server.metrics import log_event
from server.roles import Permission
from signing.metadata import (
    MetadataFormatError,
    delegation_hardware_ids,
    image_custom,
    version_key,
)
from signing.names import check_name, check_sha256

MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
#: Content-Type of a batch upload (POST /api/v1/image/uploads).
BATCH_CONTENT_TYPE = "application/x-uptake-images"
#: Largest targets metadata a release engineer may upload.
MAX_TARGETS_BODY = 5_000_000


async def list_images(request: web.Request) -> web.Response:
    limit, position = page_query(request)
    repo = request.app[IMAGE_REPO]
    repo.refresh()  # another server process may have published since
    targets = repo.targets.signed.targets
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


async def upload_images(request: web.Request) -> web.Response:
    """Stage several images in one streamed body (framing: :mod:`server.image_batch`)."""
    if request.content_type != BATCH_CONTENT_TYPE:
        raise ApiError(415, f"a batch upload's Content-Type must be {BATCH_CONTENT_TYPE}")
    idle = request.app[TIMEOUTS].upload_idle
    received = 0

    async def read(n: int) -> bytes:
        nonlocal received
        try:
            async with asyncio.timeout(idle):
                chunk = await request.content.read(n)
        except TimeoutError as exc:
            raise BodyTimeoutError(f"batch upload: nothing received for {idle:g} s") from exc
        except ConnectionError as exc:
            raise ClientDisconnectedError(f"batch upload cut off after {received} bytes") from exc
        received += len(chunk)
        return chunk

    stored = await request.app[IMAGE_REPO].store_upload_batch(
        read, MAX_BATCH_IMAGES, MAX_IMAGE_BYTES
    )
    actor = actor_of(request)
    await in_session(
        request,
        lambda s: audit.append(
            s, actor, "image.upload", f"{len(stored)} images", count=len(stored),
            length=sum(n for _, n in stored), sha256=[h for h, _ in stored[:100]],
        ),
    )  # fmt: skip
    return web.json_response(
        {"images": [{"sha256": h, "length": n} for h, n in stored]}, status=201
    )


def _hardware_ids_changed(
    current: Mapping[str, TargetFile], new: Mapping[str, TargetFile]
) -> set[str]:
    """Hardware ids a change from ``current`` to ``new`` touches (what a supplier must own).

    An image added, changed or removed touches the hardware ids of both its old and its new
    entry: re-tagging another supplier's image to one's own hardware id changes that image.
    """
    hardware_ids: set[str] = set()
    for path in set(current) | set(new):
        if current.get(path) == new.get(path):
            continue
        for target in (current.get(path), new.get(path)):
            if target is None:
                continue
            try:
                hardware_ids.update(image_custom(target).hardware_ids)
            except MetadataFormatError:
                continue  # an upload with such an entry is refused by its own checks anyway
    return hardware_ids


def _changed_hardware_ids(repo: ImageRepository, data: bytes) -> set[str]:
    """Hardware ids of the images a targets upload adds, changes or removes."""
    try:
        new = Metadata[Targets].from_bytes(data).signed.targets
    except Exception:  # malformed: accept_targets says exactly why, with its own checks
        return set()
    repo.refresh()
    return _hardware_ids_changed(repo.targets.signed.targets, new)


def _check_staged_scope(request: web.Request, repo: ImageRepository) -> None:
    """A supplier may replace or discard a staged release only if it could have staged it."""
    try:
        staged = repo.staged()
    except NoStagedReleaseError:
        return
    repo.refresh()
    _check_supplier_scope(
        request, _hardware_ids_changed(repo.targets.signed.targets, staged.signed.targets)
    )


def _check_supplier_scope(request: web.Request, changed: set[str]) -> None:
    operator = operator_of(request)
    if not operator.may_publish_for(changed):
        raise ApiError(
            403, f"supplier token {operator.name!r} may publish images for "
            f"{', '.join(operator.hardware_ids)} only; this targets metadata changes images for "
            f"{', '.join(sorted(changed - set(operator.hardware_ids)))}",
        )  # fmt: skip


def _delegations(repo: ImageRepository) -> dict[str, dict[str, Any]]:
    """The supplier delegations the published targets make, as their JSON."""
    return {name: role.to_dict() for name, role in repo.supplier_roles().items()}


def _delegation_changes(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, "add" | "remove" | "change", the role now or before) per changed delegation."""
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        kind = "add" if name not in before else "remove" if name not in after else "change"
        changes.append((name, kind, after.get(name) or before[name]))
    return changes


async def _published(
    request: web.Request,
    md: Metadata[Targets],
    before: Mapping[str, TargetFile],
    changed: set[str],
    delegations_before: dict[str, dict[str, Any]],
) -> list[str]:
    """Record a publication (and the delegations it changed) in the audit log and start its
    deltas; returns the added paths.

    Images whose version is below one published before for the same hardware
    ids (``uptake release publish --allow-lower``, or a revert) are named in
    the record as ``lower_versions``.
    """
    added = sorted(set(md.signed.targets) - set(before))
    lower = _lower_versions(before, md.signed.targets, added)
    actor = actor_of(request)
    delegation_changes = _delegation_changes(
        delegations_before, _delegations(request.app[IMAGE_REPO])
    )

    def record(session: Session) -> None:
        audit.append(
            session, actor, "targets.publish", f"targets v{md.signed.version}",
            version=md.signed.version, added=added[:100], hardware_ids=sorted(changed),
            delegations_changed=[name for name, _, _ in delegation_changes],
            **({"lower_versions": lower[:100]} if lower else {}),
        )  # fmt: skip
        for name, kind, role in delegation_changes:
            audit.append(
                session, actor, f"delegation.{kind}", name, targets_version=md.signed.version,
                keyids=role.get("keyids", []), threshold=role.get("threshold"),
                paths=role.get("paths", [])[:50],
            )  # fmt: skip

    await in_session(request, record)
    log_event(
        "publish", actor=actor, targets_version=md.signed.version, added=added[:100],
        hardware_ids=sorted(changed),
    )  # fmt: skip
    await request.app[DELTAS].on_published(added)
    return added


def _lower_versions(
    before: Mapping[str, TargetFile], after: Mapping[str, TargetFile], added: list[str]
) -> list[str]:
    """Of the ``added`` paths, those versioned below an image published before for one of
    their hardware ids (dotted decimal versions only)."""
    highest: dict[str, tuple[int, ...]] = {}
    for target in before.values():
        try:
            custom = image_custom(target)
        except MetadataFormatError:
            continue
        key = version_key(custom.version)
        if key is None:
            continue
        for hardware_id in custom.hardware_ids:
            highest[hardware_id] = max(key, highest.get(hardware_id, key))
    lower = []
    for path in added:
        custom = image_custom(after[path])
        key = version_key(custom.version)
        if key is not None and any(key < highest.get(h, key) for h in custom.hardware_ids):
            lower.append(f"{path} ({custom.version})")
    return lower


async def publish_targets(request: web.Request) -> web.Response:
    data = await read_body(request, MAX_TARGETS_BODY, "targets metadata")
    image_repo = request.app[IMAGE_REPO]
    changed = await asyncio.to_thread(_changed_hardware_ids, image_repo, data)
    _check_supplier_scope(request, changed)
    before = image_repo.targets.signed.targets  # replaced, never changed, by a publication
    delegations_before = _delegations(image_repo)
    md = await asyncio.to_thread(image_repo.accept_targets, data)
    await _published(request, md, before, changed, delegations_before)
    return web.json_response(
        {"targets_version": md.signed.version, "targets": sorted(md.signed.targets)}, status=201
    )


def _staged_error(exc: ImageRepositoryError) -> ApiError:
    return ApiError(404 if isinstance(exc, NoStagedReleaseError) else 400, str(exc))


async def stage_release(request: web.Request) -> web.Response:
    """Stage targets metadata whose signatures will come from separate machines."""
    data = await read_body(request, MAX_TARGETS_BODY, "targets metadata")
    image_repo = request.app[IMAGE_REPO]
    changed = await asyncio.to_thread(_changed_hardware_ids, image_repo, data)
    _check_supplier_scope(request, changed)
    await asyncio.to_thread(_check_staged_scope, request, image_repo)
    status = await asyncio.to_thread(image_repo.stage_targets, data)
    actor = actor_of(request)
    await in_session(
        request,
        lambda s: audit.append(
            s, actor, "release.stage", f"targets v{status.targets_version}",
            hardware_ids=sorted(changed),
        ),
    )  # fmt: skip
    return web.json_response(status.to_dict(), status=201)


async def staged_release(request: web.Request) -> web.Response:
    """The staged release (what signers sign), the published targets it follows, and status."""
    image_repo = request.app[IMAGE_REPO]
    try:
        staged = await asyncio.to_thread(image_repo.staged)
        status = await asyncio.to_thread(image_repo.staged_status)
    except ImageRepositoryError as exc:
        raise _staged_error(exc) from exc
    return web.json_response(
        {
            "status": status.to_dict(),
            "staged": staged.to_dict(),
            "previous": image_repo.targets.to_dict(),
        }
    )


async def add_staged_signatures(request: web.Request) -> web.Response:
    body = await json_body(request, StagedSignatures)
    assert isinstance(body, StagedSignatures)
    image_repo = request.app[IMAGE_REPO]
    image_repo.refresh()
    before = image_repo.targets.signed.targets  # replaced, never changed, by a publication
    delegations_before = _delegations(image_repo)
    signatures = [Signature(s.keyid, s.sig) for s in body.signatures]
    try:
        status, published = await asyncio.to_thread(
            image_repo.add_staged_signatures, body.targets_version, signatures
        )
    except ImageRepositoryError as exc:
        raise _staged_error(exc) from exc
    actor = actor_of(request)
    await in_session(
        request,
        lambda s: audit.append(
            s, actor, "release.sign", f"targets v{status.targets_version}",
            keyids=[sig.keyid for sig in signatures], signed_by=list(status.signed_by),
        ),
    )  # fmt: skip
    if published is not None:
        hardware_ids: set[str] = set()
        for path in set(published.signed.targets) - set(before):
            hardware_ids.update(image_custom(published.signed.targets[path]).hardware_ids)
        await _published(request, published, before, hardware_ids, delegations_before)
    return web.json_response(status.to_dict(), status=201 if published is not None else 200)


async def discard_staged_release(request: web.Request) -> web.Response:
    await asyncio.to_thread(_check_staged_scope, request, request.app[IMAGE_REPO])
    try:
        version = await asyncio.to_thread(request.app[IMAGE_REPO].discard_staged)
    except ImageRepositoryError as exc:
        raise _staged_error(exc) from exc
    actor = actor_of(request)
    await in_session(
        request, lambda s: audit.append(s, actor, "release.discard", f"targets v{version}")
    )
    return web.json_response({"discarded": version})


async def list_delegations(request: web.Request) -> web.Response:
    """The supplier delegations of the published targets (at most MAX_DELEGATIONS, one page)."""
    repo = request.app[IMAGE_REPO]
    delegations = []
    for name, role in sorted(repo.supplier_roles().items()):
        supplier = repo.suppliers.get(name)
        delegations.append(
            {
                "name": name,
                "keyids": list(role.keyids),
                "threshold": role.threshold,
                "paths": list(role.paths or ()),
                "hardware_ids": list(delegation_hardware_ids(role)),
                "version": supplier.signed.version if supplier else 0,
                "images": sorted(supplier.signed.targets) if supplier else [],
            }
        )
    return web.json_response({"delegations": delegations})


async def publish_delegated_targets(request: web.Request) -> web.Response:
    """A supplier publishes its delegated role's metadata, signed with its own key(s)."""
    name = check_name(request.match_info["name"], "URL delegation name")
    data = await read_body(request, MAX_TARGETS_BODY, "delegated targets metadata")
    image_repo = request.app[IMAGE_REPO]
    image_repo.refresh()
    previous = image_repo.suppliers.get(name)
    changed = await asyncio.to_thread(_changed_in_role, previous, data)
    _check_supplier_scope(request, changed)
    try:
        md = await asyncio.to_thread(image_repo.accept_delegated_targets, name, data)
    except NoSuchDelegationError as exc:
        raise ApiError(404, str(exc)) from exc
    except OutsideDelegationError as exc:
        raise ApiError(403, str(exc)) from exc
    before = set(previous.signed.targets) if previous else set()
    added = sorted(set(md.signed.targets) - before)
    actor = actor_of(request)
    await in_session(
        request,
        lambda s: audit.append(
            s, actor, "delegation.publish", f"{name} v{md.signed.version}",
            version=md.signed.version, added=added[:100], hardware_ids=sorted(changed),
        ),
    )  # fmt: skip
    log_event(
        "publish", actor=actor, delegation=name, version=md.signed.version, added=added[:100],
        hardware_ids=sorted(changed),
    )  # fmt: skip
    return web.json_response(
        {"delegation": name, "version": md.signed.version, "targets": sorted(md.signed.targets)},
        status=201,
    )


def _changed_in_role(previous: Metadata[Targets] | None, data: bytes) -> set[str]:
    """Hardware ids of the images a supplier role upload adds, changes or removes."""
    try:
        new = Metadata[Targets].from_bytes(data).signed.targets
    except Exception:  # malformed: accept_delegated_targets says exactly why
        return set()
    return _hardware_ids_changed(previous.signed.targets if previous else {}, new)


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
    repo.refresh()
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
    all_jobs = await in_session(request, request.app[DELTAS].jobs)
    jobs_by_key = sorted(
        (f"{job['base_sha256']} {job['result_filepath']}", job) for job in all_jobs
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
          "Published images (paged)", query=PageQuery, response=ImagePage),
    Route("PUT", "/api/v1/image/uploads/{sha256}", upload_image, Permission.PUBLISH,
          "Stage an image's bytes, named by their SHA-256, before publishing"),
    Route("POST", "/api/v1/image/uploads", upload_images, Permission.PUBLISH,
          "Stage many images' bytes in one streamed body (framed; see server.image_batch)"),
    Route("POST", "/api/v1/image/targets", publish_targets, Permission.PUBLISH,
          "Publish offline-signed image targets metadata (suppliers: their hardware ids only)"),
    Route("POST", "/api/v1/image/staged", stage_release, Permission.PUBLISH,
          "Stage unsigned image targets metadata for threshold signing on separate machines"),
    Route("GET", "/api/v1/image/staged", staged_release, Permission.READ_RELEASES,
          "The staged release, the targets it follows, who signed and who is missing"),
    Route("POST", "/api/v1/image/staged/signatures", add_staged_signatures, Permission.PUBLISH,
          "Add signatures to the staged release; published once a threshold signed"),
    Route("DELETE", "/api/v1/image/staged", discard_staged_release, Permission.PUBLISH,
          "Discard the staged release"),
    Route("GET", "/api/v1/image/delegations", list_delegations, Permission.READ_RELEASES,
          "Supplier delegations: keys, path patterns, hardware ids, published version"),
    Route("POST", "/api/v1/image/delegations/{name}/targets", publish_delegated_targets,
          Permission.PUBLISH,
          "Publish a supplier's delegated targets, signed with its own keys (its scope only)"),
    Route("GET", "/api/v1/deltas", list_deltas, Permission.READ_RELEASES,
          "Published deltas and delta jobs (paged)", query=PageQuery),
]  # fmt: skip
