"""The offline key set: how many keys each offline role has, their threshold, their names.

The offline roles (image root, image targets, director root) may each have
N keys of which any M must sign (the *threshold*). ``uptake keys init``
generates them into the offline keys directory and writes ``keyset.json``
there, which ``uptake server init`` then signs the first roots with::

    {"image-root": {"threshold": 2, "keys": ["image-root-1", "image-root-2", "image-root-3"]},
     "image-targets": {"threshold": 2, "keys": ["image-targets-1", ...]},
     "director-root": {"threshold": 1, "keys": ["director-root"]}}

Each key is ``NAME.key`` (+ ``NAME.pub.json``) or a signer reference
``NAME.signer.json`` (:mod:`signing.keys`); its holders move the private
halves to their own machines or directories afterwards (``uptake release
sign --key`` signs with one of them wherever it is). A role with one key keeps
the historical names (``image-targets.key``).

Root rotations (:mod:`server.rotation`) rewrite the set when they replace
keys, so it always describes the newest root.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import Signer, SSlibKey

from server.config import OFFLINE_KEYS
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.keys import (
    SIGNER_REFERENCE_SUFFIX,
    KeyFileError,
    generate_signer,
    key_public_half,
    load_key,
    save_signer,
)
from signing.names import InvalidNameError, check_name

KEYSET_NAME = "keyset.json"
#: The most keys one role may have.
MAX_KEYS_PER_ROLE = 16


class KeySetError(UptakeError):
    """The offline key set is malformed, or a threshold cannot be met with the keys at hand."""


@dataclass(frozen=True)
class RoleKeys:
    threshold: int
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.names) <= MAX_KEYS_PER_ROLE:
            raise KeySetError(f"a role has 1 to {MAX_KEYS_PER_ROLE} keys, not {len(self.names)}")
        if not 1 <= self.threshold <= len(self.names):
            raise KeySetError(
                f"threshold {self.threshold} must be between 1 and the number of keys ({len(self.names)})"
            )


def key_file(directory: Path, name: str) -> Path:
    """Where key ``name`` lives in ``directory``: its signer reference if any, else ``NAME.key``."""
    reference = directory / f"{name}{SIGNER_REFERENCE_SUFFIX}"
    return reference if reference.exists() else directory / f"{name}.key"


def _public_file(directory: Path, name: str) -> Path:
    reference = directory / f"{name}{SIGNER_REFERENCE_SUFFIX}"
    return reference if reference.exists() else directory / f"{name}.pub.json"


class KeySet:
    """Role (``image-root``, ``image-targets``, ``director-root``) -> :class:`RoleKeys`."""

    def __init__(self, roles: dict[str, RoleKeys]) -> None:
        self.roles = dict(roles)

    @classmethod
    def load(cls, directory: Path) -> KeySet:
        """The set in ``directory``; one key per role with the historical names if none is there."""
        path = Path(directory) / KEYSET_NAME
        if not path.exists():
            return cls({role: RoleKeys(1, (role,)) for role in OFFLINE_KEYS})
        try:
            data = parse_json(path.read_bytes(), where=str(path), max_bytes=100_000)
        except (OSError, UntrustedJsonError) as exc:
            raise KeySetError(f"cannot read {path}: {exc}") from exc
        roles = {}
        for role in OFFLINE_KEYS:
            entry = data.get(role) if isinstance(data, dict) else None
            keys = entry.get("keys") if isinstance(entry, dict) else None
            threshold = entry.get("threshold") if isinstance(entry, dict) else None
            if not isinstance(keys, list) or not isinstance(threshold, int):
                raise KeySetError(
                    f"{path}: {role} needs 'keys' (a list) and 'threshold' (a number)"
                )
            try:
                names = tuple(check_name(k, f"{path}: {role}.keys") for k in keys)
            except InvalidNameError as exc:
                raise KeySetError(str(exc)) from exc
            roles[role] = RoleKeys(threshold, names)
        return cls(roles)

    def save(self, directory: Path) -> None:
        body = {r: {"threshold": k.threshold, "keys": list(k.names)} for r, k in self.roles.items()}
        write_atomic(Path(directory) / KEYSET_NAME, json.dumps(body, indent=2).encode() + b"\n")

    def public_keys(self, directory: Path, role: str) -> list[tuple[str, SSlibKey]]:
        """Every key of ``role`` by name (public halves stay in the directory)."""
        try:
            return [
                (n, key_public_half(_public_file(directory, n))) for n in self.roles[role].names
            ]
        except KeyFileError as exc:
            raise KeySetError(f"{role}: {exc}") from exc

    def signers(
        self, directory: Path, role: str, password: bytes | None, paths: Sequence[Path] = ()
    ) -> list[Signer]:
        """A threshold of ``role``'s signers: ``paths`` if given, else the private keys still in
        ``directory`` (the others were moved to their holders' machines)."""
        if paths:
            candidates = list(paths)
        else:
            candidates = [key_file(directory, n) for n in self.roles[role].names]
            candidates = [p for p in candidates if p.exists()]
        try:
            signers = [load_key(p, password) for p in candidates]
        except KeyFileError as exc:
            raise KeySetError(str(exc)) from exc
        threshold = self.roles[role].threshold
        if len(signers) < threshold:
            raise KeySetError(
                f"{role} needs {threshold} key(s) to sign, {len(signers)} given or found in {directory}"
            )
        return signers


def generate_key_set(
    directory: Path,
    counts: dict[str, tuple[int, int]],
    password: bytes,
    key_type: str = "ed25519",
) -> KeySet:
    """Generate ``counts[role] = (keys, threshold)`` keys per offline role into ``directory``."""
    roles = {}
    for role in OFFLINE_KEYS:
        count, threshold = counts.get(role, (1, 1))
        names = (role,) if count == 1 else tuple(f"{role}-{i}" for i in range(1, count + 1))
        roles[role] = RoleKeys(threshold, names)
    key_set = KeySet(roles)
    for role_keys in roles.values():
        for name in role_keys.names:
            save_signer(generate_signer(key_type), Path(directory) / f"{name}.key", password)
    key_set.save(directory)
    return key_set
