"""Verified downloads: images and deltas, into one directory, never trusted unchecked.

Every file here is named by a sha256 from verified metadata (``<sha256>`` for
an image, ``<sha256>.delta`` for a delta) and placed with
:func:`signing.names.confined`, so no signed value can become a path outside
``STATE_DIR/downloads``. A download:

1. goes to ``<name>.part`` first, resumable across failures and restarts
   (Range requests, :meth:`client.fetcher.ResumableFetcher.download_to`),
   capped at the signed length;
2. is checked against the signed length and hashes; bytes that fail are
   deleted (never resumed from) and the failure is an
   :class:`~signing.exceptions.AttackDetected`;
3. only then is renamed to ``<name>`` (and the rename made durable), so a
   file without ``.part`` has been verified once. It is verified again
   before use anyway (:meth:`VerifiedDownloads.image`), since a power cut may
   have torn it.

Images the director encrypted for this ECU are fetched from the director and
decrypted on the way (:mod:`client.decryption`).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib import parse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tuf.api.exceptions import DownloadError, LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from client.decryption import EncryptedDelivery, fetch_and_decrypt
from client.fetcher import ResumableFetcher
from client.verification import DirectedImage, classify
from signing.atomic_file import fsync_directory
from signing.exceptions import AttackDetected, TransientFailure
from signing.metadata import consistent_target_path
from signing.names import InvalidNameError, confined


def bytes_held(directory: Path, name: str) -> int:
    """How much of download ``name`` is in ``directory`` (complete or partial), for status."""
    for candidate in (name, f"{name}.part", f"{name}.enc.part"):
        try:
            return confined(directory, candidate, where="download").stat().st_size
        except (OSError, InvalidNameError):
            continue
    return 0


class VerifiedDownloads:
    """Images and deltas in ``directory``, each checked against its verified metadata."""

    def __init__(
        self,
        directory: Path,
        server_url: str,
        image_url: str,
        vin: str,
        fetcher: ResumableFetcher,
        max_image_size: int,
        decryption_key: X25519PrivateKey | None = None,
    ) -> None:
        self.directory = directory
        self._server_url = server_url.rstrip("/")
        self._image_url = image_url.rstrip("/")
        self._vin = vin
        self._fetcher = fetcher
        self._max_image_size = max_image_size
        self._decryption_key = decryption_key

    def path(self, name: str) -> Path:
        """Where the download called ``name`` (a sha256, maybe with a suffix) lives: never elsewhere."""
        try:
            return confined(self.directory, name, where="download")
        except InvalidNameError as exc:
            raise AttackDetected(str(exc)) from exc

    def discard(self, name: str) -> None:
        """Delete download ``name`` (done with it, or refused)."""
        self.path(name).unlink(missing_ok=True)

    def keep_only(self, sha256s: set[str]) -> None:
        """Delete every download (whole or partial) not named by one of ``sha256s``.

        Called after a successful verification with what is still directed:
        an image downloaded ahead whose assignment was then withdrawn, or a
        partial download the director no longer wants, must not hold the
        vehicle's storage for ever.
        """
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.split(".", 1)[0] not in sha256s and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)

    def image(self, item: DirectedImage) -> Path:
        """The directed image on disk, length and hashes verified; fetched (or resumed) if needed."""
        target = item.target
        if target.length > self._max_image_size:
            raise AttackDetected(
                f"{target.path}: {target.length} bytes exceeds max_image_size "
                f"{self._max_image_size}"
            )
        if item.encrypted is not None:
            destination = self.path(item.sha256)
            if self._holds(target, destination):
                return destination
            return self._fetch_encrypted(item.encrypted, destination)
        return self.target(target, item.sha256)

    def target(self, target: TargetFile, name: str) -> Path:
        """``target`` (an image, or a delta) as file ``name``, verified; fetched if not held.

        The target comes from verified metadata (or from the journal, which
        recorded its length and sha256 from verified metadata).
        """
        destination = self.path(name)
        if self._holds(target, destination):
            return destination
        return self._fetch(target, destination)

    @staticmethod
    def _holds(target: TargetFile, path: Path) -> bool:
        """Whether ``path`` holds exactly ``target``; a torn or foreign file is deleted."""
        try:
            with open(path, "rb") as held:
                target.verify_length_and_hashes(held)
            return True
        except FileNotFoundError:
            return False
        except (OSError, LengthOrHashMismatchError):
            path.unlink(missing_ok=True)
            return False

    def _fetch(self, target: TargetFile, destination: Path) -> Path:
        destination.parent.mkdir(parents=True, exist_ok=True)
        # the .part and .resume files sit beside the destination, which is confined
        partial = destination.with_name(destination.name + ".part")
        name = consistent_target_path(target.path, target.hashes["sha256"])
        url = f"{self._image_url}/image/targets/{parse.quote(name)}"
        try:
            received = self._fetcher.download_to(url, partial, target.length)
        except DownloadError as exc:
            raise classify(exc, "image") from exc
        if received < target.length:  # the body ended early: resume next time
            raise TransientFailure(
                f"download of {target.path!r} ended at {received} of {target.length} bytes"
            )
        try:
            with open(partial, "rb") as f:
                target.verify_length_and_hashes(f)
        except LengthOrHashMismatchError as exc:
            partial.unlink(missing_ok=True)  # never resume from bytes that failed verification
            raise AttackDetected(f"image {target.path!r}: {exc}") from exc
        os.replace(partial, destination)
        # the rename must survive a power cut before the slot write
        fsync_directory(destination.parent)
        return destination

    def _fetch_encrypted(self, delivery: EncryptedDelivery, destination: Path) -> Path:
        destination.parent.mkdir(parents=True, exist_ok=True)
        name = consistent_target_path(
            delivery.ciphertext.path, delivery.ciphertext.hashes["sha256"]
        )
        url = f"{self._server_url}/director/{self._vin}/targets/{parse.quote(name)}"
        try:
            fetch_and_decrypt(self._fetcher, url, delivery, self._decryption_key, destination)
        except DownloadError as exc:
            raise classify(exc, "director") from exc
        return destination
