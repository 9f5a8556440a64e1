"""The inventory ledger, the fleet's lists, exports and cancelling an assignment.

One real server and one real agent (gateway + BMS secondary): the agent installs what it is
assigned and reports it; the ledger records each change with the manifest that said so, and
nothing for a heartbeat that changes nothing. Lists page and filter, and refuse bad parameters
with a 400 that names them; exports stream CSV and JSON through ``uptake fleet export``; an
assignment is withdrawn from the vehicle's director targets when cancelled, and a viewer reads
all of it while a supplier reads none of it.
"""

from __future__ import annotations

import csv
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.api.application import ROUTES
from server.api_client import AdminClient, ApiClientError
from server.roles import Permission
from signing.manifest import InstallOutcome, InstallResult
from tests.uptake_fixtures import ENV, PASSWORD, ServerProcess, Vehicle, sample


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Vehicle]]:
    tmp = tmp_path_factory.mktemp("ledger")
    srv = ServerProcess(tmp)
    vehicle = Vehicle(tmp, srv)
    yield srv, vehicle
    srv.stop()


def _status(api: AdminClient, method: str, path: str) -> int:
    try:
        api.request(method, path)
    except ApiClientError as exc:
        return int(str(exc).split("HTTP ", 1)[1][:3])
    return 200


def _ledger(srv: ServerProcess, vin: str, query: str = "") -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = srv.admin.request(
            "GET",
            f"/api/v1/vehicles/{vin}/ledger?limit=2{query}"
            + (f"&cursor={cursor}" if cursor else ""),
        )
        entries += page["entries"]
        cursor = page["next"]
        if cursor is None:
            return entries


@pytest.fixture(scope="module")
def installed(deployment: tuple[ServerProcess, Vehicle]) -> str:
    """The gateway of the vehicle installed rpi-gateway 1.1.0; returns its target path."""
    srv, vehicle = deployment
    image = srv.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    srv.assign(vehicle.vin, vehicle.primary, image.filepath)
    run = vehicle.run_once()
    assert run.report["exit_code"] == 0, run.stdout
    vehicle.run_once()  # reports the install's outcome
    return image.filepath


