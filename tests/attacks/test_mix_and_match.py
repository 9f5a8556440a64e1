"""Mix-and-match: pieces that are each validly signed but do not belong together are refused.

* snapshot/targets from different versions: the attacker answers a request
  for targets version N with the genuine, signed version N-1 (image
  repository or director) → TUF refuses a targets version other than the
  one its snapshot names;
* director target hash or length ≠ the image repository's: a compromised
  director points a real image path at other bytes → the cross-check
  refuses it;
* hardware id mismatch: a compromised director sends the BMS image to the
  gateway ECU, or names a hardware id the ECU does not have → refused;
* ECU serial of another vehicle: a compromised director directs an image to
  an ECU that belongs to another vehicle → refused.
"""

from __future__ import annotations

import hashlib

import pytest
from tuf.api.metadata import Targets

from tests.attacks.deployment import BMS, GATEWAY, Deployment
from tests.uptake_fixtures import Vehicle


@pytest.mark.parametrize("repository", ["image", "director"])
def test_targets_of_another_version_than_snapshot_names_are_refused(
    deployment: Deployment, repository: str
) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")  # a new image targets version, and then a new director one
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    prefix = "/image/metadata/" if repository == "image" else d.director_path()

    def older(path: str, body: bytes) -> bytes | None:
        name = path.removeprefix(prefix)
        if not path.startswith(prefix) or not name.endswith(".targets.json"):
            return None
        return d.upstream(f"{prefix}{int(name.split('.')[0]) - 1}.targets.json")

    d.proxy.rewrites.append(older)
    d.assert_refused(d.attack(), "Expected targets v")


@pytest.mark.parametrize("field", ["hash", "length"])
def test_director_target_differing_from_image_repository_is_refused(
    deployment: Deployment, field: str
) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    other = d.publish(GATEWAY, "2.0.0")  # real, signed bytes, just not the ones this path names

    def point_elsewhere(signed: Targets) -> None:
        target = signed.targets[new.filepath]
        if field == "hash":
            target.hashes = {"sha256": hashlib.sha256(b"attacker's image").hexdigest()}
        else:
            target.length = other.length

    d.on_director_targets(point_elsewhere)
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    d.assert_refused(d.attack(), f"{'sha256 hash' if field == 'hash' else 'length'}")


@pytest.mark.parametrize("lie", ["image for other hardware", "ECU hardware id"])
def test_hardware_id_mismatch_is_refused(deployment: Deployment, lie: str) -> None:
    d = deployment
    bms = d.publish(BMS, "1.1.0")
    gateway = d.publish(GATEWAY, "1.1.0")

    def mismatch(signed: Targets) -> None:
        if (
            lie == "image for other hardware"
        ):  # the BMS image to the gateway, claimed as gateway hardware
            target = d.director_target(d.image_target(bms.filepath), {d.vehicle.primary: GATEWAY})
        else:  # the gateway image to the secondary, claiming the secondary is a gateway
            target = d.director_target(
                d.image_target(gateway.filepath), {d.vehicle.secondary: GATEWAY}
            )
        signed.targets = {target.path: target}

    d.on_director_targets(mismatch)
    d.server.assign(d.vehicle.vin, d.vehicle.primary, gateway.filepath)
    needle = (
        "image repository lists it for stm32f4-bms"
        if lie == "image for other hardware"
        else f"ECU {d.vehicle.secondary} is 'stm32f4-bms', director says 'rpi-gateway'"
    )
    d.assert_refused(d.attack(), needle)


def test_ecu_serial_of_another_vehicle_is_refused(deployment: Deployment) -> None:
    d = deployment
    other = Vehicle(d.tmp, d.server, vin="VIN0002", secondaries=False)
    new = d.publish(GATEWAY, "1.1.0")

    def to_other_vehicle(signed: Targets) -> None:
        target = d.director_target(d.image_target(new.filepath), {other.primary: GATEWAY})
        signed.targets = {target.path: target}

    d.on_director_targets(to_other_vehicle)
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    d.assert_refused(d.attack(), f"names ECU '{other.primary}', which is not in this vehicle")
