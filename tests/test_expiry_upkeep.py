"""Expiry upkeep: with lifetimes of seconds, the server re-signs online metadata by itself.

The server runs with timestamps and snapshots that live a few seconds; nothing
is published while a vehicle polls again and again: every poll verifies
(python-tuf refuses expired metadata), because the server re-signed in time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.uptake_fixtures import ServerProcess, Vehicle, sample

LIFETIMES = {
    "timestamp": 6,
    "snapshot": 8,
    "deltas": 10,
    "director-timestamp": 6,
    "director-snapshot": 8,
    "director-targets": 10,
}


def _timestamp(server: ServerProcess) -> dict[str, int | str]:
    signed = json.loads((server.data_dir / "image-repo/metadata/timestamp.json").read_bytes())
    return {"version": signed["signed"]["version"], "expires": signed["signed"]["expires"]}


def test_a_vehicle_never_meets_expired_online_metadata(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, metadata_lifetimes=LIFETIMES)
    try:
        vehicle = Vehicle(tmp_path, server)
        published = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        first = _timestamp(server)
        server.assign(vehicle.vin, vehicle.primary, published.filepath)
        report = vehicle.run_once().report
        assert report["outcomes"][vehicle.primary]["result"] == "installed", report
        deadline = time.monotonic() + 3 * LIFETIMES["director-targets"]
        polls = 0
        while time.monotonic() < deadline:
            report = vehicle.run_once().report
            assert report["verification_error"] == "", report
            assert report["exit_code"] == 0, report
            polls += 1
        later = _timestamp(server)
        # re-signed by the server alone: nothing was published meanwhile
        assert int(later["version"]) > int(first["version"]) + 3, (first, later)
        assert polls >= 3
        director = server.vehicle(vehicle.vin)
        assert director["ecus"]  # the vehicle kept reporting
    finally:
        server.stop()