def test_the_ledger_records_each_change_with_its_signed_manifest(
    deployment: tuple[ServerProcess, Vehicle], installed: str
) -> None:
    srv, vehicle = deployment
    entries = _ledger(srv, vehicle.vin)
    gateway = [e for e in entries if e["ecu_serial"] == vehicle.primary]
    assert any(
        e["change"] == "installed" and e["filepath"] == installed and e["version"] == "1.1.0"
        for e in gateway
    ), gateway
    assert any(
        e["change"] == "install_result" and e["install_filepath"] == installed
        and e["install_result"] == "installed"
        for e in gateway
    ), gateway  # fmt: skip
    # paged by id, oldest first, nothing twice
    assert [e["id"] for e in entries] == sorted({e["id"] for e in entries})
    current = srv.admin.request("GET", f"/api/v1/vehicles/{vehicle.vin}/ledger")["current"]
    assert {(c["ecu_serial"], c["filepath"], c["version"]) for c in current} >= {
        (vehicle.primary, installed, "1.1.0")
    }
    only_gateway = _ledger(srv, vehicle.vin, f"&ecu={vehicle.primary}&change=installed")
    assert only_gateway and all(
        e["ecu_serial"] == vehicle.primary and e["change"] == "installed" for e in only_gateway
    )

    manifest = srv.admin.request(
        "GET", f"/api/v1/vehicles/{vehicle.vin}/manifests/{gateway[-1]['manifest_id']}"
    )
    assert manifest["content_stored"] and manifest["manifest"]["signed"]["vin"] == vehicle.vin
    reports = manifest["manifest"]["signed"]["ecu_version_reports"]
    assert vehicle.primary in reports and len(manifest["sha256"]) == 64

    # a heartbeat that changes nothing stores nothing
    answer = srv.admin.request(
        "POST", f"/api/v1/vehicles/{vehicle.vin}/manifest", body=vehicle.signed_manifest(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert answer["accepted"] and answer["ledger_manifest_id"] is None
    assert len(_ledger(srv, vehicle.vin)) == len(entries)

    for path, status in [
        (f"/api/v1/vehicles/{vehicle.vin}/manifests/999999", 404),
        (f"/api/v1/vehicles/{vehicle.vin}/manifests/x1", 400),
        ("/api/v1/vehicles/NOSUCHVIN/ledger", 404),
        (f"/api/v1/vehicles/{vehicle.vin}/ledger?change=exploded", 400),
        (f"/api/v1/vehicles/{vehicle.vin}/ledger?limit=501", 400),
    ]:
        assert _status(srv.admin, "GET", path) == status, path


def test_lists_page_and_filter(deployment: tuple[ServerProcess, Vehicle], installed: str) -> None:
    srv, vehicle = deployment
    Vehicle(srv.data_dir.parent, srv, vin="VIN0002", secondaries=False)

    def vins(query: str) -> list[str]:
        return [v["vin"] for v in srv.admin.request("GET", f"/api/v1/vehicles?{query}")["vehicles"]]

    assert vins("") == [vehicle.vin, "VIN0002"]
    first = srv.admin.request("GET", "/api/v1/vehicles?limit=1")
    assert [v["vin"] for v in first["vehicles"]] == [vehicle.vin] and first["next"]
    second = srv.admin.request("GET", f"/api/v1/vehicles?limit=1&cursor={first['next']}")
    assert [v["vin"] for v in second["vehicles"]] == ["VIN0002"] and second["next"] is None
    assert vins(f"image={installed}") == [vehicle.vin]
    assert vins("hardware_id=stm32f4-bms") == [vehicle.vin]
    assert vins("hardware_id=rpi-gateway") == [vehicle.vin, "VIN0002"]
    assert vins("seen_since=2000-01-01T00:00:00Z") == [vehicle.vin]
    assert vins("not_seen_since=2000-01-01T00:00:00Z") == ["VIN0002"]  # never seen
    assert vins("revoked=true") == [] and len(vins("revoked=false")) == 2
    assert vins("has_attacks=false") == [vehicle.vin, "VIN0002"]

    ecus = srv.admin.request("GET", f"/api/v1/ecus?vin={vehicle.vin}")["ecus"]
    assert {e["serial"] for e in ecus} == {vehicle.primary, vehicle.secondary}
    running = srv.admin.request("GET", f"/api/v1/ecus?image={installed}")["ecus"]
    assert [e["serial"] for e in running] == [vehicle.primary]
    assert "security_events" in srv.admin.request("GET", "/api/v1/events?kind=attack_reported")

    for query, words in [
        ("limit=0", "limit"),
        ("colour=red", "unknown parameter `colour`"),
        ("seen_since=yesterday", "seen_since"),
        ("seen_since=2026-01-01T00:00:00", "time zone"),
        ("revoked=maybe", "revoked"),
        ("hardware_id=../x", "hardware_id"),
        ("limit=1&limit=2", "more than once"),
        ("cursor=!!!", "cursor"),
    ]:
        with pytest.raises(ApiClientError, match="HTTP 400") as caught:
            srv.admin.request("GET", f"/api/v1/vehicles?{query}")
        assert words in str(caught.value), (query, caught.value)
    assert _status(srv.admin, "GET", "/api/v1/events?kind=nonsense") == 400
    assert _status(srv.admin, "GET", "/api/v1/ecus?has_attacks=2") == 400


def _cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "UPTAKE_SERVER": srv.url, "UPTAKE_TOKEN_FILE": str(srv.config.admin_token_path)}
    return subprocess.run([sys.executable, "-m", "uptake", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_exports_stream_csv_and_json_to_a_file(
    deployment: tuple[ServerProcess, Vehicle], installed: str, tmp_path: Path
) -> None:
    srv, vehicle = deployment
    out = tmp_path / "vehicle.csv"
    done = _cli(srv, "fleet", "export", "--vin", vehicle.vin, "--output", str(out))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert rows and {r["vin"] for r in rows} == {vehicle.vin}
    assert len(rows) == len(_ledger(srv, vehicle.vin))

    out = tmp_path / "release.json"
    done = _cli(srv, "fleet", "export", "--image", installed, "--format", "json", "--output",
                str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = json.loads(out.read_text())
    assert entries and all(e["filepath"] == installed for e in entries)
    by_version = _cli(srv, "fleet", "export", "--version", "1.1.0", "--format", "json")
    assert json.loads(by_version.stdout) == entries

    refused = _cli(srv, "fleet", "export", "--vin", "NOSUCHVIN", "--output", str(tmp_path / "x"))
    assert refused.returncode == 1 and "unknown vehicle" in refused.stderr
    assert not (tmp_path / "x").exists() and "Traceback" not in refused.stderr
    both = _cli(srv, "fleet", "export", "--vin", vehicle.vin, "--image", installed)
    assert both.returncode == 2 and "exactly one" in both.stderr

    listed = _cli(srv, "fleet", "list", "--image", installed, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [v["vin"] for v in json.loads(listed.stdout)["vehicles"]] == [vehicle.vin]


def _director_targets(srv: ServerProcess, vin: str) -> dict[str, Any]:
    version = srv.vehicle(vin)["director_targets_version"]
    raw = srv.admin.get_bytes(f"/director/{vin}/metadata/{version}.targets.json")
    targets: dict[str, Any] = json.loads(raw)["signed"]["targets"]
    return targets


def test_cancel_withdraws_a_pending_assignment(
    deployment: tuple[ServerProcess, Vehicle], installed: str
) -> None:
    srv, vehicle = deployment
    image = srv.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    row = srv.assign(vehicle.vin, vehicle.secondary, image.filepath)
    assert image.filepath in _director_targets(srv, vehicle.vin)
    done = _cli(srv, "fleet", "cancel", vehicle.vin, "--assignment", str(row["id"]), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "cancelled"
    assert image.filepath not in _director_targets(srv, vehicle.vin)
    assert installed in _director_targets(srv, vehicle.vin)  # the installed one stays directed
    again = _cli(srv, "fleet", "cancel", vehicle.vin, "--assignment", str(row["id"]))
    assert again.returncode == 1 and "cancelled" in again.stderr

    done_row = next(
        a for a in srv.vehicle(vehicle.vin)["assignments"] if a["filepath"] == installed
    )
    path = f"/api/v1/vehicles/{vehicle.vin}/assignments/{done_row['id']}/cancel"
    with pytest.raises(ApiClientError, match=r"HTTP 409.*already installed"):
        srv.admin.request("POST", path)
    assert (
        _status(srv.admin, "POST", f"/api/v1/vehicles/{vehicle.vin}/assignments/999/cancel") == 404
    )
    records = srv.admin.request("GET", "/api/v1/audit?action=assignment.cancel")["records"]
    assert [(r["subject"], r["detail"]["assignment"]) for r in records] == [
        (vehicle.vin, row["id"])
    ]


def test_a_viewer_reads_the_inventory_and_a_supplier_none_of_it(
    deployment: tuple[ServerProcess, Vehicle], installed: str
) -> None:
    srv, vehicle = deployment

    def token(name: str, role: str, **extra: Any) -> AdminClient:
        answer = srv.admin.request(
            "POST", "/api/v1/tokens", json_body={"name": name, "role": role, **extra}
        )
        return AdminClient(srv.url, answer["token"])

    viewer = token("ledger-viewer", "viewer")
    supplier = token("ledger-supplier", "supplier", hardware_ids=["stm32f4-bms"])
    manifest_id = _ledger(srv, vehicle.vin)[0]["manifest_id"]
    reads = [
        "/api/v1/vehicles",
        "/api/v1/ecus",
        "/api/v1/events",
        f"/api/v1/vehicles/{vehicle.vin}/ledger",
        f"/api/v1/vehicles/{vehicle.vin}/manifests/{manifest_id}",
        f"/api/v1/ledger/export?vin={vehicle.vin}",
    ]
    for path in reads:
        assert _status(viewer, "GET", path) == 200, path
        assert _status(supplier, "GET", path) == 403, path
    cancel = f"/api/v1/vehicles/{vehicle.vin}/assignments/1/cancel"
    assert _status(viewer, "POST", cancel) == 403
    assert _status(supplier, "POST", cancel) == 403


def _signed_report(
    vehicle: Vehicle, *, attacks: str | None = None, last_install: InstallOutcome | None = None
) -> bytes:
    """A manifest the vehicle's own keys sign, saying what its primary says after a change."""
    from client.agent import Agent
    from client.config import load_config

    agent = Agent(load_config(vehicle.config_path), PASSWORD.encode())
    state = agent.store.load()
    ecu = state.ecu(vehicle.primary)
    if attacks is not None:
        ecu.attacks_detected = attacks
    if last_install is not None:
        ecu.last_install = last_install
    return agent.reporter.signed_manifest(state)


def test_failed_installs_and_attacks_are_in_the_ledger_and_the_lists(
    deployment: tuple[ServerProcess, Vehicle], installed: str
) -> None:
    srv, _ = deployment
    vehicle = Vehicle(srv.data_dir.parent, srv, vin="VIN0003", secondaries=False)

    def post(body: bytes) -> dict[str, Any]:
        answer: dict[str, Any] = srv.admin.request(
            "POST", f"/api/v1/vehicles/{vehicle.vin}/manifest", body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        return answer

    failed = InstallOutcome(installed, InstallResult.ROLLED_BACK, "health check failed")
    assert post(_signed_report(vehicle, last_install=failed))["ledger_manifest_id"]
    assert post(_signed_report(vehicle, attacks="director targets signed by an unknown key"))[
        "attacks_recorded"
    ] == [vehicle.primary]
    attacked = srv.admin.request("GET", "/api/v1/vehicles?has_attacks=true")["vehicles"]
    assert [(v["vin"], v["has_attacks"]) for v in attacked] == [(vehicle.vin, True)]
    assert post(_signed_report(vehicle))["ledger_manifest_id"] is None  # nothing new
    cleared = post(_signed_report(vehicle, attacks=""))["ledger_manifest_id"]

    failures = _ledger(srv, vehicle.vin, "&failed=true")
    assert [(e["install_filepath"], e["install_result"]) for e in failures] == [
        (installed, "rolled_back")
    ]
    page = srv.admin.request("GET", f"/api/v1/vehicles/{vehicle.vin}/ledger?limit=1")
    assert [(c["ecu_serial"], c["last_install_result"]) for c in page["current"]] == [
        (vehicle.primary, "rolled_back")
    ]
    changes = [(e["change"], e["install_result"], e["detail"]) for e in _ledger(srv, vehicle.vin)]
    assert ("install_result", "rolled_back", "health check failed") in changes
    assert ("attack", "", "director targets signed by an unknown key") in changes
    assert changes[-1] == ("attack_cleared", "", "")
    last = _ledger(srv, vehicle.vin, "&change=attack_cleared")[-1]
    assert last["manifest_id"] == cleared

    rolled_back = srv.admin.request("GET", "/api/v1/ecus?last_install_result=rolled_back")["ecus"]
    assert [e["serial"] for e in rolled_back] == [vehicle.primary]
    events = srv.admin.request("GET", f"/api/v1/events?vin={vehicle.vin}&kind=attack_reported")
    assert [e["detail"] for e in events["security_events"]] == [
        "director targets signed by an unknown key"
    ]
    since = srv.admin.request("GET", "/api/v1/events?since=2999-01-01T00:00:00%2B00:00")
    assert since["security_events"] == []


def test_every_fleet_route_is_refused_to_a_supplier_and_read_by_a_viewer(
    deployment: tuple[ServerProcess, Vehicle],
) -> None:
    """Walks the route table: a route added later is checked too."""
    srv, vehicle = deployment
    supplier = AdminClient(srv.url, srv.admin.request(
        "POST", "/api/v1/tokens",
        json_body={"name": "walk-supplier", "role": "supplier", "hardware_ids": ["stm32f4-bms"]},
    )["token"])  # fmt: skip
    viewer = AdminClient(srv.url, srv.admin.request(
        "POST", "/api/v1/tokens", json_body={"name": "walk-viewer", "role": "viewer"}
    )["token"])  # fmt: skip
    params = {"vin": vehicle.vin, "serial": vehicle.primary, "id": "1", "name": "nobody"}

    def path(template: str) -> str:
        for key, value in params.items():
            template = template.replace("{" + key + "}", value)
        return template

    fleet = [r for r in ROUTES if r.access in (Permission.READ_FLEET, Permission.MANAGE_FLEET)]
    assert {"/api/v1/vehicles/{vin}/ledger", "/api/v1/ecus", "/api/v1/events"} <= {
        r.path for r in fleet
    }
    for route in fleet:
        assert _status(supplier, route.method, path(route.path)) == 403, route.path
        if route.method == "GET":
            # read: answered (a 404 or 400 for the made-up ids is still an answer, not a refusal)
            assert _status(viewer, "GET", path(route.path)) not in (401, 403), route.path
        else:
            assert _status(viewer, route.method, path(route.path)) == 403, route.path


@pytest.mark.postgres
def test_ledger_lists_and_exports_on_postgresql(tmp_path: Path) -> None:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3",
            autocommit=True,
        )
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    name = f"fleet_ledger_{secrets.token_hex(6)}"
    admin.execute(f"CREATE DATABASE {name}")
    srv = ServerProcess(
        tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    )
    try:
        vehicle = Vehicle(tmp_path, srv, secondaries=False)
        image = srv.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        failed = InstallOutcome(image.filepath, InstallResult.FAILED, "=cmd|' /C calc'!A0")
        srv.admin.request(
            "POST", f"/api/v1/vehicles/{vehicle.vin}/manifest",
            body=_signed_report(vehicle, attacks="replayed timestamp", last_install=failed),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        entries = _ledger(srv, vehicle.vin)
        assert {e["change"] for e in entries} == {"install_result", "attack"}
        for query, expected in [
            ("has_attacks=true", [vehicle.vin]),
            ("has_attacks=false", []),
            ("seen_since=2000-01-01T00:00:00Z", [vehicle.vin]),
            ("not_seen_since=2000-01-01T00:00:00Z", []),
            ("hardware_id=rpi-gateway&revoked=false", [vehicle.vin]),
        ]:
            found = srv.admin.request("GET", f"/api/v1/vehicles?{query}")["vehicles"]
            assert [v["vin"] for v in found] == expected, query
        status, _ = srv.admin.get(f"{srv.url}/api/v1/ledger/export?vin={vehicle.vin}", 100_000)
        assert status == 401  # a plain GET carries no token
        out = tmp_path / "export.csv"
        with out.open("wb") as f:
            srv.admin.download(f"/api/v1/ledger/export?vin={vehicle.vin}&format=csv", f)
        rows = list(csv.DictReader(out.open(newline="")))
        assert len(rows) == len(entries)
        # text a spreadsheet would run is quoted
        assert [r["detail"] for r in rows if r["change"] == "install_result"] == [
            "'=cmd|' /C calc'!A0"
        ]
        row = srv.assign(vehicle.vin, vehicle.primary, image.filepath)
        cancelled = srv.admin.request(
            "POST", f"/api/v1/vehicles/{vehicle.vin}/assignments/{row['id']}/cancel"
        )
        assert cancelled["status"] == "cancelled"
    finally:
        srv.stop()
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
