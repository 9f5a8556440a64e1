"""Publishing firmware: the release engineer's side of the image repository.

Runs on the release engineer's machine, where the offline targets key(s)
live, and talks to the server over HTTP:

1. fetch the image repository's current targets metadata and *verify* it
   with a ``tuf.ngclient.Updater`` anchored on the release engineer's own
   copy of root (``image-root.json`` beside the offline keys), so nobody can
   slip an entry into what gets re-signed;
2. add the new image's entry (length, sha256, ``hardwareIds``, release
   counter, version, optional ``requires`` of other ECUs), bump the
   version, sign with the targets key(s);
3. upload the image bytes, then the signed metadata; the server checks the
   signatures against root and publishes snapshot + timestamp.

When the targets threshold is above one and the keys live on separate
machines, steps 2-3 split (:func:`stage_release` ... :func:`import_signatures`):

* **stage** (a machine that talks to the server, no keys): steps 1-2
  without signing; the images are uploaded and the unsigned targets wait on
  the server;
* **export** (:func:`export_release`): a file with the staged targets and
  the published targets they follow;
* **sign** (:func:`sign_release_file`, each key holder, offline): shows what
  is signed (:func:`release_summary`: images, sizes, hashes, hardware ids,
  release counters, expiry, what changed) and adds one signature to the file;
* **import** (:func:`import_signatures`): the server verifies each
  signature, publishes at the threshold, and otherwise says who is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from securesystemslib.signer import Signature, Signer
from tuf.api.exceptions import DownloadError, DownloadHTTPError, RepositoryError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from server.api_client import AdminClient, ApiClientError
from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.metadata import (
    ImageCustom,
    MetadataFormatError,
    check_arch,
    expiry,
    image_custom,
    key_names,
    parse_requires,
    version_key,
)

#: Name of the release engineer's trusted copy of the image repository root.
TRUSTED_ROOT_NAME = "image-root.json"


class PublishError(UptakeError):
    """Publishing was refused before anything was uploaded; says why."""


@dataclass(frozen=True)
class Published:
    filepath: str
    length: int
    sha256: str
    release_counter: int
    targets_version: int
    #: the same bytes were already published under this path: nothing changed
    already_published: bool = False


class _ServerFetcher(FetcherInterface):
    """python-tuf downloads over the operator's client (its TLS trust, its token)."""

    def __init__(self, client: AdminClient) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            status, body = self._client.get(url, _MAX_METADATA_BYTES)
        except ApiClientError as exc:
            raise DownloadError(str(exc)) from exc
        if status != 200:
            raise DownloadHTTPError(f"{url}: HTTP {status}", status)
        yield body


_MAX_METADATA_BYTES = 32 * 1024 * 1024


def fetch_verified_targets(client: AdminClient, trusted_root: bytes) -> Metadata[Targets]:
    """The image repository's current targets, verified from ``trusted_root``."""
    with tempfile.TemporaryDirectory() as tmp:
        updater = Updater(
            tmp,
            f"{client.base_url}/image/metadata/",
            bootstrap=trusted_root,
            fetcher=_ServerFetcher(client),
        )
        try:
            updater.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            raise PublishError(
                f"cannot verify the image repository's current metadata: {exc}"
            ) from exc
        return Metadata[Targets].from_file(f"{tmp}/targets.json")


@dataclass(frozen=True)
class ReleaseImage:
    """One image of a release, as the release engineer describes it."""

    path: Path
    hardware_ids: list[str]
    version: str
    release_counter: int | None = None
    filepath: str | None = None
    requires: dict[str, str] | None = None
    #: the machine code of a raw image, for deltas (:data:`signing.delta_format.ARCH_NAMES`)
    arch: str | None = None


class _ManifestImage(msgspec.Struct, forbid_unknown_fields=True):
    file: str
    hardware_ids: list[str]
    version: str
    release_counter: int | None = None
    filepath: str | None = None
    requires: dict[str, str] | None = None
    arch: str | None = None


class _Manifest(msgspec.Struct, forbid_unknown_fields=True):
    image: list[_ManifestImage]


#: Largest release manifest read, and most images it may list.
MAX_MANIFEST_BYTES = 4_000_000
MAX_MANIFEST_IMAGES = 10_000


