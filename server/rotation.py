"""Rotating the keys of any role of either repository, root included.

:func:`rotate_role` is the one entry point (``uptake keys rotate``): the
OFFLINE roles (root of both repositories, image targets) get N new keys with
a threshold M; an ONLINE role gets one new key, generated here or brought by
its holder (a signer reference to an HSM or key service). Either way the
server is stopped and a new root version, signed by a threshold of the old
root keys AND (for root) of the new ones, names the new keys; vehicles
follow the chain N -> N+1 on their next poll. Rotating the image targets
keys re-signs the targets with the new keys at once (keeping the delegation
to the online deltas role), so a vehicle that follows the new root finds
targets it verifies.

An offline rotation journals itself (``DATA/keys/rotation/offline-rotation.json``,
written atomically once the new keys and the new signed root exist: key paths
and the root, no secret): every later step (store the root, re-sign the
targets, refresh the trusted root copy, save the key set) is idempotent, so
if the command stops, running it again finishes that rotation instead of
starting another; any other rotation is refused until it has.

Online keys generated here go through :func:`rotate_online_keys`:

The online keys (image snapshot/timestamp, director targets/snapshot/
timestamp) live on the server, so they are the ones an intruder takes.
Uptane's answer is to replace them through root: a new root version, signed
by the OFFLINE root key(s), names new online keys, and every vehicle that
follows the root chain (``tuf.ngclient`` fetches ``N+1.root.json``) from
then on refuses anything signed with the old ones.

:func:`rotate_online_keys` does it for one repository, with the server
STOPPED (it is the only writer of the data directory and the database then,
and nothing signed with a key being retired is served meanwhile):

1. generate the new online keys into ``DATA/keys/rotation/`` (pending);
2. build root vN+1: a copy of vN (same root keys, same thresholds, a fresh
   expiry) where each rotated role names only its new key; sign it with the
   offline root key(s) and check it verifies under both vN and vN+1;
3. store it in the repository (``image-repo/metadata`` or
   ``director/metadata``, where vehicles fetch it), and refresh the trusted
   root copy in the offline directory (release engineers, provisioning);
4. move the pending keys over the old ones in ``DATA/keys``;
5. re-sign with the new keys: image snapshot + timestamp, or every
   vehicle's director targets, snapshot and timestamp (versions bumped).

A finished rotation is recorded in the audit log (``keys.rotate``, by
``local:USER@HOST``), like every other key operation.

Every step is atomic and the command resumes: if it stops after step 3,
running it again finds the stored root naming the pending (or already
moved) keys and finishes steps 4-5 instead of rotating once more. If it
stops during step 5, running it again rotates once more, which re-signs
everything too. ``uptake server run`` then starts with the new keys.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import JSONSerializer

from server import audit
from server.config import ONLINE_KEYS, ConfigError, ServerConfig
from server.db import Vehicle, make_engine, shown_database_url
from server.director import DirectorRepository
from server.image_repository import ImageRepository, ImageRepositoryError, versioned_files
from server.lifetimes import Lifetimes
from server.offline_keys import KeySet, KeySetError, RoleKeys
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.keys import (
    SIGNER_REFERENCE_SUFFIX,
    KeyFileError,
    generate_signer,
    is_signer_reference,
    key_name,
    key_public_half,
    load_key,
    load_signer,
    save_signer,
)
from signing.metadata import expiry, set_key_names

#: The online roles of each repository, which this module may rotate.
ONLINE_ROLES: dict[str, tuple[str, ...]] = {
    "image": ("snapshot", "timestamp"),
    "director": ("targets", "snapshot", "timestamp"),
}
_PENDING_DIR = "rotation"
_SERIALIZER = JSONSerializer(compact=False)


class RotationError(UptakeError):
    """Key rotation was refused or could not finish; says why and what to do."""


@dataclass(frozen=True)
class RotationResult:
    repository: str
    roles: tuple[str, ...]
    root_version: int
    new_keyids: dict[str, str]
    vehicles_resigned: int
    resumed: bool


def ensure_server_stopped(config: ServerConfig) -> None:
    """Refuse to rotate while something answers on the server's configured address."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    try:
        with socket.create_connection((host, config.port), timeout=1.0):
            pass
    except OSError:
        return
    raise RotationError(
        f"a server is listening on {host}:{config.port}: stop 'uptake server run' before rotating keys"
    )


def _metadata_dir(config: ServerConfig, repository: str) -> Path:
    return (config.image_dir if repository == "image" else config.director_dir) / "metadata"


