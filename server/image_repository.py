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

   With a targets threshold above one, and signers on separate machines,
   the targets are *staged* instead (:meth:`stage_targets`: the same checks
   but the signatures), signatures arrive one at a time
   (:meth:`add_staged_signatures`, each verified against root's targets
   keys on arrival), and the staged targets are published as in step 2 the
   moment a threshold has signed; :meth:`staged_status` names the signers
   still missing (by the names root records, :func:`signing.metadata.key_names`).
4. Deltas between images (:mod:`server.deltas`) are targets of the
   ``deltas`` role, which the offline targets delegate ``deltas/*`` to and
   whose key is online: the server adds them (:meth:`add_delta`) without
   the release engineers' keys, and a vehicle uses one only to produce
   exactly an image the offline-signed targets name.
5. Suppliers sign their own images in terminating delegated roles that the
   offline targets create (``uptake delegation add``, :mod:`server.delegation`),
   each limited to path patterns and hardware ids (both in the signed
   delegation, :func:`signing.metadata.check_supplier_delegation`). A
   supplier uploads its role's metadata (:meth:`accept_delegated_targets`):
   signed by a threshold of the delegation's keys, next version, and every
   image within the delegation's paths and hardware ids, or refused
   (:class:`OutsideDelegationError`). Images move to ``targets/<dir>/<sha256>.<name>`` so that all files
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

import asyncio
import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature, Signer
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

from server.image_batch import CHUNK_BYTES, DIGEST_BYTES, HEADER
from server.lifetimes import Lifetimes
from server.metrics import signing_timer
from signing.atomic_file import atomic_writer, fsync_directory, write_atomic
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.metadata import (
    DELTAS_PATH_PATTERN,
    DELTAS_ROLE,
    DeltaCustom,
    MetadataFormatError,
    check_arch,
    check_supplier_delegation,
    consistent_target_path,
    delta_target_path,
    image_custom,
    images_outside_delegation,
    key_names,
)
from signing.names import (
    InvalidNameError,
    check_hashes,
    check_sha256,
    check_target_path,
    confined,
)

_SERIALIZER = JSONSerializer(compact=False)
#: Largest targets metadata accepted from a release engineer.
MAX_TARGETS_BYTES = 5_000_000


class ImageRepositoryError(UptakeError):
    """A request to the image repository was refused; the message says why."""


class NoSuchDelegationError(ImageRepositoryError):
    """The targets delegate to no supplier role of that name."""


class OutsideDelegationError(ImageRepositoryError):
    """A supplier's metadata names an image outside its delegation (path or hardware ids)."""


#: Most supplier delegations the targets may make (bounds what every vehicle walks).
MAX_DELEGATIONS = 256


class NoStagedReleaseError(ImageRepositoryError):
    """No release is staged (or it was published or discarded meanwhile)."""


@dataclass(frozen=True)
class StagedStatus:
    """Who signed a staged release and who may still sign it (names from root, else key ids)."""

    targets_version: int
    threshold: int
    signed_by: tuple[str, ...]
    missing: tuple[str, ...]
    published: bool = False

    @property
    def needed(self) -> int:
        return max(0, self.threshold - len(self.signed_by))

    def to_dict(self) -> dict[str, object]:
        return {
            "targets_version": self.targets_version,
            "threshold": self.threshold,
            "signed_by": list(self.signed_by),
            "missing": list(self.missing),
            "signatures_needed": self.needed,
            "published": self.published,
        }


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


@contextmanager
def _file_lock(path: Path, operation: int) -> Iterator[None]:
    """``flock`` ``path`` (made if missing) while the block runs: one publisher across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


#: Images of a batch upload whose fsync may run while the next ones stream in.
_FSYNCS_IN_FLIGHT = 16


async def _receive_image(
    read: Callable[[int], Awaitable[bytes]], out: BinaryIO, length: int, where: str
) -> hashlib._Hash:
    """Write the next ``length`` bytes of a batch upload to ``out``; returns their hash."""
    digest = hashlib.sha256()
    left = length
    while left:
        chunk = await read(min(left, CHUNK_BYTES))
        if not chunk:
            raise ImageRepositoryError(
                f"{where} is cut off after {length - left} of its {length} bytes"
            )
        digest.update(chunk)
        out.write(chunk)
        left -= len(chunk)
    return digest


def _sync_and_place(out: BinaryIO, tmp_name: str, final: Path) -> None:
    """Make a received image durable (one fsync), then give it its name."""
    try:
        os.fsync(out.fileno())
    finally:
        out.close()
    os.replace(tmp_name, final)


async def _read_exactly(
    read: Callable[[int], Awaitable[bytes]], n: int, done: int, eof_ok: bool = False
) -> bytes | None:
    """``n`` bytes of a batch upload; None at a clean end (``eof_ok``), else refused."""
    data = b""
    while len(data) < n:
        chunk = await read(n - len(data))
        if not chunk:
            if eof_ok and not data:
                return None
            raise ImageRepositoryError(
                f"the upload is cut off in the frame of image {done + 1} "
                f"(after {done} complete image(s))"
            )
        data += chunk
    return data


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
        lifetimes: Lifetimes | None = None,
    ) -> None:
        self.metadata_dir = root_dir / "metadata"
        self.lifetimes = lifetimes or Lifetimes()
        self.targets_dir = root_dir / "targets"
        self.uploads_dir = root_dir / "uploads"
        self.staged_path = root_dir / "staged" / "targets.json"
        self._snapshot_signer = snapshot_signer
        self._timestamp_signer = timestamp_signer
        self._deltas_signer = deltas_signer
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        with self._lock, _file_lock(self._lock_path, fcntl.LOCK_SH):
            self._load()
            self._seen = self._stamp()

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
        lifetimes: Lifetimes | None = None,
    ) -> ImageRepository:
        """Create a repository from offline-signed root v1 and targets v1."""
        metadata_dir = root_dir / "metadata"
        if versioned_files(metadata_dir, "root"):
            raise ImageRepositoryError(f"{metadata_dir} already holds an image repository")
        write_atomic(metadata_dir / "1.root.json", _to_bytes(root))
        write_atomic(metadata_dir / f"{targets.signed.version}.targets.json", _to_bytes(targets))
        repo = cls.__new__(cls)
        repo.lifetimes = lifetimes or Lifetimes()
        snapshot = Metadata(Snapshot(expires=repo.lifetimes.expires("snapshot")))
        timestamp = Metadata(Timestamp(expires=repo.lifetimes.expires("timestamp")))
        repo.metadata_dir, repo.targets_dir = metadata_dir, root_dir / "targets"
        repo.uploads_dir = root_dir / "uploads"
        repo.staged_path = root_dir / "staged" / "targets.json"
        repo._snapshot_signer, repo._timestamp_signer = snapshot_signer, timestamp_signer
        repo._deltas_signer = deltas_signer
        repo._lock = threading.Lock()
        repo._seen = None
        repo.root, repo.targets, repo.snapshot, repo.timestamp = root, targets, snapshot, timestamp
        repo.deltas = None
        repo.suppliers = {}
        repo._ensure_deltas_metadata()
        repo._publish_snapshot_and_timestamp(bump=False)
        repo._index_served_files()
        return repo

    # -- several server processes on one repository directory ---------------------
    #
    # Every change happens under an exclusive lock of DATA/image-repo/.lock (flock) and
    # starts from what is on disk; every change ends by writing timestamp.json, so a
    # process that sees a timestamp.json other than the one it last loaded reloads the
    # metadata (under the shared lock, so never half a publish).

    @property
    def _lock_path(self) -> Path:
        return self.metadata_dir.parent / ".lock"

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.metadata_dir / "timestamp.json")
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's lock and the repository's file lock, with the newest metadata loaded."""
        with self._lock, _file_lock(self._lock_path, fcntl.LOCK_EX):
            if self._seen is not None and self._stamp() != self._seen:
                self._load()
            try:
                yield
            finally:
                self._seen = self._stamp()

    def refresh(self) -> None:
        """Load what another server process published since (one stat when nothing changed)."""
        if self._seen is None or self._stamp() == self._seen:
            return
        with self._lock, _file_lock(self._lock_path, fcntl.LOCK_SH):
            if self._stamp() != self._seen:
                self._load()
                self._seen = self._stamp()

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
        self.suppliers: dict[str, Metadata[Targets]] = {}
        self._load_suppliers()
        self._index_served_files()

    def supplier_roles(self) -> dict[str, DelegatedRole]:
        """The supplier delegations the published targets make, by name."""
        delegations = self.targets.signed.delegations
        roles = (delegations.roles or {}) if delegations else {}
        return {name: role for name, role in roles.items() if name != DELTAS_ROLE}

    def _load_suppliers(self) -> None:
        """The newest metadata of every supplier role delegated to now (None yet: not loaded)."""
        suppliers = {}
        for name in self.supplier_roles():
            found = versioned_files(self.metadata_dir, name)
            if found:
                suppliers[name] = Metadata[Targets].from_file(str(found[-1][1]))
        self.suppliers = suppliers

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
        for supplier in self.suppliers.values():
            served.update((consistent_target_name(t), t) for t in supplier.signed.targets.values())
        self._served: dict[str, TargetFile] = served

    def _delegates_deltas(self) -> bool:
        delegations = self.targets.signed.delegations
        return bool(delegations and delegations.roles and DELTAS_ROLE in delegations.roles)

    def _ensure_deltas_metadata(self) -> None:
        """Create the (empty) deltas role metadata once targets delegate to it."""
        if self.deltas is None and self._delegates_deltas() and self._deltas_signer is not None:
            self.deltas = Metadata(Targets(version=1, expires=self.lifetimes.expires(DELTAS_ROLE)))
            self._sign(self.deltas, self._deltas_signer)
            write_atomic(self.metadata_dir / f"1.{DELTAS_ROLE}.json", _to_bytes(self.deltas))

    # -- publishing ----------------------------------------------------------

    def _sign(self, md: Metadata, signer: Signer) -> None:  # type: ignore[type-arg]
        md.signatures.clear()
        with signing_timer("image", md.signed.type):
            md.sign(signer, append=True)

    def missing_signers(self) -> list[str]:
        """The online keys this repository cannot sign with (none once the server runs)."""
        signers = {
            "image-snapshot": self._snapshot_signer,
            "image-timestamp": self._timestamp_signer,
        }
        return [name for name, signer in signers.items() if signer is None]

    def _publish_snapshot_and_timestamp(self, bump: bool = True) -> None:
        snap = self.snapshot.signed
        snap.version += bump
        snap.expires = self.lifetimes.expires("snapshot")
        snap.meta = {"targets.json": MetaFile(version=self.targets.signed.version)}
        if self.deltas is not None and self._delegates_deltas():
            snap.meta[f"{DELTAS_ROLE}.json"] = MetaFile(version=self.deltas.signed.version)
        for name, supplier in self.suppliers.items():
            snap.meta[f"{name}.json"] = MetaFile(version=supplier.signed.version)
        self._sign(self.snapshot, self._snapshot_signer)
        write_atomic(self.metadata_dir / f"{snap.version}.snapshot.json", _to_bytes(self.snapshot))
        self._publish_timestamp(bump)

    def _publish_timestamp(self, bump: bool = True) -> None:
        ts = self.timestamp.signed
        ts.version += bump
        ts.expires = self.lifetimes.expires("timestamp")
        ts.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self._sign(self.timestamp, self._timestamp_signer)
        write_atomic(self.metadata_dir / "timestamp.json", _to_bytes(self.timestamp))

    def refresh_online_metadata(self, now: datetime | None = None) -> bool:
        """Re-sign the online metadata (deltas, snapshot, timestamp) that is due.

        The one place the image repository re-signs by itself (the server runs it
        every :meth:`~server.lifetimes.Lifetimes.upkeep_interval`): metadata is
        due once less than half of its lifetime is left (:mod:`server.lifetimes`).
        True if anything was re-signed.
        """
        now = now or datetime.now(UTC)
        due = self.lifetimes.due
        with self._exclusive():
            if (
                self.deltas is not None
                and self._deltas_signer is not None
                and due(DELTAS_ROLE, self.deltas.signed.expires, now)
            ):
                self._publish_deltas()  # and snapshot and timestamp
                return True
            if due("snapshot", self.snapshot.signed.expires, now):
                self._publish_snapshot_and_timestamp()
                return True
            if due("timestamp", self.timestamp.signed.expires, now):
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

    async def store_upload_batch(
        self, read: Callable[[int], Awaitable[bytes]], max_images: int, max_length: int
    ) -> list[tuple[str, int]]:
        """Stage the images of a batch upload (:mod:`server.image_batch` framing).

        ``read(n)`` returns at most ``n`` bytes of the body, ``b""`` at its end.
        Each image is hashed while written and checked against the SHA-256 its
        sender computed; then, in a worker thread while the next image streams
        in, fsynced once and renamed to ``uploads/<sha256>``. The directory is
        fsynced once at the end, after every image is durable, before the
        answer. Returns (sha256, length) per image.
        """
        stored: list[tuple[str, int]] = []
        durable: list[asyncio.Future[None]] = []
        temporary: list[str] = []
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        try:
            while (
                head := await _read_exactly(read, HEADER.size, len(stored), eof_ok=True)
            ) is not None:
                if len(stored) >= max_images:
                    raise ImageRepositoryError(f"at most {max_images} images per upload")
                (length,) = HEADER.unpack(head)
                where = f"image {len(stored) + 1} of the upload"
                if length > max_length:
                    raise ImageRepositoryError(
                        f"{where} is larger than the {max_length}-byte limit"
                    )
                fd, tmp_name = tempfile.mkstemp(dir=self.uploads_dir, prefix=".batch.")
                temporary.append(tmp_name)
                out = os.fdopen(fd, "wb")
                try:
                    digest = await _receive_image(read, out, length, where)
                    stated = await _read_exactly(read, DIGEST_BYTES, len(stored))
                    if stated != digest.digest():
                        raise ImageRepositoryError(
                            f"{where}: its bytes have SHA-256 {digest.hexdigest()}, the sender "
                            f"stated {stated.hex() if stated else '?'}"
                        )
                    out.flush()
                except BaseException:
                    out.close()
                    raise
                final = self.uploads_dir / digest.hexdigest()
                durable.append(asyncio.ensure_future(asyncio.to_thread(_sync_and_place, out, tmp_name, final)))  # fmt: skip
                stored.append((digest.hexdigest(), length))
                if len(durable) >= _FSYNCS_IN_FLIGHT:
                    await durable[-_FSYNCS_IN_FLIGHT]
            if not stored:
                raise ImageRepositoryError("the upload holds no image")
            await asyncio.gather(*durable)
        except BaseException:
            await asyncio.gather(*durable, return_exceptions=True)
            for name in temporary:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            raise
        await asyncio.to_thread(fsync_directory, self.uploads_dir)
        return stored

    # -- targets from release engineers ---------------------------------------

    def accept_targets(self, data: bytes) -> Metadata[Targets]:
        """Verify and publish offline-signed targets metadata (see module docstring)."""
        new = self._parse_targets(data)
        with self._exclusive():
            self._verify_targets_signatures(new)
            moves = self._check_next_targets(new)
            self._publish_targets(new, data, moves)
            return new

    def _parse_targets(self, data: bytes) -> Metadata[Targets]:
        if len(data) > MAX_TARGETS_BYTES:
            raise ImageRepositoryError(f"targets metadata larger than {MAX_TARGETS_BYTES} bytes")
        return _parse(data, Targets)

    def _verify_targets_signatures(self, new: Metadata[Targets]) -> None:
        try:
            self.root.signed.verify_delegate(Targets.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise ImageRepositoryError(
                f"targets metadata is not signed by a threshold of root's targets keys: {exc}"
            ) from exc

    def _check_next_targets(self, new: Metadata[Targets]) -> list[tuple[Path, Path]]:
        """Everything but the signatures; returns the staged uploads to move into place."""
        current = self.targets.signed
        if new.signed.version != current.version + 1:
            raise ImageRepositoryError(
                f"targets version must be {current.version + 1} (current is {current.version}),"
                f" got {new.signed.version}"
            )
        if new.signed.is_expired():
            raise ImageRepositoryError("targets metadata is already expired")
        self._check_delegations(new.signed)
        # entries published before were checked then: only new or changed ones are (no stat or
        # parse per image already published, whatever the size of the repository)
        published = current.targets
        return self._check_targets(
            t for path, t in new.signed.targets.items() if published.get(path) != t
        )

    def _publish_targets(
        self, new: Metadata[Targets], data: bytes, moves: list[tuple[Path, Path]]
    ) -> None:
        for src, dst in moves:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        write_atomic(confined(self.metadata_dir, f"{new.signed.version}.targets.json"), data)
        self.targets = new
        self._load_suppliers()
        self._ensure_deltas_metadata()
        self._publish_snapshot_and_timestamp()
        self._index_served_files()

    # -- staged releases (threshold signing on separate machines) -------------

    def stage_targets(self, data: bytes) -> StagedStatus:
        """Stage targets metadata to collect signatures for (see module docstring).

        Replaces a release staged before. Signatures already on it are checked
        like the ones that arrive later; the images must be uploaded already.
        """
        new = self._parse_targets(data)
        with self._exclusive():
            self._check_next_targets(new)
            valid = self._valid_signatures(new, list(new.signatures.values()))
            new.signatures.clear()
            new.signatures.update(valid)
            write_atomic(self.staged_path, _to_bytes(new))
            return self._status(new)

    def staged(self) -> Metadata[Targets]:
        """The staged release with the signatures it collected so far."""
        try:
            return Metadata[Targets].from_bytes(self.staged_path.read_bytes())
        except FileNotFoundError:
            raise NoStagedReleaseError(
                "no release is staged (uptake release stage makes one)"
            ) from None

    def staged_status(self) -> StagedStatus:
        with self._exclusive():
            return self._status(self.staged())

    def discard_staged(self) -> int:
        """Drop the staged release; returns its targets version."""
        with self._exclusive():
            version = self.staged().signed.version
            self.staged_path.unlink()
            return version

    def add_staged_signatures(
        self, version: int, signatures: list[Signature]
    ) -> tuple[StagedStatus, Metadata[Targets] | None]:
        """Add verified signatures to the staged release; publish it once a threshold signed.

        Returns the status and, when this published the release, its metadata.
        """
        with self._exclusive():
            staged = self.staged()
            if staged.signed.version != version:
                raise ImageRepositoryError(
                    f"these signatures are for targets v{version}, but the staged release is "
                    f"v{staged.signed.version}: export it again and sign that"
                )
            for signature in self._valid_signatures(staged, signatures).values():
                staged.signatures[signature.keyid] = signature
            status = self._status(staged)
            if status.needed:
                write_atomic(self.staged_path, _to_bytes(staged))
                return status, None
            self._verify_targets_signatures(staged)
            moves = self._check_next_targets(staged)
            self._publish_targets(staged, _to_bytes(staged), moves)
            self.staged_path.unlink()
            return StagedStatus(
                status.targets_version, status.threshold, status.signed_by, status.missing, True
            ), staged

    def _valid_signatures(
        self, staged: Metadata[Targets], signatures: list[Signature]
    ) -> dict[str, Signature]:
        """``signatures`` by key id, each by a targets key of root over ``staged``; else refused."""
        role = self.root.signed.roles[Targets.type]
        names = key_names(self.root.signed)
        valid = {}
        for signature in signatures:
            name = names.get(signature.keyid, signature.keyid)
            if signature.keyid not in role.keyids:
                raise ImageRepositoryError(
                    f"key {name} is not one of root's targets keys: its signature is refused"
                )
            try:
                self.root.signed.keys[signature.keyid].verify_signature(
                    signature, staged.signed_bytes
                )
            except UnverifiedSignatureError as exc:
                raise ImageRepositoryError(
                    f"the signature of key {name} does not verify over staged targets "
                    f"v{staged.signed.version} (signed something else?)"
                ) from exc
            valid[signature.keyid] = signature
        return valid

    def _status(self, staged: Metadata[Targets]) -> StagedStatus:
        role = self.root.signed.roles[Targets.type]
        names = key_names(self.root.signed)
        signed = [k for k in role.keyids if k in staged.signatures]
        missing = [k for k in role.keyids if k not in staged.signatures]
        return StagedStatus(
            staged.signed.version,
            role.threshold,
            tuple(names.get(k, k) for k in signed),
            tuple(names.get(k, k) for k in missing),
        )

    def _check_delegations(self, targets: Targets) -> None:
        delegations = targets.delegations
        if delegations is None:
            return
        roles = delegations.roles or {}
        if len(roles) > MAX_DELEGATIONS + 1:
            raise ImageRepositoryError(f"at most {MAX_DELEGATIONS} supplier delegations")
        for name, role in roles.items():
            if name == DELTAS_ROLE:
                if role.paths != [DELTAS_PATH_PATTERN] or not role.terminating:
                    raise ImageRepositoryError(
                        f"delegation {DELTAS_ROLE!r} must be terminating, for {DELTAS_PATH_PATTERN!r}"
                    )
                continue
            try:
                check_supplier_delegation(role)
            except MetadataFormatError as exc:
                raise ImageRepositoryError(str(exc)) from exc

    # -- supplier roles (delegated, signed by the suppliers' own keys) ----------

    def accept_delegated_targets(self, name: str, data: bytes) -> Metadata[Targets]:
        """Verify and publish a supplier role's metadata (see module docstring, step 5)."""
        new = self._parse_targets(data)
        with self._exclusive():
            role = self.supplier_roles().get(name)
            if role is None:
                raise NoSuchDelegationError(f"the image targets delegate to no role {name!r}")
            try:
                self.targets.signed.verify_delegate(name, new.signed_bytes, new.signatures)
            except UnsignedMetadataError as exc:
                raise ImageRepositoryError(
                    f"{name} metadata is not signed by a threshold of delegation {name!r}'s keys:"
                    f" {exc}"
                ) from exc
            published = versioned_files(self.metadata_dir, name)
            expected = published[-1][0] + 1 if published else 1
            if new.signed.version != expected:
                raise ImageRepositoryError(
                    f"{name} metadata version must be {expected}, got {new.signed.version}"
                )
            if new.signed.is_expired():
                raise ImageRepositoryError(f"{name} metadata is already expired")
            if new.signed.delegations is not None:
                raise ImageRepositoryError(f"{name} metadata may not delegate further")
            try:
                problems = images_outside_delegation(role, new.signed.targets.values())
            except MetadataFormatError as exc:
                raise ImageRepositoryError(str(exc)) from exc
            if problems:
                raise OutsideDelegationError("; ".join(problems[:5]))
            moves = self._check_targets(new.signed.targets.values())
            for src, dst in moves:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            write_atomic(confined(self.metadata_dir, f"{new.signed.version}.{name}.json"), data)
            self.suppliers[name] = new
            self._publish_snapshot_and_timestamp()
            self._index_served_files()
            return new

    # -- deltas (online role) ----------------------------------------------------

    def has_delta(self, base_sha256: str, result_sha256: str) -> bool:
        self.refresh()
        return (
            self.deltas is not None
            and delta_target_path(base_sha256, result_sha256) in self.deltas.signed.targets
        )

    def find_by_sha256(self, sha256: str) -> TargetFile | None:
        """The published full image with this SHA-256, if any (suppliers' included)."""
        self.refresh()
        for targets in self._image_targets():
            for target in targets.values():
                if target.hashes.get("sha256") == sha256:
                    return target
        return None

    def _image_targets(self) -> list[dict[str, TargetFile]]:
        """Image targets in the order vehicles look them up: top-level, then each supplier."""
        roles = self.supplier_roles()
        return [self.targets.signed.targets] + [
            self.suppliers[name].signed.targets for name in roles if name in self.suppliers
        ]

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
        with self._exclusive():
            assert self.deltas is not None
            self.deltas.signed.targets[path] = target
            self._publish_deltas()
            self._index_served_files()
        return target

    def _publish_deltas(self) -> None:
        assert self.deltas is not None and self._deltas_signer is not None
        signed = self.deltas.signed
        signed.version += 1
        signed.expires = self.lifetimes.expires(DELTAS_ROLE)
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
                custom = image_custom(target)
                if custom.arch is not None:
                    check_arch(custom.arch, f"{where}: custom.arch")
            except MetadataFormatError as exc:
                raise ImageRepositoryError(str(exc)) from exc
            if final.exists():
                if final.stat().st_size != target.length:
                    raise ImageRepositoryError(f"{where}: length differs from the published image")
                continue
            if not staged.exists() and not self._stage_published_bytes(target, staged):
                raise ImageRepositoryError(
                    f"{where}: image not uploaded (POST it to /api/v1/image/uploads first)"
                )
            if staged.stat().st_size != target.length:
                raise ImageRepositoryError(
                    f"{where}: uploaded image is {staged.stat().st_size} bytes, metadata says {target.length}"
                )
            moves.append((staged, final))
        return moves

    def _stage_published_bytes(self, target: TargetFile, staged: Path) -> bool:
        """Stage the bytes of an image published under another path (a revert re-releases
        them under a new path and release counter) by hard link; False if there are none."""
        published = self.find_by_sha256(target.hashes["sha256"])
        if published is None or published.length != target.length:
            return False
        source = self.image_file(published)
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, staged)
        except FileExistsError:
            pass
        except OSError:
            return False
        return True

    def accept_root(self, data: bytes) -> Metadata[Root]:
        """Rotate root: the new root must be signed by old AND new root key thresholds."""
        new = _parse(data, Root)
        with self._exclusive():
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
        with self._exclusive():
            self._snapshot_signer, self._timestamp_signer = snapshot_signer, timestamp_signer
            self._publish_snapshot_and_timestamp()

    # -- reading -------------------------------------------------------------

    def find_target(self, filepath: str) -> TargetFile | None:
        """The published image ``filepath``: top-level, else of the supplier role delegated it."""
        self.refresh()
        top = self.targets.signed.targets.get(filepath)
        if top is not None:
            return top
        for name, role in self.supplier_roles().items():
            if role.is_delegated_path(filepath):  # terminating: the first match decides
                supplier = self.suppliers.get(name)
                return supplier.signed.targets.get(filepath) if supplier else None
        return None

    def targets_bytes(self) -> bytes:
        self.refresh()
        return (self.metadata_dir / f"{self.targets.signed.version}.targets.json").read_bytes()

    def metadata_path(self, filename: str) -> Path | None:
        """The metadata file served as ``filename`` (a name, :mod:`signing.names`), or None."""
        return _existing_file(confined(self.metadata_dir, filename, where="metadata file"))

    def target_path(self, name: str) -> Path | None:
        """The published image or delta served as ``name`` (``dir/<sha256>.<name>``), or None."""
        self.refresh()
        target = self._served.get(name)
        return None if target is None else _existing_file(self.image_file(target))


__all__ = ["ImageRepository", "ImageRepositoryError", "RepositoryError", "consistent_target_name"]
