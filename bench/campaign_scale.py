"""Campaign scale benchmark: create and start a campaign over 100,000 and 1,000,000 vehicles.

On PostgreSQL (database ``campaigns_bench`` on 127.0.0.1:5432, dropped and
created afresh), with a real server process:

1. a few live vehicles (:mod:`tests.simulated_fleet` signers) register through
   the API and report; the rest of the fleet is bulk-inserted with COPY
   (vehicles and ECUs, reported as running the old image), not via the API;
2. the cost of a vehicle's poll is measured without a campaign: the director
   ``timestamp.json`` GET, ``N.targets.json`` GET, and a signed manifest POST;
3. ``POST /api/v1/campaigns`` + ``approve`` + ``start`` over the whole fleet
   (phases 1 %, 10 %, 100 %) is timed;
4. the poll cost is measured again while the campaign runs (and its sweep
   walks the fleet in the background), separating each live vehicle's first
   manifest after the start (the one that may join it) from later ones.

Figures depend on the machine (and on who else uses it). Goal: creation under
10 s at a million, poll cost unchanged.

    .venv/bin/python bench/campaign_scale.py [--sizes 100000,1000000] [--live 20]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from signing.keys import generate_signer, public_key_to_dict
from signing.manifest import ImageInfo
from tests.simulated_fleet import SimVehicle, http, make_fleet
from tests.uptake_fixtures import ServerProcess, sample

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB = "campaigns_bench"
BMS = "stm32f4-bms"


def _fresh_database() -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB}"


def _bulk_insert(start: int, count: int, image: Any) -> float:
    """COPY ``count`` vehicles with one ECU each, reported as running ``image``."""
    key = json.dumps(public_key_to_dict(generate_signer().public_key))
    began = time.perf_counter()
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DB}") as conn:
        with conn.cursor() as cur:
            with cur.copy(
                "COPY vehicle (vin, primary_ecu_serial, registered_at, last_manifest_at, "
                "manifests_accepted, manifests_rejected, last_rejection, "
                "director_targets_version) FROM STDIN"
            ) as copy:
                buf = io.StringIO()
                for i in range(start, start + count):
                    buf.write(f"BULK{i:08d}\tBULK{i:08d}-E0\tnow\tnow\t1\t0\t\t0\n")
                    if buf.tell() > 1 << 20:
                        copy.write(buf.getvalue())
                        buf = io.StringIO()
                copy.write(buf.getvalue())
            with cur.copy(
                "COPY ecu (serial, vin, hardware_id, public_key, is_primary, installed_filepath, "
                "installed_length, installed_sha256, report_counter, report_counter_state, "
                "attacks_detected, last_install_filepath, last_install_result, "
                "last_install_detail, last_install_method, updated_at) FROM STDIN"
            ) as copy:
                buf = io.StringIO()
                for i in range(start, start + count):
                    buf.write(
                        f"BULK{i:08d}-E0\tBULK{i:08d}\t{BMS}\t{key}\tt\t{image.filepath}\t"
                        f"{image.length}\t{image.sha256}\t1\tbounded\t\t\t\t\t\tnow\n"
                    )
                    if buf.tell() > 1 << 20:
                        copy.write(buf.getvalue())
                        buf = io.StringIO()
                copy.write(buf.getvalue())
        conn.execute("ANALYZE vehicle")
        conn.execute("ANALYZE ecu")
    return time.perf_counter() - began


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.1f} ms median, p90 {sorted(samples)[int(len(samples) * 0.9)] * 1000:7.1f}"


def _poll(url: str, vehicles: list[SimVehicle], rounds: int) -> dict[str, list[float]]:
    """Time each vehicle's timestamp GET, targets GET and manifest POST, ``rounds`` times."""
    out: dict[str, list[float]] = {"timestamp": [], "targets": [], "manifest": []}
    for _ in range(rounds):
        for v in vehicles:
            prefix = f"/director/{v.vin}/metadata"
            t = time.perf_counter()
            ts = http(url, "GET", f"{prefix}/timestamp.json")
            out["timestamp"].append(time.perf_counter() - t)
            snap = http(
                url,
                "GET",
                f"{prefix}/{ts['signed']['meta']['snapshot.json']['version']}.snapshot.json",
            )
            version = snap["signed"]["meta"]["targets.json"]["version"]
            t = time.perf_counter()
            http(url, "GET", f"{prefix}/{version}.targets.json")
            out["targets"].append(time.perf_counter() - t)
            t = time.perf_counter()
            v.report(url)
            out["manifest"].append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--live", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    database_url = _fresh_database()
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp), database_url=database_url)
        try:
            token = srv.admin.token
            old = srv.publish(sample(BMS, "1.0.0"), BMS, "1.0.0")
            new = srv.publish(sample(BMS, "1.1.0"), BMS, "1.1.0")
            http(srv.url, "POST", "/api/v1/releases", token,
                 {"name": "bms-1.1", "images": {BMS: new.filepath}})  # fmt: skip
            approver = http(srv.url, "POST", "/api/v1/tokens", token,
                            {"name": "approver", "role": "release-engineer"})["token"]  # fmt: skip
            live = make_fleet(args.live, prefix="LIVE")
            for v in live:
                http(srv.url, "POST", "/api/v1/vehicles", token, v.registration())
                v.primary.installed = ImageInfo.of(old.filepath, old.length, {"sha256": old.sha256})
                v.report(srv.url)
            inserted = 0
            print(f"PostgreSQL, {args.live} live vehicles polling, {args.rounds} rounds each")
            for size in sizes:
                took = _bulk_insert(inserted, size - inserted, old)
                print(f"\n== {size:,} vehicles (COPY of {size - inserted:,} more "
                      f"vehicles+ECUs took {took:.1f} s)")  # fmt: skip
                inserted = size
                before = _poll(srv.url, live, args.rounds)
                name = f"all-{size}"
                t = time.perf_counter()
                http(srv.url, "POST", "/api/v1/campaigns", token, {
                    "name": name, "release": "bms-1.1",
                    "phases": [{"percent": 1, "success_threshold": 0.9},
                               {"percent": 10, "success_threshold": 0.9}, {"percent": 100}],
                })  # fmt: skip
                created = time.perf_counter() - t
                http(srv.url, "POST", f"/api/v1/campaigns/{name}/approve", approver, {})
                approved = time.perf_counter() - t
                http(srv.url, "POST", f"/api/v1/campaigns/{name}/start", token, {})
                started = time.perf_counter() - t
                print(f"create {created * 1000:.0f} ms, +approve {approved * 1000:.0f} ms, "
                      f"+start {started * 1000:.0f} ms (total to running: {started:.2f} s)")  # fmt: skip
                t = time.perf_counter()
                first = _poll(srv.url, live, 1)
                during = _poll(srv.url, live, args.rounds)
                for what in ("timestamp", "targets", "manifest"):
                    print(
                        f"  poll {what:9}: without {_ms(before[what])} | during {_ms(during[what])}"
                    )
                print(f"  first manifest after the start (may join): {_ms(first['manifest'])}")
                record = http(srv.url, "GET", f"/api/v1/campaigns/{name}", token)
                print(f"  after {time.perf_counter() - t:.1f} s: sweep at {record['sweep']}, "
                      f"joined {record['totals']['joined']:,}")  # fmt: skip
                http(srv.url, "POST", f"/api/v1/campaigns/{name}/cancel", token, {})
                # the withdrawal of what the sweep reached finishes in the background
                deadline = time.monotonic() + 600
                while http(srv.url, "GET", f"/api/v1/campaigns/{name}", token)["withdrawing"]:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(1)
                for v in live:  # the live vehicles start from the old image again
                    v.primary.installed = ImageInfo.of(
                        old.filepath, old.length, {"sha256": old.sha256}
                    )
                    v.primary.last_install = None
        finally:
            srv.stop()
            print(
                "\nserver warnings:",
                [line for line in srv.log().splitlines() if "WARNING" in line][-5:],
            )


if __name__ == "__main__":
    main()
