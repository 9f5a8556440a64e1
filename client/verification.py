"""Uptane full verification (Uptane Standard 2.x, section 5.4.4.2).

:class:`FullVerifier` runs two ``tuf.ngclient.Updater`` instances, one per
repository, each anchored on the root provisioned into the vehicle
(``STATE_DIR/metadata/{director,image}/root.json``, kept up to date by the
updaters through root rotation):

1. refresh the director repository (root → timestamp → snapshot → targets,
   with every TUF check: signatures, thresholds, versions, expiry, lengths).
   Every director timestamp, snapshot and targets file carries the VIN it was
   signed for, and :class:`VehicleBoundFetcher` refuses a file for another
   vehicle *before* python-tuf trusts it: all vehicles share the director's
   online keys, so another vehicle's genuine, higher-versioned timestamp
   would otherwise be trusted and freeze this vehicle until its own versions
   caught up;
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

Names in signed metadata (target paths, hashes, ECU serials, hardware ids)
must follow :mod:`signing.names`, and every file a download creates is placed
with :func:`signing.names.confined`, so no signed value can become a path
outside the agent's download directory.

Anything that fails raises a :class:`VerificationFailure` whose class says
what it means for the vehicle:

* :class:`AttackDetected`: evidence of an attack, refused and reported in
  the next manifest's ``attacks_detected``;
* :class:`TransientFailure`: the network or the server failed; the update is
  postponed to the next poll (a partial download resumes);
* :class:`ConfigurationFailure`: a provisioning or deployment mistake (a
  trusted root that never verified anything from this server, a VIN the
  server does not know, a redirect to another origin); refused and reported
  as a failure, never as an attack.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
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
    UnsignedMetadataError,
)
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from client.decryption import (
    DecryptionFailure,
    EncryptedDelivery,
    encrypted_delivery,
    fetch_and_decrypt,
)
from client.fetcher import CrossOriginRedirectError, HTTPStatusError, ResumableFetcher
from signing.atomic_file import fsync_directory
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.metadata import (
    ImageCustom,
    MetadataFormatError,
    check_target,
    consistent_target_path,
    delta_custom,
    delta_target_path,
    director_ecus,
    director_vin,
    director_vin_of,
    image_custom,
)
from signing.names import InvalidNameError, confined

log = logging.getLogger(__name__)


class VerificationFailure(UptakeError):
    """Full verification, or a verified download, did not succeed; the subclass says why."""


class AttackDetected(VerificationFailure):
    """Evidence of an attack: refused, and reported in the next manifest's ``attacks_detected``."""


class TransientFailure(VerificationFailure):
    """The network or the server failed: the update is postponed to the next poll."""


class ConfigurationFailure(VerificationFailure):
    """A provisioning or deployment mistake: refused and reported as a failure, not an attack."""


class ForeignMetadataError(RepositoryError):
    """Director metadata signed for another vehicle (or for none) was offered to this one."""


#: Director roles whose files carry the VIN they were signed for (root is shared by the fleet).
_VEHICLE_BOUND_ROLES = ("timestamp", "snapshot", "targets")


class VehicleBoundFetcher(FetcherInterface):
    """The agent's fetcher, refusing director metadata of another vehicle before python-tuf sees it.

    python-tuf stores a timestamp or snapshot as trusted as soon as its
    signatures and versions check out; the VIN inside them is Uptake's, so
    python-tuf cannot check it. This wrapper does, on the downloaded bytes:
    a file whose ``signed.custom.vin`` is not this vehicle's never reaches
    the trusted set. It can only refuse, never accept: python-tuf still
    checks everything it checks.
    """

    def __init__(self, inner: ResumableFetcher, vin: str) -> None:
        self._inner = inner
        self._vin = vin

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._inner._fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        data = self._inner.download_bytes(url, max_length)
        filename = url.rsplit("/", 1)[-1]
        role = filename.removesuffix(".json").rpartition(".")[2]
        if filename.endswith(".json") and role in _VEHICLE_BOUND_ROLES:
            self._check(data, f"director {role} metadata")
        return data

    def _check(self, data: bytes, what: str) -> None:
        try:
            document = parse_json(data, where=what, max_bytes=len(data))
            signed = document.get("signed") if isinstance(document, dict) else None
            custom = signed.get("custom") if isinstance(signed, dict) else None
            vin = director_vin_of(custom, what)
        except (UntrustedJsonError, MetadataFormatError) as exc:
            raise ForeignMetadataError(str(exc)) from exc
        if vin != self._vin:
            raise ForeignMetadataError(f"{what} is for VIN {vin!r}, this vehicle is {self._vin!r}")


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


