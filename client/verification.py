"""Uptane full verification (Uptane Standard 2.x, section 5.4.4.2).

:meth:`FullVerifier.verify` runs two ``tuf.ngclient.Updater`` instances, one
per repository, each anchored on the root provisioned into the vehicle
(``STATE_DIR/metadata/{director,image}/root.json``, kept up to date by the
updaters through root rotation), and returns one immutable
:class:`VerifiedUpdate` that everything after it consumes: the installer,
the bundle check, the secondaries. Nothing else reads verified metadata back
from disk.

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
   release counter must not be below what that ECU has installed. An image
   the top-level targets do not list is looked up through the supplier
   delegation its path falls in (python-tuf walks it, checking the
   supplier's signatures), and every hardware id it lists must be one the
   delegation allows (``docs/delegations.md``); the online ``deltas`` role
   never vouches for an image. A target
   the director encrypted for one ECU (:mod:`client.decryption`) is
   cross-checked by the plaintext length and sha256 it promises;
5. for each image not yet installed on an ECU that can take a delta, look
   up the delta from what it runs in the image repository's ``deltas`` role
   (:meth:`FullVerifier` never lets that online role vouch for an image);
6. when a secondary is to be updated and the director root has rotated,
   fetch the director roots since version 1, which the secondary follows.

The result holds the verified director targets exactly as signed (the
secondaries check their signatures again), the offline-signed image
repository targets (for the bundle check), the director root chain and the
images directed to each ECU. python-tuf keeps each role it verified as
``<role>.json`` in the Updater's metadata directory (the same directory whose
``root.json`` it trusts); :func:`_verified_targets` reads it once, right
after the refresh that verified it.

Names in signed metadata (target paths, hashes, ECU serials, hardware ids)
must follow :mod:`signing.names`; downloads (:mod:`client.downloads`) place
every file with :func:`signing.names.confined`.

Anything that fails raises a :class:`~signing.exceptions.VerificationFailure`
whose class says what it means for the vehicle (:func:`classify`):
:class:`~signing.exceptions.AttackDetected`,
:class:`~signing.exceptions.TransientFailure` or
:class:`~signing.exceptions.ConfigurationFailure`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from tuf.api.exceptions import (
    DownloadError,
    DownloadLengthMismatchError,
    RepositoryError,
    SlowRetrievalError,
    UnsignedMetadataError,
)
from tuf.api.metadata import DelegatedRole, Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from client.decryption import EncryptedDelivery, encrypted_delivery
from client.fetcher import CrossOriginRedirectError, HTTPStatusError, ResumableFetcher, TLSError
from signing.atomic_file import fsync_directory
from signing.exceptions import (
    AttackDetected,
    ConfigurationFailure,
    TransientFailure,
    VerificationFailure,
)
from signing.json_limits import UntrustedJsonError, parse_json
from signing.metadata import (
    DELTAS_ROLE,
    ImageCustom,
    MetadataFormatError,
    check_supplier_delegation,
    check_target,
    delta_custom,
    delta_target_path,
    director_ecus,
    director_install_on_consent,
    director_vin,
    director_vin_of,
    image_custom,
    images_outside_delegation,
)

__all__ = [
    "AttackDetected",
    "ConfigurationFailure",
    "DirectedImage",
    "EcuBeforeUpdate",
    "ForeignMetadataError",
    "FullVerifier",
    "TransientFailure",
    "VehicleBoundFetcher",
    "VerificationFailure",
    "VerifiedUpdate",
    "classify",
]

log = logging.getLogger(__name__)


class ForeignMetadataError(RepositoryError):
    """Director metadata signed for another vehicle (or for none) was offered to this one."""


#: Director roles whose files carry the VIN they were signed for (root is shared by the fleet).
_VEHICLE_BOUND_ROLES = ("timestamp", "snapshot", "targets")
_ROOT_MAX_LENGTH = UpdaterConfig().root_max_length


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
class EcuBeforeUpdate:
    """What verification needs to know about one ECU of the vehicle before the update."""

    hardware_id: str
    #: release counter of the installed image (anti-rollback)
    release_counter: int = 0
    #: sha256 of the installed image ('' for none or unknown)
    sha256: str = ""
    #: whether the primary can rebuild this ECU's next image from a delta of the installed one
    takes_delta: bool = False


@dataclass(frozen=True)
class DirectedImage:
    """An image the director wants on one ECU, verified against both repositories."""

    ecu_serial: str
    hardware_id: str
    target: TargetFile  # the image repository's entry (same length and hashes as the director's)
    custom: ImageCustom
    #: set when the director sends this image encrypted to the ECU (client.decryption)
    encrypted: EncryptedDelivery | None = None
    #: the verified delta from the image the ECU runs, when the repository has one
    delta: TargetFile | None = None
    #: the director (a campaign) says: install only once the ``consent`` precondition holds
    install_on_consent: bool = False

    @property
    def sha256(self) -> str:
        return self.target.hashes["sha256"]


@dataclass(frozen=True)
class VerifiedUpdate:
    """What one full verification vouched for; immutable, consumed by the rest of the cycle."""

    #: the director targets metadata exactly as signed (secondaries verify it again)
    director_targets: bytes = b""
    #: the offline-signed top-level targets of the image repository, by path
    image_targets: Mapping[str, TargetFile] = field(default_factory=lambda: MappingProxyType({}))
    #: director roots after version 1 up to the trusted one (for secondaries to follow rotations);
    #: fetched only when a secondary is to be updated
    director_roots: tuple[bytes, ...] = ()
    #: every image the director names, by ECU serial
    directed: Mapping[str, DirectedImage] = field(default_factory=lambda: MappingProxyType({}))
    #: the directed images an ECU does not run yet, in the director's order
    to_install: tuple[DirectedImage, ...] = ()
    #: deltas the deltas role offered that failed their checks: attack evidence (the full
    #: image is used instead)
    refused_deltas: tuple[str, ...] = ()


def classify(exc: Exception, repo: str, *, first_contact: bool = False) -> VerificationFailure:
    """What a python-tuf or download error means for the vehicle (see module docstring)."""
    what = f"{repo} repository: {type(exc).__name__}: {exc}"
    if isinstance(exc, (DownloadLengthMismatchError, SlowRetrievalError)):
        return AttackDetected(what)
    if isinstance(exc, CrossOriginRedirectError):
        return ConfigurationFailure(f"{repo} repository: {exc}")
    if isinstance(exc, TLSError):
        # refused, never trusted: a wrong CA bundle or an expired client certificate is far
        # likelier than a man in the middle, who learns nothing and changes nothing here
        return ConfigurationFailure(
            f"{repo} repository: {exc} (check [tls] ca_certs, and the client certificate)"
        )
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
            f"with the right {repo}-root.json of this deployment?"
        )
    return AttackDetected(what)


def _restore_trusted_root_link(directory: Path) -> None:
    """Put back ``root.json`` if a kill took it away while python-tuf re-linked it.

    python-tuf keeps every root it verified in ``root_history/N.root.json``
    and points ``root.json`` at the newest by removing the old link and then
    making the new one: a SIGKILL or power cut between the two leaves no
    trusted root at all, and a vehicle that can never verify again. The newest
    file in ``root_history`` is a root python-tuf verified (it writes one there
    only after verifying it), so pointing ``root.json`` at it, atomically, is
    exactly what the interrupted step would have done.
    """
    link = directory / "root.json"
    if link.exists():  # (follows the link: a dangling one is repaired too)
        return
    history = directory / "root_history"
    versions = sorted(
        (int(v), p)
        for p in history.glob("*.root.json")
        if (v := p.name.split(".", 1)[0]).isascii() and v.isdigit()
    )
    if not versions:
        return  # never provisioned: python-tuf says so
    temporary = directory / ".root.json.restoring"
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.join("root_history", versions[-1][1].name), temporary)
    os.replace(temporary, link)
    fsync_directory(directory)
    log.warning("restored %s, lost in an interrupted root update", link)


def _root_version(directory: Path) -> int | None:
    """The version of the trusted root in ``directory`` (None if unreadable: python-tuf says why)."""
    try:
        version = json.loads((directory / "root.json").read_bytes())["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) else None


def _verified_targets(directory: Path, repo: str) -> tuple[bytes, Metadata[Targets]]:
    """The top-level targets python-tuf just verified (and kept as targets.json), read once."""
    try:
        data = (directory / "targets.json").read_bytes()
        return data, Metadata[Targets].from_bytes(data)
    except (OSError, DeserializationError) as exc:
        raise TransientFailure(f"{repo} repository: verified targets unreadable: {exc}") from exc


class FullVerifier:
    """Verifies director and image metadata for one vehicle (see module docstring)."""

    def __init__(
        self,
        metadata_dir: Path,
        server_url: str,
        vin: str,
        fetcher: ResumableFetcher,
        *,
        image_url: str = "",
    ) -> None:
        self.metadata_dir = metadata_dir
        self.server_url = server_url.rstrip("/")
        #: the image repository's base URL (the director's server unless served apart)
        self.image_url = (image_url or server_url).rstrip("/")
        self.vin = vin
        self.fetcher = fetcher

    def _refresh(
        self, repo: str, metadata_url: str, targets_url: str | None, fetcher: FetcherInterface
    ) -> Updater:
        """A refreshed Updater for ``repo`` (every TUF check passed), or a classified failure."""
        directory = self.metadata_dir / repo
        _restore_trusted_root_link(directory)
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
            raise classify(exc, repo, first_contact=first_contact) from exc
        return updater

    def verify(
        self,
        ecus: Mapping[str, str],
        release_counters: Mapping[str, int],
        before: Callable[[str], EcuBeforeUpdate],
        primary_serial: str,
    ) -> VerifiedUpdate:
        """Run full verification; return what it vouched for (see module docstring).

        ``ecus`` maps this vehicle's ECU serials to hardware ids, and
        ``release_counters`` holds what each has installed. ``before`` tells
        what an ECU runs; it is asked only about ECUs the director names, so
        an idle poll asks no ECU anything.
        """
        self._refresh(
            "director",
            f"{self.server_url}/director/{self.vin}/metadata/",
            None,
            VehicleBoundFetcher(self.fetcher, self.vin),
        )
        director_bytes, targets = _verified_targets(self.metadata_dir / "director", "director")
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
            return VerifiedUpdate(director_targets=director_bytes)

        image = self._refresh(
            "image",
            f"{self.image_url}/image/metadata/",
            f"{self.image_url}/image/targets/",
            self.fetcher,
        )
        # The top-level targets, signed by the OFFLINE targets keys, vouch for images, and
        # so do the supplier roles they delegate to, within the hardware ids the delegation
        # names: the online "deltas" role must never make an image installable, or a server
        # compromise alone could install software.
        top_level = _verified_targets(self.metadata_dir / "image", "image")[1].signed
        image_targets = dict(top_level.targets)
        for path in targets.signed.targets:
            if path not in image_targets:
                found = self._delegated_image(image, top_level, path)
                if found is not None:
                    image_targets[path] = found

        directed: dict[str, DirectedImage] = {}
        for path, dtarget in sorted(targets.signed.targets.items()):
            for item in self._cross_check(image_targets, path, dtarget, release_counters, ecus):
                if item.ecu_serial in directed:  # Uptane 5.4.4.2: one image per ECU
                    raise AttackDetected(
                        f"director targets name ECU(s) {item.ecu_serial} more than once"
                    )
                directed[item.ecu_serial] = item
        to_install: list[DirectedImage] = []
        refused: list[str] = []
        for serial, item in directed.items():
            ecu = before(serial)
            if ecu.sha256 == item.sha256:
                continue
            if ecu.takes_delta and ecu.sha256 and item.encrypted is None:
                delta, refusal = self._find_delta(image, item, ecu.sha256)
                if refusal:
                    refused.append(refusal)
                item = replace(item, delta=delta)
                directed[serial] = item
            to_install.append(item)
        roots: tuple[bytes, ...] = ()
        if any(item.ecu_serial != primary_serial for item in to_install):
            roots = self._director_roots()
        return VerifiedUpdate(
            director_targets=director_bytes,
            image_targets=MappingProxyType(dict(image_targets)),
            director_roots=roots,
            directed=MappingProxyType(directed),
            to_install=tuple(to_install),
            refused_deltas=tuple(refused),
        )

    def _delegated_image(self, image: Updater, top_level: Targets, path: str) -> TargetFile | None:
        """The image at ``path`` vouched for by a supplier delegation, checked against it.

        The first delegation whose patterns match ``path`` is the one python-tuf's
        walk ends in (supplier delegations are terminating; a delegation that is
        not, or the deltas role, vouches for no image). python-tuf checks the
        supplier's signatures and the path patterns; the image's hardware ids
        must all be ones the delegation allows, or the metadata is refused as an
        attack (a supplier, or its key, publishing beyond its delegation).
        """
        delegations = top_level.delegations
        roles = (delegations.roles or {}) if delegations else {}
        role: DelegatedRole | None = next(
            (r for r in roles.values() if r.is_delegated_path(path)), None
        )
        if role is None:
            return None
        where = f"director target {path!r}"
        if role.name == DELTAS_ROLE:
            raise AttackDetected(
                f"{where} is not in the image repository: it is in the online "
                f"{DELTAS_ROLE!r} role, which vouches for no image"
            )
        try:
            check_supplier_delegation(role)
        except MetadataFormatError as exc:
            raise AttackDetected(f"{where}: {exc}") from exc
        try:
            target = image.get_targetinfo(path)
        except (RepositoryError, DownloadError, OSError) as exc:
            raise classify(exc, "image") from exc
        if target is None:
            return None
        try:
            check_target(target, "image target")
            problems = images_outside_delegation(role, [target])
        except MetadataFormatError as exc:
            raise AttackDetected(f"supplier delegation {role.name!r}: {exc}") from exc
        if problems:
            raise AttackDetected(f"supplier delegation {role.name!r}: {'; '.join(problems)}")
        return target

    def _cross_check(
        self,
        image_targets: dict[str, TargetFile],
        path: str,
        dtarget: TargetFile,
        installed_release_counters: Mapping[str, int],
        ecus: Mapping[str, str],
    ) -> list[DirectedImage]:
        try:
            wanted = director_ecus(dtarget)
            on_consent = director_install_on_consent(dtarget)
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
        encrypted = encrypted_delivery(dtarget, wanted)  # DecryptionFailure is an AttackDetected
        if encrypted is not None:
            # the director's promise about the plaintext, cross-checked below
            dtarget = encrypted.plaintext
        if dtarget.length != itarget.length:
            raise AttackDetected(
                f"director target {path!r}: length {dtarget.length} differs from the image "
                f"repository's {itarget.length}"
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
                    f"director target {path!r}: ECU {serial} is {ecus[serial]!r}, director says "
                    f"{hw!r}"
                )
            if hw not in custom.hardware_ids:
                raise AttackDetected(
                    f"director target {path!r} for {hw!r}, but the image repository lists it for "
                    f"{', '.join(custom.hardware_ids)}"
                )
            installed = installed_release_counters.get(serial, 0)
            if custom.release_counter < installed:
                raise AttackDetected(
                    f"rollback: {path!r} has release counter {custom.release_counter}, ECU "
                    f"{serial} has {installed}"
                )
            result.append(
                DirectedImage(serial, hw, itarget, custom, encrypted, install_on_consent=on_consent)
            )
        return result

    def _find_delta(
        self, image: Updater, item: DirectedImage, installed_sha256: str
    ) -> tuple[TargetFile | None, str]:
        """The verified delta from ``installed_sha256`` to ``item``'s image, and why one was refused.

        The delta target comes from the image repository's delegated ``deltas``
        role (TUF-verified); it is used only if it names exactly this base and
        exactly the image the director and the offline-signed targets name.
        A network problem means "no delta" (the full image is always the
        fallback); a delta target that is malformed or joins other images
        than its path says is signed evidence of an attack: refused, reported,
        and the full image used.
        """
        try:
            delta = image.get_targetinfo(delta_target_path(installed_sha256, item.sha256))
        except (RepositoryError, DownloadError, OSError) as exc:
            log.warning("ignoring deltas for %s: %s", item.target.path, exc)
            return None, ""
        if delta is None:
            return None, ""
        try:
            custom = delta_custom(delta)
        except MetadataFormatError as exc:
            return None, f"deltas role: {exc}"
        if (custom.base_sha256, custom.result_sha256, custom.result_length) != (
            installed_sha256,
            item.sha256,
            item.target.length,
        ):
            return None, (
                f"deltas role: delta {delta.path!r} does not join the installed image to "
                f"{item.target.path!r} ({custom.result_length} bytes)"
            )
        return delta, ""

    def _director_roots(self) -> tuple[bytes, ...]:
        """Director roots 2..N, N the trusted one, as the server serves them (TUF keeps them all).

        A secondary follows them from its own trusted root, checking each
        signature itself; the primary only makes sure the chain ends at the
        root it trusts, so it never hands over a chain it would not follow.
        """
        directory = self.metadata_dir / "director"
        newest = _root_version(directory)
        if newest is None or newest < 2:
            return ()
        base = f"{self.server_url}/director/{self.vin}/metadata/"
        try:
            chain = tuple(
                self.fetcher.download_bytes(f"{base}{v}.root.json", _ROOT_MAX_LENGTH)
                for v in range(2, newest + 1)
            )
            trusted = Metadata[Root].from_bytes((directory / "root.json").read_bytes())
            served = Metadata[Root].from_bytes(chain[-1])
        except DownloadError as exc:
            raise classify(exc, "director") from exc
        except (OSError, DeserializationError) as exc:
            raise AttackDetected(f"director root chain: {exc}") from exc
        if served.signed_bytes != trusted.signed_bytes:
            raise AttackDetected(
                f"director root v{newest} served for secondaries differs from the trusted one"
            )
        return chain
