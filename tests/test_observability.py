"""Observability of a real server: /metrics moves with a vehicle's update, probes, access log.

A real ``uptake server run`` serves a real agent's update; then ``/metrics`` (with a
viewer-level token) must show the polls, the accepted manifest, the install it reported,
signing and database timings, and the request counts under route templates. ``/readyz``
answers 503 with the reason once the PostgreSQL database is gone. Every request leaves one
JSON line in the access log with the route template, never a token.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from tests.uptake_fixtures import ServerProcess, Vehicle, sample

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def scrape(server: ServerProcess) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} (the Prometheus text format, one sample a line)."""
    http = urllib3.PoolManager(retries=False, timeout=10.0)
    token = server.config.admin_token_path.read_text().strip()
    answer = http.request(
        "GET", f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status == 200, answer.data
    assert answer.headers["Content-Type"].startswith("text/plain")
    text = answer.data.decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_move_with_a_vehicle_update(server: ServerProcess, vehicle: Vehicle) -> None:
    http = urllib3.PoolManager(retries=False, timeout=10.0)
    assert http.request("GET", f"{server.url}/metrics").status == 401  # operators' information
    before = scrape(server)
    image = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, image.filepath)
    run = vehicle.run_once()
    assert run.report["outcomes"][vehicle.primary]["result"] == "installed", run.report
    vehicle.run_once()  # reports the install
    after = scrape(server)

    def moved(sample_name: str) -> float:
        return after.get(sample_name, 0.0) - before.get(sample_name, 0.0)

    assert moved('uptake_director_polls_total{role="timestamp"}') >= 2
    assert moved('uptake_director_polls_total{role="targets"}') >= 1
    assert moved('uptake_manifests_total{outcome="accepted"}') >= 1
    assert moved('uptake_installs_total{result="installed"}') == 1
    signed = sum(v for k, v in after.items() if k.startswith("uptake_signing_seconds_count{"))
    assert signed > sum(
        v for k, v in before.items() if k.startswith("uptake_signing_seconds_count{")
    )
    assert moved("uptake_database_statement_seconds_count") > 0
    poll = (
        'uptake_http_requests_total{method="GET",route="/director/{vin}/metadata/{file}",'
        'status="200"}'
    )
    assert moved(poll) >= 2
    # labels are templates: no VIN or file name ever becomes a label
    assert not any(vehicle.vin in name for name in after)
    assert after["uptake_attacks_reported_total"] == 0


def test_health_and_readiness(shared_server: ServerProcess) -> None:
    http = urllib3.PoolManager(retries=False, timeout=10.0)
    for path in ("/healthz", "/health"):
        answer = http.request("GET", shared_server.url + path)
        assert answer.status == 200 and json.loads(answer.data) == {"status": "ok"}
    answer = http.request("GET", shared_server.url + "/readyz")
    assert answer.status == 200 and json.loads(answer.data) == {"status": "ready"}


def test_one_json_access_line_per_request(shared_server: ServerProcess) -> None:
    http = urllib3.PoolManager(retries=False, timeout=10.0)
    marker = secrets.token_hex(4)
    token = shared_server.config.admin_token_path.read_text().strip()
    http.request("GET", f"{shared_server.url}/image/metadata/{marker}.root.json")
    http.request(
        "GET", f"{shared_server.url}/api/v1/images", headers={"Authorization": f"Bearer {token}"}
    )
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=5) as conn:
        conn.sendall(b"NOT-HTTP\x00\x01\r\n\r\n")  # refused by aiohttp before routing
        conn.recv(1024)
    http.request("GET", f"{shared_server.url}/no/such/{marker}")
    # written once each response is sent: wait for the last one
    deadline = time.monotonic() + 10
    while '"route":"unmatched"' not in shared_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = shared_server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    assert lines, log[-2000:]
    for entry in lines:
        assert set(entry) >= {"time", "method", "route", "status", "ms", "bytes", "client"}
    metadata = [e for e in lines if e["route"] == "/image/metadata/{file}" and e["status"] == 404]
    assert metadata and metadata[-1]["client"] == "anonymous" and metadata[-1]["bytes"] > 0
    listing = [e for e in lines if e["route"] == "/api/v1/images" and e["status"] == 200]
    assert listing and listing[-1]["client"] == "operator" and listing[-1]["operator"] == "admin"
    assert any(e["route"] == "unmatched" and e["status"] == 404 for e in lines)
    assert any(e["route"] == "malformed" and e["status"] == 400 for e in lines)
    assert "Traceback" not in log
    # never the token, never the concrete path a client chose
    assert token not in log
    assert marker not in "".join(line for line in log.splitlines() if line.startswith('{"time"'))
    assert re.search(r'"ms":\d+(\.\d+)?', log)


@pytest.fixture
def pg_url() -> Iterator[tuple[str, str]]:
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    name = f"edge_ready_{secrets.token_hex(4)}"
    conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.mark.postgres
def test_not_ready_once_the_database_is_gone(tmp_path: Path, pg_url: tuple[str, str]) -> None:
    import psycopg

    url, name = pg_url
    server = ServerProcess(tmp_path, database_url=url)
    try:
        http = urllib3.PoolManager(retries=False, timeout=15.0)
        assert http.request("GET", server.url + "/readyz").status == 200
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
        answer = http.request("GET", server.url + "/readyz")
        assert answer.status == 503, answer.data
        body = json.loads(answer.data)
        assert body["status"] == "unready"
        assert body["reasons"][0].startswith("database: "), body
        # alive all the same: a liveness probe must not restart it for this
        assert http.request("GET", server.url + "/healthz").status == 200
    finally:
        server.stop()
