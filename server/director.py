"""The director repository: per-vehicle targets telling each ECU what to install.

All vehicles share one director root (signed offline, stored as
``director/metadata/N.root.json``). Each vehicle has its own chain of
targets, snapshot and timestamp, signed with the director's online keys and
stored in the ``DirectorMetadata`` table, served under
``/director/<VIN>/metadata/`` so the vehicle's ``tuf.ngclient.Updater``
sees an ordinary TUF repository with consistent snapshots.

Director targets list, per ECU that has an active assignment, the image to
run (length and hashes copied from the image repository, custom
``ecuIdentifiers`` naming the ECU serial and hardware id), and carry the VIN
even when the list is empty; so do the vehicle's snapshot and timestamp,
because every vehicle shares the director's online keys: without the VIN,
another vehicle's genuine timestamp of a higher version would be a valid
timestamp for this one (a freeze with no key at all). New metadata is signed only when that list
changes or the metadata nears expiry: an idle poll costs one indexed read.

For vehicles whose images are encrypted, the entry names instead a copy of
the image encrypted to that ECU's key (:mod:`server.encrypted_images`).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer
from sqlalchemy import delete
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from server.db import (
    Assignment,
    DirectorMetadata,
    Ecu,
    EcuEncryptionKey,
    Vehicle,
    VehicleEncryption,
    as_utc,
)
from server.encrypted_images import EncryptedImages
from server.image_repository import ImageRepository, versioned_files
from signing.atomic_file import write_atomic
from signing.metadata import DIRECTOR_TARGETS_EXPIRY, director_custom, expiry, set_director_vin

log = logging.getLogger(__name__)
_SERIALIZER = JSONSerializer(compact=False)
_KEEP_VERSIONS = 4
#: Re-sign when metadata expires sooner than this.
_REFRESH_MARGIN = {
    "targets": timedelta(days=2),
    "snapshot": timedelta(days=2),
    "timestamp": timedelta(hours=6),
}
_ACTIVE = ("pending", "installed")


class DirectorRepository:
    """Signs and serves per-vehicle director metadata."""

    def __init__(
        self,
        director_dir: Path,
        image_repo: ImageRepository,
        targets_signer: Signer,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        *,
        encrypt_images: bool = False,
    ) -> None:
        self.metadata_dir = director_dir / "metadata"
        self._encrypt_all = encrypt_images
        self._encrypted = EncryptedImages(director_dir / "encrypted", image_repo.targets_dir)
        roots = versioned_files(self.metadata_dir, "root")
        if not roots:
            raise FileNotFoundError(
                f"no director root in {self.metadata_dir}: run 'uptake server init'"
            )
        self.root = Metadata[Root].from_file(str(roots[-1][1]))
        self._image_repo = image_repo
        self._signers = {
            "targets": targets_signer,
            "snapshot": snapshot_signer,
            "timestamp": timestamp_signer,
        }
        self._lock = threading.Lock()
        # vin -> (timestamp bytes, expires): the idle-poll cache
        self._timestamp_cache: dict[str, tuple[bytes, datetime]] = {}

    @property
    def image_repo(self) -> ImageRepository:
        return self._image_repo

    @staticmethod
    def initialize(director_dir: Path, root: Metadata[Root]) -> None:
        write_atomic(director_dir / "metadata" / "1.root.json", root.to_bytes(_SERIALIZER))

    def invalidate(self, vin: str) -> None:
        """Forget the cached timestamp of ``vin`` (call after committing new metadata)."""
        self._timestamp_cache.pop(vin, None)

    def accept_root(self, root: Metadata[Root], data: bytes) -> None:
        write_atomic(self.metadata_dir / f"{root.signed.version}.root.json", data)
        self.root = root

    def set_online_signers(self, signers: dict[str, Signer]) -> None:
        """Switch to rotated online keys (after a root that names them)."""
        self._signers = dict(signers)
        self._timestamp_cache.clear()

    # -- desired state -------------------------------------------------------

    def encrypts(self, session: Session, vin: str) -> bool:
        """Whether ``vin``'s images are delivered encrypted per ECU (:mod:`server.encrypted_images`)."""
        if self._encrypt_all:
            return True
        row = session.get(VehicleEncryption, vin)
        return row is not None and row.encrypt_images

    def encrypted_image_path(self, vin: str, name: str) -> Path | None:
        return self._encrypted.path(vin, name)

    def _desired_targets(self, session: Session, vin: str) -> dict[str, TargetFile]:
        ecus = {e.serial: e for e in session.exec(select(Ecu).where(Ecu.vin == vin))}
        rows = session.exec(
            select(Assignment).where(Assignment.vin == vin, col(Assignment.status).in_(_ACTIVE))
        )
        wanted: dict[str, dict[str, str]] = {}
        for row in rows:
            ecu = ecus.get(row.ecu_serial)
            if ecu is not None:
                wanted.setdefault(row.filepath, {})[ecu.serial] = ecu.hardware_id
        encryption_keys = (
            {
                k.ecu_serial: k.public_key
                for k in session.exec(select(EcuEncryptionKey).where(EcuEncryptionKey.vin == vin))
            }
            if self.encrypts(session, vin)
            else None
        )
        targets: dict[str, TargetFile] = {}
        for filepath, ecu_map in sorted(wanted.items()):
            image = self._image_repo.find_target(filepath)
            if image is None:
                continue  # unpublished meanwhile: never direct to an unknown image
            if encryption_keys is not None:
                # one encrypted copy per ECU; never plaintext to a vehicle that gets ciphertext
                serial = next((s for s in sorted(ecu_map) if s in encryption_keys), None)
                if serial is not None:
                    try:
                        targets[filepath] = self._encrypted.director_target(
                            vin, serial, ecu_map[serial], encryption_keys[serial], image
                        )
                    except (OSError, ValueError) as exc:  # stored image missing or altered
                        log.error(
                            "not directing %s to %s: cannot make its encrypted copy: %s",
                            filepath,
                            serial,
                            exc,
                        )
                continue
            targets[filepath] = TargetFile(
                image.length, dict(image.hashes), filepath, {"custom": director_custom(ecu_map)}
            )
        return targets

    def _latest(self, session: Session, vin: str, role: str) -> DirectorMetadata | None:
        return session.exec(
            select(DirectorMetadata)
            .where(DirectorMetadata.vin == vin, DirectorMetadata.role == role)
            .order_by(col(DirectorMetadata.version).desc())
            .limit(1)
        ).first()

    def _store(self, session: Session, vin: str, md: Metadata) -> None:  # type: ignore[type-arg]
        role = md.signed.type
        md.signatures.clear()
        md.sign(self._signers[role], append=True)
        session.add(
            DirectorMetadata(
                vin=vin,
                role=role,
                version=md.signed.version,
                content=md.to_bytes(_SERIALIZER),
                expires=md.signed.expires,
            )
        )
        session.exec(
            delete(DirectorMetadata).where(
                col(DirectorMetadata.vin) == vin,
                col(DirectorMetadata.role) == role,
                col(DirectorMetadata.version) <= md.signed.version - _KEEP_VERSIONS,
            )
        )

    def update_vehicle(self, session: Session, vin: str, *, force: bool = False) -> bool:
        """Re-sign the vehicle's metadata if its desired targets changed or near expiry.

        Runs inside the caller's transaction. Returns True when new metadata was signed.
        """
        now = datetime.now(UTC)
        # outside the lock: it may encrypt a new image for an ECU, which must not stall other vehicles
        desired = self._desired_targets(session, vin)
        with self._lock:
            latest = {
                r: self._latest(session, vin, r) for r in ("targets", "snapshot", "timestamp")
            }
            targets_row = latest["targets"]
            current = Metadata[Targets].from_bytes(targets_row.content) if targets_row else None

            def near_expiry(role: str) -> bool:
                row = latest[role]
                return row is None or as_utc(row.expires) - now < _REFRESH_MARGIN[role]

            new_targets = (
                force
                or current is None
                or current.signed.targets != desired
                or near_expiry("targets")
            )
            new_snapshot = new_targets or near_expiry("snapshot")
            new_timestamp = new_snapshot or near_expiry("timestamp")
            if not new_timestamp:
                return False

            if new_targets:
                version = current.signed.version + 1 if current else 1
                targets = Targets(
                    version=version, expires=(now + DIRECTOR_TARGETS_EXPIRY).replace(microsecond=0)
                )
                targets.targets = desired
                set_director_vin(targets, vin)
                self._store(session, vin, Metadata(targets))
                targets_version = version
                vehicle = session.get(Vehicle, vin)
                if vehicle is not None:
                    vehicle.director_targets_version = version
                    session.add(vehicle)
            else:
                assert current is not None
                targets_version = current.signed.version

            snap_row = latest["snapshot"]
            if new_snapshot:
                snap_version = snap_row.version + 1 if snap_row else 1
                snapshot = Snapshot(version=snap_version, expires=expiry("snapshot", now))
                snapshot.meta = {"targets.json": MetaFile(version=targets_version)}
                set_director_vin(snapshot, vin)
                self._store(session, vin, Metadata(snapshot))
            else:
                assert snap_row is not None
                snap_version = snap_row.version

            ts_row = latest["timestamp"]
            timestamp = Timestamp(
                version=ts_row.version + 1 if ts_row else 1,
                expires=expiry("timestamp", now),
                snapshot_meta=MetaFile(version=snap_version),
            )
            set_director_vin(timestamp, vin)
            self._store(session, vin, Metadata(timestamp))
            self._timestamp_cache.pop(vin, None)
            return True

    # -- serving -------------------------------------------------------------

    def metadata(self, session: Session, vin: str, filename: str) -> bytes | None:
        """The bytes of ``filename`` in the vehicle's director repository, or None."""
        head, _, rest = filename.partition(".")
        if filename == "timestamp.json":
            return self._timestamp(session, vin)
        # ASCII digits that fit the database's 64-bit integers ("²".isdigit() is True too)
        if not (head.isascii() and head.isdigit() and len(head) <= 18) or rest not in (
            "root.json",
            "targets.json",
            "snapshot.json",
        ):
            return None
        version = int(head)
        if rest == "root.json":
            if session.get(Vehicle, vin) is None:
                return None
            path = self.metadata_dir / filename
            return path.read_bytes() if path.is_file() else None
        row = session.get(DirectorMetadata, (vin, rest.removesuffix(".json"), version))
        return row.content if row else None

    def _timestamp(self, session: Session, vin: str) -> bytes | None:
        cached = self._timestamp_cache.get(vin)
        now = datetime.now(UTC)
        if cached and cached[1] - now > _REFRESH_MARGIN["timestamp"]:
            return cached[0]
        if session.get(Vehicle, vin) is None:
            return None
        if self.update_vehicle(session, vin):
            session.commit()
        row = self._latest(session, vin, "timestamp")
        if row is None:
            return None
        self._timestamp_cache[vin] = (row.content, as_utc(row.expires))
        return row.content