def _classify(exc: Exception, repo: str, *, first_contact: bool = False) -> VerificationFailure:
    """What a python-tuf or download error means for the vehicle (see module docstring)."""
    what = f"{repo} repository: {type(exc).__name__}: {exc}"
    if isinstance(exc, (DownloadLengthMismatchError, SlowRetrievalError)):
        return AttackDetected(what)
    if isinstance(exc, CrossOriginRedirectError):
        return ConfigurationFailure(f"{repo} repository: {exc}")
    if (
        isinstance(exc, HTTPStatusError)
        and exc.status_code in (401, 403, 404)
        and exc.url.endswith("/timestamp.json")
    ):
        # the entry point of the repository is missing: not this vehicle's server, or a VIN
        # it does not know (a versioned file missing is a server mid-publish, or worse)
        return ConfigurationFailure(
            f"{repo} repository answered HTTP {exc.status_code} for its timestamp ({exc}): is the "
            "vehicle registered, and the server URL right?"
        )
    if isinstance(exc, DownloadError):
        return TransientFailure(f"{repo} repository unreachable: {exc}")
    if first_contact and isinstance(exc, UnsignedMetadataError):
        # nothing from this server has ever verified with the provisioned root: a wrong root
        # file (the other repository's, another deployment's) is far likelier than an attack
        return ConfigurationFailure(
            f"{repo} repository: the {repo} root this vehicle was provisioned with does not verify "
            f"the server's {repo} metadata ({type(exc).__name__}: {exc}); was it provisioned "
            f"with the right "
            f"{repo}-root.json of this deployment?"
        )
    return AttackDetected(what)