def read_manifest(path: Path) -> list[ReleaseImage]:
    """The images a release manifest lists (TOML; files relative to the manifest)::

    [[image]]
    file = "bms/bms.bin"
    hardware_ids = ["stm32f4-bms"]
    version = "1.1.0"
    # optional: release_counter = 7, filepath = "…", requires = {"rpi-gateway" = ">=1.1"},
    #           arch = "armt" (the machine code of a raw image, for deltas)
    """
    try:
        data = Path(path).read_bytes()
        if len(data) > MAX_MANIFEST_BYTES:
            raise PublishError(f"{path}: a manifest has at most {MAX_MANIFEST_BYTES} bytes")
        raw = tomllib.loads(data.decode())
        manifest = msgspec.convert(raw, _Manifest)
    except OSError as exc:
        raise PublishError(f"{path}: cannot read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PublishError(f"{path}: not valid TOML ({exc})") from exc
    except msgspec.ValidationError as exc:
        raise PublishError(f"{path}: {exc} (see 'uptake release publish --help')") from exc
    if not 1 <= len(manifest.image) <= MAX_MANIFEST_IMAGES:
        raise PublishError(f"{path}: list 1 to {MAX_MANIFEST_IMAGES} [[image]] tables")
    base = Path(path).resolve().parent
    return [
        ReleaseImage(
            base / entry.file, entry.hardware_ids, entry.version, entry.release_counter,
            entry.filepath, entry.requires, entry.arch,
        )
        for entry in manifest.image
    ]  # fmt: skip


#: Called with the number of bytes of each chunk uploaded (progress bars).
Progress = Callable[[int], None]


@dataclass
class _Release:
    targets: Metadata[Targets]
    published: list[Published] = field(default_factory=list)
    #: images to upload: each with its target path and Uptane fields (hashes: once uploaded)
    new: list[tuple[ReleaseImage, str, ImageCustom]] = field(default_factory=list)

    def planned_targets(self) -> list[TargetFile]:
        """Every entry the release will hold, the new ones with placeholder length and hash
        (for checks of paths and Uptane fields before anything is uploaded)."""
        planned = [
            TargetFile(
                0, {"sha256": "0" * 64}, filepath,
                unrecognized_fields={"custom": custom.to_custom()},
            )
            for _, filepath, custom in self.new
        ]  # fmt: skip
        return [*self.targets.signed.targets.values(), *planned]


@dataclass
class _Highest:
    """The highest release counter and version published per hardware id (one pass)."""

    counters: dict[str, int] = field(default_factory=dict)
    versions: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)

    @classmethod
    def of(cls, targets: Targets) -> _Highest:
        highest = cls()
        for target in targets.targets.values():
            custom = image_custom(target)
            highest.add(custom.hardware_ids, custom.release_counter, custom.version)
        return highest

    def add(self, hardware_ids: Sequence[str], counter: int, version: str) -> None:
        key = version_key(version)
        for hardware_id in hardware_ids:
            self.counters[hardware_id] = max(counter, self.counters.get(hardware_id, counter))
            if key is not None and key > self.versions.get(hardware_id, ((), ""))[0]:
                self.versions[hardware_id] = (key, version)

    def counter(self, hardware_ids: Sequence[str]) -> int | None:
        return max((self.counters[h] for h in hardware_ids if h in self.counters), default=None)

    def higher_version(self, hardware_ids: Sequence[str], version: str) -> str | None:
        """A published version above ``version`` for one of ``hardware_ids``, if any."""
        key = version_key(version)
        if key is None:
            return None
        above = [v for h in hardware_ids if (v := self.versions.get(h)) and v[0] > key]
        return max(above)[1] if above else None


