"""Dashboard render benchmark: the fleet overview and a campaign page at 100,000 vehicles.

Bulk-inserts a fleet into a fresh SQLite file and a fresh PostgreSQL database
(127.0.0.1:5432; skipped if unreachable): vehicles with two ECUs each (80 %
seen within 24 h), models and regions, attacks reported by 1 %, two named
releases, and one running campaign in three phases that reached every
vehicle (a part per vehicle, 60 % succeeded, 2 % failed, spread over two
hours) with an assignment each, and an audit log of a record per vehicle. Then renders, as the server does for a
request (the same queries and templates, :mod:`server.dashboard.routes`),
each page several times and prints the median and the slowest, in
milliseconds. Goal: under 300 ms for the fleet overview and the campaign
page. Figures depend on the machine.

    .venv/bin/python bench/dashboard_render.py [--vehicles 100000] [--repeat 5] [--no-postgres]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel

from server import audit
from server.audit import record_hash
from server.campaign_tables import (
    Campaign,
    CampaignPhase,
    CampaignVehicle,
    Release,
    VehicleAttributes,
)
from server.dashboard import queries
from server.dashboard.render import render_text
from server.dashboard.routes import campaign_view, fleet_view, vehicle_view
from server.db import (
    Assignment,
    AuditHead,
    AuditRecord,
    Ecu,
    SecurityEvent,
    Vehicle,
    make_engine,
    utcnow,
)

BMS_OLD, BMS_NEW, GATEWAY = (
    "stm32f4-bms/1.0.0/bms.bin", "stm32f4-bms/1.1.0/bms.bin", "rpi-gateway/2.0.0/gw.bin",
)  # fmt: skip
MODELS = ("roadster", "van", "truck", "city")
CAMPAIGN = "fleet-rollout"
_CHUNK = 10_000


def _table(model: type[SQLModel]) -> Any:
    return model.__table__  # type: ignore[attr-defined]


def _insert(engine: Engine, model: type[SQLModel], rows: Iterator[dict[str, Any]]) -> int:
    count, batch = 0, []
    with engine.begin() as conn:
        for row in rows:
            batch.append(row)
            if len(batch) == _CHUNK:
                conn.execute(insert(_table(model)), batch)
                count, batch = count + len(batch), []
        if batch:
            conn.execute(insert(_table(model)), batch)
            count += len(batch)
    return count


def populate(engine: Engine, n: int) -> None:
    now = utcnow()
    vins = [f"V{i:07d}" for i in range(n)]

    def last_seen(i: int) -> Any:
        if i % 20 == 0:
            return None
        return now - (timedelta(days=3) if i % 20 < 4 else timedelta(minutes=i % 600))

    _insert(engine, Vehicle, ({
        "vin": v, "primary_ecu_serial": f"{v}-bms", "registered_at": now - timedelta(days=30),
        "last_manifest_at": last_seen(i), "manifests_accepted": i % 50, "manifests_rejected": 0,
        "last_rejection": "", "director_targets_version": 2,
        "revoked_at": now if i % 1000 == 7 else None,
    } for i, v in enumerate(vins)))  # fmt: skip
    ecu_common = {"public_key": "{}", "report_counter": 10, "report_counter_state": "bounded",
                  "attacks_detected": "", "last_install_filepath": "", "last_install_result": "",
                  "last_install_detail": "", "last_install_method": "", "updated_at": now,
                  "installed_length": 1, "installed_sha256": "0" * 64}  # fmt: skip
    _insert(engine, Ecu, ({
        **ecu_common, "serial": f"{v}-bms", "vin": v, "hardware_id": "stm32f4-bms",
        "is_primary": True, "installed_filepath": BMS_NEW if i % 10 < 6 else BMS_OLD,
    } for i, v in enumerate(vins)))  # fmt: skip
    _insert(engine, Ecu, ({
        **ecu_common, "serial": f"{v}-gw", "vin": v, "hardware_id": "rpi-gateway",
        "is_primary": False, "installed_filepath": GATEWAY,
    } for v in vins))  # fmt: skip
    _insert(engine, VehicleAttributes, ({
        "vin": v, "model": MODELS[i % len(MODELS)], "year": 2020 + i % 6,
        "region": "eu" if i % 3 else "us", "tags": "[]", "updated_at": now,
    } for i, v in enumerate(vins)))  # fmt: skip
    _insert(engine, SecurityEvent, ({
        "vin": v, "ecu_serial": f"{v}-bms", "kind": "attack_reported", "reason": "",
        "detail": "targets metadata signed by an unknown key", "count": 1, "first_at": now,
        "last_at": now - timedelta(minutes=i % 300),
    } for i, v in enumerate(vins) if i % 100 == 3))  # fmt: skip
    _insert(engine, Release, iter([
        {"name": "bms-1.0", "images": f'{{"stm32f4-bms": "{BMS_OLD}"}}', "description": "",
         "created_by": "operator:admin", "created_at": now - timedelta(days=10)},
        {"name": "bms-1.1", "images": f'{{"rpi-gateway": "{GATEWAY}", "stm32f4-bms": "{BMS_NEW}"}}',
         "description": "", "created_by": "operator:admin", "created_at": now - timedelta(days=1)},
    ]))  # fmt: skip
    with Session(engine) as session:
        campaign = Campaign(
            name=CAMPAIGN, release="bms-1.1", state="running", created_by="operator:admin",
            approved_by="operator:approver", started_at=now - timedelta(hours=2), current_phase=2,
        )  # fmt: skip
        session.add(campaign)
        session.commit()
        campaign_id = campaign.id
    assert campaign_id is not None

    def part_state(i: int) -> str:
        return "succeeded" if i % 100 < 60 else ("failed" if i % 100 < 62 else "offered")

    _insert(engine, CampaignVehicle, ({
        "campaign_id": campaign_id, "vin": v, "phase": 0 if i % 100 == 0 else (1 if i % 10 == 1 else 2),
        "state": part_state(i), "assignments": f"[{i + 1}]",
        "detail": "flash failed" if part_state(i) == "failed" else "",
        "created_at": now - timedelta(hours=2), "updated_at": now - timedelta(seconds=i % 7200),
    } for i, v in enumerate(vins)))  # fmt: skip
    _insert(engine, Assignment, ({
        "vin": v, "ecu_serial": f"{v}-bms", "filepath": BMS_NEW,
        "status": {"succeeded": "installed", "failed": "failed"}.get(part_state(i), "pending"),
        "detail": "", "created_at": now, "updated_at": now,
    } for i, v in enumerate(vins)))  # fmt: skip

    # the audit log of that fleet: a registration per vehicle, chained as server.audit chains them
    def records() -> Iterator[dict[str, Any]]:
        prev = "0" * 64
        for seq, v in enumerate(vins, start=1):
            detail = '{"ecus":{"' + v + '-bms":"stm32f4-bms"}}'
            digest = record_hash(seq, now, "operator:admin", "vehicle.register", v, detail, prev)
            yield {"seq": seq, "at": now, "actor": "operator:admin", "action": "vehicle.register",
                   "subject": v, "detail": detail, "prev_hash": prev, "hash": digest}  # fmt: skip
            prev = digest
        head["hash"] = prev

    head = {"id": 1, "seq": n, "hash": ""}
    _insert(engine, AuditRecord, records())
    _insert(engine, AuditHead, iter([head]))
    phases = [(0, 1.0), (1, 10.0), (2, 100.0)]
    share = {0: 0.01, 1: 0.09, 2: 0.9}
    _insert(engine, CampaignPhase, ({
        "campaign_id": campaign_id, "index": index, "percent": percent, "success_threshold": 0.9,
        "failure_threshold": 0.1, "on_failure": "abort", "min_finished": 1,
        "joined": int(n * share[index]), "offered": int(n * share[index]),
        "succeeded": int(n * share[index] * 0.6), "failed": int(n * share[index] * 0.02),
        "skipped": 0, "cancelled": 0, "started_at": now - timedelta(hours=2),
    } for index, percent in phases))  # fmt: skip


def _timed(fn: Callable[[], str], repeat: int) -> tuple[float, float, int]:
    fn()  # warm: templates compiled, connection pooled, caches filled as after the first request
    times = []
    size = 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = len(fn())
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times), size


def pages(engine: Engine, n: int) -> dict[str, Callable[[], str]]:
    cache = queries.FleetSummaryCache()

    def fleet() -> str:
        with Session(engine) as s:
            return render_text(None, "fleet.html", **fleet_view(queries.fleet_summary(s)))

    def fleet_cached() -> str:
        return render_text(None, "fleet.html", **fleet_view(cache.get(engine)))

    def campaign() -> str:
        with Session(engine) as s:
            return render_text(None, "campaign.html", **campaign_view(s, CAMPAIGN, None))

    def vehicles() -> str:
        with Session(engine) as s:
            rows, last = queries.vehicles_page(
                s, show=queries.VehicleFilter.FAILED, after=f"V{n // 2:07d}"
            )
        return render_text(None, "vehicles.html", rows=rows, show="failed", image=None,
                           more=last, choices=queries.VehicleFilter.CHOICES)  # fmt: skip

    def vehicle() -> str:
        with Session(engine) as s:
            return render_text(None, "vehicle.html", **vehicle_view(s, f"V{n // 2 + 2:07d}"))

    verification = queries.AuditVerificationCache()

    def audit_page(verify: bool) -> str:
        with Session(engine) as s:
            rows, last = queries.audit_page(s)
            result = audit.verify(s) if verify else verification.get(engine)
        return render_text(None, "audit.html", rows=rows, more=last, verification=result,
                           verified_at=verification.computed_at)  # fmt: skip

    return {"fleet overview (counted)": fleet, "fleet overview (10-s cache)": fleet_cached,
            "campaign page": campaign,
            "vehicles (failed, page 2)": vehicles, "vehicle page": vehicle,
            "audit log (chain verified)": lambda: audit_page(True),
            "audit log (shared verification)": lambda: audit_page(False)}  # fmt: skip


@contextmanager
def postgres_database() -> Iterator[str | None]:
    try:
        import psycopg

        admin = psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3", autocommit=True
        )
    except Exception as exc:
        print(f"PostgreSQL: skipped ({exc})")
        yield None
        return
    name = f"dashboard_bench_{secrets.token_hex(4)}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def run(label: str, url: str, n: int, repeat: int) -> None:
    engine = make_engine(url)
    start = time.perf_counter()
    populate(engine, n)
    if engine.dialect.name == "postgresql":
        # as autovacuum leaves a settled database: statistics, and the visibility map that lets
        # counts read only the indexes
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    print(f"\n{label}: {n:,} vehicles, {2 * n:,} ECUs, {n:,} campaign parts, assignments and audit records "
          f"inserted in {time.perf_counter() - start:.1f} s")  # fmt: skip
    print(f"{'page':28} {'median ms':>10} {'max ms':>8} {'HTML KiB':>9}  goal < 300 ms")
    for name, fn in pages(engine, n).items():
        median, slowest, size = _timed(fn, repeat)
        verdict = "ok" if median < 300 else "OVER"
        print(f"{name:28} {median:10.1f} {slowest:8.1f} {size / 1024:9.1f}  {verdict}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vehicles", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run("SQLite", f"sqlite:///{tmp}/fleet.db", args.vehicles, args.repeat)
    if not args.no_postgres:
        with postgres_database() as url:
            if url is not None:
                run("PostgreSQL", url, args.vehicles, args.repeat)


if __name__ == "__main__":
    main()
