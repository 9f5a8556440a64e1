"""Receiving an image the director encrypted for this ECU (format: :mod:`signing.encryption`).

Full verification (:mod:`client.verification`) calls :func:`encrypted_delivery`
on each director target: a target with ``custom.encryption`` must be for
exactly one ECU, and its ciphertext length must follow from the plaintext
length; its plaintext length and sha256 then go through the same
cross-check against the image repository as a plaintext target's would. The
download (:func:`fetch_and_decrypt`):

1. fetches the ciphertext from ``/director/<VIN>/targets/<SERIAL>/...``
   (resumable, capped at the signed ciphertext length) and checks its
   length and sha256 against the signed director target, like TUF does;
2. decrypts it chunk by chunk with the ECU's X25519 key (every chunk
   authenticated), hashing the plaintext on the way;
3. keeps the plaintext only if its length and sha256 are the image
   repository's; otherwise nothing is left behind.

Any failure raises :class:`DecryptionFailure` naming the step: an
:class:`~signing.exceptions.AttackDetected` (or a key mix-up), so the image is refused
and the attempt reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from client.fetcher import ResumableFetcher
from signing.atomic_file import atomic_writer
from signing.encryption import (
    DecryptionError,
    EncryptionFormatError,
    EncryptionInfo,
    decrypt_stream,
    encryption_info,
)
from signing.exceptions import AttackDetected


class DecryptionFailure(AttackDetected):
    """An encrypted image was malformed, tampered with, or not for this ECU; says which step."""


@dataclass(frozen=True)
class EncryptedDelivery:
    """How one directed image reaches its ECU encrypted."""

    ciphertext: (
        TargetFile  # path SERIAL/<image path>; length and sha256 from the signed director target
    )
    plaintext: TargetFile  # what the director promises the ciphertext decrypts to
    info: EncryptionInfo


def encrypted_delivery(dtarget: TargetFile, ecus: dict[str, str]) -> EncryptedDelivery | None:
    """The encrypted delivery a director target describes, or None for a plaintext target."""
    try:
        info = encryption_info(dtarget)
    except EncryptionFormatError as exc:
        raise DecryptionFailure(str(exc)) from exc
    if info is None:
        return None
    where = f"encrypted director target {dtarget.path!r}"
    if len(ecus) != 1:
        raise DecryptionFailure(
            f"{where} names {len(ecus)} ECUs; an encrypted copy is for exactly one"
        )
    if dtarget.length != info.ciphertext_length:
        raise DecryptionFailure(
            f"{where}: length {dtarget.length} is not the ciphertext length of {info.plaintext_length} "
            f"plaintext bytes ({info.ciphertext_length})"
        )
    if set(dtarget.hashes) != {"sha256"}:
        raise DecryptionFailure(f"{where}: hashes must be exactly one sha256")
    (serial,) = ecus
    ciphertext = TargetFile(dtarget.length, dict(dtarget.hashes), f"{serial}/{dtarget.path}")
    plaintext = TargetFile(
        info.plaintext_length,
        {"sha256": info.plaintext_sha256},
        dtarget.path,
        dict(dtarget.unrecognized_fields),
    )
    return EncryptedDelivery(ciphertext, plaintext, info)


def fetch_and_decrypt(
    fetcher: ResumableFetcher,
    url: str,
    delivery: EncryptedDelivery,
    key: X25519PrivateKey | None,
    destination: Path,
) -> None:
    """Download the ciphertext at ``url``, verify, decrypt into ``destination`` (see module docstring)."""
    if key is None:
        raise DecryptionFailure(
            f"{delivery.plaintext.path!r} is encrypted for this ECU, which has no encryption key"
        )
    partial = destination.with_name(destination.name + ".enc.part")
    fetcher.download_to(
        url, partial, delivery.ciphertext.length
    )  # DownloadError: the caller classifies
    try:
        with open(partial, "rb") as f:
            delivery.ciphertext.verify_length_and_hashes(f)
    except LengthOrHashMismatchError as exc:
        partial.unlink(missing_ok=True)  # never resume from bytes that failed verification
        raise DecryptionFailure(f"encrypted image {delivery.plaintext.path!r}: {exc}") from exc
    try:
        with open(partial, "rb") as src, atomic_writer(destination) as out:
            decrypt_stream(src, out, key, delivery.info)
    except DecryptionError as exc:
        raise DecryptionFailure(f"encrypted image {delivery.plaintext.path!r}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    if (
        os.path.getsize(destination) != delivery.plaintext.length
    ):  # decrypt_stream checked it; belt and braces
        destination.unlink(missing_ok=True)
        raise DecryptionFailure(f"decrypted image {delivery.plaintext.path!r} has the wrong length")
