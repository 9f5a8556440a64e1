"""Arbitrary software: the vehicle installs only images BOTH repositories vouch for.

* image not signed by the image repository: an attacker on the network
  swaps the image bytes in flight (same length) → TUF's hash check on the
  download refuses it;
* signed by the director only: a compromised director directs an image the
  image repository never signed → the cross-check finds no image repository
  entry;
* signed by the image repository only: the attacker holds the image
  repository's (offline) targets key and uses it to sign director targets
  directing a real image the director never chose → TUF refuses director
  metadata not signed by the director's targets key.
"""

from __future__ import annotations

from tuf.api.metadata import TargetFile, Targets

from signing.metadata import director_custom
from tests.attacks.deployment import GATEWAY, Deployment
from tests.malicious_proxy import resign

EVIL = b"\x7fELF" + b"evil firmware that opens a backdoor " * 200


def test_image_not_signed_by_image_repository_is_refused(deployment: Deployment) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    evil = (EVIL * (new.length // len(EVIL) + 1))[
        : new.length
    ]  # same length: only the hash can tell
    d.proxy.rewrites.append(lambda path, body: evil if path.startswith("/image/targets/") else None)
    d.assert_refused(d.attack(), "hash")


def test_image_signed_by_director_only_is_refused(deployment: Deployment) -> None:
    d = deployment
    d.publish(GATEWAY, "1.1.0")  # legitimate activity: a fresh image repository

    def direct_evil(signed: Targets) -> None:
        evil = TargetFile.from_data("rpi-gateway/6.6.6/gateway.elf", EVIL, ["sha256"])
        evil.unrecognized_fields["custom"] = director_custom({d.vehicle.primary: GATEWAY})
        signed.targets = {evil.path: evil}

    d.on_director_targets(direct_evil)
    d.proxy.rewrites.append(lambda path, body: EVIL if path.endswith("gateway.elf") else None)
    # the vehicle fetches director targets only when they change: let a legitimate assignment
    # make a new version, which the proxy swaps for the forgery
    d.server.assign(d.vehicle.vin, d.vehicle.primary, d.publish(GATEWAY, "1.1.0").filepath)
    d.assert_refused(d.attack(), "not in the image repository")


def test_image_signed_by_image_repository_only_is_refused(deployment: Deployment) -> None:
    d = deployment
    unassigned = d.publish(GATEWAY, "1.1.0")  # signed by the image repository, never directed
    image_targets_key = d.server.targets_signer  # offline key of the image repository, stolen

    def direct_unassigned(signed: Targets) -> None:
        signed.targets = {
            unassigned.filepath: d.director_target(
                d.image_target(unassigned.filepath), {d.vehicle.primary: GATEWAY}
            )
        }

    # the vehicle fetches targets only when the director's snapshot names a new version:
    # let it see one (a legitimate assignment for the secondary), then swap in the forgery
    d.on_director_targets(direct_unassigned, signer=image_targets_key)
    d.server.assign(d.vehicle.vin, d.vehicle.secondary, d.publish("stm32f4-bms", "1.0.0").filepath)
    d.assert_refused(d.attack(), "UnsignedMetadataError")


def test_image_signed_by_the_online_deltas_role_is_refused(deployment: Deployment) -> None:
    """All online keys stolen (deltas, director, snapshot/timestamp): still no arbitrary software.

    The online deltas role may sign ``deltas/*`` targets; the attacker dresses one up as a
    firmware image (image custom fields, a huge release counter) and directs the gateway to it.
    Only the offline-signed top-level targets may vouch for an image.
    """
    from signing.metadata import ImageCustom

    d = deployment
    deltas_key = d.online_signer("image-deltas")
    evil = TargetFile.from_data("deltas/evil-firmware", EVIL, ["sha256"])
    evil.unrecognized_fields["custom"] = ImageCustom((GATEWAY,), 99, "6.6.6").to_custom()

    def add_evil(signed: Targets) -> None:
        signed.targets[evil.path] = evil

    d.proxy.rewrites.append(
        lambda path, body: (
            resign(body, [deltas_key], add_evil)
            if path.startswith("/image/metadata/") and path.endswith(".deltas.json")
            else None
        )
    )
    d.proxy.rewrites.append(lambda path, body: EVIL if path.endswith("evil-firmware") else None)

    def direct_evil(signed: Targets) -> None:
        target = TargetFile(evil.length, dict(evil.hashes), evil.path)
        target.unrecognized_fields["custom"] = director_custom({d.vehicle.primary: GATEWAY})
        signed.targets = {evil.path: target}

    d.on_director_targets(direct_evil)
    d.server.assign(d.vehicle.vin, d.vehicle.primary, d.publish(GATEWAY, "1.1.0").filepath)
    d.assert_refused(d.attack(), "not in the image repository")
