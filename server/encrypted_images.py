"""Encrypted per-ECU copies of images, made and served by the director.

When a vehicle's images are to be encrypted (``encrypt_images`` in
``server.json`` for every vehicle, or per vehicle at registration), the
director does not point an ECU at the image repository's plaintext image:
:class:`EncryptedImages` makes, once per (ECU, image), a copy encrypted to
that ECU's registered X25519 key (format: :mod:`signing.encryption`) and
stores it as::

    DATA/director/encrypted/<VIN>/<SERIAL>/<dir>/<ciphertext sha256>.<name>
    DATA/director/encrypted/<VIN>/<SERIAL>/<image sha256>.json   (its description)

served at ``/director/<VIN>/targets/<SERIAL>/<dir>/<sha256>.<name>``. The
director target for that ECU then names the ciphertext's length and sha256
and carries ``custom.encryption``. The copy is made once and reused, so the
director's metadata stays stable (no re-signing on every poll); the
description file is written last, so a crash leaves at worst an unused
ciphertext file. Every one of these files is placed with
:func:`signing.names.confined`: a VIN, serial or image path can only name a
file inside the vehicle's own directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tuf.api.metadata import TargetFile

from server.image_repository import consistent_target_name
from signing.atomic_file import atomic_writer, write_atomic
from signing.encryption import (
    DEFAULT_CHUNK_SIZE,
    ENCRYPTION,
    EncryptionInfo,
    encrypt_stream,
    parse_public_key,
)
from signing.metadata import consistent_target_path, director_custom
from signing.names import confined

#: The store's own bookkeeping next to the copies: descriptions and copies being made.
_BOOKKEEPING = re.compile(r"[0-9a-f]{64}\.(?:json|encrypting)")


@dataclass(frozen=True)
class EncryptedCopy:
    path: str  # relative to the vehicle's encrypted directory: SERIAL/dir/<sha256>.<name>
    length: int
    sha256: str
    info: EncryptionInfo


class EncryptedImages:
    """The director's store of per-ECU encrypted copies (see module docstring)."""

    def __init__(self, root_dir: Path, image_targets_dir: Path) -> None:
        self.root_dir = root_dir
        self._image_targets_dir = image_targets_dir

    def director_target(
        self, vin: str, ecu_serial: str, hardware_id: str, public_key_hex: str, image: TargetFile
    ) -> TargetFile:
        """The director target sending ``image`` to one ECU, encrypted for its key."""
        copy = self._copy(vin, ecu_serial, public_key_hex, image)
        custom = director_custom({ecu_serial: hardware_id})
        custom[ENCRYPTION] = copy.info.to_custom()
        return TargetFile(copy.length, {"sha256": copy.sha256}, image.path, {"custom": custom})

    def _copy(
        self, vin: str, ecu_serial: str, public_key_hex: str, image: TargetFile
    ) -> EncryptedCopy:
        vehicle_dir = confined(self.root_dir, vin, where="encrypted images of a vehicle")
        ecu_dir = confined(vehicle_dir, ecu_serial, where="encrypted images of an ECU")
        description = confined(ecu_dir, f"{image.hashes['sha256']}.json")
        try:
            raw = json.loads(description.read_bytes())
            if (
                raw["public_key"] == public_key_hex
                and self._below(vehicle_dir, raw["path"]).is_file()
            ):
                info = raw["encryption"]
                return EncryptedCopy(
                    raw["path"],
                    raw["length"],
                    raw["sha256"],
                    EncryptionInfo(
                        bytes.fromhex(info["ephemeralPublicKey"]),
                        info["chunkSize"],
                        info["plaintextLength"],
                        info["plaintextHashes"]["sha256"],
                    ),
                )
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet (or for an older key): make one
        source = self._below(self._image_targets_dir, consistent_target_name(image))
        staging = confined(ecu_dir, f"{image.hashes['sha256']}.encrypting")
        digest = hashlib.sha256()
        with open(source, "rb") as src, atomic_writer(staging) as out:
            info = encrypt_stream(
                src,
                _Hashing(out, digest),
                parse_public_key(public_key_hex),
                image.length,
                DEFAULT_CHUNK_SIZE,
            )
        if info.plaintext_sha256 != image.hashes["sha256"]:
            staging.unlink(missing_ok=True)
            raise ValueError(
                f"stored image {image.path!r} does not match its sha256 in the image repository"
            )
        rel = f"{ecu_serial}/{consistent_target_path(image.path, digest.hexdigest())}"
        final = self._below(vehicle_dir, rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(final)
        copy = EncryptedCopy(rel, info.ciphertext_length, digest.hexdigest(), info)
        write_atomic(
            description,
            json.dumps(
                {
                    "public_key": public_key_hex,
                    "path": rel,
                    "length": copy.length,
                    "sha256": copy.sha256,
                    "encryption": info.to_custom(),
                },
                indent=1,
            ).encode(),
        )
        return copy

    @staticmethod
    def _below(directory: Path, relative: str) -> Path:
        """``directory/relative`` ('/'-separated), refused if it would leave ``directory``."""
        return confined(directory, *relative.split("/"), where="encrypted image")

    def path(self, vin: str, name: str) -> Path | None:
        """The copy served at ``/director/<vin>/targets/<name>`` (a VIN and a target path), or None."""
        if _BOOKKEEPING.fullmatch(name.rpartition("/")[2]):
            return None
        path = self._below(confined(self.root_dir, vin, where="encrypted images"), name)
        try:
            return path if path.is_file() else None
        except OSError:  # a name the OS refuses (too long...)
            return None


class _Hashing:
    """A writer that hashes what passes through it."""

    def __init__(self, out: BinaryIO, digest: Any) -> None:
        self._out, self._digest = out, digest

    def write(self, data: bytes, /) -> int:
        self._digest.update(data)
        return self._out.write(data)
