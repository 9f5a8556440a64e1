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
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.exceptions import DownloadError, DownloadHTTPError, RepositoryError
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from server.api_client import AdminClient, ApiClientError
from signing.exceptions import UptakeError
from signing.metadata import ImageCustom, MetadataFormatError, expiry, image_custom, parse_requires

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
) -> Published:
    """Publish ``image`` (see module docstring) and return what was published."""
    if not image.is_file():
        raise PublishError(f"{image}: no such file")
    if not hardware_ids:
        raise PublishError("at least one --hardware-id is needed")
    targets_md = fetch_verified_targets(client, trusted_root)
    targets = targets_md.signed
    filepath = filepath or f"{hardware_ids[0]}/{version}/{image.name}"
    target = TargetFile.from_file(filepath, str(image), ["sha256"])
    existing = targets.targets.get(filepath)
    if existing is not None and existing.hashes != target.hashes:
        raise PublishError(
            f"{filepath!r} is already published with different content: pick a new version"
        )
    counters = [
        image_custom(t).release_counter
        for t in targets.targets.values()
        if set(image_custom(t).hardware_ids) & set(hardware_ids)
    ]
    if release_counter is None:
        release_counter = max(counters, default=0) + 1
    elif counters and release_counter < max(counters):
        raise PublishError(
            f"release counter {release_counter} is below the highest already published ({max(counters)})"
        )
    try:
        needs = parse_requires(requires, f"image {filepath!r}") if requires else ()
    except MetadataFormatError as exc:
        raise PublishError(str(exc)) from exc
    target.unrecognized_fields["custom"] = ImageCustom(
        tuple(hardware_ids), release_counter, version, requires=needs
    ).to_custom()
    targets.targets[filepath] = target
    targets.version += 1
    targets.expires = expiry("targets")
    targets_md.signatures.clear()
    for signer in signers:
        targets_md.sign(signer, append=True)
    sha256 = target.hashes["sha256"]
    try:
        client.upload_file(sha256, image)
        client.request(
            "POST",
            "/api/v1/image/targets",
            body=targets_md.to_bytes(JSONSerializer(compact=False)),
            headers={"Content-Type": "application/json"},
        )
    except ApiClientError as exc:
        raise PublishError(str(exc)) from exc
    return Published(filepath, target.length, sha256, release_counter, targets.version)