def _add_images(
    targets_md: Metadata[Targets], images: Sequence[ReleaseImage], allow_lower: bool = False
) -> _Release:
    """Check ``images`` against ``targets_md`` and add their entries (hashes: after upload).

    Every refusal happens here, before anything is uploaded. An image whose
    path is already published is hashed here (only those are): the same
    bytes are reported as already published, other bytes refused.
    """
    targets = targets_md.signed
    release = _Release(targets_md)
    highest = _Highest.of(targets)
    seen: set[str] = set()
    for image in images:
        if not image.path.is_file():
            raise PublishError(f"{image.path}: no such file")
        if not image.hardware_ids:
            raise PublishError("at least one --hardware-id is needed")
        filepath = image.filepath or f"{image.hardware_ids[0]}/{image.version}/{image.path.name}"
        if filepath in seen:
            raise PublishError(f"{filepath!r} is named twice in this release")
        seen.add(filepath)
        existing = targets.targets.get(filepath)
        if existing is not None:
            target = TargetFile.from_file(filepath, str(image.path), ["sha256"])
            if existing.hashes != target.hashes:
                raise PublishError(
                    f"{filepath!r} is already published with different content: pick a new version"
                )
            custom = image_custom(existing)  # the very same bytes: say so, no new counter
            release.published.append(
                Published(
                    filepath, existing.length, existing.hashes["sha256"],
                    custom.release_counter, targets.version, already_published=True,
                )
            )  # fmt: skip
            continue
        highest_counter = highest.counter(image.hardware_ids)
        counter = image.release_counter
        if counter is None:
            counter = (highest_counter or 0) + 1
        elif highest_counter is not None and counter < highest_counter:
            raise PublishError(
                f"release counter {counter} is below the highest already published "
                f"({highest_counter}) for {', '.join(image.hardware_ids)}: vehicles refuse a "
                "rollback by counter ('uptake release revert' re-releases older bytes)"
            )
        higher = highest.higher_version(image.hardware_ids, image.version)
        if higher is not None and not allow_lower:
            raise PublishError(
                f"{filepath!r}: version {image.version} is lower than {higher}, already published "
                f"for {', '.join(image.hardware_ids)}; pass --allow-lower if that is intended "
                "(or use 'uptake release revert')"
            )
        try:
            needs = parse_requires(image.requires, f"image {filepath!r}") if image.requires else ()
            if image.arch is not None:
                check_arch(image.arch, f"image {filepath!r}: arch")
        except MetadataFormatError as exc:
            raise PublishError(str(exc)) from exc
        custom = ImageCustom(
            tuple(image.hardware_ids), counter, image.version, requires=needs, arch=image.arch
        )
        highest.add(image.hardware_ids, counter, image.version)
        release.new.append((image, filepath, custom))
    return release


def _upload(client: AdminClient, release: _Release, progress: Progress | None) -> None:
    """Upload the new images in one streamed request; fill in their lengths and hashes."""
    if not release.new:
        return
    sent = client.upload_images([image.path for image, _, _ in release.new], progress)
    targets = release.targets.signed
    for (_, filepath, custom), uploaded in zip(release.new, sent, strict=True):
        targets.targets[filepath] = TargetFile(
            uploaded.length,
            {"sha256": uploaded.sha256},
            filepath,
            unrecognized_fields={"custom": custom.to_custom()},
        )
        release.published.append(
            Published(
                filepath, uploaded.length, uploaded.sha256, custom.release_counter,
                targets.version + 1,
            )
        )  # fmt: skip
    targets.version += 1
    targets.expires = expiry("targets")
    release.targets.signatures.clear()


def publish_image(
    client: AdminClient,
    image: Path,
    hardware_ids: list[str],
    version: str,
    signers: list[Signer],
    trusted_root: bytes,
    *,
    release_counter: int | None = None,
    filepath: str | None = None,
    requires: dict[str, str] | None = None,
    allow_lower: bool = False,
    arch: str | None = None,
) -> Published:
    """Publish ``image`` (see module docstring) and return what was published."""
    spec = ReleaseImage(image, hardware_ids, version, release_counter, filepath, requires, arch)
    return publish_images(client, [spec], signers, trusted_root, allow_lower=allow_lower)[0]


def publish_images(
    client: AdminClient,
    images: Sequence[ReleaseImage],
    signers: Sequence[Signer],
    trusted_root: bytes,
    *,
    allow_lower: bool = False,
    progress: Progress | None = None,
) -> list[Published]:
    """Publish ``images`` in one new targets version signed by ``signers`` (all on this machine).

    The images go up in one streamed upload that also hashes them (each file
    is read once); the targets are signed once, and the server publishes one
    snapshot and timestamp, whatever the number of images.
    """
    release = _add_images(fetch_verified_targets(client, trusted_root), images, allow_lower)
    if not release.new:
        return release.published  # all already published: nothing to sign
    try:
        _upload(client, release, progress)
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc
    _sign_and_send(client, release.targets, signers)
    return _in_order(release.published, images)


def _sign_and_send(
    client: AdminClient, targets: Metadata[Targets], signers: Sequence[Signer]
) -> None:
    for signer in signers:
        targets.sign(signer, append=True)
    try:
        client.request(
            "POST",
            "/api/v1/image/targets",
            body=targets.to_bytes(JSONSerializer(compact=False)),
            headers={"Content-Type": "application/json"},
        )
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc


