"""Manifest forgery: the server believes only manifests the vehicle's ECUs really signed, once.

* tampered in flight: an attacker on the network edits the manifest the
  agent uploads (claims another installed image) → the primary's signature
  no longer verifies;
* ECU report with a bad signature: a compromised primary (its key stolen)
  re-signs the manifest around a secondary's report it edited → the
  secondary's own signature no longer verifies;
* replayed report counter: a manifest captured earlier is uploaded again
  (every signature valid) → refused, its counters are not above the last
  accepted ones;
* unknown ECU: a compromised primary adds a report signed by an ECU of
  another vehicle, or by an ECU nobody registered → refused;
* another vehicle's manifest posted for this VIN → refused.

Each must answer 4xx with a JSON error, record a ``manifest_rejected``
security event, change nothing the server believes about the vehicle, and
leave the next genuine manifest accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import urllib3

from signing.keys import generate_signer, load_signer
from signing.manifest import EcuVersionReport, SignedEnvelope
from tests.attacks.deployment import Deployment
from tests.uptake_fixtures import PASSWORD, Vehicle


def _primary_key(vehicle: Vehicle) -> Any:
    return load_signer(vehicle.state_dir / "keys" / "primary.key", PASSWORD.encode())


def _post(d: Deployment, body: bytes, vin: str | None = None) -> tuple[int, dict[str, Any]]:
    resp = urllib3.PoolManager(retries=False, timeout=30.0).request(
        "POST",
        f"{d.server.url}/api/v1/vehicles/{vin or d.vehicle.vin}/manifest",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    return resp.status, json.loads(resp.data)


def _re_signed(body: bytes, signer: Any, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """``body`` with its signed part edited by ``mutate`` and signed again by ``signer``."""
    signed = json.loads(body)["signed"]
    mutate(signed)
    return SignedEnvelope.create(signed, signer).to_bytes()


def _ecus(record: dict[str, Any]) -> dict[str, Any]:
    return {
        e["serial"]: (e["installed"], e["report_counter"], e["attacks_detected"])
        for e in record["ecus"]
    }


def _assert_rejected(
    d: Deployment,
    before: dict[str, Any],
    status: int,
    answer: dict[str, Any],
    expected_status: int,
    needle: str,
) -> None:
    assert status == expected_status, answer
    assert needle.lower() in answer["error"]["message"].lower(), answer
    after = d.server.vehicle(d.vehicle.vin)
    assert _ecus(after) == _ecus(before)  # nothing believed
    assert after["manifests_rejected"] == before["manifests_rejected"] + 1
    events = [e for e in after["security_events"] if e["kind"] == "manifest_rejected"]
    assert events and needle.lower() in events[-1]["detail"].lower(), after["security_events"]
    assert "Traceback" not in d.server.log()
    # the genuine vehicle is not locked out: its next manifest (made due) is accepted
    d.vehicle.configure(agent={"manifest_heartbeat": 0.01})
    assert d.vehicle.run_once().report["manifest_accepted"]


def test_manifest_tampered_in_flight_is_rejected(deployment: Deployment) -> None:
    d = deployment
    before = d.server.vehicle(d.vehicle.vin)

    def claim_other_image(method: str, path: str, body: bytes) -> bytes | None:
        if not path.endswith("/manifest"):
            return None
        doc = json.loads(body)
        report = doc["signed"]["ecu_version_reports"][d.vehicle.primary]["signed"]
        report["installed_image"]["filepath"] = "rpi-gateway/6.6.6/gateway.elf"
        return json.dumps(doc).encode()

    d.proxy.request_rewrites.append(claim_other_image)
    d.vehicle.configure(agent={"manifest_heartbeat": 0.01})  # nothing changed: make one due
    report = d.vehicle.run_once().report
    assert not report["manifest_accepted"]
    d.proxy.request_rewrites.clear()
    after = d.server.vehicle(d.vehicle.vin)
    assert (
        "vehicle manifest" in after["last_rejection"]
        and "does not verify" in after["last_rejection"]
    )
    # replay the tampered body once more, directly, to check the answer itself
    tampered = claim_other_image("POST", "/manifest", d.vehicle.signed_manifest())
    assert tampered is not None
    status, answer = _post(d, tampered)
    before["manifests_rejected"] += 1  # the agent's own attempt above
    _assert_rejected(d, before, status, answer, 403, "vehicle manifest: signature")


def test_ecu_report_with_bad_signature_is_rejected(deployment: Deployment) -> None:
    d = deployment
    before = d.server.vehicle(d.vehicle.vin)

    def lie_about_secondary(signed: dict[str, Any]) -> None:
        report = signed["ecu_version_reports"][d.vehicle.secondary]["signed"]
        report["installed_image"] = {  # well formed: only the signature can tell
            "filepath": "stm32f4-bms/6.6.6/bms.bin",
            "fileinfo": {"length": 1234, "hashes": {"sha256": "ab" * 32}},
        }

    forged = _re_signed(d.vehicle.signed_manifest(), _primary_key(d.vehicle), lie_about_secondary)
    status, answer = _post(d, forged)
    _assert_rejected(
        d, before, status, answer, 403, f"ECU report of {d.vehicle.secondary}: signature"
    )


def test_replayed_report_counter_is_rejected(deployment: Deployment) -> None:
    d = deployment
    captured = [body for what, body in d.proxy.request_bodies if what.endswith("/manifest")][-1]
    before = d.server.vehicle(d.vehicle.vin)
    status, answer = _post(d, captured)  # every signature valid, counters already used
    _assert_rejected(d, before, status, answer, 400, "replayed report")


@pytest.mark.parametrize("whose", ["another vehicle's ECU", "unregistered ECU"])
def test_report_from_unknown_ecu_is_rejected(deployment: Deployment, whose: str) -> None:
    d = deployment
    if whose == "another vehicle's ECU":
        other = Vehicle(d.tmp, d.server, vin="VIN0002", secondaries=False)
        serial, key = other.primary, _primary_key(other)
    else:
        serial, key = "BMS-ROGUE", generate_signer()
    rogue = EcuVersionReport(serial, d.baseline_image_info(), 10**6).sign(key)
    before = d.server.vehicle(d.vehicle.vin)

    def add_rogue(signed: dict[str, Any]) -> None:
        signed["ecu_version_reports"][serial] = rogue.to_dict()

    forged = _re_signed(d.vehicle.signed_manifest(), _primary_key(d.vehicle), add_rogue)
    status, answer = _post(d, forged)
    _assert_rejected(
        d, before, status, answer, 400, f"ECU report from '{serial}', which is not an ECU"
    )


def test_manifest_of_another_vehicle_is_rejected(deployment: Deployment) -> None:
    d = deployment
    other = Vehicle(d.tmp, d.server, vin="VIN0002", secondaries=False)
    before = d.server.vehicle(d.vehicle.vin)
    status, answer = _post(d, other.signed_manifest())
    _assert_rejected(d, before, status, answer, 400, "manifest is for VIN 'VIN0002'")
