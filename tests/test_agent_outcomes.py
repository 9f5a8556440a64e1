"""The agent tells the truth: exit codes, text output and --json say what really happened.

``uptake agent run --once`` exits 0 (installed, or nothing to do), 75 (postponed by a
transient problem) or 1 (refused or failed), prints the reason of anything but success,
and its ``--json`` says whether a manifest was accepted, not needed, refused or could not
be sent. A slot that is not what its installer writes to stops the agent before anything
is written, and ``uptake agent status`` says what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.uptake_fixtures import ENV, SELFTEST, ServerProcess, Vehicle, free_port, sample


def _run_text(vehicle: Vehicle) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "uptake", "agent", "run", "--config", str(vehicle.config_path)]
    return subprocess.run(
        [*argv, "--once"], env=ENV, capture_output=True, text=True, timeout=120, check=False
    )


def test_nothing_to_do_exits_0_and_an_unneeded_manifest_is_not_called_accepted(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    first = vehicle.run_once()
    assert first.returncode == 0 and first.report["manifest"] == "accepted"
    second = vehicle.run_once()  # nothing changed: no manifest sent
    assert second.returncode == 0, second.stderr
    assert second.report["manifest"] == "unchanged" and not second.report["manifest_accepted"]
    text = _run_text(vehicle)
    assert text.returncode == 0 and "cycle ok: nothing to install" in text.stdout


def test_an_install_that_rolls_back_exits_1_and_says_why(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    bad = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")  # fails selftest
    server.assign(vehicle.vin, vehicle.primary, bad.filepath)
    text = _run_text(vehicle)
    assert text.returncode == 1, text.stdout + text.stderr
    assert "cycle FAILED" in text.stderr and f"{vehicle.primary} rolled_back" in text.stderr


def test_unreachable_server_exits_75_postponed(server: ServerProcess, tmp_path: Path) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    vehicle.configure(agent={"server_url": f"http://127.0.0.1:{free_port()}"})
    run = vehicle.run_once()
    assert run.returncode == 75, run.report
    assert run.report["status"] == "postponed" and run.report["manifest"] == "unreachable"
    assert not run.report["manifest_accepted"]
    text = _run_text(vehicle)
    assert text.returncode == 75 and "cycle POSTPONED" in text.stderr
    assert "unreachable" in text.stderr


def test_unknown_vin_exits_1_as_a_configuration_error_not_an_attack(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    vehicle.configure(agent={"vin": "VIN9999"})
    run = vehicle.run_once()
    assert run.returncode == 1, run.report
    assert run.report["manifest"] == "refused"
    assert run.report["verification_failure"] == "configuration", run.report
    assert vehicle.state().ecu(vehicle.primary).attacks_detected == ""
    text = _run_text(vehicle)
    assert text.returncode == 1 and "cycle FAILED" in text.stderr


@pytest.mark.parametrize("installer", ["uboot", "file"])
def test_a_slot_that_does_not_exist_stops_the_agent_and_status_says_so(
    server: ServerProcess, tmp_path: Path, installer: str
) -> None:
    missing = f"/dev/uptake-test-{uuid.uuid4().hex[:8]}p3"  # unique: never an earlier run's
    assert not os.path.exists(missing)
    vehicle = Vehicle(tmp_path, server, secondaries=False, health_check=[SELFTEST])
    image = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, image.filepath)
    changes = {"type": installer, "slot_b": missing}
    if installer == "uboot":
        changes["boot_env"] = str(tmp_path / "fw_env.config")
    vehicle.configure(installer=changes)

    try:
        text = _run_text(vehicle)
        created = os.path.isfile(missing)
    finally:  # an agent without this defence writes a regular file there: never leave it
        if os.path.isfile(missing):
            os.unlink(missing)
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert "slot_b" in text.stderr and missing in text.stderr, text.stderr
    assert not created  # never created
    status = subprocess.run(
        [sys.executable, "-m", "uptake", "agent", "status", "--config", str(vehicle.config_path)],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert "PROBLEM" in status.stderr and missing in status.stderr, status.stderr
    record = server.vehicle(vehicle.vin)
    assert all(a["status"] != "installed" for a in record["assignments"])


def test_status_json_lists_problems(server: ServerProcess, tmp_path: Path) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    vehicle.configure(installer={"slot_a": "/dev/uptake-test-missing"})
    status = subprocess.run(
        [sys.executable, "-m", "uptake", "agent", "status", "--json",
         "--config", str(vehicle.config_path)],
        env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert status.returncode == 1
    problems = json.loads(status.stdout)["problems"]
    assert problems and "/dev/uptake-test-missing" in problems[0], problems
