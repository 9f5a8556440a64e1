"""The image repository: one global TUF repository of firmware images.

Workflow:

1. ``uptake server init`` signs root and an empty targets with OFFLINE
   keys and calls :meth:`ImageRepository.initialize`.
2. A release engineer uploads image bytes (:meth:`store_upload`, staged
   under ``uploads/`` by their SHA-256) and then targets metadata that they
   signed offline (:meth:`accept_targets`). The server checks that root's
   targets keys signed it (threshold), that its version is the next one,
   that every listed image is present with the stated length and hash, and
   that every entry carries valid Uptane custom fields.
3. The server then publishes a new snapshot and timestamp with its ONLINE
   keys.
4. Deltas between images (:mod:`server.deltas`) are targets of the
   ``deltas`` role, which the offline targets delegate ``deltas/*`` to and
   whose key is online: the server adds them (:meth:`add_delta`) without
   the release engineers' keys, and a vehicle uses one only to produce
   exactly an image the offline-signed targets name. Images move to ``targets/<dir>/<sha256>.<name>`` so that all files
   but ``timestamp.json`` are immutable (consistent snapshots) and can be
   cached by any web server or CDN.

Writes are atomic and ordered (images, then targets, snapshot, timestamp
last), so a crash at any point leaves the previously published state intact
and served. Uploaded metadata is parsed with bounded size and depth
(:mod:`signing.json_limits`), target paths and hashes follow
:mod:`signing.names`, and every file named from outside is placed with
:func:`signing.names.confined`, so none can land outside its directory.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.api.serialization.json import JSONSerializer

from signing.atomic_file import atomic_writer, write_atomic
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.metadata import (
    DELTAS_PATH_PATTERN,
    DELTAS_ROLE,
    DeltaCustom,
    MetadataFormatError,
    consistent_target_path,
    delta_target_path,
    expiry,
    image_custom,
)
from signing.names import (
    InvalidNameError,
    check_hashes,
    check_sha256,
    check_target_path,
    confined,
)

_SERIALIZER = JSONSerializer(compact=False)
#: Re-sign online metadata when it expires sooner than this.
_REFRESH_MARGIN = {"snapshot": timedelta(days=2), "timestamp": timedelta(hours=6)}
#: Largest targets metadata accepted from a release engineer.
MAX_TARGETS_BYTES = 5_000_000
#: Lifetime of the online-signed deltas role metadata.
_DELTAS_EXPIRY = timedelta(days=30)


class ImageRepositoryError(UptakeError):
    """A request to the image repository was refused; the message says why."""


def versioned_files(directory: Path, role: str) -> list[tuple[int, Path]]:
    found = []
    for p in directory.glob(f"*.{role}.json"):
        head = p.name.split(".", 1)[0]
        if head.isdigit():
            found.append((int(head), p))
    return sorted(found)


def _existing_file(path: Path) -> Path | None:
    """``path`` if it is a regular file; None also for names the OS refuses (too long...)."""
    try:
        return path if path.is_file() else None
    except OSError:
        return None


def _to_bytes(md: Metadata) -> bytes:  # type: ignore[type-arg]
    return md.to_bytes(_SERIALIZER)


_Role = TypeVar("_Role", Root, Targets)


def _parse(data: bytes, role: type[_Role]) -> Metadata[_Role]:
    """Parse metadata that must be of ``role`` type, as :class:`ImageRepositoryError` otherwise."""
    try:
        # bounds first (depth, integers): python-tuf's parser has none
        parse_json(data, where=f"{role.type} metadata", max_bytes=MAX_TARGETS_BYTES)
    except UntrustedJsonError as exc:
        raise ImageRepositoryError(str(exc)) from exc
    try:
        md = Metadata[role].from_bytes(data)  # type: ignore[valid-type]
        _ = md.signed_bytes  # what signatures cover must have a canonical form (no floats)
    except (DeserializationError, SerializationError) as exc:
        raise ImageRepositoryError(
            f"{role.type} metadata is malformed: {exc.__cause__ or exc}"
        ) from exc
    if not isinstance(md.signed, role):
        raise ImageRepositoryError(f"expected {role.type} metadata, got {md.signed.type!r}")
    return md


def deltas_delegation(deltas_key: Key) -> Delegations:
    """The delegation the offline targets role makes to the server's online deltas key."""
    role = DelegatedRole(DELTAS_ROLE, [deltas_key.keyid], 1, True, paths=[DELTAS_PATH_PATTERN])
    return Delegations(keys={deltas_key.keyid: deltas_key}, roles={DELTAS_ROLE: role})


def consistent_target_name(target: TargetFile) -> str:
    """Where a consistent-snapshot client fetches ``target`` (``dir/<hash>.<name>``)."""
    return consistent_target_path(target.path, next(iter(target.hashes.values())))


