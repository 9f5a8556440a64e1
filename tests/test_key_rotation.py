"""Rotating every role's keys, root included, while a vehicle keeps updating.

Each rotation is ``uptake keys rotate`` with the server stopped; the vehicle
then follows root N -> N+1 on its next poll (python-tuf walks the chain) and
installs the next release, published with whatever targets keys are current.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.release import ReleaseImage, publish_images
from signing.keys import load_signer
from tests.attacks.vehicle_checks import assert_attack_reported, online_signer
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import ENV, PASSWORD, ServerProcess, Vehicle, sample


def rotate(server: ServerProcess, repository: str, role: str, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable, "-m", "uptake", "keys", "rotate", "--data-dir", str(server.data_dir),
            "--offline-keys-dir", str(server.offline_dir), "--repository", repository,
            "--role", role, "--json", *extra,
        ],
        env=ENV, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _trusted_root_version(vehicle: Vehicle, repository: str) -> int:
    root = json.loads((vehicle.state_dir / "metadata" / repository / "root.json").read_bytes())
    version: int = root["signed"]["version"]
    return version


def _install(
    server: ServerProcess,
    vehicle: Vehicle,
    version: str,
    targets_keys: list[Path],
    hardware_id: str = "rpi-gateway",
) -> None:
    signers = [load_signer(p, PASSWORD.encode()) for p in targets_keys]
    root = (server.offline_dir / "image-root.json").read_bytes()
    image = ReleaseImage(sample(hardware_id, version), [hardware_id], version)
    published = publish_images(server.admin, [image], signers, root)[0]
    ecu = vehicle.primary if hardware_id == "rpi-gateway" else vehicle.secondary
    server.assign(vehicle.vin, ecu, published.filepath)
    report = vehicle.run_once().report
    assert report["verification_error"] == "", report
    assert report["outcomes"][ecu]["result"] == "installed", report


def test_both_roots_rotate_twice_and_targets_keys_too_while_a_vehicle_updates(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    targets_keys = [server.offline_dir / "image-targets.key"]
    _install(server, vehicle, "1.0.0", targets_keys)

    # round 1: both roots to new single keys
    server.stop()
    image = rotate(server, "image", "root")
    director = rotate(server, "director", "root")
    assert image["root_version"] == 2 and director["root_version"] == 2
    server.start()
    _install(server, vehicle, "1.1.0", targets_keys)
    assert _trusted_root_version(vehicle, "image") == 2
    assert _trusted_root_version(vehicle, "director") == 2

    # round 2: both roots to 2-of-3 keys (signed by the old key and 2 new ones);
    # the image targets keys to 2-of-2 (targets re-signed, deltas still delegated)
    server.stop()
    rotate(server, "image", "root", "--keys", "3", "--threshold", "2")
    rotate(server, "director", "root", "--keys", "3", "--threshold", "2")
    targets = rotate(server, "image", "targets", "--keys", "2", "--threshold", "2")
    assert targets["root_version"] == 4
    keyset = json.loads((server.offline_dir / "keyset.json").read_bytes())
    assert keyset["image-root"] == {
        "threshold": 2,
        "keys": ["image-root-r3-1", "image-root-r3-2", "image-root-r3-3"],
    }
    server.start()
    targets_keys = [server.offline_dir / f"{name}.key" for name in targets["new_keyids"]]
    metadata = server.data_dir / "image-repo" / "metadata"
    newest = max(int(p.name.split(".")[0]) for p in metadata.glob("*.targets.json"))
    delegations = json.loads((metadata / f"{newest}.targets.json").read_bytes())["signed"]
    assert "deltas" in delegations["delegations"]["roles"][0]["name"]
    _install(server, vehicle, "1.1.0", targets_keys, "stm32f4-bms")
    assert _trusted_root_version(vehicle, "image") == 4
    assert _trusted_root_version(vehicle, "director") == 3

    # the old targets key signs nothing any more
    old = load_signer(server.offline_dir / "image-targets.key", PASSWORD.encode())
    with pytest.raises(Exception, match="threshold"):
        publish_images(
            server.admin,
            [ReleaseImage(sample("stm32f4-bms", "2.0.0"), ["stm32f4-bms"], "2.0.0")],
            [old],
            (server.offline_dir / "image-root.json").read_bytes(),
        )


@pytest.fixture
def proxied(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[MaliciousProxy, Vehicle]]:
    proxy = MaliciousProxy(server.url)
    yield proxy, Vehicle(tmp_path, server, server_url=proxy.url)
    proxy.close()


def test_a_revoked_timestamp_key_signs_nothing_a_vehicle_accepts(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    targets_keys = [server.offline_dir / "image-targets.key"]
    _install(server, vehicle, "1.0.0", targets_keys)
    compromised = online_signer(server, "image-timestamp")
    server.stop()
    result = rotate(server, "image", "timestamp")
    assert result["root_version"] == 2
    server.start()
    assert online_signer(server, "image-timestamp").public_key.keyid != (
        compromised.public_key.keyid
    )
    # what the attacker still can do: sign a fresh-looking timestamp with the revoked key
    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [compromised], lambda s: setattr(s, "version", s.version + 1))
            if path == "/image/metadata/timestamp.json"
            else None
        )
    )
    report = vehicle.run_once().report
    assert "image repository: UnsignedMetadataError" in report["verification_error"], report
    assert_attack_reported(server, vehicle, "timestamp")
    proxy.rewrites.clear()
    _install(server, vehicle, "1.1.0", targets_keys)


def test_an_interrupted_targets_rotation_finishes_when_run_again(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    _install(server, vehicle, "1.0.0", [server.offline_dir / "image-targets.key"])
    server.stop()
    metadata = server.data_dir / "image-repo" / "metadata"
    # a real fault after root v2 is stored and the targets re-signed: the release
    # engineers' trusted copy of root cannot be replaced (nor the key set saved)
    blocker = server.offline_dir / "image-root.json"
    trusted_v1 = blocker.read_bytes()
    blocker.unlink()
    blocker.mkdir()
    args = [
        sys.executable, "-m", "uptake", "keys", "rotate", "--data-dir", str(server.data_dir),
        "--offline-keys-dir", str(server.offline_dir), "--repository", "image",
        "--role", "targets", "--json",
    ]  # fmt: skip
    failed = subprocess.run(args, env=ENV, capture_output=True, timeout=120, check=False)
    assert failed.returncode == 1 and b"Traceback" not in failed.stderr, failed.stderr
    assert (metadata / "2.root.json").exists()
    # another rotation waits until this one is finished
    for role in ("root", "online"):
        other = rotate_refused(server, "director", role)
        assert b"image targets keys was interrupted" in other.stderr
    blocker.rmdir()
    blocker.write_bytes(trusted_v1)
    result = rotate(server, "image", "targets")
    assert result["resumed"] and result["root_version"] == 2  # finished, not rotated again
    assert not (metadata / "3.root.json").exists()
    assert not (server.data_dir / "keys" / "rotation" / "offline-rotation.json").exists()
    keyset = json.loads((server.offline_dir / "keyset.json").read_bytes())
    assert keyset["image-targets"] == {"threshold": 1, "keys": ["image-targets-r2"]}
    server.start()
    _install(server, vehicle, "1.1.0", [server.offline_dir / "image-targets-r2.key"])
    assert _trusted_root_version(vehicle, "image") == 2


def rotate_refused(
    server: ServerProcess, repository: str, role: str
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [
            sys.executable, "-m", "uptake", "keys", "rotate", "--data-dir", str(server.data_dir),
            "--offline-keys-dir", str(server.offline_dir), "--repository", repository,
            "--role", role,
        ],
        env=ENV, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
    return proc
