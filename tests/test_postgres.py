"""The same update cycle with the fleet database on PostgreSQL (127.0.0.1:5432, database per test)."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.uptake_fixtures import ServerProcess, Vehicle, sample

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


@pytest.fixture
def pg_url() -> Iterator[str]:
    try:
        conn = psycopg.connect(ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {exc}")
    name = f"uptake_{secrets.token_hex(6)}"
    conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def test_update_cycle_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    server = ServerProcess(tmp_path, database_url=pg_url)
    try:
        vehicle = Vehicle(tmp_path, server)
        gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        server.assign(vehicle.vin, vehicle.primary, gw.filepath)
        report = vehicle.run_once().report
        assert report["outcomes"][vehicle.primary]["result"] == "installed"
        record = server.vehicle(vehicle.vin)
        assert (
            next(e for e in record["ecus"] if e["serial"] == vehicle.primary)["installed"][
                "filepath"
            ]
            == gw.filepath
        )
        assert record["assignments"][0]["status"] == "installed"
        # a restart keeps everything (the state is in PostgreSQL, not in the process)
        server.stop()
        server.start()
        assert server.vehicle(vehicle.vin)["manifests_accepted"] == record["manifests_accepted"]
        assert vehicle.run_once().report["directed"] == []
    finally:
        server.stop()


def test_idle_polls_survive_the_database_dropping_every_connection(
    tmp_path: Path, pg_url: str
) -> None:
    # Idle polls read the newest timestamp version on connections of their own
    # (server.timestamp_versions); when the database drops them, a poll must still be
    # answered (through the ORM's pool) and the next ones reconnect.
    server = ServerProcess(tmp_path, database_url=pg_url)
    try:
        vehicle = Vehicle(tmp_path, server)
        gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        server.assign(vehicle.vin, vehicle.primary, gw.filepath)
        assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
        assert vehicle.run_once().report["directed"] == []  # idle: served from the cache
        database = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()
        assert dropped is not None and dropped[0] > 0
        # the first polls after the drop, each on a connection of its own (an agent would
        # retry a 5xx and hide it)
        poll = f"{server.url}/director/{vehicle.vin}/metadata/timestamp.json"
        for _ in range(3):
            with urllib.request.urlopen(poll, timeout=10) as answer:
                assert answer.status == 200 and json.loads(answer.read())["signed"]["version"] >= 1
        assert vehicle.run_once().report["directed"] == []
        # and a new assignment is still seen at once (the version is read, not assumed)
        v2 = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")
        server.assign(vehicle.vin, vehicle.primary, v2.filepath)
        assert v2.filepath in vehicle.run_once().report["outcomes"][vehicle.primary]["filepath"]
    finally:
        server.stop()
