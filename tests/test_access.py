"""Operators: named tokens with roles, enforced on every route, recorded in the audit log.

Walks the server's own route table, so a route added later is checked too: a viewer gets 403
on everything that changes state (and on token management), a route nobody may call without
a token answers 401; a supplier publishes only for its hardware ids; revoked and expired
tokens get 401; the database never holds a token in clear; and every change names who made
it in the hash-chained audit log, which notices a changed, deleted or reordered record.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from server.api.access import Audience
from server.api.application import ROUTES
from server.api_client import AdminClient, ApiClientError
from server.release import (
    PublishError,
    ReleaseImage,
    fetch_verified_targets,
    publish_image,
    stage_release,
)
from server.roles import ROLE_PERMISSIONS, Permission, Role
from tests.uptake_fixtures import ENV, PASSWORD, ServerProcess, Vehicle, sample

_PARAMS = {
    "vin": "VIN0001",
    "serial": "GW-VIN0001",
    "sha256": "ab" * 32,
    "name": "someone",
    "id": "1",
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Vehicle]]:
    tmp = tmp_path_factory.mktemp("access")
    srv = ServerProcess(tmp)
    vehicle = Vehicle(tmp, srv, secondaries=False)
    yield srv, vehicle
    srv.stop()


def _token(srv: ServerProcess, name: str, role: Role, **extra: Any) -> AdminClient:
    answer = srv.admin.request(
        "POST", "/api/v1/tokens", json_body={"name": name, "role": role.value, **extra}
    )
    return AdminClient(srv.url, answer["token"])


def _status(api: AdminClient, method: str, path: str, body: Any = None) -> int:
    try:
        api.request(method, path, json_body=body if body is not None else {})
    except ApiClientError as exc:
        return int(str(exc).split("HTTP ", 1)[1][:3])
    return 200


def _path(template: str) -> str:
    path = template.replace("{path:.+}", "rpi-gateway/1.0.0/x")
    for key, value in _PARAMS.items():
        path = path.replace("{" + key + "}", value)
    return path


_OPERATOR_ROUTES = [r for r in ROUTES if isinstance(r.access, Permission)]


@pytest.mark.parametrize(
    "route",
    [r for r in _OPERATOR_ROUTES if r.access not in ROLE_PERMISSIONS[Role.VIEWER]],
    ids=lambda r: f"{r.method} {r.path}",
)
def test_a_viewer_gets_403_on_every_route_that_changes_state(
    deployment: tuple[ServerProcess, Vehicle], route: Any
) -> None:
    srv, _ = deployment
    viewer = _viewer(srv)
    assert _status(viewer, route.method, _path(route.path)) == 403


@pytest.mark.parametrize("route", _OPERATOR_ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_every_operator_route_needs_a_token(
    deployment: tuple[ServerProcess, Vehicle], route: Any
) -> None:
    srv, _ = deployment
    assert _status(AdminClient(srv.url, ""), route.method, _path(route.path)) == 401
    assert (
        _status(AdminClient(srv.url, "uptake_not-a-token"), route.method, _path(route.path)) == 401
    )


def test_every_route_declares_who_may_call_it() -> None:
    for route in ROUTES:
        assert isinstance(route.access, Audience | Permission), route
    changing = [r for r in ROUTES if r.method != "GET" and isinstance(r.access, Permission)]
    assert changing and all(r.access not in ROLE_PERMISSIONS[Role.VIEWER] for r in changing)


_viewers: dict[str, AdminClient] = {}


def _viewer(srv: ServerProcess) -> AdminClient:
    if srv.url not in _viewers:
        _viewers[srv.url] = _token(srv, "auditor", Role.VIEWER)
    return _viewers[srv.url]


def test_a_viewer_reads(deployment: tuple[ServerProcess, Vehicle]) -> None:
    srv, vehicle = deployment
    viewer = _viewer(srv)
    assert viewer.request("GET", f"/api/v1/vehicles/{vehicle.vin}")["vin"] == vehicle.vin
    assert "images" in viewer.request("GET", "/api/v1/images")


def test_a_supplier_publishes_only_for_its_hardware_ids(
    deployment: tuple[ServerProcess, Vehicle],
) -> None:
    srv, _ = deployment
    supplier = _token(srv, "bms-supplier", Role.SUPPLIER, hardware_ids=["stm32f4-bms"])
    root = (srv.offline_dir / "image-root.json").read_bytes()
    ok = publish_image(supplier, sample("stm32f4-bms", "1.0.0"), ["stm32f4-bms"], "1.0.0",
                       [srv.targets_signer], root)  # fmt: skip
    assert ok.filepath.startswith("stm32f4-bms/")
    with pytest.raises(PublishError, match="may publish images for stm32f4-bms only"):
        publish_image(supplier, sample("rpi-gateway", "1.0.0"), ["rpi-gateway"], "1.0.0",
                      [srv.targets_signer], root)  # fmt: skip
    assert _status(supplier, "POST", "/api/v1/vehicles", {"vin": "X"}) == 403  # no fleet at all
    with pytest.raises(ApiClientError, match="HTTP 400"):  # a supplier token needs hardware ids
        _token(srv, "no-hardware", Role.SUPPLIER)


def test_a_supplier_cannot_retag_or_replace_another_hardware_ids_image(
    deployment: tuple[ServerProcess, Vehicle],
) -> None:
    """Changing an image touches its old hardware ids too: re-tagging is not publishing one's own."""
    srv, _ = deployment
    supplier = _token(srv, "retagging-supplier", Role.SUPPLIER, hardware_ids=["stm32f4-bms"])
    root = (srv.offline_dir / "image-root.json").read_bytes()
    gateway = publish_image(srv.admin, sample("rpi-gateway", "1.0.0"), ["rpi-gateway"], "1.0.0",
                            [srv.targets_signer], root)  # fmt: skip
    targets = fetch_verified_targets(srv.admin, root)
    entry = targets.signed.targets[gateway.filepath]
    entry.unrecognized_fields["custom"]["hardwareIds"] = ["stm32f4-bms"]
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(srv.targets_signer)
    with pytest.raises(ApiClientError, match=r"HTTP 403.*rpi-gateway"):
        supplier.request("POST", "/api/v1/image/targets", body=targets.to_bytes(),
                         headers={"Content-Type": "application/json"})  # fmt: skip

    # A release the engineers staged is theirs: a supplier neither discards nor replaces it.
    stage_release(srv.admin, [ReleaseImage(sample("rpi-gateway", "1.1.0"), ["rpi-gateway"], "1.1.0")],
                  root)  # fmt: skip
    assert _status(supplier, "DELETE", "/api/v1/image/staged") == 403
    bms = fetch_verified_targets(srv.admin, root)
    bms.signed.version += 1
    bms.signatures.clear()
    with pytest.raises(ApiClientError, match=r"HTTP 403.*rpi-gateway"):
        supplier.request("POST", "/api/v1/image/staged", body=bms.to_bytes(),
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert srv.admin.request("DELETE", "/api/v1/image/staged")["discarded"] > 0


def test_revoked_and_expired_tokens_get_401(deployment: tuple[ServerProcess, Vehicle]) -> None:
    srv, _ = deployment
    operator = _token(srv, "temporary-operator", Role.FLEET_OPERATOR)
    assert _status(operator, "GET", "/api/v1/images") == 200
    srv.admin.request("POST", "/api/v1/tokens/temporary-operator/revoke", json_body={})
    assert _status(operator, "GET", "/api/v1/images") == 401
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    short = _token(srv, "short-lived", Role.VIEWER, expires_at=soon)
    assert _status(short, "GET", "/api/v1/images") == 200
    time.sleep(2.5)
    assert _status(short, "GET", "/api/v1/images") == 401


def test_no_token_is_stored_in_clear(deployment: tuple[ServerProcess, Vehicle]) -> None:
    srv, _ = deployment
    created = _token(srv, "secret-holder", Role.VIEWER)
    if srv.config.database_url.startswith("sqlite"):
        database = srv.data_dir / "uptake.db"
        stored = b"".join(p.read_bytes() for p in database.parent.glob("uptake.db*"))
    else:  # every text the tables hold
        stored = repr(
            [srv.sql(f"SELECT * FROM {table}") for table in ("operatortoken", "auditrecord")]
        ).encode()
    for token in (created.token, srv.admin.token):
        assert token.encode() not in stored
    listing = srv.admin.request("GET", "/api/v1/tokens")["tokens"]
    assert {t["name"] for t in listing} >= {"admin", "secret-holder"}
    assert all("token" not in t and "token_sha256" not in t for t in listing)


def test_every_change_names_who_made_it(deployment: tuple[ServerProcess, Vehicle]) -> None:
    srv, vehicle = deployment
    operator = _token(srv, "alice", Role.FLEET_OPERATOR)
    image = srv.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    operator.request(
        "POST", f"/api/v1/vehicles/{vehicle.vin}/assignments",
        json_body={"ecu_serial": vehicle.primary, "filepath": image.filepath},
    )  # fmt: skip
    records = srv.admin.request("GET", "/api/v1/audit?limit=500")["records"]
    seen = {(r["action"], r["actor"]) for r in records}
    assert ("vehicle.register", "operator:admin") in seen
    assert ("targets.publish", "operator:admin") in seen
    assert ("image.upload", "operator:admin") in seen
    assert ("assignment.create", "operator:alice") in seen
    assert ("token.create", "operator:admin") in seen


@pytest.mark.parametrize("tampering", ["change", "delete", "reorder", "delete the last"])
def test_a_tampered_audit_log_is_detected(tmp_path: Path, tampering: str) -> None:
    srv = ServerProcess(tmp_path)
    try:
        for i in range(3):
            _token(srv, f"op{i}", Role.VIEWER)
        assert srv.admin.request("GET", "/api/v1/audit/verify")["intact"]
    finally:
        srv.stop()
    if tampering == "change":
        srv.sql("UPDATE auditrecord SET actor = 'operator:nobody' WHERE seq = 2")
    elif tampering == "delete":
        srv.sql("DELETE FROM auditrecord WHERE seq = 2")
    elif tampering == "reorder":
        srv.sql("UPDATE auditrecord SET seq = 100 WHERE seq = 2")
        srv.sql("UPDATE auditrecord SET seq = 2 WHERE seq = 3")
        srv.sql("UPDATE auditrecord SET seq = 3 WHERE seq = 100")
    else:
        srv.sql("DELETE FROM auditrecord WHERE seq = (SELECT MAX(seq) FROM auditrecord)")
    srv.start()
    try:
        result = srv.admin.request("GET", "/api/v1/audit/verify")
        assert not result["intact"] and result["problems"], result
    finally:
        srv.stop()


def test_admin_token_cli(deployment: tuple[ServerProcess, Vehicle], tmp_path: Path) -> None:
    srv, _ = deployment
    base = [sys.executable, "-m", "uptake", "admin", "token"]
    env = {**ENV, "UPTAKE_SERVER": srv.url, "UPTAKE_TOKEN_FILE": str(srv.config.admin_token_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip

    out = tmp_path / "bob.token"
    made = run("create", "--name", "bob", "--role", "release-engineer", "--expires", "90d",
               "--out", str(out))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert out.read_text().startswith("uptake_") and oct(out.stat().st_mode)[-3:] == "600"
    assert "bob" in run("list").stdout
    assert run("revoke", "bob").returncode == 0
    bob = AdminClient(srv.url, out.read_text().strip())
    assert _status(bob, "GET", "/api/v1/images") == 401
    bad = run("create", "--name", "x", "--role", "supplier")
    assert bad.returncode == 1 and "hardware ids" in bad.stderr and "Traceback" not in bad.stderr
    assert PASSWORD  # the fixtures' password is never a token
