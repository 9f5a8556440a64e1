"""The inventory ledger: what each ECU of each vehicle ran, when, and who said so.

UN R156 asks for a software identification record per vehicle. The ledger
is that record, written from the one place the server believes vehicles,
:func:`server.fleet.process_manifest`:

1. For each ECU report of an accepted manifest, :func:`changes_of` compares
   it with what the server last recorded for the ECU and names what changed
   (:class:`~server.db.LedgerChange`): another installed image, a new
   install outcome (success or failure), a new attack or its end.
2. If anything changed, :func:`record` stores the manifest's signed bytes
   once (:class:`~server.db.StoredManifest`, up to
   :data:`~server.db.MAX_STORED_MANIFEST_BYTES`; larger ones by hash and
   length only) and appends one :class:`~server.db.LedgerEntry` per change,
   each naming that manifest. A heartbeat that changes nothing stores
   nothing, so the ledger grows with the fleet's changes, not its polls.
   Each vehicle keeps the bytes of its latest
   :data:`MAX_MANIFESTS_KEPT_PER_VEHICLE` stored manifests; older ones keep
   their hash (``content_stored`` false) and their ledger entries.

Reading it: :func:`ledger_page` (a vehicle's history, oldest first, paged
by entry id; failed installs with ``failed``), :func:`current_versions`
(what each ECU runs now), :func:`manifest_record` (a stored manifest, the JSON the
vehicle signed), and :func:`export_batch`, which walks the entries of one
vehicle or of one release (image path or version) in batches of
:data:`EXPORT_BATCH` by keyset, so that an export of a large fleet never
holds more than a batch in memory (:mod:`server.api.inventory_routes`
streams it as CSV or JSON).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from server.db import (
    MAX_STORED_MANIFEST_BYTES,
    Ecu,
    LedgerChange,
    LedgerEntry,
    StoredManifest,
    as_utc,
    bounded_text,
    utcnow,
)
from server.image_repository import ImageRepository
from signing.manifest import FAILED_RESULTS, EcuVersionReport
from signing.metadata import MetadataFormatError, image_custom

#: Stored manifests per vehicle whose bytes are kept (older ones: hash and length only).
MAX_MANIFESTS_KEPT_PER_VEHICLE = 200
#: Ledger entries read from the database at a time by an export.
EXPORT_BATCH = 500
#: The columns of an export, in order (CSV header; JSON keys).
EXPORT_COLUMNS = (
    "id", "vin", "ecu_serial", "hardware_id", "at", "change", "filepath", "version", "sha256",
    "length", "install_filepath", "install_result", "detail", "manifest_id",
)  # fmt: skip


def changes_of(ecu: Ecu, report: EcuVersionReport, attacks: str) -> list[LedgerChange]:
    """What ``report`` changes of ``ecu`` (before ``ecu`` is updated); ``attacks`` as stored."""
    changes = []
    image = report.installed_image
    if (image.filepath, image.hashes.get("sha256", "")) != (
        ecu.installed_filepath,
        ecu.installed_sha256,
    ):
        changes.append(LedgerChange.INSTALLED)
    last = report.last_install
    if last is not None and (
        last.filepath, last.result, bounded_text(last.detail), last.method
    ) != (
        ecu.last_install_filepath, ecu.last_install_result, ecu.last_install_detail,
        ecu.last_install_method,
    ):  # fmt: skip
        changes.append(LedgerChange.INSTALL_RESULT)
    if attacks != ecu.attacks_detected:
        changes.append(LedgerChange.ATTACK if attacks else LedgerChange.ATTACK_CLEARED)
    return changes


def _version(image_repo: ImageRepository, filepath: str) -> str:
    target = image_repo.find_target(filepath) if filepath else None
    if target is None:
        return ""
    try:
        return image_custom(target).version
    except MetadataFormatError:
        return ""


def record(
    session: Session,
    image_repo: ImageRepository,
    vin: str,
    body: bytes,
    changed: list[tuple[Ecu, list[LedgerChange]]],
) -> int | None:
    """Store the manifest ``body`` and one entry per change (ECUs already updated).

    Returns the stored manifest's id, or None when nothing changed.
    """
    changed = [(ecu, changes) for ecu, changes in changed if changes]
    if not changed:
        return None
    now = utcnow()
    kept = len(body) <= MAX_STORED_MANIFEST_BYTES
    manifest = StoredManifest(
        vin=vin,
        received_at=now,
        sha256=hashlib.sha256(body).hexdigest(),
        length=len(body),
        content_stored=kept,
        content=body if kept else b"",
    )
    session.add(manifest)
    session.flush()
    assert manifest.id is not None
    for ecu, changes in changed:
        for change in changes:
            is_install = change is LedgerChange.INSTALL_RESULT
            if is_install:
                detail = ecu.last_install_detail
            elif change is LedgerChange.ATTACK:
                detail = ecu.attacks_detected
            else:
                detail = ""
            session.add(
                LedgerEntry(
                    vin=vin,
                    ecu_serial=ecu.serial,
                    hardware_id=ecu.hardware_id,
                    at=now,
                    change=change,
                    filepath=ecu.installed_filepath[:512],
                    version=_version(image_repo, ecu.installed_filepath)[:128],
                    sha256=ecu.installed_sha256[:64],
                    length=ecu.installed_length,
                    install_filepath=ecu.last_install_filepath[:512] if is_install else "",
                    install_result=ecu.last_install_result[:64] if is_install else "",
                    detail=detail,
                    manifest_id=manifest.id,
                )
            )
    _prune(session, vin)
    return manifest.id


def _prune(session: Session, vin: str) -> None:
    """Drop the bytes (not the record) of a vehicle's stored manifests past the newest kept."""
    old = session.exec(
        select(StoredManifest.id)
        .where(StoredManifest.vin == vin, col(StoredManifest.content_stored))
        .order_by(col(StoredManifest.id).desc())
        .offset(MAX_MANIFESTS_KEPT_PER_VEHICLE)
    ).all()
    if old:
        session.exec(
            update(StoredManifest)
            .where(col(StoredManifest.id).in_(old))
            .values(content=b"", content_stored=False)
        )


