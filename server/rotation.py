"""Rotating the online keys of a repository (recovery from key compromise).

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

Every step is atomic and the command resumes: if it stops after step 3,
running it again finds the stored root naming the pending (or already
moved) keys and finishes steps 4-5 instead of rotating once more. If it
stops during step 5, running it again rotates once more, which re-signs
everything too. ``uptake server run`` then starts with the new keys.
"""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Signer
from sqlmodel import Session, select
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from server.config import ONLINE_KEYS, ConfigError, ServerConfig
from server.db import Vehicle, make_engine
from server.director import DirectorRepository
from server.image_repository import ImageRepository, versioned_files
from signing.atomic_file import write_atomic
from signing.keys import KeyFileError, generate_signer, load_signer, save_signer
from signing.metadata import expiry

#: The online roles of each repository, which this module may rotate.
ONLINE_ROLES: dict[str, tuple[str, ...]] = {
    "image": ("snapshot", "timestamp"),
    "director": ("targets", "snapshot", "timestamp"),
}
_PENDING_DIR = "rotation"
_SERIALIZER = JSONSerializer(compact=False)


class RotationError(Exception):
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
    current, _ = _latest_root(config, repository)

    signers = _resumable_signers(config, repository, roles, password, current.signed)
    resumed = signers is not None
    if signers is None:
        paths = list(root_keys) or [Path(offline_dir) / f"{repository}-root.key"]
        try:
            root_signers = [load_signer(p, offline_password) for p in paths]
        except KeyFileError as exc:
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
    return RotationResult(
        repository,
        roles,
        current.signed.version,
        {role: s.public_key.keyid for role, s in signers.items()},
        resigned,
        resumed,
    )


def _resign(config: ServerConfig, password: bytes, repository: str) -> int:
    """Step 5: re-publish ``repository``'s online metadata with the keys now in ``DATA/keys``.

    Returns how many vehicles' director metadata was re-signed.
    """
    try:
        keys = {
            name: load_signer(config.keys_dir / f"{name}.key", password) for name in ONLINE_KEYS
        }
    except KeyFileError as exc:
        raise RotationError(str(exc)) from exc
    image_repo = ImageRepository(config.image_dir, keys["image-snapshot"], keys["image-timestamp"])
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
    )
    try:
        engine = make_engine(config.database_url)
    except Exception as exc:  # driver missing, server down, bad URL
        raise ConfigError(f"cannot open database {config.database_url!r}: {exc}") from exc
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