def _latest_root(config: ServerConfig, repository: str) -> tuple[Metadata[Root], bytes]:
    roots = versioned_files(_metadata_dir(config, repository), "root")
    if not roots:
        raise RotationError(f"no {repository} root in {_metadata_dir(config, repository)}")
    data = roots[-1][1].read_bytes()
    return Metadata[Root].from_bytes(data), data


def _key_name(repository: str, role: str) -> str:
    return f"{repository}-{role}"


def _resumable_signers(
    config: ServerConfig, repository: str, roles: Sequence[str], password: bytes, root: Root
) -> dict[str, CryptoSigner] | None:
    """The new keys of a rotation that stopped after storing ``root``, or None if none is in progress.

    Each role's new key is still pending or already moved into place (step 4).
    """
    pending = config.keys_dir / _PENDING_DIR
    in_progress = False
    signers = {}
    for role in roles:
        name = _key_name(repository, role)
        key, pub = pending / f"{name}.key", pending / f"{name}.pub.json"
        if pub.exists() and not key.exists():  # stopped between moving the key and its public half
            os.replace(pub, config.keys_dir / pub.name)
        in_progress |= key.exists()
        try:
            signers[role] = load_signer(
                key if key.exists() else config.keys_dir / key.name, password
            )
        except KeyFileError:
            return None
    return signers if in_progress and _names_exactly(root, signers) else None


def _names_exactly(root: Root, signers: dict[str, CryptoSigner]) -> bool:
    return all(root.roles[role].keyids == [s.public_key.keyid] for role, s in signers.items())


def _new_root(
    current: Metadata[Root], signers: dict[str, CryptoSigner], root_signers: Sequence[Signer]
) -> Metadata[Root]:
    new = Metadata(copy.deepcopy(current.signed))
    root = new.signed
    root.version += 1
    root.expires = expiry("root")
    for role, signer in signers.items():
        if root.roles[role].threshold != 1:
            raise RotationError(
                f"{role} has threshold {root.roles[role].threshold}: rotating to one new key needs threshold 1"
            )
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(signer.public_key, role)
    for root_signer in root_signers:
        new.sign(root_signer, append=True)
    try:
        current.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        root.verify_delegate(Root.type, new.signed_bytes, new.signatures)
    except UnsignedMetadataError as exc:
        raise RotationError(f"the root keys given do not meet the root threshold: {exc}") from exc
    return new


def rotate_online_keys(
    config: ServerConfig,
    offline_dir: Path,
    repository: str,
    roles: Sequence[str],
    password: bytes,
    offline_password: bytes,
    *,
    root_keys: Sequence[Path] = (),
    key_type: str = "ed25519",
) -> RotationResult:
    """Rotate ``roles`` of ``repository`` (see module docstring). The server must be stopped."""
    if repository not in ONLINE_ROLES:
        raise RotationError(f"repository must be 'image' or 'director', not {repository!r}")
    roles = tuple(dict.fromkeys(roles or ONLINE_ROLES[repository]))
    bad = [r for r in roles if r not in ONLINE_ROLES[repository]]
    if bad:
        raise RotationError(
            f"{repository} online roles are {', '.join(ONLINE_ROLES[repository])}; cannot rotate {', '.join(bad)}"
            + (
                " (the image targets key is offline: re-sign targets with a new root instead)"
                if repository == "image" and "targets" in bad
                else ""
            )
        )
    ensure_server_stopped(config)
    journal = _read_journal(config)
    if journal is not None:
        raise _unfinished(journal)
    current, _ = _latest_root(config, repository)

    signers = _resumable_signers(config, repository, roles, password, current.signed)
    resumed = signers is not None
    if signers is None:
        try:
            root_signers = KeySet.load(offline_dir).signers(
                offline_dir, f"{repository}-root", offline_password, root_keys
            )
        except KeySetError as exc:
            raise RotationError(str(exc)) from exc
        signers = {role: generate_signer(key_type) for role in roles}
        for role, signer in signers.items():
            save_signer(
                signer,
                config.keys_dir / _PENDING_DIR / f"{_key_name(repository, role)}.key",
                password,
            )
        new_root = _new_root(current, signers, root_signers)
        data = new_root.to_bytes(_SERIALIZER)
        write_atomic(
            _metadata_dir(config, repository) / f"{new_root.signed.version}.root.json", data
        )
        trusted_copy = Path(offline_dir) / f"{repository}-root.json"
        if trusted_copy.parent.is_dir():
            write_atomic(trusted_copy, data)
        current = new_root
    assert signers is not None

    # step 4: the new keys replace the old ones (private key first, then public)
    pending = config.keys_dir / _PENDING_DIR
    for role in roles:
        name = _key_name(repository, role)
        if (pending / f"{name}.key").exists():
            os.replace(pending / f"{name}.key", config.keys_dir / f"{name}.key")
            os.replace(pending / f"{name}.pub.json", config.keys_dir / f"{name}.pub.json")

    resigned = _resign(config, password, repository)
    result = RotationResult(
        repository,
        roles,
        current.signed.version,
        {role: s.public_key.keyid for role, s in signers.items()},
        resigned,
        resumed,
    )
    _audit_rotation(config, result)
    return result