def _under(directory: Path, relative: str, where: str) -> Path:
    """``directory/relative`` for a '/'-separated path, refused if it would leave ``directory``."""
    return confined(directory, *relative.split("/"), where=where)


class ImageRepository:
    """The image repository stored under ``root_dir`` (see module docstring)."""

    def __init__(
        self,
        root_dir: Path,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        deltas_signer: Signer | None = None,
    ) -> None:
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.uploads_dir = root_dir / "uploads"
        self._snapshot_signer = snapshot_signer
        self._timestamp_signer = timestamp_signer
        self._deltas_signer = deltas_signer
        self._lock = threading.Lock()
        self._load()

    # -- setup ---------------------------------------------------------------

    @classmethod
    def initialize(
        cls,
        root_dir: Path,
        root: Metadata[Root],
        targets: Metadata[Targets],
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        deltas_signer: Signer | None = None,
    ) -> ImageRepository:
        """Create a repository from offline-signed root v1 and targets v1."""
        metadata_dir = root_dir / "metadata"
        if versioned_files(metadata_dir, "root"):
            raise ImageRepositoryError(f"{metadata_dir} already holds an image repository")
        write_atomic(metadata_dir / "1.root.json", _to_bytes(root))
        write_atomic(metadata_dir / f"{targets.signed.version}.targets.json", _to_bytes(targets))
        snapshot = Metadata(Snapshot(expires=expiry("snapshot")))
        timestamp = Metadata(Timestamp(expires=expiry("timestamp")))
        repo = cls.__new__(cls)
        repo.metadata_dir, repo.targets_dir = metadata_dir, root_dir / "targets"
        repo.uploads_dir = root_dir / "uploads"
        repo._snapshot_signer, repo._timestamp_signer = snapshot_signer, timestamp_signer
        repo._deltas_signer = deltas_signer
        repo._lock = threading.Lock()
        repo.root, repo.targets, repo.snapshot, repo.timestamp = root, targets, snapshot, timestamp
        repo.deltas = None
        repo._ensure_deltas_metadata()
        repo._publish_snapshot_and_timestamp(bump=False)
        repo._index_served_files()
        return repo

    def _load(self) -> None:
        roots = versioned_files(self.metadata_dir, "root")
        targets = versioned_files(self.metadata_dir, "targets")
        snapshots = versioned_files(self.metadata_dir, "snapshot")
        if not roots or not targets or not snapshots:
            raise ImageRepositoryError(
                f"{self.metadata_dir} holds no image repository: run 'uptake server init'"
            )
        self.root = Metadata[Root].from_file(str(roots[-1][1]))
        self.targets = Metadata[Targets].from_file(str(targets[-1][1]))
        self.snapshot = Metadata[Snapshot].from_file(str(snapshots[-1][1]))
        self.timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
        deltas = versioned_files(self.metadata_dir, DELTAS_ROLE)
        self.deltas: Metadata[Targets] | None = (
            Metadata[Targets].from_file(str(deltas[-1][1])) if deltas else None
        )
        self._index_served_files()

    def _index_served_files(self) -> None:
        """Index what ``targets/`` serves: the published images and deltas, by consistent name.

        Served paths are looked up here, never built from the URL: a request
        can only ever reach a file this repository published. Replaced as a
        whole after every change, so the event loop reads it without a lock.
        """
        served = {consistent_target_name(t): t for t in self.targets.signed.targets.values()}
        if self.deltas is not None:
            served.update(
                (consistent_target_name(t), t) for t in self.deltas.signed.targets.values()
            )
        self._served: dict[str, TargetFile] = served

    def _delegates_deltas(self) -> bool:
        delegations = self.targets.signed.delegations
        return bool(delegations and delegations.roles and DELTAS_ROLE in delegations.roles)

    def _ensure_deltas_metadata(self) -> None:
        """Create the (empty) deltas role metadata once targets delegate to it."""
        if self.deltas is None and self._delegates_deltas() and self._deltas_signer is not None:
            self.deltas = Metadata(
                Targets(
                    version=1, expires=(datetime.now(UTC) + _DELTAS_EXPIRY).replace(microsecond=0)
                )
            )
            self._sign(self.deltas, self._deltas_signer)
            write_atomic(self.metadata_dir / f"1.{DELTAS_ROLE}.json", _to_bytes(self.deltas))

    # -- publishing ----------------------------------------------------------

    def _sign(self, md: Metadata, signer: Signer) -> None:  # type: ignore[type-arg]
        md.signatures.clear()
        md.sign(signer, append=True)

    def _publish_snapshot_and_timestamp(self, bump: bool = True) -> None:
        snap = self.snapshot.signed
        snap.version += bump
        snap.expires = expiry("snapshot")
        snap.meta = {"targets.json": MetaFile(version=self.targets.signed.version)}
        if self.deltas is not None and self._delegates_deltas():
            snap.meta[f"{DELTAS_ROLE}.json"] = MetaFile(version=self.deltas.signed.version)
        self._sign(self.snapshot, self._snapshot_signer)
        write_atomic(self.metadata_dir / f"{snap.version}.snapshot.json", _to_bytes(self.snapshot))
        self._publish_timestamp(bump)

    def _publish_timestamp(self, bump: bool = True) -> None:
        ts = self.timestamp.signed
        ts.version += bump
        ts.expires = expiry("timestamp")
        ts.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self._sign(self.timestamp, self._timestamp_signer)
        write_atomic(self.metadata_dir / "timestamp.json", _to_bytes(self.timestamp))

    def refresh_online_metadata(self, now: datetime | None = None) -> bool:
        """Re-sign snapshot/timestamp that are close to expiry. True if anything changed."""
        now = now or datetime.now(UTC)
        with self._lock:
            if (
                self.deltas is not None
                and self._deltas_signer is not None
                and self.deltas.signed.expires - now < _REFRESH_MARGIN["snapshot"]
            ):
                self._publish_deltas()
                return True
            if self.snapshot.signed.expires - now < _REFRESH_MARGIN["snapshot"]:
                self._publish_snapshot_and_timestamp()
                return True
            if self.timestamp.signed.expires - now < _REFRESH_MARGIN["timestamp"]:
                self._publish_timestamp()
                return True
        return False

    # -- uploads -------------------------------------------------------------

    async def store_upload(
        self, expected_sha256: str, chunks: AsyncIterator[bytes], max_length: int
    ) -> int:
        """Stage an image upload, checking its SHA-256 while streaming it to disk."""
        try:
            check_sha256(expected_sha256, "upload name")
            target = confined(self.uploads_dir, expected_sha256, where="upload")
        except InvalidNameError as exc:
            raise ImageRepositoryError(f"{exc} (the image's SHA-256)") from exc
        digest = hashlib.sha256()
        length = 0
        with atomic_writer(target) as out:
            async for chunk in chunks:
                length += len(chunk)
                if length > max_length:
                    raise ImageRepositoryError(f"upload larger than the {max_length}-byte limit")
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != expected_sha256:
                raise ImageRepositoryError(
                    f"uploaded bytes have SHA-256 {digest.hexdigest()}, not {expected_sha256}"
                )
        return length

    # -- targets from release engineers ---------------------------------------

    def accept_targets(self, data: bytes) -> Metadata[Targets]:
        """Verify and publish offline-signed targets metadata (see module docstring)."""
        if len(data) > MAX_TARGETS_BYTES:
            raise ImageRepositoryError(f"targets metadata larger than {MAX_TARGETS_BYTES} bytes")
        new = _parse(data, Targets)
        with self._lock:
            current = self.targets.signed
            try:
                self.root.signed.verify_delegate(Targets.type, new.signed_bytes, new.signatures)
            except UnsignedMetadataError as exc:
                raise ImageRepositoryError(
                    f"targets metadata is not signed by a threshold of root's targets keys: {exc}"
                ) from exc
            if new.signed.version != current.version + 1:
                raise ImageRepositoryError(
                    f"targets version must be {current.version + 1} (current is {current.version}),"
                    f" got {new.signed.version}"
                )
            if new.signed.is_expired():
                raise ImageRepositoryError("targets metadata is already expired")
            self._check_delegations(new.signed)
            moves = self._check_targets(new.signed.targets.values())
            for src, dst in moves:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            write_atomic(confined(self.metadata_dir, f"{new.signed.version}.targets.json"), data)
            self.targets = new
            self._ensure_deltas_metadata()
            self._publish_snapshot_and_timestamp()
            self._index_served_files()
            return new

    def _check_delegations(self, targets: Targets) -> None:
        delegations = targets.delegations
        if delegations is None:
            return
        roles = delegations.roles or {}
        if set(roles) != {DELTAS_ROLE} or roles[DELTAS_ROLE].paths != [DELTAS_PATH_PATTERN]:
            raise ImageRepositoryError(
                f"the only delegation this repository serves is {DELTAS_ROLE!r} for {DELTAS_PATH_PATTERN!r}"
            )

    # -- deltas (online role) ----------------------------------------------------

    def has_delta(self, base_sha256: str, result_sha256: str) -> bool:
        return (
            self.deltas is not None
            and delta_target_path(base_sha256, result_sha256) in self.deltas.signed.targets
        )

    def find_by_sha256(self, sha256: str) -> TargetFile | None:
        """The published full image with this SHA-256, if any."""
        for target in self.targets.signed.targets.values():
            if target.hashes.get("sha256") == sha256:
                return target
        return None

    def image_file(self, target: TargetFile) -> Path:
        return _under(self.targets_dir, consistent_target_name(target), f"image {target.path!r}")

    def add_delta(self, delta_file: Path, custom: DeltaCustom) -> TargetFile:
        """Publish ``delta_file`` as a target of the deltas role (moves the file)."""
        if self._deltas_signer is None or not self._delegates_deltas():
            raise ImageRepositoryError(
                "this repository's targets do not delegate deltas to an online key"
            )
        path = delta_target_path(custom.base_sha256, custom.result_sha256)
        target = TargetFile.from_file(path, str(delta_file), ["sha256"])
        target.unrecognized_fields["custom"] = custom.to_custom()
        final = self.image_file(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(delta_file, final)
        with self._lock:
            assert self.deltas is not None
            self.deltas.signed.targets[path] = target
            self._publish_deltas()
            self._index_served_files()
        return target

    def _publish_deltas(self) -> None:
        assert self.deltas is not None and self._deltas_signer is not None
        signed = self.deltas.signed
        signed.version += 1
        signed.expires = (datetime.now(UTC) + _DELTAS_EXPIRY).replace(microsecond=0)
        self._sign(self.deltas, self._deltas_signer)
        write_atomic(
            self.metadata_dir / f"{signed.version}.{DELTAS_ROLE}.json", _to_bytes(self.deltas)
        )
        self._publish_snapshot_and_timestamp()

    def _check_targets(self, targets: Iterable[TargetFile]) -> list[tuple[Path, Path]]:
        moves = []
        for target in targets:
            where = f"target {target.path[:80]!r}"
            try:
                check_target_path(target.path, "target path")
                check_hashes(target.hashes, f"{where}.hashes")
                if list(target.hashes) != ["sha256"]:
                    raise InvalidNameError(f"{where}.hashes", "must be exactly one sha256")
                final = self.image_file(target)
                staged = confined(self.uploads_dir, target.hashes["sha256"], where=where)
            except InvalidNameError as exc:
                raise ImageRepositoryError(str(exc)) from exc
            if target.path.startswith(DELTAS_PATH_PATTERN.removesuffix("*")):
                raise ImageRepositoryError(
                    f"{where}: {DELTAS_PATH_PATTERN} belongs to the online deltas role"
                )
            try:
                image_custom(target)
            except MetadataFormatError as exc:
                raise ImageRepositoryError(str(exc)) from exc
            if final.exists():
                if final.stat().st_size != target.length:
                    raise ImageRepositoryError(f"{where}: length differs from the published image")
                continue
            if not staged.exists():
                raise ImageRepositoryError(
                    f"{where}: image not uploaded (PUT it to /api/v1/image/uploads/<sha256> first)"
                )
            if staged.stat().st_size != target.length:
                raise ImageRepositoryError(
                    f"{where}: uploaded image is {staged.stat().st_size} bytes, metadata says {target.length}"
                )
            moves.append((staged, final))
        return moves

    def accept_root(self, data: bytes) -> Metadata[Root]:
        """Rotate root: the new root must be signed by old AND new root key thresholds."""
        new = _parse(data, Root)
        with self._lock:
            if new.signed.version != self.root.signed.version + 1:
                raise ImageRepositoryError(f"root version must be {self.root.signed.version + 1}")
            try:
                self.root.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
                new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            except UnsignedMetadataError as exc:
                raise ImageRepositoryError(
                    f"root metadata is not signed by old and new root keys: {exc}"
                ) from exc
            write_atomic(confined(self.metadata_dir, f"{new.signed.version}.root.json"), data)
            self.root = new
            return new

    def set_online_signers(self, snapshot_signer: Signer, timestamp_signer: Signer) -> None:
        """Use rotated online keys and re-publish with them (key-compromise recovery)."""
        with self._lock:
            self._snapshot_signer, self._timestamp_signer = snapshot_signer, timestamp_signer
            self._publish_snapshot_and_timestamp()

    # -- reading -------------------------------------------------------------

    def find_target(self, filepath: str) -> TargetFile | None:
        return self.targets.signed.targets.get(filepath)

    def targets_bytes(self) -> bytes:
        return (self.metadata_dir / f"{self.targets.signed.version}.targets.json").read_bytes()

    def metadata_path(self, filename: str) -> Path | None:
        """The metadata file served as ``filename`` (a name, :mod:`signing.names`), or None."""
        return _existing_file(confined(self.metadata_dir, filename, where="metadata file"))

    def target_path(self, name: str) -> Path | None:
        """The published image or delta served as ``name`` (``dir/<sha256>.<name>``), or None."""
        target = self._served.get(name)
        return None if target is None else _existing_file(self.image_file(target))


__all__ = ["ImageRepository", "ImageRepositoryError", "RepositoryError", "consistent_target_name"]
