"""Cost of the fleet's lists and of a ledger export, against the fleet's size.

Fills a fresh fleet database (SQLite in a temporary directory, or the
PostgreSQL URL given) with N vehicles of two ECUs each (a gateway and a BMS),
one in ten running a newer gateway image, one in a hundred reporting an
attack, and three ledger entries per vehicle; then times, through the same
functions the API handlers call (:mod:`server.inventory`,
:mod:`server.ledger`):

* the first page (100) of ``GET /api/v1/vehicles`` unfiltered and with each
  filter, and the last page reached by cursor;
* an export of one release (every ledger entry of the newer image) read
  batch by batch as the streaming route does, with its peak Python memory
  (tracemalloc), against a baseline of one batch.

    .venv/bin/python bench/fleet_lists.py [--vehicles 100000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, text
from sqlmodel import Session

from server.db import Ecu, LedgerEntry, StoredManifest, Vehicle, make_engine
from server.inventory import VehicleFilter, vehicles_page
from server.ledger import export_batch

OLD, NEW = "rpi-gateway/1.0.0/gateway.elf", "rpi-gateway/1.1.0/gateway.elf"


def _fill(session: Session, count: int) -> None:
    now = datetime.now(UTC)
    chunk = 5000
    for start in range(0, count, chunk):
        vins = [f"VIN{i:09d}" for i in range(start, min(count, start + chunk))]
        vehicles, ecus, manifests, entries = [], [], [], []
        for i, vin in zip(range(start, start + len(vins)), vins, strict=True):
            seen = now - timedelta(days=i % 60)
            vehicles.append({"vin": vin, "primary_ecu_serial": f"GW-{vin}", "registered_at": now,
                             "last_manifest_at": seen, "manifests_accepted": 1})  # fmt: skip
            image = NEW if i % 10 == 0 else OLD
            attacks = "replayed timestamp" if i % 100 == 0 else ""
            ecus.append({"serial": f"GW-{vin}", "vin": vin, "hardware_id": "rpi-gateway",
                         "public_key": "{}", "is_primary": True, "installed_filepath": image,
                         "attacks_detected": attacks, "updated_at": now})  # fmt: skip
            ecus.append({"serial": f"BMS-{vin}", "vin": vin, "hardware_id": "stm32f4-bms",
                         "public_key": "{}", "updated_at": now})  # fmt: skip
            manifests.append({"id": i + 1, "vin": vin, "received_at": seen, "sha256": "0" * 64,
                              "length": 2000, "content_stored": True, "content": b"{}"})  # fmt: skip
            for change in ("installed", "install_result", "attack" if attacks else "installed"):
                entries.append({"vin": vin, "ecu_serial": f"GW-{vin}", "hardware_id": "rpi-gateway",
                                "at": seen, "change": change, "filepath": image,
                                "version": image.split("/")[1], "manifest_id": i + 1})  # fmt: skip
        session.execute(insert(Vehicle), vehicles)
        session.execute(insert(Ecu), ecus)
        session.execute(insert(StoredManifest), manifests)
        session.execute(insert(LedgerEntry), entries)
        session.commit()


def _ms(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vehicles", type=int, default=100_000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/fleet.db"
        engine = make_engine(url)
        started = time.perf_counter()
        with Session(engine) as session:
            _fill(session, args.vehicles)
        # the planner's statistics, as autovacuum (PostgreSQL) or a long-running server has them
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
        print(f"{args.vehicles} vehicles, {2 * args.vehicles} ECUs, {3 * args.vehicles} ledger "
              f"entries on {engine.dialect.name}: filled in {time.perf_counter() - started:.1f} s")  # fmt: skip
        month_ago = datetime.now(UTC) - timedelta(days=30)
        filters = {
            "unfiltered": VehicleFilter(),
            "hardware_id=stm32f4-bms": VehicleFilter(hardware_id="stm32f4-bms"),
            f"image={NEW} (1 in 10)": VehicleFilter(image=NEW),
            "has_attacks=true (1 in 100)": VehicleFilter(has_attacks=True),
            "not_seen_since=30 days ago": VehicleFilter(not_seen_since=month_ago),
            "revoked=true (none)": VehicleFilter(revoked=True),
        }
        with Session(engine) as session:
            for name, where in filters.items():
                ms = _ms(partial(vehicles_page, session, where, after=None, limit=100))
                print(f"  GET /api/v1/vehicles first page, {name:40} {ms:8.1f} ms")
            last_vin = f"VIN{args.vehicles - 50:09d}"
            ms = _ms(lambda: vehicles_page(session, VehicleFilter(), after=last_vin, limit=100))
            print(f"  GET /api/v1/vehicles page at the end (cursor)                   {ms:8.1f} ms")

            def export(version: str) -> int:
                rows, after = 0, 0
                while batch := export_batch(session, version=version, after=after):
                    rows, after = rows + len(batch), batch[-1]["id"]
                return rows

            tracemalloc.start()
            export_batch(session, version="1.1.0", after=0)
            one_batch = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            started = time.perf_counter()
            rows = export("1.1.0")
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"  export of release 1.1.0: {rows} entries in {elapsed:.2f} s "
                  f"({rows / elapsed:,.0f}/s); peak Python memory {peak / 2**20:.1f} MiB "
                  f"(one batch: {one_batch / 2**20:.1f} MiB)")  # fmt: skip
        engine.dispose()


if __name__ == "__main__":
    main()
