"""Provisioning mistakes are caught at ``uptake agent init`` and never reported as attacks.

``agent init`` refuses trusted roots that cannot be this vehicle's: the image root given as
the director root (or the other way round), one file for both, roots of another
deployment, and names outside the grammar. A vehicle whose provisioned root never verified
anything from its server (provisioned by hand, or before these checks) says "configuration
error" when its very first refresh fails, and reports no attack to the server.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.service import init_server
from tests.uptake_fixtures import ENV, PASSWORD, ServerProcess, Vehicle, sample


@pytest.fixture(scope="module")
def other_deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline directory (roots) of a second, unrelated deployment."""
    tmp = tmp_path_factory.mktemp("other")
    init_server(ServerConfig(tmp / "data"), tmp / "offline", PASSWORD.encode(), PASSWORD.encode())
    return tmp / "offline"


def _init(
    tmp: Path,
    server: ServerProcess,
    image_root: Path,
    director_root: Path,
    vin: str = "VIN0001",
    primary: str = "GW-1:rpi-gateway",
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    state = tmp / "vehicle"
    shutil.rmtree(state, ignore_errors=True)
    argv = [
        sys.executable, "-m", "uptake", "agent", "init", "--dir", str(state), "--vin", vin,
        "--server", server.url, "--primary", primary,
        "--image-root", str(image_root), "--director-root", str(director_root), *extra,
    ]  # fmt: skip
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=60, check=False)


def test_the_right_roots_are_accepted_and_checked_with_the_server(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    keys = shared_server.offline_dir
    done = _init(tmp_path, shared_server, keys / "image-root.json", keys / "director-root.json")
    assert done.returncode == 0, done.stderr
    assert "matches the server's image repository root v1" in done.stdout


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("swapped", "swapped files"),
        ("same file", "are the same root"),
        ("director root of another deployment", "same 'uptake server init'"),
        ("both of another deployment", "another deployment"),
    ],
)
def test_wrong_roots_are_refused(
    shared_server: ServerProcess, tmp_path: Path, other_deployment: Path, case: str, needle: str
) -> None:
    keys, other = shared_server.offline_dir, other_deployment
    image, director = {
        "swapped": (keys / "director-root.json", keys / "image-root.json"),
        "same file": (keys / "image-root.json", keys / "image-root.json"),
        "director root of another deployment": (
            keys / "image-root.json",
            other / "director-root.json",
        ),
        "both of another deployment": (other / "image-root.json", other / "director-root.json"),
    }[case]
    refused = _init(tmp_path, shared_server, image, director)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert needle in refused.stderr, refused.stderr
    assert not (tmp_path / "vehicle" / "agent.toml").exists()


@pytest.mark.parametrize(
    ("vin", "primary", "extra", "needle"),
    [
        ("..", "GW-1:rpi-gateway", (), "is not a name"),
        ("../etc", "GW-1:rpi-gateway", (), "is not a name"),
        ("VIN0001", "../x:rpi-gateway", (), "is not a name"),
        ("VIN0001", "GW-1:rpi gateway", (), "is not a name"),
        ("VIN0001", "GW-1:rpi-gateway", ("--secondary", "GW-1:stm32f4-bms"), "more than once"),
    ],
)
def test_bad_names_are_refused(
    shared_server: ServerProcess,
    tmp_path: Path,
    vin: str,
    primary: str,
    extra: tuple[str, ...],
    needle: str,
) -> None:
    keys = shared_server.offline_dir
    refused = _init(
        tmp_path, shared_server, keys / "image-root.json", keys / "director-root.json",
        vin, primary, *extra,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert needle in refused.stderr, refused.stderr
    assert not (tmp_path / "vehicle").exists()


@pytest.mark.parametrize("repository", ["image", "director"])
def test_a_wrong_trusted_root_at_first_contact_is_a_configuration_error_not_an_attack(
    server: ServerProcess, tmp_path: Path, other_deployment: Path, repository: str
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    # provisioned by hand with another deployment's root (agent init would have refused it)
    shutil.copy(
        other_deployment / f"{repository}-root.json",
        vehicle.state_dir / "metadata" / repository / "root.json",
    )
    image = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, image.filepath)
    run = vehicle.run_once()
    assert run.returncode == 1, run.report
    assert run.report["verification_failure"] == "configuration", run.report
    assert "provisioned with" in run.report["verification_error"]
    assert vehicle.state().ecu(vehicle.primary).attacks_detected == ""
    record = server.vehicle(vehicle.vin)
    assert not [e for e in record["security_events"] if e["kind"] == "attack_reported"], record
    assert all(e["attacks_detected"] == "" for e in record["ecus"])