def _open_image_repository(
    config: ServerConfig, password: bytes
) -> tuple[ImageRepository, dict[str, Signer]]:
    from server.service import online_key_file

    try:
        keys = {name: load_key(online_key_file(config, name), password) for name in ONLINE_KEYS}
    except KeyFileError as exc:
        raise RotationError(str(exc)) from exc
    repo = ImageRepository(
        config.image_dir, keys["image-snapshot"], keys["image-timestamp"], keys["image-deltas"],
        Lifetimes(config.metadata_lifetimes),
    )  # fmt: skip
    return repo, keys


def _resign(config: ServerConfig, password: bytes, repository: str) -> int:
    """Step 5: re-publish ``repository``'s online metadata with the keys now in ``DATA/keys``.

    Returns how many vehicles' director metadata was re-signed.
    """
    image_repo, keys = _open_image_repository(config, password)
    if repository == "image":
        image_repo.set_online_signers(keys["image-snapshot"], keys["image-timestamp"])
        return 0
    director = DirectorRepository(
        config.director_dir,
        image_repo,
        keys["director-targets"],
        keys["director-snapshot"],
        keys["director-timestamp"],
        encrypt_images=config.encrypt_images,
        lifetimes=Lifetimes(config.metadata_lifetimes),
    )
    engine = _open_database(config)
    count = 0
    try:
        with Session(engine) as session:
            for vin in session.exec(select(Vehicle.vin)).all():
                director.update_vehicle(session, vin, force=True)
                count += 1
            session.commit()
    finally:
        engine.dispose()
    return count


#: The offline roles of each repository (their keys live in the offline keys directory).
OFFLINE_ROLES: dict[str, tuple[str, ...]] = {"image": ("root", "targets"), "director": ("root",)}


@dataclass(frozen=True)
class _NewKey:
    name: str
    key: SSlibKey
    signer: Signer | None  # None: only the public half is here (its holder signs later)


def _audit_rotation(config: ServerConfig, result: RotationResult) -> None:
    """Record a finished rotation in the audit log (the server is stopped: we are its only writer)."""
    engine = _open_database(config)
    try:
        with Session(engine) as session:
            audit.append(
                session, audit.local_actor(), "keys.rotate",
                f"{result.repository} {', '.join(result.roles)}",
                repository=result.repository, roles=list(result.roles),
                root_version=result.root_version, new_keyids=dict(result.new_keyids),
                vehicles_resigned=result.vehicles_resigned, resumed=result.resumed,
            )  # fmt: skip
            session.commit()
    finally:
        engine.dispose()