def revert_image(
    client: AdminClient,
    filepath: str,
    signers: Sequence[Signer],
    trusted_root: bytes,
    *,
    new_filepath: str | None = None,
) -> Published:
    """Re-release the bytes of the published image ``filepath`` with a new, higher counter.

    Vehicles refuse a lower release counter by design (rollback protection), so
    going back to older firmware is a *new* release of its bytes: a new targets
    version (never an older one) whose new entry ``new_filepath`` (default
    ``DIR/revert-COUNTER/NAME``) has the old image's length, hash, hardware ids,
    version and requirements, and a release counter above every one published
    for those hardware ids. Nothing is uploaded: the server links the bytes it
    already serves. Assign the new path to the vehicles to roll them back.
    """
    targets_md = fetch_verified_targets(client, trusted_root)
    targets = targets_md.signed
    old = targets.targets.get(filepath)
    if old is None:
        raise PublishError(f"{filepath!r} is not a published image of the image repository")
    try:
        custom = image_custom(old)
    except MetadataFormatError as exc:
        raise PublishError(str(exc)) from exc
    counter = (_Highest.of(targets).counter(custom.hardware_ids) or 0) + 1
    if new_filepath is None:
        directory, _, name = filepath.rpartition("/")
        new_filepath = f"{directory + '/' if directory else ''}revert-{counter}/{name}"
    if new_filepath in targets.targets:
        raise PublishError(f"{new_filepath!r} is already published: pick another --filepath")
    reverted = dataclasses.replace(custom, release_counter=counter)
    targets.targets[new_filepath] = TargetFile(
        old.length, dict(old.hashes), new_filepath,
        unrecognized_fields={"custom": reverted.to_custom()},
    )  # fmt: skip
    targets.version += 1
    targets.expires = expiry("targets")
    targets_md.signatures.clear()
    _sign_and_send(client, targets_md, signers)
    return Published(new_filepath, old.length, old.hashes["sha256"], counter, targets.version)


def _in_order(published: list[Published], images: Sequence[ReleaseImage]) -> list[Published]:
    """``published`` in the order of ``images`` (already-published ones come first otherwise)."""
    position = {p.filepath: i for i, p in enumerate(published)}
    order = [
        image.filepath or f"{image.hardware_ids[0]}/{image.version}/{image.path.name}"
        for image in images
    ]
    return [published[position[f]] for f in order]


# -- threshold signing on separate machines ------------------------------------------

#: Largest release file ``sign`` and ``import`` read.
MAX_RELEASE_FILE_BYTES = 12_000_000
_RELEASE_FORMAT = "uptake-staged-release/1"


def stage_release(
    client: AdminClient,
    images: Sequence[ReleaseImage],
    trusted_root: bytes,
    *,
    allow_lower: bool = False,
    progress: Progress | None = None,
) -> tuple[list[Published], dict[str, Any]]:
    """Upload ``images`` and stage the unsigned targets naming them; returns them and the status."""
    release = _add_images(fetch_verified_targets(client, trusted_root), images, allow_lower)
    if not release.new:
        raise PublishError("every image is already published with these bytes: nothing to stage")
    try:
        _upload(client, release, progress)
        status = client.request(
            "POST",
            "/api/v1/image/staged",
            body=release.targets.to_bytes(JSONSerializer(compact=False)),
            headers={"Content-Type": "application/json"},
        )
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc
    return release.published, status


def staged_status(client: AdminClient) -> dict[str, Any]:
    """Who signed the staged release, who is missing (``status`` of :func:`export_release`)."""
    try:
        answer: dict[str, Any] = client.request("GET", "/api/v1/image/staged")
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc
    return answer


def export_release(client: AdminClient, path: Path) -> dict[str, Any]:
    """Write the staged release to ``path`` for signers; returns its status."""
    answer = staged_status(client)
    bundle = {
        "format": _RELEASE_FORMAT,
        "staged": answer["staged"],
        "previous": answer["previous"],
    }
    write_atomic(path, json.dumps(bundle, indent=1, sort_keys=True).encode() + b"\n")
    status: dict[str, Any] = answer["status"]
    return status


@dataclass(frozen=True)
class ReleaseFile:
    """A release file read back: the staged targets (with signatures) and what they follow."""

    staged: Metadata[Targets]
    previous: Metadata[Targets]


