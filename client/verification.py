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
   release counter must not be below what that ECU has installed.

Anything that fails raises :class:`VerificationFailure`, whose ``attack``
flag says whether it is evidence of an attack (to be reported in the next
manifest's ``attacks_detected``) or just a network problem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tuf.api.exceptions import (
    DownloadError,
    DownloadLengthMismatchError,
    RepositoryError,
    SlowRetrievalError,
)
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from signing.metadata import (
    ImageCustom,
    MetadataFormatError,
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

    def __init__(self, metadata_dir: Path, server_url: str, vin: str,
                 fetcher: FetcherInterface | None = None) -> None:
        self.metadata_dir = metadata_dir
        self.server_url = server_url.rstrip("/")
        self.vin = vin
        self.fetcher = fetcher
        self.image_updater: Updater | None = None
        self.director_targets: Metadata[Targets] | None = None

    def _updater(self, repo: str, metadata_url: str, targets_url: str | None) -> Updater:
        directory = self.metadata_dir / repo
        try:
            # bootstrap=None: the provisioned (and since rotated) local root is the anchor
            return Updater(str(directory), metadata_url, str(self.metadata_dir / "downloads"), targets_url,
                           fetcher=self.fetcher, config=UpdaterConfig(), bootstrap=None)
        except (OSError, RepositoryError) as exc:
            raise VerificationFailure(f"{repo} trusted root in {directory} is unusable: {exc}", attack=False) from exc

    def verify(self, installed_release_counters: dict[str, int], ecus: dict[str, str]) -> list[DirectedImage]:
        """Run full verification; return the images the director wants installed."""
        director = self._updater("director", f"{self.server_url}/director/{self.vin}/metadata/", None)
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
            raise VerificationFailure(f"director targets are for VIN {vin!r}, this vehicle is {self.vin!r}")
        if not targets.signed.targets:
            return []

        image = self._updater("image", f"{self.server_url}/image/metadata/", f"{self.server_url}/image/targets/")
        try:
            image.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            raise _classify(exc, "image") from exc
        self.image_updater = image

        directed = []
        for path, dtarget in sorted(targets.signed.targets.items()):
            directed.extend(self._cross_check(image, path, dtarget, installed_release_counters, ecus))
        return directed

    def _cross_check(self, image: Updater, path: str, dtarget: TargetFile,
                     installed_release_counters: dict[str, int], ecus: dict[str, str]) -> list[DirectedImage]:
        try:
            wanted = director_ecus(dtarget)
            itarget = image.get_targetinfo(path)
        except MetadataFormatError as exc:
            raise VerificationFailure(str(exc)) from exc
        except (RepositoryError, DownloadError, OSError) as exc:
            raise _classify(exc, "image") from exc
        if itarget is None:
            raise VerificationFailure(f"director target {path!r} is not in the image repository")
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
                raise VerificationFailure(f"director target {path!r} names ECU {serial!r}, which is not in this vehicle")
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
            result.append(DirectedImage(serial, hw, itarget, custom))
        return result

    def download(self, item: DirectedImage, destination: Path) -> Path:
        """Download and verify (length + hashes) one directed image into ``destination``."""
        assert self.image_updater is not None, "verify() first"
        destination.parent.mkdir(parents=True, exist_ok=True)
        cached = self.image_updater.find_cached_target(item.target, str(destination))
        if cached:
            return destination
        try:
            self.image_updater.download_target(item.target, str(destination))
        except (RepositoryError, DownloadError) as exc:
            destination.unlink(missing_ok=True)
            raise _classify(exc, "image") from exc
        return destination
