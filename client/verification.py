"""Uptane full verification (Uptane Standard 2.x, section 5.4.4.2).

:class:`FullVerifier` runs two ``tuf.ngclient.Updater`` instances, one per
repository, each anchored on the root provisioned into the vehicle
(``STATE_DIR/metadata/{director,image}/root.json``, kept up to date by the
updaters through root rotation):

1. refresh the director repository (root → timestamp → snapshot → targets,
   with every TUF check: signatures, thresholds, versions, expiry, lengths);
2. check the director targets were signed for *this* VIN (also when they
   list nothing, so another vehicle's targets cannot be replayed here);
3. if they list anything, refresh the image repository the same way;
4. cross-check every director target against the image repository:
   the image must be there with the same length and hashes, its
   ``hardwareIds`` must include the hardware id the director names, the ECU
   serial must be one of this vehicle's ECUs with that hardware id, and its
   release counter must not be below what that ECU has installed. A target
   the director encrypted for one ECU (:mod:`client.decryption`) is
   cross-checked by the plaintext length and sha256 it promises, and its
   ciphertext is verified before and the plaintext after decryption.

Anything that fails raises :class:`VerificationFailure`, whose ``attack``
flag says whether it is evidence of an attack (to be reported in the next
manifest's ``attacks_detected``) or just a network problem.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib import parse

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tuf.api.exceptions import (
    DownloadError,
    DownloadLengthMismatchError,
    LengthOrHashMismatchError,
    RepositoryError,
    SlowRetrievalError,
)
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig

from client.decryption import (
    DecryptionFailure,
    EncryptedDelivery,
    encrypted_delivery,
    fetch_and_decrypt,
)
from client.fetcher import ResumableFetcher
from signing.atomic_file import fsync_directory
from signing.metadata import (
    ImageCustom,
    MetadataFormatError,
    consistent_target_path,
    delta_custom,
    delta_target_path,
    director_ecus,
    director_vin,
    image_custom,
)

log = logging.getLogger(__name__)


class VerificationFailure(Exception):
    """Full verification failed; ``attack`` is True when it is evidence of one."""

    def __init__(self, message: str, *, attack: bool = True) -> None:
        super().__init__(message)
        self.attack = attack


@dataclass(frozen=True)
class DirectedImage:
    """An image the director wants on one ECU, verified against both repositories."""

    ecu_serial: str
    hardware_id: str
    target: TargetFile  # the image repository's entry (same length and hashes as the director's)
    custom: ImageCustom
    #: set when the director sends this image encrypted to the ECU (client.decryption)
    encrypted: EncryptedDelivery | None = None

    @property
    def sha256(self) -> str:
        return self.target.hashes["sha256"]


def _classify(exc: Exception, repo: str) -> VerificationFailure:
    if isinstance(exc, (DownloadLengthMismatchError, SlowRetrievalError)):
        return VerificationFailure(f"{repo} repository: {type(exc).__name__}: {exc}")
    if isinstance(exc, DownloadError):
        return VerificationFailure(f"{repo} repository unreachable: {exc}", attack=False)
    return VerificationFailure(f"{repo} repository: {type(exc).__name__}: {exc}")


class FullVerifier:
    """Verifies director and image metadata for one vehicle (see module docstring)."""

    def __init__(
        self, metadata_dir: Path, server_url: str, vin: str, fetcher: ResumableFetcher | None = None
    ) -> None:
        self.metadata_dir = metadata_dir
        self.server_url = server_url.rstrip("/")
        self.vin = vin
        self.fetcher = fetcher or ResumableFetcher()
        self.image_updater: Updater | None = None
        #: this ECU's X25519 key, for images the director encrypts to it
        self.decryption_key: X25519PrivateKey | None = None
        self.director_targets: Metadata[Targets] | None = None

    def _updater(self, repo: str, metadata_url: str, targets_url: str | None) -> Updater:
        directory = self.metadata_dir / repo
        try:
            # bootstrap=None: the provisioned (and since rotated) local root is the anchor
            return Updater(
                str(directory),
                metadata_url,
                str(self.metadata_dir / "downloads"),
                targets_url,
                fetcher=self.fetcher,
                config=UpdaterConfig(),
                bootstrap=None,
            )
        except (OSError, RepositoryError) as exc:
            raise VerificationFailure(
                f"{repo} trusted root in {directory} is unusable: {exc}", attack=False
            ) from exc

    def verify(
        self, installed_release_counters: dict[str, int], ecus: dict[str, str]
    ) -> list[DirectedImage]:
        """Run full verification; return the images the director wants installed."""
        director = self._updater(
            "director", f"{self.server_url}/director/{self.vin}/metadata/", None
        )
        try:
            director.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            raise _classify(exc, "director") from exc
        # the Updater persisted exactly the targets it verified
        targets = Metadata[Targets].from_file(str(self.metadata_dir / "director" / "targets.json"))
        self.director_targets = targets
        try:
            vin = director_vin(targets.signed)
        except MetadataFormatError as exc:
            raise VerificationFailure(str(exc)) from exc
        if vin != self.vin:
            raise VerificationFailure(
                f"director targets are for VIN {vin!r}, this vehicle is {self.vin!r}"
            )
        if not targets.signed.targets:
            return []

        image = self._updater(
            "image", f"{self.server_url}/image/metadata/", f"{self.server_url}/image/targets/"
        )
        try:
            image.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            raise _classify(exc, "image") from exc
        self.image_updater = image
        # Only the top-level targets, signed by the OFFLINE targets keys, vouch for
        # images: delegated roles (the online "deltas" role) must never make an image
        # installable, or a server compromise alone could install software.
        image_targets = (
            Metadata[Targets]
            .from_file(str(self.metadata_dir / "image" / "targets.json"))
            .signed.targets
        )

        directed: list[DirectedImage] = []
        for path, dtarget in sorted(targets.signed.targets.items()):
            directed.extend(
                self._cross_check(image_targets, path, dtarget, installed_release_counters, ecus)
            )
        serials = [d.ecu_serial for d in directed]
        if len(set(serials)) != len(serials):  # Uptane 5.4.4.2: one image per ECU
            twice = sorted({s for s in serials if serials.count(s) > 1})
            raise VerificationFailure(
                f"director targets name ECU(s) {', '.join(twice)} more than once"
            )
        return directed

    def _cross_check(
        self,
        image_targets: dict[str, TargetFile],
        path: str,
        dtarget: TargetFile,
        installed_release_counters: dict[str, int],
        ecus: dict[str, str],
    ) -> list[DirectedImage]:
        try:
            wanted = director_ecus(dtarget)
        except MetadataFormatError as exc:
            raise VerificationFailure(str(exc)) from exc
        itarget = image_targets.get(path)
        if itarget is None:
            raise VerificationFailure(f"director target {path!r} is not in the image repository")
        try:
            encrypted = encrypted_delivery(dtarget, wanted)
        except DecryptionFailure as exc:
            raise VerificationFailure(str(exc)) from exc
        if encrypted is not None:
            dtarget = (
                encrypted.plaintext
            )  # the director's promise about the plaintext, cross-checked below
        if dtarget.length != itarget.length:
            raise VerificationFailure(
                f"director target {path!r}: length {dtarget.length} differs from the image repository's {itarget.length}"
            )
        if not dtarget.hashes or "sha256" not in itarget.hashes:
            raise VerificationFailure(f"target {path!r}: no sha256 hash to compare")
        for alg, digest in dtarget.hashes.items():
            if itarget.hashes.get(alg) != digest:
                raise VerificationFailure(
                    f"director target {path!r}: {alg} hash differs from the image repository's"
                )
        try:
            custom = image_custom(itarget)
        except MetadataFormatError as exc:
            raise VerificationFailure(str(exc)) from exc
        result = []
        for serial, hw in sorted(wanted.items()):
            if serial not in ecus:
                raise VerificationFailure(
                    f"director target {path!r} names ECU {serial!r}, which is not in this vehicle"
                )
            if ecus[serial] != hw:
                raise VerificationFailure(
                    f"director target {path!r}: ECU {serial} is {ecus[serial]!r}, director says {hw!r}"
                )
            if hw not in custom.hardware_ids:
                raise VerificationFailure(
                    f"director target {path!r} for {hw!r}, but the image repository lists it for "
                    f"{', '.join(custom.hardware_ids)}"
                )
            installed = installed_release_counters.get(serial, 0)
            if custom.release_counter < installed:
                raise VerificationFailure(
                    f"rollback: {path!r} has release counter {custom.release_counter}, ECU {serial} has {installed}"
                )
            result.append(DirectedImage(serial, hw, itarget, custom, encrypted))
        return result

    def download(self, item: DirectedImage, destination: Path) -> Path:
        """Download and verify (length + hashes) one directed image into ``destination``.

        The bytes go to ``destination.part`` first, resumable across failures
        and restarts (Range requests), capped at the signed length; only a
        file whose length and hashes match the verified metadata is renamed
        to ``destination``.
        """
        assert self.image_updater is not None, "verify() first"
        target = item.target
        destination.parent.mkdir(parents=True, exist_ok=True)
        if self.image_updater.find_cached_target(target, str(destination)):
            return destination
        if item.encrypted is not None:
            return self._download_encrypted(item.encrypted, destination)
        return self._fetch_verified(target, destination)

    def _fetch_verified(self, target: TargetFile, destination: Path) -> Path:
        partial = destination.with_name(destination.name + ".part")
        try:
            received = self.fetcher.download_to(self._target_url(target), partial, target.length)
        except DownloadError as exc:
            raise _classify(exc, "image") from exc
        if (
            received < target.length
        ):  # the body ended early: resume next time, nothing to verify yet
            raise VerificationFailure(
                f"download of {target.path!r} ended at {received} of {target.length} bytes",
                attack=False,
            )
        try:
            with open(partial, "rb") as f:
                target.verify_length_and_hashes(f)
        except LengthOrHashMismatchError as exc:
            partial.unlink(missing_ok=True)  # never resume from bytes that failed verification
            raise VerificationFailure(f"image {target.path!r}: {exc}") from exc
        os.replace(partial, destination)
        fsync_directory(
            destination.parent
        )  # the rename must survive a power cut before the slot write
        return destination

    def find_delta(self, item: DirectedImage, installed_sha256: str) -> TargetFile | None:
        """The verified delta from ``installed_sha256`` to ``item``'s image, if the repository has one.

        The delta target comes from the image repository's delegated ``deltas``
        role (TUF-verified); it is used only if it names exactly this base and
        exactly the image the director and the offline-signed targets name.
        Any problem means "no delta": the full image is always the fallback.
        """
        assert self.image_updater is not None, "verify() first"
        if not installed_sha256 or item.encrypted is not None:
            return None
        try:
            delta = self.image_updater.get_targetinfo(
                delta_target_path(installed_sha256, item.sha256)
            )
            if delta is None:
                return None
            custom = delta_custom(delta)
        except (RepositoryError, DownloadError, OSError, MetadataFormatError) as exc:
            log.warning("ignoring deltas for %s: %s", item.target.path, exc)
            return None
        if (custom.base_sha256, custom.result_sha256, custom.result_length) != (
            installed_sha256,
            item.sha256,
            item.target.length,
        ):
            log.warning(
                "delta %s does not join the installed image to %s: ignored",
                delta.path,
                item.target.path,
            )
            return None
        return delta

    def download_target(self, target: TargetFile, destination: Path) -> Path:
        """Download ``target`` (a delta from :meth:`find_delta`, or an image whose length and
        hashes were verified earlier, as a resumed install has them) and check length and hashes."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        return self._fetch_verified(target, destination)

    def _download_encrypted(self, delivery: EncryptedDelivery, destination: Path) -> Path:
        name = consistent_target_path(
            delivery.ciphertext.path, delivery.ciphertext.hashes["sha256"]
        )
        url = f"{self.server_url}/director/{self.vin}/targets/{parse.quote(name)}"
        try:
            fetch_and_decrypt(self.fetcher, url, delivery, self.decryption_key, destination)
        except DownloadError as exc:
            raise _classify(exc, "director") from exc
        except DecryptionFailure as exc:
            raise VerificationFailure(str(exc)) from exc
        return destination

    def _target_url(self, target: TargetFile) -> str:
        name = consistent_target_path(target.path, target.hashes["sha256"])
        return f"{self.server_url}/image/targets/{parse.quote(name)}"