def entry_dict(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "vin": entry.vin,
        "ecu_serial": entry.ecu_serial,
        "hardware_id": entry.hardware_id,
        "at": as_utc(entry.at).isoformat(),
        "change": entry.change,
        "filepath": entry.filepath,
        "version": entry.version,
        "sha256": entry.sha256,
        "length": entry.length,
        "install_filepath": entry.install_filepath,
        "install_result": entry.install_result,
        "detail": entry.detail,
        "manifest_id": entry.manifest_id,
    }


def current_versions(
    session: Session, image_repo: ImageRepository, vin: str
) -> list[dict[str, Any]]:
    """What each ECU of ``vin`` runs now, with the version the image repository gives it."""
    ecus = session.exec(select(Ecu).where(Ecu.vin == vin).order_by(col(Ecu.serial))).all()
    return [
        {
            "ecu_serial": e.serial,
            "hardware_id": e.hardware_id,
            "filepath": e.installed_filepath,
            "version": _version(image_repo, e.installed_filepath),
            "sha256": e.installed_sha256,
            "last_install_result": e.last_install_result,
            "attacks_detected": e.attacks_detected,
        }
        for e in ecus
    ]


def ledger_page(
    session: Session,
    vin: str,
    *,
    after: int | None,
    limit: int,
    ecu_serial: str | None = None,
    change: LedgerChange | None = None,
    failed: bool | None = None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Ledger entries of ``vin`` with ids above ``after``, oldest first; and the next cursor.

    ``failed``: only install outcomes that failed (True), or every entry but those (False).
    """
    query = select(LedgerEntry).where(LedgerEntry.vin == vin)
    if ecu_serial is not None:
        query = query.where(LedgerEntry.ecu_serial == ecu_serial)
    if change is not None:
        query = query.where(LedgerEntry.change == change)
    if failed is not None:
        is_failed = (col(LedgerEntry.change) == LedgerChange.INSTALL_RESULT) & col(
            LedgerEntry.install_result
        ).in_([str(r) for r in FAILED_RESULTS])
        query = query.where(is_failed if failed else ~is_failed)
    if after is not None:
        query = query.where(col(LedgerEntry.id) > after)
    rows = session.exec(query.order_by(col(LedgerEntry.id)).limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [entry_dict(r) for r in rows], (rows[-1].id if more else None)


def manifest_record(session: Session, vin: str, manifest_id: int) -> dict[str, Any] | None:
    """A stored manifest of ``vin``: when, its hash, and the JSON the vehicle signed (or None)."""
    row = session.get(StoredManifest, manifest_id)
    if row is None or row.vin != vin:
        return None
    return {
        "id": row.id,
        "vin": row.vin,
        "received_at": as_utc(row.received_at).isoformat(),
        "sha256": row.sha256,
        "length": row.length,
        "content_stored": row.content_stored,
        "manifest": json.loads(row.content) if row.content_stored else None,
    }


def export_batch(
    session: Session,
    *,
    vin: str | None = None,
    filepath: str | None = None,
    version: str | None = None,
    after: int = 0,
    limit: int = EXPORT_BATCH,
) -> list[dict[str, Any]]:
    """Up to ``limit`` ledger entries of one vehicle, image or version with ids above ``after``.

    Oldest first: an export calls it again with the last id it got until a batch is empty.
    """
    query = select(LedgerEntry).where(col(LedgerEntry.id) > after)
    if vin is not None:
        query = query.where(LedgerEntry.vin == vin)
    if filepath is not None:
        query = query.where(LedgerEntry.filepath == filepath)
    if version is not None:
        query = query.where(LedgerEntry.version == version)
    rows = session.exec(query.order_by(col(LedgerEntry.id)).limit(limit)).all()
    return [entry_dict(r) for r in rows]
