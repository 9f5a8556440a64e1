"""Rollback: the vehicle never goes back to older software or older metadata.

* older image: the vehicle runs gateway 1.1.0; the server itself refuses to
  direct 1.0.0, so a compromised director directs it → the agent's release
  counter check refuses it;
* older metadata versions: with the director's online snapshot and timestamp
  keys, the attacker publishes a *newer* timestamp and snapshot that point
  back at an older director targets version → TUF refuses a snapshot that
  lowers a version it already trusted;
* lower release counter: a compromised release engineer signs a new-looking
  image ("1.2.0", new bytes) with a release counter below the installed
  one; the server refuses to assign it and the agent refuses it when a
  compromised director directs it anyway.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tuf.api.metadata import Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from server.api_client import ApiClientError
from server.release import fetch_verified_targets
from signing.metadata import ImageCustom, director_ecus, expiry
from tests.attacks.deployment import BMS, GATEWAY, Deployment
from tests.malicious_proxy import resign
from tests.uptake_fixtures import sample


def _direct_instead(d: Deployment, filepath: str) -> None:
    """Compromised director: the vehicle's next director targets direct ``filepath`` to the gateway."""
    target = d.director_target(d.image_target(filepath), {d.vehicle.primary: GATEWAY})

    def swap(signed: Targets) -> None:
        signed.targets = {
            p: t for p, t in signed.targets.items() if d.vehicle.primary not in director_ecus(t)
        }
        signed.targets[filepath] = target

    d.on_director_targets(swap)
    # a legitimate change (an image for the secondary) makes the director sign a new version
    d.server.assign(d.vehicle.vin, d.vehicle.secondary, d.publish(BMS, "1.0.0").filepath)


def test_older_image_is_refused(deployment: Deployment) -> None:
    d = deployment
    old = d.baseline
    d.install(d.vehicle.primary, d.publish(GATEWAY, "1.1.0"))
    with pytest.raises(ApiClientError, match="rollback"):
        d.server.assign(d.vehicle.vin, d.vehicle.primary, old.filepath)
    _direct_instead(d, old.filepath)
    d.assert_refused(d.attack(), "rollback")


def test_older_metadata_versions_are_refused(deployment: Deployment) -> None:
    d = deployment
    prefix = d.director_path()
    timestamp_key, snapshot_key = (
        d.online_signer("director-timestamp"),
        d.online_signer("director-snapshot"),
    )

    def newer_timestamp(signed: Timestamp) -> None:
        signed.version += 1
        signed.snapshot_meta.version += 1

    def snapshot_pointing_back(path: str, body: bytes) -> bytes | None:
        name = path.removeprefix(prefix)
        if not path.startswith(prefix) or not name.endswith(".snapshot.json"):
            return None
        version = int(name.split(".")[0])
        real = d.upstream(f"{prefix}{version - 1}.snapshot.json")

        def point_back(signed: Snapshot) -> None:
            signed.version = version
            signed.meta["targets.json"].version = 1  # the vehicle already trusts a later one

        return resign(real, [snapshot_key], point_back)

    d.proxy.rewrites.append(
        lambda path, body: (
            resign(body, [timestamp_key], newer_timestamp)
            if path == f"{prefix}timestamp.json"
            else None
        )
    )
    d.proxy.rewrites.append(snapshot_pointing_back)
    d.assert_refused(d.attack(), "targets.json version")


def _publish_with_counter(d: Deployment, tmp: Path, version: str, counter: int) -> str:
    """Sign and publish an image entry with any release counter (the offline targets key, stolen)."""
    image = tmp / f"gateway-{version}.elf"
    image.write_bytes(sample(GATEWAY, "1.1.0").read_bytes() + b"\0 backdoor " * 16)
    filepath = f"{GATEWAY}/{version}/gateway.elf"
    md = fetch_verified_targets(
        d.server.admin, (d.server.offline_dir / "image-root.json").read_bytes()
    )
    target = TargetFile.from_file(filepath, str(image), ["sha256"])
    target.unrecognized_fields["custom"] = ImageCustom((GATEWAY,), counter, version).to_custom()
    md.signed.targets[filepath] = target
    md.signed.version += 1
    md.signed.expires = expiry("targets")
    md.signatures.clear()
    md.sign(d.server.targets_signer)
    d.server.admin.upload_file(target.hashes["sha256"], image)
    d.server.admin.request(
        "POST",
        "/api/v1/image/targets",
        body=md.to_bytes(JSONSerializer(compact=False)),
        headers={"Content-Type": "application/json"},
    )
    return filepath


def test_lower_release_counter_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    current = d.publish(GATEWAY, "1.1.0")
    d.install(d.vehicle.primary, current)
    lower = _publish_with_counter(d, tmp_path, "1.2.0", current.release_counter - 1)
    with pytest.raises(ApiClientError, match="rollback"):
        d.server.assign(d.vehicle.vin, d.vehicle.primary, lower)
    _direct_instead(d, lower)
    d.assert_refused(d.attack(), f"release counter {current.release_counter - 1}")