def read_release_file(path: Path) -> ReleaseFile:
    try:
        data = parse_json(
            Path(path).read_bytes(), where=str(path), max_bytes=MAX_RELEASE_FILE_BYTES
        )
    except OSError as exc:
        raise PublishError(f"cannot read release file {path}: {exc.strerror}") from exc
    except UntrustedJsonError as exc:
        raise PublishError(str(exc)) from exc
    if not isinstance(data, dict) or data.get("format") != _RELEASE_FORMAT:
        raise PublishError(f"{path} is not a release file ('uptake release export' makes them)")
    try:
        staged = Metadata[Targets].from_dict(copy.deepcopy(data["staged"]))
        previous = Metadata[Targets].from_dict(copy.deepcopy(data["previous"]))
        _ = staged.signed_bytes
    except Exception as exc:  # python-tuf raises KeyError, TypeError, ValueError...
        raise PublishError(f"{path}: the staged targets are malformed ({exc})") from exc
    if not isinstance(staged.signed, Targets) or not isinstance(previous.signed, Targets):
        raise PublishError(f"{path}: the release file must hold targets metadata")
    return ReleaseFile(staged, previous)


def _describe(target: TargetFile) -> str:
    try:
        custom = image_custom(target)
        fields = (
            f"hardware ids {', '.join(custom.hardware_ids)}; version {custom.version}; "
            f"release counter {custom.release_counter}"
        )
        if custom.requires:
            fields += "; requires " + ", ".join(
                f"{r.hardware_id} {r.spec}" for r in custom.requires
            )
        if custom.arch:
            fields += f"; machine code {custom.arch}"
    except MetadataFormatError as exc:
        fields = f"INVALID UPTANE FIELDS: {exc}"
    hashes = ", ".join(f"{k} {v}" for k, v in sorted(target.hashes.items()))
    return f"{target.path}\n      {target.length} bytes; {hashes}\n      {fields}"


def release_summary(release: ReleaseFile, trusted_root: bytes | None = None) -> str:
    """What a signer signs, readable: every image, what changed since the published targets."""
    staged, previous = release.staged.signed, release.previous.signed
    lines = [
        f"Image repository targets v{staged.version} (follows published v{previous.version}), "
        f"expires {staged.expires.isoformat()}",
    ]
    if trusted_root is not None:
        root = Metadata[Root].from_bytes(trusted_root).signed
        try:
            root.verify_delegate(
                Targets.type, release.previous.signed_bytes, release.previous.signatures
            )
            lines.append(f"  published v{previous.version} verifies under your trusted root")
        except Exception:
            lines.append(
                f"  WARNING: published v{previous.version} does NOT verify under your trusted "
                "root (root rotated since, or not the real repository)"
            )
    if staged.version != previous.version + 1:
        lines.append(f"  WARNING: version {staged.version} does not follow {previous.version}")
    old, new = previous.targets, staged.targets
    changes = [
        ("ADDED", sorted(set(new) - set(old))),
        ("CHANGED", sorted(p for p in set(new) & set(old) if new[p] != old[p])),
        ("REMOVED", sorted(set(old) - set(new))),
    ]
    for label, paths in changes:
        for path in paths:
            lines.append(f"  {label} {_describe(new.get(path) or old[path])}")
    if not any(paths for _, paths in changes):
        lines.append("  no image added, changed or removed")
    if staged.delegations != previous.delegations:
        lines.append("  DELEGATIONS CHANGED: " + json.dumps(
            staged.delegations.to_dict() if staged.delegations else None, sort_keys=True
        ))  # fmt: skip
    unchanged = len(set(new) & set(old)) - len(changes[1][1])
    lines.append(f"  {unchanged} image(s) unchanged; {len(new)} in all")
    if release.staged.signatures:
        lines.append(f"  already signed by {len(release.staged.signatures)} key(s)")
    return "\n".join(lines)


def sign_release_file(path: Path, signer: Signer) -> Signature:
    """Add ``signer``'s signature over the staged targets to the release file at ``path``."""
    release = read_release_file(path)
    signature = signer.sign(release.staged.signed_bytes)
    data = json.loads(Path(path).read_bytes())
    kept = [s for s in data["staged"]["signatures"] if s.get("keyid") != signature.keyid]
    data["staged"]["signatures"] = [*kept, signature.to_dict()]
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
    return signature


def import_signatures(client: AdminClient, path: Path) -> dict[str, Any]:
    """Send the signatures in the release file at ``path``; returns the server's status."""
    release = read_release_file(path)
    if not release.staged.signatures:
        raise PublishError(f"{path} holds no signature: 'uptake release sign' it first")
    try:
        status: dict[str, Any] = client.request(
            "POST",
            "/api/v1/image/staged/signatures",
            json_body={
                "targets_version": release.staged.signed.version,
                "signatures": [s.to_dict() for s in release.staged.signatures.values()],
            },
        )
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc
    return status


def signer_names(trusted_root: bytes) -> dict[str, str]:
    """Key id -> name of the keys a trusted root names."""
    return key_names(Metadata[Root].from_bytes(trusted_root).signed)
