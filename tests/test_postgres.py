"""The same update cycle with the fleet database on PostgreSQL (127.0.0.1:5432, database per test)."""

from __future__ import annotations

import secrets
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