def rotate_role(
    config: ServerConfig,
    offline_dir: Path,
    repository: str,
    role: str,
    password: bytes,
    offline_password: bytes,
    *,
    count: int = 1,
    threshold: int = 1,
    root_keys: Sequence[Path] = (),
    new_keys: Sequence[Path] = (),
    key_type: str = "ed25519",
) -> RotationResult:
    """Replace every key of ``role`` (see module docstring). The server must be stopped.

    ``new_keys``: key files, public key files or signer references of keys
    their holders made (the root role needs their private halves to sign);
    without them, ``count`` keys are generated (offline roles: into
    ``offline_dir``, encrypted with ``offline_password``).
    """
    if repository not in ONLINE_ROLES:
        raise RotationError(f"repository must be 'image' or 'director', not {repository!r}")
    roles = OFFLINE_ROLES[repository] + ONLINE_ROLES[repository]
    if role not in roles:
        raise RotationError(f"{repository} roles are {', '.join(roles)}, not {role!r}")
    online = role in ONLINE_ROLES[repository]
    if online and not new_keys:
        return rotate_online_keys(
            config, offline_dir, repository, [role], password, offline_password,
            root_keys=root_keys, key_type=key_type,
        )  # fmt: skip
    ensure_server_stopped(config)
    journal = _read_journal(config)
    if journal is not None and (journal.repository, journal.role) != (repository, role):
        raise _unfinished(journal)
    needs_private = role == "root" or (repository, role) == ("image", "targets")
    try:
        key_set = KeySet.load(offline_dir)
        if journal is None:
            journal = _start_offline_rotation(
                config, offline_dir, repository, role, key_set, offline_password,
                count=count, threshold=threshold, root_keys=root_keys, new_keys=new_keys,
                key_type=key_type, needs_private=needs_private,
            )  # fmt: skip
            resumed = False
        else:
            resumed = True
        new = _new_keys(
            offline_dir, "", [Path(p) for p in journal.keys], 0, offline_password, key_type,
            needs_private=needs_private,
        )  # fmt: skip
        data = journal.root.encode()
        version, threshold = journal.root_version, journal.threshold
        # every step below is idempotent: a re-run after an interruption finishes them
        if repository == "image":
            _store_image_root(config, password, role, data, new, threshold)
        else:
            _store_root_file(_metadata_dir(config, repository), version, data)
        trusted_copy = Path(offline_dir) / f"{repository}-root.json"
        if trusted_copy.parent.is_dir():
            write_atomic(trusted_copy, data)
        if online:
            _install_online_key(config, f"{repository}-{role}", Path(journal.keys[0]))
            resigned = _resign(config, password, repository)
        else:
            key_set.roles[f"{repository}-{role}"] = RoleKeys(threshold, tuple(k.name for k in new))
            key_set.save(offline_dir)
            resigned = 0
        _journal_path(config).unlink()
    except (KeySetError, KeyFileError, ImageRepositoryError) as exc:
        raise RotationError(str(exc)) from exc
    result = RotationResult(
        repository, (role,), version, {k.name: k.key.keyid for k in new}, resigned, resumed
    )
    _audit_rotation(config, result)
    return result


@dataclass(frozen=True)
class _Journal:
    """An offline rotation under way: what a re-run needs to finish it (no secret in it)."""

    repository: str
    role: str
    root_version: int
    threshold: int
    #: the new keys: key files, public key files or signer references
    keys: list[str]
    #: the new root, signed
    root: str


def _unfinished(journal: _Journal) -> RotationError:
    return RotationError(
        f"a rotation of the {journal.repository} {journal.role} keys was interrupted: finish "
        f"it first with 'uptake keys rotate --repository {journal.repository} --role "
        f"{journal.role}' (the same command again)"
    )


def _journal_path(config: ServerConfig) -> Path:
    return config.keys_dir / _PENDING_DIR / "offline-rotation.json"


