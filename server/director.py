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

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.signer import Signer
from sqlalchemy import delete, update
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from server.campaign_tables import Campaign, CampaignVehicle
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
from server.lifetimes import Lifetimes
from server.metrics import signing_timer
from signing.atomic_file import write_atomic
from signing.metadata import director_custom, set_director_vin
from signing.names import parse_number

log = logging.getLogger(__name__)
_SERIALIZER = JSONSerializer(compact=False)
_KEEP_VERSIONS = 4
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
        lifetimes: Lifetimes | None = None,
        sole_writer: bool = False,
    ) -> None:
        self.metadata_dir = director_dir / "metadata"
        #: no other process signs for this database (SQLite): see :meth:`cached_timestamp`
        self._sole_writer = sole_writer
        self._lifetimes = lifetimes or Lifetimes()
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
        # vin -> (version, timestamp bytes, expires): the idle-poll cache, checked against the
        # database's newest version on every use (:meth:`_timestamp`)
        self._timestamp_cache: dict[str, tuple[int, bytes, datetime]] = {}
        # vin -> newest timestamp version this process signed: a cached timestamp older than
        # it (cached by a poll that read the database before that signing committed) is stale
        self._signed_timestamps: dict[str, int] = {}

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

    def missing_signers(self) -> list[str]:
        """The online keys this director cannot sign with (none once the server runs)."""
        return [
            f"director-{role}"
            for role in ("targets", "snapshot", "timestamp")
            if self._signers.get(role) is None
        ]

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
        consent = self._consent_assignments(session, vin)
        on_consent: set[str] = set()
        for row in rows:
            if row.id in consent:
                on_consent.add(row.filepath)
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
                image.length,
                dict(image.hashes),
                filepath,
                {"custom": director_custom(ecu_map, install_on_consent=filepath in on_consent)},
            )
        return targets

    @staticmethod
    def _consent_assignments(session: Session, vin: str) -> set[int]:
        """Ids of ``vin``'s assignments made by campaigns in install-on-consent mode."""
        lists = session.exec(
            select(CampaignVehicle.assignments)
            .join(Campaign, col(Campaign.id) == col(CampaignVehicle.campaign_id))
            .where(CampaignVehicle.vin == vin, col(Campaign.install_on_consent))
        ).all()
        return {int(i) for text in lists for i in json.loads(text)}

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
        with signing_timer("director", role):
            md.sign(self._signers[role], append=True)
        if role == "timestamp":  # before the commit: no poll may cache an older one as current
            self._signed_timestamps[vin] = max(
                md.signed.version, self._signed_timestamps.get(vin, 0)
            )
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
        What to sign is decided twice: first without a lock (an idle poll writes
        nothing), then again after locking the vehicle's row, so that a
        concurrent writer's assignment (a campaign's sweep, a manifest) cannot
        be signed away by a decision made on rows read before it committed.
        """
        if not force and not self._update(session, vin, force=False, dry_run=True):
            return False
        session.exec(
            update(Vehicle)
            .where(col(Vehicle.vin) == vin)
            .values(director_targets_version=Vehicle.director_targets_version)
        )
        return self._update(session, vin, force=force, dry_run=False)

    def _update(self, session: Session, vin: str, *, force: bool, dry_run: bool) -> bool:
        now = datetime.now(UTC)
        # Replicas: the vehicle's row is locked until the caller commits (PostgreSQL), so two
        # processes never sign the same version; the primary key (vin, role, version) refuses it
        # anyway. Locked before reading what to sign, so nothing signs an outdated list.
        session.exec(select(Vehicle.vin).where(Vehicle.vin == vin).with_for_update())
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
                return row is None or self._lifetimes.due(
                    f"director-{role}", as_utc(row.expires), now
                )

            new_targets = (
                force
                or current is None
                or current.signed.targets != desired
                or near_expiry("targets")
            )
            new_snapshot = new_targets or near_expiry("snapshot")
            new_timestamp = new_snapshot or near_expiry("timestamp")
            if not new_timestamp or dry_run:
                return new_timestamp

            if new_targets:
                version = current.signed.version + 1 if current else 1
                targets = Targets(
                    version=version, expires=self._lifetimes.expires("director-targets", now)
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
                snapshot = Snapshot(
                    version=snap_version, expires=self._lifetimes.expires("director-snapshot", now)
                )
                snapshot.meta = {"targets.json": MetaFile(version=targets_version)}
                set_director_vin(snapshot, vin)
                self._store(session, vin, Metadata(snapshot))
            else:
                assert snap_row is not None
                snap_version = snap_row.version

            ts_row = latest["timestamp"]
            timestamp = Timestamp(
                version=ts_row.version + 1 if ts_row else 1,
                expires=self._lifetimes.expires("director-timestamp", now),
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
        version = parse_number(head)
        # versions are 32-bit columns: a larger one names no file
        if (
            version is None
            or version > 2**31 - 1
            or rest
            not in (
                "root.json",
                "targets.json",
                "snapshot.json",
            )
        ):
            return None
        if rest == "root.json":
            if session.get(Vehicle, vin) is None:
                return None
            path = self.metadata_dir / filename
            return path.read_bytes() if path.is_file() else None
        row = session.get(DirectorMetadata, (vin, rest.removesuffix(".json"), version))
        return row.content if row else None

    def cached_timestamp(self, vin: str) -> bytes | None:
        """The vehicle's ``timestamp.json`` served with no database work, or None (ask
        :meth:`metadata` then).

        Only when this process is the database's sole writer (SQLite, the embedded
        default): with replicas on PostgreSQL another process may have signed a newer
        version, and serving the older one would look like a rollback to a vehicle that
        polls both, so :meth:`_timestamp` checks the database's newest version instead.
        """
        if not self._sole_writer:
            return None
        cached = self._timestamp_cache.get(vin)
        if (
            cached
            and cached[0] >= self._signed_timestamps.get(vin, 0)
            and not self._lifetimes.due("director-timestamp", cached[2], datetime.now(UTC))
        ):
            return cached[1]
        return None

    def cached_timestamp_at(self, vin: str, latest: int | None) -> bytes | None:
        """The cached ``timestamp.json`` of ``vin`` if it is the database's newest version
        ``latest`` (read by the caller, :mod:`server.timestamp_versions`) and not due to be
        signed again; None: ask :meth:`metadata`. The check :meth:`_timestamp` makes, with
        the version read elsewhere."""
        cached = self._timestamp_cache.get(vin)
        if (
            latest is None
            or not cached
            or cached[0] != latest
            or self._lifetimes.due("director-timestamp", cached[2], datetime.now(UTC))
        ):
            return None
        return cached[1]

    def _latest_version(self, session: Session, vin: str, role: str) -> int | None:
        """The newest version of ``role`` (read from the primary key's index alone)."""
        return session.exec(
            select(DirectorMetadata.version)
            .where(DirectorMetadata.vin == vin, DirectorMetadata.role == role)
            .order_by(col(DirectorMetadata.version).desc())
            .limit(1)
        ).first()

    def _timestamp(self, session: Session, vin: str) -> bytes | None:
        # The cache keeps the bytes, the database says whether they are still the newest:
        # another server process may have signed since (replicas), and a deleted vehicle's
        # rows are gone. One index-only read per idle poll.
        cached = self._timestamp_cache.get(vin)
        now = datetime.now(UTC)
        if (
            cached
            and not self._lifetimes.due("director-timestamp", cached[2], now)
            and self._latest_version(session, vin, "timestamp") == cached[0]
        ):
            return cached[1]
        if session.get(Vehicle, vin) is None:
            return None
        if self.update_vehicle(session, vin):
            session.commit()
        row = self._latest(session, vin, "timestamp")
        if row is None:
            return None
        self._timestamp_cache[vin] = (row.version, row.content, as_utc(row.expires))
        return row.content
