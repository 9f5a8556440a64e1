"""Bad input to every HTTP endpoint gets a 4xx with a JSON error body, never a 500."""

from __future__ import annotations

import json
from typing import Any

import pytest
import urllib3

from signing.keys import generate_signer
from signing.manifest import NO_IMAGE, EcuVersionReport, VehicleManifest
from tests.uptake_fixtures import ServerProcess, Vehicle

http = urllib3.PoolManager(retries=False)


def call(
    server: ServerProcess,
    method: str,
    path: str,
    body: Any = None,
    token: bool = True,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {server.admin.token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    resp = http.request(method, server.url + path, body=data, headers=headers)
    try:
        return resp.status, json.loads(resp.data)
    except ValueError:
        return resp.status, resp.data


def assert_client_error(status: int, body: Any, status_expected: int | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    if status_expected:
        assert status == status_expected, body
    assert isinstance(body, dict) and body["error"]["message"], body


BAD_REQUESTS: list[tuple[str, str, Any, bytes | None]] = [
    ("POST", "/api/v1/vehicles", None, b"{not json"),
    ("POST", "/api/v1/vehicles", [], None),
    ("POST", "/api/v1/vehicles", {"vin": 5, "primary_ecu_serial": "x", "ecus": []}, None),
    ("POST", "/api/v1/vehicles", {"vin": "V", "primary_ecu_serial": "x", "ecus": "nope"}, None),
    (
        "POST",
        "/api/v1/vehicles",
        {"vin": "V", "primary_ecu_serial": "x", "ecus": [{"serial": "x"}]},
        None,
    ),
    (
        "POST",
        "/api/v1/vehicles",
        {
            "vin": "V",
            "primary_ecu_serial": "x",
            "ecus": [{"serial": "x", "hardware_id": "h", "public_key": {"keyid": "k"}}],
        },
        None,
    ),
    ("POST", "/api/v1/vehicles", {"vin": "bad vin!", "primary_ecu_serial": "x", "ecus": []}, None),
    ("GET", "/api/v1/vehicles/NOPE", None, None),
    ("POST", "/api/v1/vehicles/NOPE/assignments", {"ecu_serial": "E", "filepath": "f"}, None),
    ("POST", "/api/v1/vehicles/NOPE/assignments", None, b"[1,2"),
    ("POST", "/api/v1/vehicles/NOPE/assignments", {"ecu_serial": 3}, None),
    ("POST", "/api/v1/vehicles/NOPE/manifest", None, b"garbage"),
    ("POST", "/api/v1/vehicles/NOPE/manifest", {"signed": {}, "signatures": []}, None),
    ("PUT", "/api/v1/image/uploads/not-a-hash", None, b"bytes"),
    ("PUT", "/api/v1/image/uploads/" + "0" * 64, None, b"bytes whose hash is not zero"),
    ("POST", "/api/v1/image/uploads", None, b"not a batch upload"),
    ("POST", "/api/v1/image/targets", None, b"{}"),
    ("POST", "/api/v1/image/targets", None, b"\xff\xfe"),
    ("GET", "/image/metadata/../../server.json", None, None),
    ("GET", "/image/metadata/99.root.json", None, None),
    ("GET", "/image/targets/../admin-token", None, None),
    ("GET", "/director/NOPE/metadata/timestamp.json", None, None),
    ("GET", "/director/NOPE/metadata/1.root.json", None, None),
    ("GET", "/director/bad%20vin/metadata/timestamp.json", None, None),
    ("GET", "/no/such/endpoint", None, None),
    ("DELETE", "/api/v1/vehicles", None, None),
]


@pytest.mark.parametrize(("method", "path", "body", "raw"), BAD_REQUESTS)
def test_bad_requests_get_json_4xx(
    shared_server: ServerProcess, method: str, path: str, body: Any, raw: bytes | None
) -> None:
    status, data = call(shared_server, method, path, body, raw=raw)
    assert_client_error(status, data)


@pytest.mark.parametrize("path", ["/api/v1/vehicles", "/api/v1/images", "/api/v1/vehicles/X"])
def test_admin_endpoints_need_the_token(shared_server: ServerProcess, path: str) -> None:
    status, data = call(
        shared_server,
        "GET" if "images" in path or path.endswith("X") else "POST",
        path,
        {},
        token=False,
    )
    assert_client_error(status, data, 401)


def test_manifest_problems_are_refused_and_recorded(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    url = f"/api/v1/vehicles/{vehicle.vin}/manifest"
    stranger = generate_signer()
    report = EcuVersionReport(vehicle.primary, NO_IMAGE, 10**6).sign(stranger)
    forged = VehicleManifest(vehicle.vin, vehicle.primary, {vehicle.primary: report}).sign(stranger)
    status, data = call(server, "POST", url, raw=forged.to_bytes(), token=False)
    assert_client_error(status, data, 403)
    assert "signed" in data["error"]["message"]
    # wrong VIN inside the manifest, wrong types, missing primary report
    for doc in (
        {
            "signed": {
                "vin": "OTHER",
                "primary_ecu_serial": vehicle.primary,
                "ecu_version_reports": {},
            },
            "signatures": [{"keyid": "a", "sig": "b"}],
        },
        {
            "signed": {"vin": vehicle.vin, "primary_ecu_serial": 7, "ecu_version_reports": {}},
            "signatures": [{"keyid": "a", "sig": "b"}],
        },
        {
            "signed": {
                "vin": vehicle.vin,
                "primary_ecu_serial": vehicle.primary,
                "ecu_version_reports": {},
            },
            "signatures": [{"keyid": "a", "sig": "b"}],
        },
    ):
        status, data = call(server, "POST", url, doc, token=False)
        assert_client_error(status, data)
    record = server.vehicle(vehicle.vin)
    assert record["manifests_rejected"] >= 4
    assert all(e["kind"] == "manifest_rejected" for e in record["security_events"])


def test_replayed_manifest_is_refused(server: ServerProcess, vehicle: Vehicle) -> None:

    body = vehicle.signed_manifest()
    url = f"/api/v1/vehicles/{vehicle.vin}/manifest"
    status, _ = call(server, "POST", url, raw=body, token=False)
    assert status == 200
    status, data = call(server, "POST", url, raw=body, token=False)
    assert_client_error(status, data)
    assert "replayed" in data["error"]["message"]


def test_server_never_answered_500(shared_server: ServerProcess) -> None:
    for method, path, body, raw in BAD_REQUESTS:
        call(shared_server, method, path, body, raw=raw)
    assert "Traceback" not in shared_server.log()


def test_malformed_http_is_refused_without_a_traceback_in_the_log(
    shared_server: ServerProcess,
) -> None:
    import socket

    for raw in (
        b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n",
        b"NOT-HTTP\x00\x01\r\n\r\n",
        b"POST /api/v1/vehicles HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", shared_server.port), timeout=5) as conn:
            conn.sendall(raw)
            answer = conn.recv(1024)
        assert answer[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400") or answer == b"", answer
    assert "Traceback" not in shared_server.log()