def _root_version(directory: Path) -> int | None:
    """The version of the trusted root in ``directory`` (None if unreadable: python-tuf says why)."""
    try:
        version = json.loads((directory / "root.json").read_bytes())["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) else None


class FullVerifier:
    """Verifies director and image metadata for one vehicle (see module docstring)."""

    def __init__(
        self,
        metadata_dir: Path,
        downloads_dir: Path,
        server_url: str,
        vin: str,
        fetcher: ResumableFetcher | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        #: where downloads go; every file name in it comes through :meth:`download_path`
        self.downloads_dir = downloads_dir
        self.server_url = server_url.rstrip("/")
        self.vin = vin
        self.fetcher = fetcher or ResumableFetcher()
        self.image_updater: Updater | None = None
        #: this ECU's X25519 key, for images the director encrypts to it
        self.decryption_key: X25519PrivateKey | None = None
        self.director_targets: Metadata[Targets] | None = None

    def _refresh(
        self, repo: str, metadata_url: str, targets_url: str | None, fetcher: FetcherInterface
    ) -> Updater:
        """A refreshed Updater for ``repo`` (every TUF check passed), or a classified failure."""
        directory = self.metadata_dir / repo
        provisioned_root = _root_version(directory)
        try:
            # bootstrap=None: the provisioned (and since rotated) local root is the anchor
            updater = Updater(
                str(directory),
                metadata_url,
                str(self.metadata_dir / "downloads"),
                targets_url,
                fetcher=fetcher,
                config=UpdaterConfig(),
                bootstrap=None,
            )
        except (OSError, RepositoryError) as exc:
            raise ConfigurationFailure(
                f"{repo} trusted root in {directory} is unusable: {exc}"
            ) from exc
        try:
            updater.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            # nothing from this server has ever verified with the provisioned root: no timestamp
            # trusted yet, and the root not moved on along a chain it signed
            first_contact = not (directory / "timestamp.json").exists() and provisioned_root == (
                _root_version(directory)
            )
            raise _classify(exc, repo, first_contact=first_contact) from exc
        return updater

    def verify(
        self, installed_release_counters: dict[str, int], ecus: dict[str, str]
    ) -> list[DirectedImage]:
        """Run full verification; return the images the director wants installed."""
        self._refresh(
            "director",
            f"{self.server_url}/director/{self.vin}/metadata/",
            None,
            VehicleBoundFetcher(self.fetcher, self.vin),
        )
        # the Updater persisted exactly the targets it verified
        targets = Metadata[Targets].from_file(str(self.metadata_dir / "director" / "targets.json"))
        self.director_targets = targets
        try:
            vin = director_vin(targets.signed)
            for dtarget in targets.signed.targets.values():
                check_target(dtarget, "director target")
        except MetadataFormatError as exc:
            raise AttackDetected(str(exc)) from exc
        if vin != self.vin:
            raise AttackDetected(
                f"director targets are for VIN {vin!r}, this vehicle is {self.vin!r}"
            )
        if not targets.signed.targets:
            return []

        image = self._refresh(
            "image",
            f"{self.server_url}/image/metadata/",
            f"{self.server_url}/image/targets/",
            self.fetcher,
        )
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
            raise AttackDetected(f"director targets name ECU(s) {', '.join(twice)} more than once")
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
            raise AttackDetected(str(exc)) from exc
        itarget = image_targets.get(path)
        if itarget is None:
            raise AttackDetected(f"director target {path!r} is not in the image repository")
        try:
            check_target(itarget, "image target")
            custom = image_custom(itarget)
        except MetadataFormatError as exc:
            raise AttackDetected(str(exc)) from exc
        try:
            encrypted = encrypted_delivery(dtarget, wanted)
        except DecryptionFailure as exc:
            raise AttackDetected(str(exc)) from exc
        if encrypted is not None:
            dtarget = (
                encrypted.plaintext
            )  # the director's promise about the plaintext, cross-checked below
        if dtarget.length != itarget.length:
            raise AttackDetected(
                f"director target {path!r}: length {dtarget.length} differs from the image repository's {itarget.length}"
            )
        if not dtarget.hashes or "sha256" not in itarget.hashes:
            raise AttackDetected(f"target {path!r}: no sha256 hash to compare")
        for alg, digest in dtarget.hashes.items():
            if itarget.hashes.get(alg) != digest:
                raise AttackDetected(
                    f"director target {path!r}: {alg} hash differs from the image repository's"
                )
        result = []
        for serial, hw in sorted(wanted.items()):
            if serial not in ecus:
                raise AttackDetected(
                    f"director target {path!r} names ECU {serial!r}, which is not in this vehicle"
                )
            if ecus[serial] != hw:
                raise AttackDetected(
                    f"director target {path!r}: ECU {serial} is {ecus[serial]!r}, director says {hw!r}"
                )
            if hw not in custom.hardware_ids:
                raise AttackDetected(
                    f"director target {path!r} for {hw!r}, but the image repository lists it for "
                    f"{', '.join(custom.hardware_ids)}"
                )
            installed = installed_release_counters.get(serial, 0)
            if custom.release_counter < installed:
                raise AttackDetected(
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
        destination = self.download_path(destination.name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if self.image_updater.find_cached_target(target, str(destination)):
            return destination
        if item.encrypted is not None:
            return self._download_encrypted(item.encrypted, destination)
        return self._fetch_verified(target, destination)

    def download_path(self, name: str) -> Path:
        """Where the download called ``name`` (a sha256, maybe with a suffix) lives: never elsewhere."""
        try:
            return confined(self.downloads_dir, name, where="download")
        except InvalidNameError as exc:
            raise AttackDetected(str(exc)) from exc

    def _fetch_verified(self, target: TargetFile, destination: Path) -> Path:
        # the .part and .resume files sit beside the destination: check it is where it must be
        destination = self.download_path(destination.name)
        partial = destination.with_name(destination.name + ".part")
        try:
            received = self.fetcher.download_to(self._target_url(target), partial, target.length)
        except DownloadError as exc:
            raise _classify(exc, "image") from exc
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

    def find_delta(self, item: DirectedImage, installed_sha256: str) -> TargetFile | None:
        """The verified delta from ``installed_sha256`` to ``item``'s image, if the repository has one.

        The delta target comes from the image repository's delegated ``deltas``
        role (TUF-verified); it is used only if it names exactly this base and
        exactly the image the director and the offline-signed targets name.
        A network problem means "no delta" (the full image is always the
        fallback); a delta target that is malformed or joins other images
        than its path says is signed evidence of an attack: :class:`AttackDetected`,
        which the caller reports and then falls back to the full image.
        """
        assert self.image_updater is not None, "verify() first"
        if not installed_sha256 or item.encrypted is not None:
            return None
        try:
            delta = self.image_updater.get_targetinfo(
                delta_target_path(installed_sha256, item.sha256)
            )
        except (RepositoryError, DownloadError, OSError) as exc:
            log.warning("ignoring deltas for %s: %s", item.target.path, exc)
            return None
        if delta is None:
            return None
        try:
            custom = delta_custom(delta)
        except MetadataFormatError as exc:
            raise AttackDetected(f"deltas role: {exc}") from exc
        if (custom.base_sha256, custom.result_sha256, custom.result_length) != (
            installed_sha256,
            item.sha256,
            item.target.length,
        ):
            raise AttackDetected(
                f"deltas role: delta {delta.path!r} does not join the installed image to "
                f"{item.target.path!r} ({custom.result_length} bytes)"
            )
        return delta

    def download_target(self, target: TargetFile, destination: Path) -> Path:
        """Download ``target`` (a delta from :meth:`find_delta`, or an image whose length and
        hashes were verified earlier, as a resumed install has them) and check length and hashes."""
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
            raise AttackDetected(str(exc)) from exc
        return destination

    def _target_url(self, target: TargetFile) -> str:
        name = consistent_target_path(target.path, target.hashes["sha256"])
        return f"{self.server_url}/image/targets/{parse.quote(name)}"
