"""Supplier delegations: suppliers sign their own images, within limits the OFFLINE keys set.

A supplier gets a *terminating* delegated targets role of the image
repository (TUF delegations), limited to path patterns and hardware ids that
the offline targets keys sign into the delegation itself
(:func:`signing.metadata.supplier_delegation`; see ``docs/delegations.md``).

Release engineer, with the offline targets key(s), on the machine that holds them:

1. :func:`add_delegation`: fetch and *verify* the current targets (from the
   release engineer's own ``image-root.json``), add the role (its name, the
   supplier's public key(s) and threshold, path patterns, hardware ids), bump
   the version, sign, publish (``uptake delegation add``);
2. :func:`remove_delegation`: the same, taking the role out (its images are
   no longer installable: vehicles walk only current delegations);
3. :func:`list_delegations`: what the server publishes, with the version and
   images of each supplier role.

Supplier, with its own key(s) and a ``supplier`` operator token bound to its
hardware ids:

4. :func:`publish_supplier_image`: fetch and verify its role's current
   metadata through the delegation, add the image, sign with the supplier's
   key(s), upload the image and the metadata. The server checks the
   signatures against the delegation's keys, that every image is within the
   delegation's paths and hardware ids, and the token's hardware ids.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import DownloadError, RepositoryError
from tuf.api.metadata import Delegations, Metadata, Targets
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

from server.api_client import AdminClient, ApiClientError
from server.release import (
    Published,
    PublishError,
    ReleaseImage,
    _add_images,
    _ServerFetcher,
    _upload,
    fetch_verified_targets,
)
from signing.metadata import (
    DELTAS_ROLE,
    MetadataFormatError,
    expiry,
    images_outside_delegation,
    supplier_delegation,
)

_SERIALIZER = JSONSerializer(compact=False)


class DelegationError(PublishError):
    """A delegation change or a supplier publication was refused; says why."""


def _publish_targets(
    client: AdminClient, targets_md: Metadata[Targets], signers: Sequence[Signer]
) -> int:
    targets = targets_md.signed
    targets.version += 1
    targets.expires = expiry("targets")
    targets_md.signatures.clear()
    for signer in signers:
        targets_md.sign(signer, append=True)
    try:
        client.request(
            "POST",
            "/api/v1/image/targets",
            body=targets_md.to_bytes(_SERIALIZER),
            headers={"Content-Type": "application/json"},
        )
    except ApiClientError as exc:
        raise DelegationError(str(exc)) from exc
    return targets.version


def add_delegation(
    client: AdminClient,
    name: str,
    hardware_ids: Sequence[str],
    path_patterns: Sequence[str],
    keys: Sequence[Key],
    threshold: int,
    signers: Sequence[Signer],
    trusted_root: bytes,
) -> dict[str, Any]:
    """Delegate ``path_patterns`` for ``hardware_ids`` to ``keys``; returns the delegation."""
    if not keys or not 1 <= threshold <= len(keys):
        raise DelegationError(f"threshold {threshold} needs 1 to {len(keys)} supplier keys")
    targets_md = fetch_verified_targets(client, trusted_root)
    targets = targets_md.signed
    delegations = targets.delegations or Delegations(keys={}, roles={})
    roles = delegations.roles if delegations.roles is not None else {}
    if name in roles:
        raise DelegationError(f"delegation {name!r} exists already (remove it first)")
    try:
        role = supplier_delegation(
            name, [k.keyid for k in keys], threshold, list(path_patterns), list(hardware_ids)
        )
    except MetadataFormatError as exc:
        raise DelegationError(str(exc)) from exc
    for key in keys:
        delegations.keys[key.keyid] = key
    roles[name] = role
    delegations.roles = roles
    targets.delegations = delegations
    version = _publish_targets(client, targets_md, signers)
    return {**_describe(role.to_dict()), "targets_version": version}


def remove_delegation(
    client: AdminClient, name: str, signers: Sequence[Signer], trusted_root: bytes
) -> dict[str, Any]:
    """Take delegation ``name`` out of the targets (and keys no role uses any more)."""
    targets_md = fetch_verified_targets(client, trusted_root)
    targets = targets_md.signed
    delegations = targets.delegations
    roles = (delegations.roles or {}) if delegations else {}
    if delegations is None or name not in roles or name == DELTAS_ROLE:
        raise DelegationError(f"the image targets delegate to no supplier role {name!r}")
    del roles[name]
    used = {keyid for role in roles.values() for keyid in role.keyids}
    delegations.keys = {k: v for k, v in delegations.keys.items() if k in used}
    targets.delegations = delegations if roles else None
    return {"removed": name, "targets_version": _publish_targets(client, targets_md, signers)}


def _describe(role: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": role["name"],
        "keyids": role["keyids"],
        "threshold": role["threshold"],
        "paths": role.get("paths", []),
        "hardware_ids": role.get("x-uptake-hardware-ids", []),
    }


def list_delegations(client: AdminClient) -> list[dict[str, Any]]:
    try:
        answer = client.request("GET", "/api/v1/image/delegations")
    except ApiClientError as exc:
        raise DelegationError(str(exc)) from exc
    delegations: list[dict[str, Any]] = answer["delegations"]
    return delegations


def _verified_role(
    client: AdminClient, name: str, trusted_root: bytes
) -> tuple[Metadata[Targets], Metadata[Targets]]:
    """Verified top-level targets and role ``name``'s metadata (a fresh v0 if none yet)."""
    with tempfile.TemporaryDirectory() as tmp:
        updater = Updater(
            tmp,
            f"{client.base_url}/image/metadata/",
            bootstrap=trusted_root,
            fetcher=_ServerFetcher(client),
        )
        try:
            updater.refresh()
            targets = Metadata[Targets].from_file(f"{tmp}/targets.json")
            snapshot = updater._trusted_set.snapshot
            if f"{name}.json" not in snapshot.meta:  # nothing published yet: v1 comes next
                empty = Metadata(Targets(version=1))
                empty.signed.version = 0
                return targets, empty
            # python-tuf's own delegation walk step: verified against the delegation's keys
            updater._load_targets(name, Targets.type)
            return targets, Metadata[Targets].from_file(f"{tmp}/{name}.json")
        except (RepositoryError, DownloadError, OSError) as exc:
            raise DelegationError(
                f"cannot verify the image repository's metadata for {name!r}: {exc}"
            ) from exc


