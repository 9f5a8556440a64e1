"""Every query of a vehicle's poll and manifest, EXPLAINed on PostgreSQL with a large fleet.

    .venv/bin/python bench/fleet_database.py [--vehicles 100000]

Makes a scratch database on 127.0.0.1:5432 (dropped at the end), a real
deployment on it (``init_server``), fills it with N vehicles (2 ECUs, an
installed assignment, director targets/snapshot/timestamp each, a security
event for every tenth), then registers one more vehicle through the real
code and runs, through the real code, what the server does for it: an idle
poll of ``timestamp.json`` (first and cached), ``N.snapshot.json`` and
``N.targets.json``, and a signed manifest. Every SQL statement those run is
captured and EXPLAIN ANALYZEd with its parameters; the script prints each
plan's access paths and time, and fails if any reads a whole table (a
``Seq Scan`` on a table of the fleet), which would make a poll cost grow with
the fleet.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.pool import NullPool
from sqlmodel import Session

from server.config import ServerConfig
from server.fleet import EcuRegistration, RejectionLimiter, process_manifest, register_vehicle
from server.service import init_server, open_server
from signing.keys import generate_signer, public_key_to_dict
from signing.manifest import EcuVersionReport, FileInfo, ImageInfo, VehicleManifest

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PASSWORD = b"bench-password"
FLEET_TABLES = {"vehicle", "ecu", "assignment", "directormetadata", "securityevent"}


def _fill(url: str, vehicles: int) -> float:
    started = time.perf_counter()
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO vehicle (vin, primary_ecu_serial, registered_at, manifests_accepted,"
                " manifests_rejected, last_rejection, director_targets_version)"
                " SELECT 'FLEET' || lpad(n::text, 9, '0'), 'GW-' || n, now(), 1, 0, '', 1"
                " FROM generate_series(1, :n) n"
            ),
            {"n": vehicles},
        )
        for prefix, hardware, primary in (("GW-", "rpi-gateway", True), ("BMS-", "bms", False)):
            conn.execute(
                text(
                    "INSERT INTO ecu (serial, vin, hardware_id, public_key, is_primary,"
                    " installed_filepath, installed_length, installed_sha256, report_counter,"
                    " report_counter_state, attacks_detected, last_install_filepath,"
                    " last_install_result, last_install_detail, last_install_method, updated_at)"
                    " SELECT :prefix || n, 'FLEET' || lpad(n::text, 9, '0'), :hw, '{}', :primary,"
                    " 'img/1.0.0', 1000, repeat('a', 64), 5, 'bounded', '', '', '', '', '', now()"
                    " FROM generate_series(1, :n) n"
                ),
                {"prefix": prefix, "hw": hardware, "primary": primary, "n": vehicles},
            )
        conn.execute(
            text(
                "INSERT INTO assignment (vin, ecu_serial, filepath, status, detail, created_at,"
                " updated_at) SELECT 'FLEET' || lpad(n::text, 9, '0'), 'GW-' || n, 'img/1.0.0',"
                " 'installed', '', now(), now() FROM generate_series(1, :n) n"
            ),
            {"n": vehicles},
        )
        for role in ("targets", "snapshot", "timestamp"):
            conn.execute(
                text(
                    "INSERT INTO directormetadata (vin, role, version, content, expires)"
                    " SELECT 'FLEET' || lpad(n::text, 9, '0'), :role, 1,"
                    " convert_to(repeat('x', 600), 'UTF8'), now() + interval '1 day'"
                    " FROM generate_series(1, :n) n"
                ),
                {"role": role, "n": vehicles},
            )
        conn.execute(
            text(
                "INSERT INTO securityevent (vin, ecu_serial, kind, reason, detail, count,"
                " first_at, last_at) SELECT 'FLEET' || lpad(n::text, 9, '0'), '',"
                " 'manifest_rejected', 'malformed', 'bench', 1, now(), now()"
                " FROM generate_series(1, :n, 10) n"
            ),
            {"n": vehicles},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


class Captured:
    """The SQL statements (with parameters) an engine runs while ``on``."""

    def __init__(self, engine: Any) -> None:
        self.on = False
        self.statements: list[tuple[str, str, Any]] = []
        self.label = ""

        @event.listens_for(engine, "before_cursor_execute")
        def _capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if self.on and statement.lstrip().upper().startswith(
                ("SELECT", "UPDATE", "INSERT", "DELETE")
            ):
                self.statements.append((self.label, statement, params))


def _explain(url: str, statements: list[tuple[str, str, Any]]) -> list[str]:
    """Print each statement's plan; return those that scan a whole fleet table."""
    engine = create_engine(url, poolclass=NullPool)
    bad = []
    seen = set()
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        for label, statement, params in statements:
            key = (label, statement)
            if key in seen:
                continue
            seen.add(key)
            cursor = raw.cursor()
            cursor.execute("BEGIN")
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) " + statement, params)
            plan = [row[0] for row in cursor.fetchall()]
            cursor.execute("ROLLBACK")
            paths = [
                line.strip().lstrip("-> ").split("  (")[0]
                for line in plan
                if re.search(r"Scan|Insert|Update|Delete|Result", line)
            ]
            took = next((line for line in plan if line.startswith("Execution Time")), "")
            short = " ".join(statement.split())[:110]
            print(f"[{label}] {short}\n    {'; '.join(paths)}  ({took})")
            for line in plan:
                match = re.search(r"Seq Scan on (\w+)", line)
                if match and match.group(1) in FLEET_TABLES:
                    bad.append(f"[{label}] {short}: {line.strip()}")
    engine.dispose()
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=100_000)
    args = parser.parse_args()
    name = f"uptake_bench_{secrets.token_hex(6)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = ServerConfig(Path(tmp) / "server", database_url=url, plain_http=True)
            config.vehicle_identity = "none"
            init_server(config, Path(tmp) / "offline", PASSWORD, PASSWORD)
            filled = _fill(url, args.vehicles)
            print(f"filled {args.vehicles} vehicles in {filled:.1f} s")
            components = open_server(config, PASSWORD)
            captured = Captured(components.engine)
            director = components.director
            primary, secondary = generate_signer("ed25519"), generate_signer("ed25519")
            vin = "BENCHVIN0001"
            with Session(components.engine) as session:
                register_vehicle(
                    session, director, vin, "GW-BENCH",
                    [EcuRegistration("GW-BENCH", "rpi-gateway", public_key_to_dict(primary.public_key), True),
                     EcuRegistration("BMS-BENCH", "bms", public_key_to_dict(secondary.public_key))],
                )  # fmt: skip
                session.commit()
            captured.on = True
            for label, filename in (
                ("poll", "timestamp.json"),
                ("poll cached", "timestamp.json"),
                ("poll", "1.snapshot.json"),
                ("poll", "1.targets.json"),
            ):
                captured.label = label
                with Session(components.engine) as session:
                    assert director.metadata(session, vin, filename) is not None
            captured.label = "manifest"
            nothing = ImageInfo("", FileInfo(0, {}))
            reports = {
                serial: EcuVersionReport(serial, nothing, 1).sign(signer)
                for serial, signer in (("GW-BENCH", primary), ("BMS-BENCH", secondary))
            }
            body = VehicleManifest(vin, "GW-BENCH", reports).sign(primary).to_bytes()
            with Session(components.engine) as session:
                process_manifest(session, director, vin, body, RejectionLimiter())
                session.commit()
            captured.on = False
            components.engine.dispose()
            print(f"{len(captured.statements)} statements; plans with {args.vehicles} vehicles:")
            bad = _explain(url, captured.statements)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    if bad:
        print("whole-table scans on the hot path:\n  " + "\n  ".join(bad))
        return 1
    print("every poll and manifest statement reads by index: cost independent of fleet size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
