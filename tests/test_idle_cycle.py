"""An idle poll costs the vehicle nothing but the metadata check: no signature, no write.

When nothing changed since the server acknowledged the last manifest and no heartbeat is
due, a cycle must neither make any ECU sign a report (every signature uses up a report
counter, which is saved before signing: so unchanged counters and untouched files prove
that none was made) nor write the agent's state. Only python-tuf's own metadata cache
(``metadata/``) is left to python-tuf.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.uptake_fixtures import ServerProcess, Vehicle, sample

Snapshot = dict[str, tuple[int, int, str]]


def _snapshot(state_dir: Path) -> Snapshot:
    """Every file and directory outside metadata/: inode, mtime and content digest."""
    found: Snapshot = {}
    for root, dirs, files in os.walk(state_dir):
        dirs[:] = [d for d in dirs if Path(root, d) != state_dir / "metadata"]
        for name in [*dirs, *files]:
            path = Path(root, name)
            info = path.stat()
            digest = "" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(state_dir))] = (info.st_ino, info.st_mtime_ns, digest)
    return found


def _counters(vehicle: Vehicle) -> tuple[int, int]:
    primary = vehicle.state().ecu(vehicle.primary).report_counter
    return primary, int(vehicle.secondary_state()["report_counter"])


def test_an_idle_cycle_makes_no_signature_and_writes_no_state(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    # something to be idle with: an installed image the director keeps listing
    image = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, image.filepath)
    installed = vehicle.run_once().report
    assert installed["outcomes"][vehicle.primary]["result"] == "installed", installed
    assert installed["manifest"] == "accepted"

    files, counters = _snapshot(vehicle.state_dir), _counters(vehicle)
    record = server.vehicle(vehicle.vin)
    for _ in range(2):
        idle = vehicle.run_once()
        assert idle.returncode == 0 and idle.report["status"] == "ok", idle.report
        assert idle.report["manifest"] == "unchanged" and idle.report["directed"] == []
        assert _counters(vehicle) == counters  # no ECU signed a report
        assert _snapshot(vehicle.state_dir) == files  # no state written, nothing at all
    after = server.vehicle(vehicle.vin)
    assert after["manifests_accepted"] == record["manifests_accepted"]  # nothing sent
    assert after["manifests_rejected"] == record["manifests_rejected"]

    # and as soon as something is due, the next cycle signs and reports again
    vehicle.configure(agent={"manifest_heartbeat": 0.01})
    beat = vehicle.run_once().report
    assert beat["manifest"] == "accepted"
    assert _counters(vehicle) == (counters[0] + 1, counters[1] + 1)
    assert server.vehicle(vehicle.vin)["manifests_accepted"] == after["manifests_accepted"] + 1