def publish_supplier_image(
    client: AdminClient,
    name: str,
    image: ReleaseImage,
    signers: Sequence[Signer],
    trusted_root: bytes,
) -> Published:
    """Sign ``image`` into supplier role ``name`` with the supplier's keys and publish it."""
    targets, role_md = _verified_role(client, name, trusted_root)
    delegations = targets.signed.delegations
    role = (delegations.roles or {}).get(name) if delegations else None
    if role is None or name == DELTAS_ROLE:
        raise DelegationError(f"the image targets delegate to no supplier role {name!r}")
    if image.filepath is None and image.hardware_ids:
        first = (role.paths or ["?"])[0].split("/", 1)[0]
        default = f"{first}/{image.hardware_ids[0]}-{image.version}-{image.path.name}"
        image = dataclasses.replace(image, filepath=default)
    release = _add_images(role_md, [image])
    if not release.new:
        return release.published[0]
    try:
        problems = images_outside_delegation(role, release.planned_targets())
    except MetadataFormatError as exc:
        raise DelegationError(str(exc)) from exc
    if problems:
        raise DelegationError("; ".join(problems) + " (give --filepath within the path patterns)")
    try:
        _upload(client, release, None)
        for signer in signers:
            role_md.sign(signer, append=True)
        client.request(
            "POST",
            f"/api/v1/image/delegations/{name}/targets",
            body=role_md.to_bytes(_SERIALIZER),
            headers={"Content-Type": "application/json"},
        )
    except ApiClientError as exc:
        raise DelegationError(str(exc)) from exc
    return release.published[0]