def _read_journal(config: ServerConfig) -> _Journal | None:
    path = _journal_path(config)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        return _Journal(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise RotationError(f"{path}: unreadable rotation journal ({exc})") from exc


def _start_offline_rotation(
    config: ServerConfig,
    offline_dir: Path,
    repository: str,
    role: str,
    key_set: KeySet,
    offline_password: bytes,
    *,
    count: int,
    threshold: int,
    root_keys: Sequence[Path],
    new_keys: Sequence[Path],
    key_type: str,
    needs_private: bool,
) -> _Journal:
    """Make the new keys and the new root signed by the old (and new) root keys; journal them."""
    online = role in ONLINE_ROLES[repository]
    current, _ = _latest_root(config, repository)
    version = current.signed.version + 1
    old_root_signers = key_set.signers(
        offline_dir, f"{repository}-root", offline_password, root_keys
    )
    prefix = f"{repository}-{role}-r{version}"
    new = _new_keys(
        offline_dir, prefix, new_keys, count, offline_password, key_type,
        needs_private=needs_private,
    )  # fmt: skip
    if online and len(new) != 1:
        raise RotationError(f"the online {role} role has exactly one key")
    if not 1 <= threshold <= len(new):
        raise RotationError(f"threshold {threshold} of {len(new)} new keys is impossible")
    new_root = Metadata(copy.deepcopy(current.signed))
    root = new_root.signed
    root.version, root.expires = version, expiry("root")
    for keyid in list(root.roles[role].keyids):
        root.revoke_key(keyid, role)
    for k in new:
        root.add_key(k.key, role)
    root.roles[role].threshold = threshold
    set_key_names(root, {k.key.keyid: k.name for k in new})
    signers = old_root_signers + [k.signer for k in new if k.signer and role == "root"]
    for signer in signers:
        new_root.sign(signer, append=True)
    try:
        current.signed.verify_delegate(Root.type, new_root.signed_bytes, new_root.signatures)
        root.verify_delegate(Root.type, new_root.signed_bytes, new_root.signatures)
    except UnsignedMetadataError as exc:
        raise RotationError(
            f"the new root is not signed by a threshold of the old and the new root keys: {exc}"
        ) from exc
    paths = [str(Path(p).resolve()) for p in new_keys] or [
        str((Path(offline_dir) / f"{k.name}.key").resolve()) for k in new
    ]
    journal = _Journal(
        repository, role, version, threshold, paths, new_root.to_bytes(_SERIALIZER).decode()
    )
    write_atomic(_journal_path(config), json.dumps(journal.__dict__).encode())
    return journal


def _store_root_file(metadata_dir: Path, version: int, data: bytes) -> None:
    """Store root ``version`` unless a re-run finds it stored already."""
    path = metadata_dir / f"{version}.root.json"
    if not path.exists():
        write_atomic(path, data)
    elif path.read_bytes() != data:
        raise RotationError(f"{path} holds another root v{version}: not overwritten")


def _open_database(config: ServerConfig) -> Engine:
    from server.service import pool_settings

    try:
        return make_engine(config.database_url, pool_settings(config))
    except ConfigError:
        raise  # a bad URL, or a schema to migrate first: the message says which
    except Exception as exc:  # driver missing, server down, refused login
        raise ConfigError(
            f"cannot open database {shown_database_url(config.database_url)!r}: {exc}"
        ) from exc


def _new_keys(
    offline_dir: Path,
    prefix: str,
    given: Sequence[Path],
    count: int,
    password: bytes,
    key_type: str,
    *,
    needs_private: bool,
) -> list[_NewKey]:
    if given:
        keys = []
        for path in given:
            private = is_signer_reference(path) or path.name.endswith(".key")
            signer = load_key(path, password) if private and needs_private else None
            keys.append(_NewKey(key_name(path), key_public_half(path), signer))
        return keys
    if not 1 <= count <= 16:
        raise RotationError(f"a role has 1 to 16 keys, not {count}")
    keys = []
    for i in range(1, count + 1):
        name = prefix if count == 1 else f"{prefix}-{i}"
        signer = generate_signer(key_type)
        save_signer(signer, Path(offline_dir) / f"{name}.key", password)
        keys.append(_NewKey(name, signer.public_key, signer))
    return keys


def _store_image_root(
    config: ServerConfig,
    password: bytes,
    role: str,
    data: bytes,
    new: list[_NewKey],
    threshold: int,
) -> None:
    """Store image root vN+1; after new targets keys, targets re-signed with them at once."""
    image_repo, _ = _open_image_repository(config, password)
    new_root = Metadata[Root].from_bytes(data)
    if image_repo.root.signed.version < new_root.signed.version:
        image_repo.accept_root(data)
    elif image_repo.root.to_bytes(_SERIALIZER) != new_root.to_bytes(_SERIALIZER):
        raise RotationError(
            f"image root v{new_root.signed.version} is stored already, and is another one"
        )
    if role != "targets":
        return
    published = Metadata[Targets].from_bytes(image_repo.targets_bytes())
    try:
        new_root.signed.verify_delegate(Targets.type, published.signed_bytes, published.signatures)
        return  # re-signed with the new keys already (a re-run)
    except UnsignedMetadataError:
        pass
    signers = [k.signer for k in new if k.signer is not None]
    if len(signers) < threshold:
        raise RotationError(
            f"the targets must be re-signed by {threshold} of the new targets keys: "
            "give their private halves (key files or signer references) with --new-key"
        )
    targets = published
    targets.signed.version += 1
    targets.signed.expires = expiry("targets")
    targets.signatures.clear()
    for signer in signers[:threshold]:
        targets.sign(signer, append=True)
    image_repo.accept_targets(targets.to_bytes(_SERIALIZER))


def _install_online_key(config: ServerConfig, name: str, given: Path) -> None:
    """Make ``given`` (a key file or signer reference) the online key ``name``."""
    keys_dir = config.keys_dir
    if is_signer_reference(given):
        write_atomic(keys_dir / f"{name}{SIGNER_REFERENCE_SUFFIX}", Path(given).read_bytes())
        (keys_dir / f"{name}.key").unlink(missing_ok=True)  # revoked: never loaded again
        (keys_dir / f"{name}.pub.json").unlink(missing_ok=True)
        return
    if not given.name.endswith(".key"):
        raise RotationError(f"{given}: an online key needs its private half (NAME.key)")
    write_atomic(keys_dir / f"{name}.key", Path(given).read_bytes(), mode=0o600)
    write_atomic(
        keys_dir / f"{name}.pub.json",
        Path(str(given).removesuffix(".key") + ".pub.json").read_bytes(),
    )
    (keys_dir / f"{name}{SIGNER_REFERENCE_SUFFIX}").unlink(missing_ok=True)
