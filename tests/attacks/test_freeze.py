"""Freeze: the vehicle cannot be kept on old instructions, or fed another vehicle's.

* replayed old but valid metadata: the attacker recorded the director's
  timestamp while it was current and replays it once the vehicle has seen
  a newer one (signatures valid, not expired) → TUF refuses a timestamp
  older than the one it trusts;
* expired metadata: a compromised online role re-signs metadata with an
  expiry in the past (director targets; image repository timestamp) →
  refused as expired, so a vehicle cannot be frozen longer than the
  metadata lifetimes;
* director targets for another VIN: the attacker serves this vehicle the
  genuine, director-signed targets of another vehicle → refused because
  director targets carry the VIN they were signed for;
* another vehicle's newer timestamp and snapshot: genuine, signed with the
  online keys every vehicle shares, of higher versions → refused before
  python-tuf trusts them (they carry their VIN too), so the vehicle is not
  frozen once the attacker leaves.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from client.agent import Agent
from client.config import load_config
from client.cycle_result import ManifestDelivery
from signing.manifest import InstallOutcome, InstallResult
from tests.attacks.deployment import BMS, GATEWAY, Deployment
from tests.malicious_proxy import resign
from tests.uptake_fixtures import PASSWORD, Vehicle


def test_replayed_old_metadata_is_refused(deployment: Deployment) -> None:
    d = deployment
    timestamp = f"{d.director_path()}timestamp.json"
    recorded = d.upstream(timestamp)  # current now, still valid later
    d.install(d.vehicle.primary, d.publish(GATEWAY, "1.1.0"))  # the vehicle sees newer metadata
    d.server.assign(d.vehicle.vin, d.vehicle.secondary, d.publish(BMS, "1.0.0").filepath)
    d.proxy.rewrites.append(lambda path, body: recorded if path == timestamp else None)
    d.assert_refused(d.attack(), "timestamp version")


def _expire(signed: Any) -> None:
    signed.expires = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)


@pytest.mark.parametrize("role", ["director targets", "image timestamp"])
def test_expired_metadata_is_refused(deployment: Deployment, role: str) -> None:
    d = deployment
    if role == "director targets":
        d.on_director_targets(_expire)
        needle = "targets is expired"
    else:
        key = d.online_signer("image-timestamp")
        d.proxy.rewrites.append(
            lambda path, body: (
                resign(body, [key], _expire) if path == "/image/metadata/timestamp.json" else None
            )
        )
        needle = "timestamp.json is expired"
    d.server.assign(d.vehicle.vin, d.vehicle.primary, d.publish(GATEWAY, "1.1.0").filepath)
    d.assert_refused(d.attack(), needle)


def _refused_by_vehicle(vehicle: Vehicle, filepath: str, detail: str = "not wanted") -> None:
    """``vehicle`` reports (signed, through the real agent code) that it refused ``filepath``,
    so the server drops that assignment and signs it empty director targets again."""
    agent = Agent(load_config(vehicle.config_path), PASSWORD.encode())
    state = agent.store.load()
    outcome = InstallOutcome(filepath, InstallResult.REFUSED, detail)
    state.ecu(vehicle.primary).last_install = outcome
    agent.store.save(state)
    assert agent.reporter.report(state)[0] is ManifestDelivery.ACCEPTED


def test_director_targets_for_another_vin_are_refused(deployment: Deployment) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    d.server.assign(
        d.vehicle.vin, d.vehicle.primary, new.filepath
    )  # this vehicle: targets v3, an update
    other = Vehicle(d.tmp, d.server, vin="VIN0002", secondaries=False)
    d.server.assign(other.vin, other.primary, new.filepath)  # the other: v2 ...
    _refused_by_vehicle(other, new.filepath)  # ... and v3 with nothing to install
    mine, theirs = d.director_path(), d.director_path(other.vin)
    assert d.upstream(f"{theirs}3.targets.json").count(b'"length"') == 0
    # freeze: serve this vehicle the other's genuine, empty targets of the same version
    d.proxy.rewrites.append(
        lambda path, body: (
            d.upstream(path.replace(mine, theirs))
            if path.startswith(mine) and path.endswith(".targets.json")
            else None
        )
    )
    d.assert_refused(d.attack(), "for VIN 'VIN0002'")


def _version(data: bytes) -> int:
    version: int = json.loads(data)["signed"]["version"]
    return version


def test_another_vehicles_newer_timestamp_and_snapshot_cannot_freeze_this_one(
    deployment: Deployment,
) -> None:
    """Cross-vehicle freeze, no key needed: every vehicle shares the director's online keys, so
    another vehicle's genuine timestamp and snapshot of higher versions verify for this one.
    They carry their VIN and are refused before python-tuf trusts them; once the attacker
    leaves, the very next poll installs what is pending."""
    d = deployment
    old, new = d.baseline, d.publish(GATEWAY, "1.1.0")
    other = Vehicle(d.tmp, d.server, vin="VIN0002", secondaries=False)
    for i in range(4):  # push the other vehicle's director versions far above this one's
        d.server.assign(other.vin, other.primary, new.filepath)
        _refused_by_vehicle(other, new.filepath, f"not wanted ({i})")
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)  # pending for this vehicle
    mine, theirs = d.director_path(), d.director_path(other.vin)
    assert _version(d.upstream(f"{theirs}timestamp.json")) > _version(
        d.upstream(f"{mine}timestamp.json")
    )
    d.proxy.rewrites.append(
        lambda path, body: (
            d.upstream(path.replace(mine, theirs))
            if path.startswith(mine) and path.endswith(("timestamp.json", ".snapshot.json"))
            else None
        )
    )
    d.assert_refused(d.attack(), "for VIN 'VIN0002'")
    assert d.baseline == old

    d.proxy.rewrites.clear()  # the attacker leaves
    run = d.vehicle.run_once()
    assert run.report["outcomes"][d.vehicle.primary]["result"] == "installed", run.report
    assert run.returncode == 0 and d.vehicle.booted_image() == new.filepath
