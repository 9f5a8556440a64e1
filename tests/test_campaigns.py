"""Campaigns over simulated fleets: real server processes, real signed manifests over HTTP.

The vehicles are :mod:`tests.simulated_fleet` signers (an ed25519 key per
ECU, director targets read over HTTP, manifests signed in the
:mod:`signing.manifest` format), not agents, so a thousand fit in a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from server.release import Published
from signing.manifest import ImageInfo
from tests.simulated_fleet import HttpError, SimVehicle, http, in_parallel, make_fleet
from tests.uptake_fixtures import ServerProcess, Vehicle, sample

BMS, GATEWAY = "stm32f4-bms", "rpi-gateway"
#: Every how many polls a simulated vehicle reports although nothing changed (heartbeat).
HEARTBEAT_EVERY = 5


class Deployment:
    """A server with bms 1.0.0, 1.1.0 and 2.0.0 published, release ``bms-1.1``, an approver."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv, self.url, self.token = srv, srv.url, srv.admin.token
        self.images: dict[str, Published] = {
            v: srv.publish(sample(BMS, v), BMS, v) for v in ("1.0.0", "1.1.0", "2.0.0")
        }
        self.api("POST", "/api/v1/releases",
                 {"name": "bms-1.1", "images": {BMS: self.images["1.1.0"].filepath}})  # fmt: skip
        answer = self.api(
            "POST", "/api/v1/tokens", {"name": "approver", "role": "release-engineer"}
        )
        self.approver = answer["token"]

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return http(self.url, method, path, self.token if token is None else token, body)

    def status(self, method: str, path: str, token: str, body: Any = None) -> int:
        try:
            http(self.url, method, path, token, body if body is not None else {})
        except HttpError as exc:
            return exc.status
        return 200

    def enrol(self, vehicles: list[SimVehicle], installed: Published | None = None,
              **attributes: Any) -> None:  # fmt: skip
        """Register ``vehicles`` (with attributes) and post their first manifest."""
        image = installed or self.images["1.0.0"]

        def run(v: SimVehicle) -> None:
            self.api("POST", "/api/v1/vehicles", v.registration(attributes or None))
            for e in v.ecus:
                if e.hardware_id == BMS and e.installed.filepath == "":
                    e.installed = ImageInfo.of(
                        image.filepath, image.length, {"sha256": image.sha256}
                    )
            v.report(self.url)

        in_parallel(run, vehicles)

    def campaign(self, name: str, phases: list[dict[str, Any]] | None = None,
                 start: bool = True, **extra: Any) -> dict[str, Any]:  # fmt: skip
        body = {"name": name, "release": extra.pop("release", "bms-1.1"),
                "phases": phases or [{"percent": 100}], **extra}  # fmt: skip
        record: dict[str, Any] = self.api("POST", "/api/v1/campaigns", body)
        if start:
            self.api("POST", f"/api/v1/campaigns/{name}/approve", {}, token=self.approver)
            record = self.api("POST", f"/api/v1/campaigns/{name}/start", {})
        return record

    def show(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api("GET", f"/api/v1/campaigns/{name}")
        return result

    def wait(self, name: str, done: Callable[[dict[str, Any]], bool], vehicles: list[SimVehicle],
             timeout: float = 120) -> dict[str, Any]:  # fmt: skip
        """Let ``vehicles`` poll and report until ``done(campaign)``."""
        deadline = time.monotonic() + timeout
        rounds = 0
        while True:
            record = self.show(name)
            if done(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"campaign {name} did not get there: {record}")
            rounds += 1
            heartbeat = rounds % HEARTBEAT_EVERY == 0  # vehicles report now and then anyway
            if not any(
                in_parallel(partial(SimVehicle.cycle, base=self.url, heartbeat=heartbeat), vehicles)
            ):
                time.sleep(0.3)


@pytest.fixture
def deployment(server: ServerProcess) -> Deployment:
    return Deployment(server)


@pytest.fixture(scope="module")
def shared(shared_server: ServerProcess) -> Deployment:
    return Deployment(shared_server)


def _phase_run(deployment: Deployment, count: int, timeout: float = 120) -> None:
    fleet = make_fleet(count)
    vans = make_fleet(max(2, count // 20), prefix="VAN")
    started = time.monotonic()
    deployment.enrol(fleet, model="roadster", region="eu")
    deployment.enrol(vans, model="van", region="eu")
    deployment.campaign(
        "rollout",
        [{"percent": 1, "success_threshold": 0.9}, {"percent": 10, "success_threshold": 0.9},
         {"percent": 100, "success_threshold": 0.99}],
        selection={"models": ["roadster"]},
    )  # fmt: skip
    # before anyone reports: only the canary phase is reached, by the sweep
    first = deployment.wait("rollout", lambda c: c["sweep"]["phase_covered"] >= 0, [])
    assert first["current_phase"] == 0 or first["phases"][0]["succeeded"] > 0
    assert first["phases"][2]["joined"] == 0
    seen_phases: list[int] = []

    def done(c: dict[str, Any]) -> bool:
        seen_phases.append(c["current_phase"])
        return bool(c["state"] == "completed" and c["totals"]["succeeded"] == count)

    record = deployment.wait("rollout", done, fleet + vans, timeout)
    assert sorted(set(seen_phases)) == [0, 1, 2] or set(seen_phases) >= {1, 2}
    assert record["totals"]["succeeded"] == count, record["totals"]
    assert record["totals"]["joined"] == count  # the vans never joined
    assert all(p["finished_at"] for p in record["phases"])
    assert all(v.primary.installed.filepath == deployment.images["1.1.0"].filepath for v in fleet)
    assert all(v.primary.installed.filepath == deployment.images["1.0.0"].filepath for v in vans)

    def audited(action: str) -> list[dict[str, Any]]:
        page = deployment.api("GET", f"/api/v1/audit?subject=rollout&action={action}")
        return list(page["records"])

    for action in ("campaign.create", "campaign.approve", "campaign.start", "campaign.complete"):
        assert len(audited(action)) == 1, action
    assert [r["detail"]["phase"] for r in audited("campaign.phase")] == [1, 2]
    assigned = deployment.api("GET", f"/api/v1/audit?action=campaign.assign&subject={fleet[0].vin}")
    assert [r["actor"] for r in assigned["records"]] == ["campaign-engine"]
    print(f"{count} vehicles: enrolled and rolled out in {time.monotonic() - started:.1f} s")


def test_campaign_advances_through_phases_as_vehicles_succeed(deployment: Deployment) -> None:
    _phase_run(deployment, 200)


@pytest.mark.slow
def test_campaign_over_1000_vehicles(deployment: Deployment) -> None:
    _phase_run(deployment, 1000, timeout=400)


def _abort_run(deployment: Deployment, count: int, timeout: float = 120) -> None:
    fleet = make_fleet(count)
    for v in fleet[::2]:
        v.behaviour = "fail"
    deployment.enrol(fleet)
    deployment.campaign(
        "doomed",
        [{"percent": 20, "success_threshold": 0.9, "failure_threshold": 0.25, "min_finished": 4},
         {"percent": 100}],
    )  # fmt: skip
    record = deployment.wait("doomed", lambda c: c["state"] != "running", fleet, timeout)
    assert record["state"] == "aborted"
    assert "phase 0" in record["reason"] and "failed" in record["reason"]
    assert record["phases"][1]["joined"] == 0
    assert record["phases"][0]["failed"] >= 2
    # no vehicle outside the canary got the image
    reached = {
        p["vin"]
        for p in deployment.api("GET", "/api/v1/campaigns/doomed/vehicles?limit=500")["vehicles"]
    }
    assert all(v.primary.installed.filepath != deployment.images["1.1.0"].filepath
               for v in fleet if v.vin not in reached)  # fmt: skip


def test_campaign_aborts_when_a_phase_fails(deployment: Deployment) -> None:
    _abort_run(deployment, 120)


@pytest.mark.slow
def test_campaign_over_1000_vehicles_aborts_when_a_phase_fails(deployment: Deployment) -> None:
    _abort_run(deployment, 1000, timeout=400)


def test_vehicle_registered_mid_campaign_gets_the_update(deployment: Deployment) -> None:
    early = make_fleet(5)
    deployment.enrol(early, tags=["pilot"])
    deployment.campaign("open", selection={"tags": ["pilot"]},
                        phases=[{"percent": 100, "success_threshold": 1.0}])  # fmt: skip
    # three report success; two are parked (not polling): the campaign keeps running
    deployment.wait("open", lambda c: c["totals"]["succeeded"] == 3, early[:3])
    assert deployment.show("open")["state"] == "running"
    late = make_fleet(1, prefix="LATE")
    deployment.enrol(late, tags=["pilot", "extra"])  # registered, first manifest: joins
    record = deployment.wait("open", lambda c: c["totals"]["succeeded"] == 4, late)
    assert late[0].primary.installed.filepath == deployment.images["1.1.0"].filepath
    assert record["totals"]["joined"] == 6
    record = deployment.wait("open", lambda c: c["state"] == "completed", early)
    assert record["totals"]["succeeded"] == 6


def test_dependency_between_two_ecus_is_honoured(deployment: Deployment) -> None:
    srv = deployment.srv
    gw10 = srv.publish(sample(GATEWAY, "1.0.0"), GATEWAY, "1.0.0")
    gw11 = srv.publish(sample(GATEWAY, "1.1.0"), GATEWAY, "1.1.0",
                       requires={BMS: ">=1.1.0"})  # fmt: skip
    bms11 = deployment.images["1.1.0"]
    deployment.api("POST", "/api/v1/releases",
                   {"name": "pair", "images": {BMS: bms11.filepath, GATEWAY: gw11.filepath}})  # fmt: skip
    both = make_fleet(3, hardware=(GATEWAY, BMS), prefix="PAIR")
    gateway_only = make_fleet(1, hardware=(GATEWAY,), prefix="GWONLY")
    newer_bms = make_fleet(1, hardware=(GATEWAY, BMS), prefix="NEWER")
    for v in both + gateway_only + newer_bms:
        v.ecus[0].installed = ImageInfo.of(gw10.filepath, gw10.length, {"sha256": gw10.sha256})
    deployment.enrol(both + gateway_only, tags=["pair"])
    deployment.enrol(newer_bms, installed=deployment.images["2.0.0"], tags=["pair"])
    deployment.campaign("pair", release="pair", selection={"tags": ["pair"]},
                        phases=[{"percent": 100, "success_threshold": 0.5}])  # fmt: skip
    # the campaign completes once half succeed (the threshold); stragglers still count after
    record = deployment.wait(
        "pair",
        lambda c: c["state"] == "completed" and c["totals"]["in_progress"] == 0,
        both + gateway_only + newer_bms,
    )
    parts = {
        p["vin"]: p for p in deployment.api("GET", "/api/v1/campaigns/pair/vehicles")["vehicles"]
    }
    totals = record["totals"]
    assert totals["succeeded"] == 3 and totals["skipped"] == 2, json.dumps([totals, parts])
    assert "no " + BMS in parts[gateway_only[0].vin]["detail"]
    assert "rollback" in parts[newer_bms[0].vin]["detail"]
    for v in both:
        gateway, bms = v.ecus
        assert (gateway.installed.filepath, bms.installed.filepath) == (
            gw11.filepath,
            bms11.filepath,
        )
        # in order: the BMS the gateway requires was assigned first
        rows = deployment.api("GET", f"/api/v1/vehicles/{v.vin}/assignments")["assignments"]
        assert [r["ecu_serial"] for r in rows] == [bms.serial, gateway.serial]
    # the vehicle that would have rolled back kept its images: neither was assigned
    assert (
        deployment.api("GET", f"/api/v1/vehicles/{newer_bms[0].vin}/assignments")["assignments"]
        == []
    )


STATES = ["draft", "approved", "running", "paused", "completed", "aborted", "cancelled"]


def _campaign_in(shared: Deployment, state: str, name: str) -> list[SimVehicle]:
    """A campaign ``name`` brought to ``state``, over its own two vehicles (tag = name)."""
    fleet = make_fleet(2, prefix=name.upper().replace("-", ""))
    if state == "aborted":
        for v in fleet:
            v.behaviour = "fail"
    shared.enrol(fleet, tags=[name])
    shared.campaign(name, selection={"tags": [name]}, start=False,
                    phases=[{"percent": 100, "success_threshold": 1.0}])  # fmt: skip
    if state == "draft":
        return fleet
    shared.api("POST", f"/api/v1/campaigns/{name}/approve", {}, token=shared.approver)
    if state == "approved":
        return fleet
    if state == "cancelled":
        shared.api("POST", f"/api/v1/campaigns/{name}/cancel", {})
        return fleet
    shared.api("POST", f"/api/v1/campaigns/{name}/start", {})
    # the vehicles are offered the release (their parts exist) before anything else happens
    shared.wait(name, lambda c: c["totals"]["offered"] == 2, [])
    if state == "paused":
        shared.api("POST", f"/api/v1/campaigns/{name}/pause", {"reason": "hold on"})
    elif state in ("completed", "aborted"):
        shared.wait(name, lambda c: c["state"] == state, fleet)
    return fleet


@pytest.mark.parametrize("action", ["pause", "cancel"])
@pytest.mark.parametrize("state", STATES)
def test_pause_and_cancel_in_every_state(shared: Deployment, state: str, action: str) -> None:
    name = f"{action}-{state}"
    fleet = _campaign_in(shared, state, name)
    assert shared.show(name)["state"] == state
    final = state in ("completed", "aborted", "cancelled") or (
        action == "pause" and state == "paused"
    )
    try:
        record = shared.api("POST", f"/api/v1/campaigns/{name}/{action}", {"reason": "test"})
    except HttpError as exc:
        assert final, f"{action} of a {state} campaign was refused: {exc}"
        assert exc.status == 409 and f"cannot {action}" in str(exc)
        return
    assert not final
    if action == "pause":
        assert record["state"] == "paused" and record["paused_from"] == state
        resumed = shared.api("POST", f"/api/v1/campaigns/{name}/resume", {})
        assert resumed["state"] == state
        return
    assert record["state"] == "cancelled"
    if state in ("running", "paused"):
        # the offered images are withdrawn: director targets empty again, parts cancelled
        record = shared.wait(name, lambda c: not c["withdrawing"], [])
        assert record["totals"]["cancelled"] == 2
        for v in fleet:
            assert v.director_targets(shared.url) == {}
        rows = shared.api("GET", f"/api/v1/vehicles/{fleet[0].vin}/assignments")["assignments"]
        assert [r["status"] for r in rows] == ["cancelled"]
    # and nothing moves it any more
    assert shared.status("POST", f"/api/v1/campaigns/{name}/resume", shared.token) == 409


def test_campaign_requests_are_validated(shared: Deployment) -> None:
    bad = [
        {"name": "x", "release": "nope"},
        {"name": "x", "release": "bms-1.1", "phases": [{"percent": 10}]},
        {"name": "x", "release": "bms-1.1", "phases": [{"percent": 50}, {"percent": 20}, {"percent": 100}]},
        {"name": "x y", "release": "bms-1.1"},
        {"name": "x", "release": "bms-1.1", "maintenance_windows": [{"start": "25:00", "end": "01:00"}]},
        {"name": "x", "release": "bms-1.1", "selection": {"installed": {BMS: "about 1"}}},
        {"name": "x", "release": "bms-1.1", "selection": {"tags": ["../etc"]}},
    ]  # fmt: skip
    for body in bad:
        status = shared.status("POST", "/api/v1/campaigns", shared.token, body)
        assert status in (400, 404), (body, status)
    assert shared.status("POST", "/api/v1/releases", shared.token,
                         {"name": "r", "images": {GATEWAY: shared.images["1.1.0"].filepath}}) == 400  # fmt: skip
    assert shared.status("GET", "/api/v1/campaigns?state=flying", shared.token) == 400
    assert shared.status("GET", "/api/v1/campaigns/none-such", shared.token) == 404
    assert (
        shared.status("PUT", "/api/v1/vehicles/NOPE/attributes", shared.token, {"model": "x"})
        == 404
    )


def test_roles_hold_on_campaign_routes(shared: Deployment) -> None:
    viewer = shared.api("POST", "/api/v1/tokens", {"name": "watcher", "role": "viewer"})["token"]
    supplier = shared.api("POST", "/api/v1/tokens",
                          {"name": "acme", "role": "supplier", "hardware_ids": [BMS]})["token"]  # fmt: skip
    shared.campaign("roles", start=False)
    reads = ["/api/v1/campaigns", "/api/v1/campaigns/roles", "/api/v1/campaigns/roles/vehicles"]
    actions = [
        f"/api/v1/campaigns/roles/{a}" for a in ("approve", "start", "pause", "resume", "cancel")
    ]
    for path in reads:
        assert shared.status("GET", path, viewer) == 200
        assert shared.status("GET", path, supplier) == 403
    for path in [*actions, "/api/v1/campaigns"]:
        assert shared.status("POST", path, viewer) == 403
        assert shared.status("POST", path, supplier) == 403
    assert shared.status("POST", "/api/v1/releases", viewer) == 403
    assert shared.status("POST", "/api/v1/releases", supplier) == 403
    assert shared.status("GET", "/api/v1/releases", viewer) == 200
    fleet = make_fleet(1, prefix="ROLE")
    shared.enrol(fleet)
    path = f"/api/v1/vehicles/{fleet[0].vin}/attributes"
    assert shared.status("PUT", path, viewer, {"model": "x"}) == 403
    assert shared.status("PUT", path, supplier, {"model": "x"}) == 403
    assert shared.status("GET", path, viewer) == 200


def test_attributes_are_set_at_registration_and_by_the_api(shared: Deployment) -> None:
    v = make_fleet(1, prefix="ATTR")
    shared.enrol(v, model="roadster", year=2026, region="eu-west", tags=["pilot", "fleet-a"])
    record = shared.api("GET", f"/api/v1/vehicles/{v[0].vin}")
    assert record["attributes"] == {"model": "roadster", "year": 2026, "region": "eu-west",
                                    "tags": ["fleet-a", "pilot"]}  # fmt: skip
    changed = shared.api("PUT", f"/api/v1/vehicles/{v[0].vin}/attributes",
                         {"model": "van", "tags": ["x"]})  # fmt: skip
    assert changed == {"model": "van", "year": None, "region": "", "tags": ["x"]}
    assert shared.status("PUT", f"/api/v1/vehicles/{v[0].vin}/attributes", shared.token,
                         {"model": "a" * 65}) == 400  # fmt: skip
    assert shared.status("PUT", f"/api/v1/vehicles/{v[0].vin}/attributes", shared.token,
                         {"year": "2026"}) == 400  # fmt: skip


def test_maintenance_window_holds_offers(shared: Deployment) -> None:
    fleet = make_fleet(2, prefix="WINDOW")
    shared.enrol(fleet, tags=["window"])
    now = time.gmtime()
    closed_start = f"{(now.tm_hour + 2) % 24:02d}:00"
    closed_end = f"{(now.tm_hour + 3) % 24:02d}:00"
    shared.campaign("window", selection={"tags": ["window"]},
                    maintenance_windows=[{"start": closed_start, "end": closed_end}])  # fmt: skip
    record = shared.wait("window", lambda c: c["sweep"]["phase_covered"] >= 0, [])
    assert record["totals"]["joined"] == 2 and record["totals"]["offered"] == 0
    for v in fleet:
        assert v.director_targets(shared.url) == {}
    parts = shared.api("GET", "/api/v1/campaigns/window/vehicles?state=pending")["vehicles"]
    assert len(parts) == 2


def test_consent_mode_marks_targets_and_waits(shared: Deployment) -> None:
    fleet = make_fleet(1, prefix="CONSENT")
    fleet[0].behaviour = "postpone"
    shared.enrol(fleet, tags=["consent"])
    shared.campaign("consent", selection={"tags": ["consent"]}, install_on_consent=True)
    shared.wait("consent", lambda c: c["totals"]["offered"] == 1, [])
    targets = fleet[0].director_targets(shared.url)
    (entry,) = targets.values()
    assert entry["custom"].get("installOnConsent") is True
    fleet[0].cycle(shared.url)
    parts = shared.api("GET", "/api/v1/campaigns/consent/vehicles")["vehicles"]
    assert parts[0]["state"] == "awaiting_consent"
    fleet[0].behaviour = "install"
    fleet[0].primary.last_install = None
    record = shared.wait("consent", lambda c: c["state"] == "completed", fleet)
    assert record["totals"]["succeeded"] == 1


def _consent_campaign(server: ServerProcess, vehicle: Vehicle, name: str) -> Published:
    """A real agent's vehicle in a started install-on-consent campaign for a gateway image."""
    gateway = server.publish(sample(GATEWAY, "1.1.0"), GATEWAY, "1.1.0")

    def api(method: str, path: str, body: Any = None, token: str = server.admin.token) -> Any:
        return http(server.url, method, path, token, body)

    api("POST", "/api/v1/releases", {"name": name, "images": {GATEWAY: gateway.filepath}})
    api("PUT", f"/api/v1/vehicles/{vehicle.vin}/attributes", {"tags": [name]})
    assert vehicle.run_once().report["directed"] == []  # its first manifest: what it runs
    approver = api("POST", "/api/v1/tokens", {"name": "approver", "role": "release-engineer"})
    api("POST", "/api/v1/campaigns", {"name": name, "release": name, "install_on_consent": True,
                                      "phases": [{"percent": 100}],
                                      "selection": {"tags": [name]}})  # fmt: skip
    api("POST", f"/api/v1/campaigns/{name}/approve", {}, token=approver["token"])
    api("POST", f"/api/v1/campaigns/{name}/start", {})
    _await_campaign(server, name, lambda c: c["totals"]["offered"] == 1)
    return gateway


def _await_campaign(
    server: ServerProcess, name: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        record: dict[str, Any] = http(
            server.url, "GET", f"/api/v1/campaigns/{name}", server.admin.token
        )
        if done(record):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.3)


def _consent_precondition(vehicle: Vehicle, consent_file: Path) -> None:
    with open(vehicle.config_path, "a") as f:
        f.write(
            '\n[[preconditions]]\nname = "consent"\n'
            f'command = ["sh", "-c", "test -e {consent_file} || {{ echo \'driver not asked yet\'; exit 1; }}"]\n'
        )


def test_agent_downloads_now_and_installs_on_consent_without_the_network(
    server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    consent = tmp_path / "driver-said-yes"
    _consent_precondition(vehicle, consent)
    gateway = _consent_campaign(server, vehicle, "consent-agent")
    downloads = vehicle.state_dir / "downloads"

    report = vehicle.run_once().report
    assert report["waiting"] == "consent: driver not asked yet"
    outcome = report["outcomes"][vehicle.primary]
    assert outcome["result"] == "postponed"
    assert "downloaded and verified" in outcome["detail"], outcome
    held = downloads / gateway.sha256
    assert held.read_bytes() == sample(GATEWAY, "1.1.0").read_bytes()  # downloaded now...
    assert not (vehicle.state_dir / "slots" / "b.img").exists()  # ...but nothing installed
    parts = http(server.url, "GET", "/api/v1/campaigns/consent-agent/vehicles", server.admin.token)
    assert parts["vehicles"][0]["state"] == "awaiting_consent"

    # consent comes where the image repository cannot be reached: the install needs no download
    stored = [
        p for p in (server.data_dir / "image-repo").rglob(f"*{gateway.sha256}*") if p.is_file()
    ]
    assert stored
    for path in stored:
        path.unlink()
    consent.touch()
    report = vehicle.run_once().report
    assert report["waiting"] == ""
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
    assert not held.exists()  # installed, so no longer kept
    record = _await_campaign(server, "consent-agent", lambda c: c["state"] == "completed")
    assert record["totals"]["succeeded"] == 1


def test_an_image_downloaded_ahead_is_deleted_when_its_campaign_is_cancelled(
    server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    _consent_precondition(vehicle, tmp_path / "never")
    gateway = _consent_campaign(server, vehicle, "consent-cancelled")
    vehicle.run_once()
    held = vehicle.state_dir / "downloads" / gateway.sha256
    assert held.exists()
    http(server.url, "POST", "/api/v1/campaigns/consent-cancelled/cancel", server.admin.token, {})
    report = vehicle.run_once().report
    assert report["directed"] == [] and report["waiting"] == ""
    assert not held.exists()  # the vehicle's storage is not held for a withdrawn image


def _uptake(shared: Deployment, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UPTAKE_TOKEN": token, "UPTAKE_SERVER": shared.url}
    return subprocess.run(
        [sys.executable, "-m", "uptake", *args], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_cli_runs_a_campaign(shared: Deployment) -> None:
    fleet = make_fleet(2, prefix="CLI")
    shared.enrol(fleet, tags=["cli"])
    image = shared.images["1.1.0"].filepath
    made = _uptake(
        shared, shared.token, "release", "create", "cli-rel", "--image", f"{BMS}={image}", "--json"
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["images"][0]["version"] == "1.1.0"
    listed = _uptake(shared, shared.token, "release", "list", "--json")
    assert "cli-rel" in {r["name"] for r in json.loads(listed.stdout)}
    created = _uptake(shared, shared.token, "campaign", "create", "cli", "--release", "cli-rel",
                      "--phase", "50:0.5:0.5", "--phase", "100", "--tag", "cli", "--json")  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"] == "draft"
    refused = _uptake(shared, shared.token, "campaign", "approve", "cli")
    assert refused.returncode == 1 and "four eyes" in refused.stderr
    assert _uptake(shared, shared.approver, "campaign", "approve", "cli").returncode == 0
    started = _uptake(shared, shared.token, "campaign", "start", "cli")
    assert started.returncode == 0 and "running" in started.stdout
    record = shared.wait("cli", lambda c: c["state"] == "completed", fleet)
    assert record["totals"]["succeeded"] == 2
    shown = _uptake(shared, shared.token, "campaign", "show", "cli", "--watch", "--interval", "0.2")
    assert shown.returncode == 0 and "phase 2 (100%)" in shown.stdout and "2/" in shown.stdout
    rows = json.loads(
        _uptake(shared, shared.token, "campaign", "list", "--state", "completed", "--json").stdout
    )
    assert "cli" in {c["name"] for c in rows}
    again = _uptake(shared, shared.token, "campaign", "pause", "cli")
    assert again.returncode == 1 and "completed is final" in again.stderr
