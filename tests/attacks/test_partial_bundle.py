"""Partial bundle: an update that would leave the vehicle's ECUs in an incompatible combination.

The gateway image 1.1.0 declares (in the offline-signed image repository
metadata) that it requires the BMS at >= 1.1.0. The director refuses to
direct it alone, and a director whose online key was stolen and which drops
the BMS half of the bundle is refused by the vehicle, which keeps both
installed images and reports the attack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.api_client import ApiClientError
from tests.attacks.vehicle_checks import assert_attack_reported, installed_on_server, online_signer
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import ServerProcess, Vehicle, sample

NEEDS_BMS_11 = {"stm32f4-bms": ">=1.1.0"}


@pytest.fixture
def proxied(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[MaliciousProxy, Vehicle]]:
    proxy = MaliciousProxy(server.url)
    yield proxy, Vehicle(tmp_path, server, server_url=proxy.url)
    proxy.close()


def _baseline(server: ServerProcess, vehicle: Vehicle) -> tuple[str, str]:
    gw = server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
    bms = server.publish(sample("stm32f4-bms", "1.0.0"), "stm32f4-bms", "1.0.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    outcomes = vehicle.run_once().report["outcomes"]
    assert {o["result"] for o in outcomes.values()} == {"installed"}
    return gw.filepath, bms.filepath


def test_director_dropping_half_a_bundle_is_refused(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    old_gw, old_bms = _baseline(server, vehicle)
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    gw = server.publish(
        sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0", requires=NEEDS_BMS_11
    )

    # the director refuses the gateway alone...
    with pytest.raises(ApiClientError, match=r"409.*requires stm32f4-bms >=1\.1\.0"):
        server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    # ...and takes it once the BMS it needs is assigned
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)

    stolen = online_signer(server, "director-targets")

    def drop_bms(signed: Any) -> None:
        signed.targets = {p: t for p, t in signed.targets.items() if p != bms.filepath}

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [stolen], drop_bms)
            if path.startswith("/director/") and path.endswith(".targets.json")
            else None
        )
    )
    report = vehicle.run_once().report
    assert "partial bundle refused" in report["verification_error"]
    assert report["outcomes"] == {}
    assert vehicle.booted_image() == old_gw
    assert vehicle.secondary_state()["banks"][_booted_bank(vehicle)]["filepath"] == old_bms
    assert installed_on_server(server, vehicle) == {
        vehicle.primary: old_gw,
        vehicle.secondary: old_bms,
    }
    assert_attack_reported(server, vehicle, "partial bundle")

    # the whole bundle, undisturbed, installs: the BMS the gateway needs first
    proxy.rewrites.clear()
    report = vehicle.run_once().report
    assert list(report["outcomes"]) == [vehicle.secondary, vehicle.primary]
    assert {o["result"] for o in report["outcomes"].values()} == {"installed"}
    assert installed_on_server(server, vehicle) == {
        vehicle.primary: gw.filepath,
        vehicle.secondary: bms.filepath,
    }


def _booted_bank(vehicle: Vehicle) -> str:
    import json

    env = json.loads(
        (vehicle.state_dir / "secondaries" / vehicle.secondary / "bootenv.json").read_bytes()
    )
    return str(env["boot_slot"])


def test_dependent_is_not_installed_when_its_dependency_fails(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    old_gw, old_bms = _baseline(server, vehicle)
    broken_bms = server.publish(
        sample("stm32f4-bms", "2.0.0"), "stm32f4-bms", "2.0.0"
    )  # fails its self-test
    gw = server.publish(
        sample("rpi-gateway", "1.1.0"),
        "rpi-gateway",
        "1.2.0",
        filepath="rpi-gateway/1.2.0/gateway.elf",
        requires={"stm32f4-bms": ">=2.0.0"},
    )
    server.assign(vehicle.vin, vehicle.secondary, broken_bms.filepath)
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    report = vehicle.run_once().report
    assert list(report["outcomes"]) == [vehicle.secondary, vehicle.primary]
    assert report["outcomes"][vehicle.secondary]["result"] == "rolled_back"
    primary = report["outcomes"][vehicle.primary]
    assert primary["result"] == "failed" and "requires stm32f4-bms >=2.0.0" in primary["detail"]
    assert vehicle.booted_image() == old_gw
    record = server.vehicle(vehicle.vin)
    assert {a["filepath"]: a["status"] for a in record["assignments"]}[gw.filepath] == "failed"
    assert installed_on_server(server, vehicle) == {
        vehicle.primary: old_gw,
        vehicle.secondary: old_bms,
    }
    # nothing incompatible is directed afterwards
    assert vehicle.run_once().report["directed"] == []
