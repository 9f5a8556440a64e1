"""Key compromise: stolen ONLINE keys alone cannot install arbitrary software, and rotation recovers.

Each test mounts the attack through a :class:`MaliciousProxy` between a real
agent and a real server, holding keys read from the server's ``DATA/keys``
(what an intruder on the server gets), and asserts that the vehicle refuses,
keeps its installed image, reports the attack in its next manifest, and that
the server records it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import MetaFile, TargetFile

from tests.attacks.vehicle_checks import assert_attack_reported, installed_on_server, online_signer
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import ENV, ServerProcess, Vehicle, sample

EVIL = b"\x7fELF evil firmware " * 4096


@pytest.fixture
def proxied(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[MaliciousProxy, Vehicle]]:
    proxy = MaliciousProxy(server.url)
    yield proxy, Vehicle(tmp_path, server, server_url=proxy.url)
    proxy.close()


def _evil_target(path: str, ecus: dict[str, str] | None = None) -> TargetFile:
    target = TargetFile.from_data(path, EVIL, ["sha256"])
    if ecus is not None:
        target.unrecognized_fields["custom"] = {
            "ecuIdentifiers": {s: {"hardwareId": hw} for s, hw in ecus.items()}
        }
    return target


def _install_gateway(server: ServerProcess, vehicle: Vehicle) -> str:
    gw = server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
    return gw.filepath


def test_director_key_alone_cannot_install_an_image_missing_from_the_image_repo(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    installed = _install_gateway(server, vehicle)
    stolen = online_signer(server, "director-targets")
    # with the targets key alone the attacker rides the next legitimate director change
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)

    def direct_evil(signed: Any) -> None:
        evil = _evil_target("rpi-gateway/9.9.9/gateway.elf", {vehicle.primary: "rpi-gateway"})
        signed.targets = {evil.path: evil}

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [stolen], direct_evil)
            if path.startswith("/director/") and path.endswith(".targets.json")
            else None
        )
    )
    proxy.rewrites.append(
        lambda path, body: EVIL if path.endswith("gateway.elf") and "9.9.9" in path else None
    )
    report = vehicle.run_once().report
    assert "not in the image repository" in report["verification_error"]
    assert report["outcomes"] == {}
    assert vehicle.booted_image() == installed
    assert installed_on_server(server, vehicle)[vehicle.primary] == installed
    assert_attack_reported(server, vehicle, "not in the image repository")


def test_image_snapshot_and_timestamp_keys_alone_cannot_forge_targets(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    installed = _install_gateway(server, vehicle)
    new = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, new.filepath)
    snapshot_key, timestamp_key = (
        online_signer(server, "image-snapshot"),
        online_signer(server, "image-timestamp"),
    )
    meta = server.data_dir / "image-repo" / "metadata"
    snap_v = json.loads((meta / "timestamp.json").read_bytes())["signed"]["meta"]["snapshot.json"][
        "version"
    ]
    targets_v = json.loads((meta / f"{snap_v}.snapshot.json").read_bytes())["signed"]["meta"][
        "targets.json"
    ]["version"]
    forged_targets = resign(
        (meta / f"{targets_v}.targets.json").read_bytes(),
        [snapshot_key, timestamp_key],
        lambda s: _swap_image(s, new.filepath, targets_v + 1),
    )
    forged_snapshot = resign(
        (meta / f"{snap_v}.snapshot.json").read_bytes(),
        [snapshot_key],
        lambda s: _point_snapshot(s, snap_v + 1, targets_v + 1),
    )
    forged = {
        "/image/metadata/timestamp.json": resign(
            (meta / "timestamp.json").read_bytes(),
            [timestamp_key],
            lambda s: _point_timestamp(s, snap_v + 1),
        ),
        f"/image/metadata/{snap_v + 1}.snapshot.json": forged_snapshot,
        f"/image/metadata/{targets_v + 1}.targets.json": forged_targets,
    }
    proxy.rewrites.append(lambda path, body: forged.get(path))
    proxy.rewrites.append(
        lambda path, body: EVIL if path.endswith("gateway.elf") and "1.1.0" in path else None
    )
    report = vehicle.run_once().report
    assert "UnsignedMetadataError" in report["verification_error"]
    assert "targets" in report["verification_error"]
    assert report["outcomes"] == {}
    assert vehicle.booted_image() == installed
    assert installed_on_server(server, vehicle)[vehicle.primary] == installed
    assert_attack_reported(server, vehicle, "image repository")


def _swap_image(signed: Any, filepath: str, version: int) -> None:
    signed.version = version
    evil = _evil_target(filepath)
    evil.unrecognized_fields["custom"] = signed.targets[filepath].custom
    signed.targets[filepath] = evil


def _point_snapshot(signed: Any, version: int, targets_version: int) -> None:
    signed.version = version
    signed.meta["targets.json"] = MetaFile(version=targets_version)


def _point_timestamp(signed: Any, snapshot_version: int) -> None:
    signed.snapshot_meta = MetaFile(version=snapshot_version)
    signed.version += 1


def _rotate(server: ServerProcess, repository: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uptake",
            "keys",
            "rotate",
            "--data-dir",
            str(server.data_dir),
            "--offline-keys-dir",
            str(server.offline_dir),
            "--repository",
            repository,
            "--role",
            "online",
            "--json",
        ],
        env=ENV,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_rotation_refuses_old_keys_and_restores_service(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    assert vehicle.run_once().report["directed"] == []
    old_director_targets = online_signer(server, "director-targets")
    old_image_timestamp = online_signer(server, "image-timestamp")

    # the running server refuses to rotate under it; stopped, it rotates both repositories
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "uptake",
            "server",
            "rotate-keys",
            "--data-dir",
            str(server.data_dir),
            "--offline-keys-dir",
            str(server.offline_dir),
            "--repository",
            "director",
        ],
        env=ENV,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0 and b"stop" in refused.stderr
    assert b"deprecated: use 'uptake keys rotate" in refused.stderr  # the old command: an alias
    server.stop()
    director = _rotate(server, "director")
    image = _rotate(server, "image")
    server.start()
    assert director["root_version"] == 2 and director["vehicles_resigned"] == 1
    assert image["root_version"] == 2 and image["roles"] == ["snapshot", "timestamp"]
    assert (
        online_signer(server, "director-targets").public_key.keyid
        != old_director_targets.public_key.keyid
    )

    # attacker with the old director targets key directs a published image nobody assigned
    def direct_gateway(signed: Any) -> None:
        target = TargetFile(gw.length, {"sha256": gw.sha256}, gw.filepath)
        target.unrecognized_fields["custom"] = {
            "ecuIdentifiers": {vehicle.primary: {"hardwareId": "rpi-gateway"}}
        }
        signed.targets = {gw.filepath: target}

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [old_director_targets], direct_gateway)
            if path.startswith("/director/") and path.endswith(".targets.json")
            else None
        )
    )
    report = vehicle.run_once().report
    assert "director repository: UnsignedMetadataError" in report["verification_error"]
    assert report["outcomes"] == {} and vehicle.booted_image() == ""
    assert_attack_reported(server, vehicle, "UnsignedMetadataError")
    assert (
        json.loads((vehicle.state_dir / "metadata" / "director" / "root.json").read_bytes())[
            "signed"
        ]["version"]
        == 2
    )

    # attacker with the old image timestamp key replays a timestamp signed with it
    proxy.rewrites.clear()
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [old_image_timestamp], lambda s: setattr(s, "version", s.version + 1))
            if path == "/image/metadata/timestamp.json"
            else None
        )
    )
    report = vehicle.run_once().report
    assert "image repository: UnsignedMetadataError" in report["verification_error"]
    assert report["outcomes"] == {} and vehicle.booted_image() == ""
    assert_attack_reported(server, vehicle, "timestamp")

    # service restored: the legitimate update installs on the primary and the secondary
    proxy.rewrites.clear()
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    report = vehicle.run_once().report
    assert report["verification_error"] == ""
    assert report["outcomes"][vehicle.primary]["result"] == "installed"
    assert report["outcomes"][vehicle.secondary]["result"] == "installed", report
    assert vehicle.booted_image() == gw.filepath
    assert installed_on_server(server, vehicle) == {
        vehicle.primary: gw.filepath,
        vehicle.secondary: bms.filepath,
    }
    assert vehicle.state().ecu(vehicle.primary).attacks_detected == ""


def test_interrupted_rotation_resumes(server: ServerProcess, vehicle: Vehicle) -> None:
    """A rotation that fails after publishing root v2 is finished, not repeated, by running it again."""
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.stop()
    # a real fault: step 4 cannot move the new timestamp key over a directory
    blocker = server.data_dir / "keys" / "director-timestamp.key"
    blocker.unlink()
    blocker.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uptake",
            "keys",
            "rotate",
            "--data-dir",
            str(server.data_dir),
            "--offline-keys-dir",
            str(server.offline_dir),
            "--repository",
            "director",
            "--role",
            "online",
        ],
        env=ENV,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr, proc.stderr
    assert (server.data_dir / "director" / "metadata" / "2.root.json").exists()
    blocker.rmdir()
    result = _rotate(server, "director")
    assert result["resumed"] and result["root_version"] == 2
    assert not (server.data_dir / "director" / "metadata" / "3.root.json").exists()
    root = json.loads((server.data_dir / "director" / "metadata" / "2.root.json").read_bytes())[
        "signed"
    ]
    for role in ("targets", "snapshot", "timestamp"):
        assert root["roles"][role]["keyids"] == [
            online_signer(server, f"director-{role}").public_key.keyid
        ]
    server.start()
    # every rotation is in the audit log, the chain intact
    rotations = server.admin.request("GET", "/api/v1/audit?action=keys.rotate")["records"]
    assert rotations[-1]["subject"] == "director targets, snapshot, timestamp"
    assert rotations[-1]["actor"].startswith("local:") and rotations[-1]["detail"]["resumed"]
    assert server.admin.request("GET", "/api/v1/audit/verify")["intact"]
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
