"""The cost of an idle poll over plain HTTP, HTTPS and mutual TLS, measured in one run.

An idle poll is what a vehicle's director refresh asks when nothing changed:
the next root version (404) and ``timestamp.json`` (200), over one kept-alive
connection as the agent's fetcher does. Three real ``uptake server run``
processes on loopback, one after the other: plain HTTP with no vehicle
identity, HTTPS with no vehicle identity, and HTTPS with the vehicle's client
certificate checked on every request (the production setting). Prints the
time per poll of each, and their ratios to plain HTTP.

    .venv/bin/python bench/idle_poll_tls.py [--polls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle


def _poll_times(pool: Any, base: str, vin: str, polls: int) -> list[float]:
    root = f"{base}/director/{vin}/metadata/2.root.json"
    timestamp = f"{base}/director/{vin}/metadata/timestamp.json"
    times = []
    for _ in range(polls):
        start = time.perf_counter()
        assert pool.request("GET", root).status == 404
        assert pool.request("GET", timestamp).status == 200
        times.append(time.perf_counter() - start)
    return times


def _measure(tmp: Path, mode: str, polls: int) -> list[float]:
    if mode == "plain HTTP":
        server = ServerProcess(tmp)
    elif mode == "HTTPS":
        server = ServerProcess(tmp, tls=True, vehicle_identity="none")
    else:
        server = ServerProcess(tmp, tls=True)
    try:
        vehicle = Vehicle(tmp, server, vin="VINBENCH", secondaries=False)
        args: dict[str, Any] = {"retries": False, "timeout": 10.0, "maxsize": 1}
        if server.ca_cert:
            args["ca_certs"] = str(server.ca_cert)
        if mode == "mutual TLS":
            args.update(
                cert_file=str(vehicle.state_dir / "tls" / "client.crt"),
                key_file=str(vehicle.state_dir / "tls" / "client.key"),
                key_password=PASSWORD,
            )
        pool = urllib3.PoolManager(**args)
        _poll_times(pool, server.url, vehicle.vin, 100)  # warm up: connection, caches
        return _poll_times(pool, server.url, vehicle.vin, polls)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for mode in ("plain HTTP", "HTTPS", "mutual TLS"):
        with tempfile.TemporaryDirectory() as tmp:
            results[mode] = _measure(Path(tmp), mode, args.polls)
    base = statistics.median(results["plain HTTP"])
    print(
        f"idle poll (404 next root + 200 timestamp, one kept-alive connection), {args.polls} polls"
    )
    print(f"{'transport':12} {'median ms':>10} {'p99 ms':>8} {'polls/s':>8} {'vs plain':>9}")
    for mode, times in results.items():
        median = statistics.median(times)
        p99 = statistics.quantiles(times, n=100)[98]
        print(
            f"{mode:12} {median * 1000:10.3f} {p99 * 1000:8.3f} {1 / median:8.0f} "
            f"{median / base:9.2f}"
        )


if __name__ == "__main__":
    main()
