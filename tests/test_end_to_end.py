"""Publish → sign → direct → verify → install A/B → report → roll back, on a real server and agent."""

from __future__ import annotations

import signal
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import tomli_w
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Targets, Timestamp

from signing.keys import generate_signer, load_signer
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import PASSWORD, SELFTEST, ServerProcess, Vehicle, sample


def _install_v110(server: ServerProcess, vehicle: Vehicle) -> tuple[str, str]:
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    return gw.filepath, bms.filepath


def test_update_installs_primary_and_secondary_and_reports(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    gw, bms = _install_v110(server, vehicle)
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed"
    assert report["outcomes"][vehicle.secondary]["result"] == "installed"
    assert report["manifest_accepted"]
    # the primary booted the new slot, committed, and the slot holds exactly the image
    env = vehicle.boot_env()
    assert env["boot_slot"] == "b" and env["upgrade_available"] == "0"
    assert (vehicle.state_dir / "slots" / "b.img").read_bytes() == sample(
        "rpi-gateway", "1.1.0"
    ).read_bytes()
    assert vehicle.booted_image() == gw
    record = server.vehicle(vehicle.vin)
    installed = {e["serial"]: e["installed"]["filepath"] for e in record["ecus"]}
    assert installed == {vehicle.primary: gw, vehicle.secondary: bms}
    assert {a["status"] for a in record["assignments"]} == {"installed"}
    assert record["security_events"] == []
    # nothing left to do on the next poll
    again = vehicle.run_once().report
    assert again["directed"] == [] and again["outcomes"] == {}


def test_failed_health_check_rolls_back_and_is_reported(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    gw, _ = _install_v110(server, vehicle)
    vehicle.run_once()
    broken = server.publish(sample("rpi-gateway", "2.0.0"), "rpi-gateway", "2.0.0")
    server.assign(vehicle.vin, vehicle.primary, broken.filepath)
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome["result"] == "rolled_back"
    assert "self-test" in outcome["detail"]
    assert vehicle.booted_image() == gw  # old slot boots again
    assert vehicle.boot_env()["upgrade_available"] == "0"
    record = server.vehicle(vehicle.vin)
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert primary["installed"]["filepath"] == gw
    assert primary["last_install"]["result"] == "rolled_back"
    failed = [a for a in record["assignments"] if a["filepath"] == broken.filepath]
    assert failed[0]["status"] == "failed" and "self-test" in failed[0]["detail"]
    # the director no longer asks for the broken image: no retry loop
    assert vehicle.run_once().report["directed"] == []


def test_agent_killed_during_health_check_resumes_after_restart(
    server: ServerProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "hang-health-check"
    hang = ["sh", "-c", f"test ! -e {marker} || sleep 60"]
    vehicle = Vehicle(tmp_path, server, secondaries=False, health_check=[hang, SELFTEST])
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    marker.touch()
    proc = vehicle.spawn()
    deadline = time.monotonic() + 60
    while (j := vehicle.state().journal) is None or j.phase != "trial":
        assert time.monotonic() < deadline, "agent never reached the trial boot"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert vehicle.boot_env()["upgrade_available"] == "1"  # on trial, not committed
    marker.unlink()
    report = vehicle.run_once().report  # power back on: the trial boot is retried and passes
    assert report["outcomes"][vehicle.primary]["result"] == "installed"
    assert vehicle.state().journal is None
    assert vehicle.booted_image() == gw.filepath
    assert (
        next(e for e in server.vehicle(vehicle.vin)["ecus"])["installed"]["filepath"] == gw.filepath
    )


def test_agent_killed_at_random_points_always_ends_consistent(
    server: ServerProcess, tmp_path: Path
) -> None:
    # a larger image so the kills land in download, write and trial phases
    big = tmp_path / "gateway-big.elf"
    big.write_bytes(sample("rpi-gateway", "1.1.0").read_bytes() + bytes(range(256)) * 64 * 1024)
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    pub = server.publish(big, "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, pub.filepath)
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
        proc = vehicle.spawn()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = vehicle.state()
        # whatever the instant: the booted slot holds a known image or is the factory slot a
        booted = vehicle.boot_env().get("boot_slot", "a")  # no env yet: the factory default
        assert booted in ("a", "b")
        if booted == "b":
            assert state.slot_images["b"] is not None
    report = vehicle.run_once().report
    assert vehicle.booted_image() == pub.filepath, report
    assert vehicle.boot_env()["upgrade_available"] == "0"
    assert vehicle.state().journal is None
    record = server.vehicle(vehicle.vin)
    assert record["ecus"][0]["installed"]["filepath"] == pub.filepath


def test_tampered_image_is_refused_and_reported(server: ServerProcess, vehicle: Vehicle) -> None:
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    stored = next((server.data_dir / "image-repo" / "targets").rglob("*gateway.elf"))
    data = bytearray(stored.read_bytes())
    data[100] ^= 0x01
    stored.write_bytes(bytes(data))
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome["result"] == "refused" and "hash" in outcome["detail"].lower()
    assert vehicle.booted_image() == ""  # still the factory slot, untouched
    _assert_attack_recorded(server, vehicle, "hash")


def _assert_attack_recorded(server: ServerProcess, vehicle: Vehicle, needle: str) -> None:
    state = vehicle.state()
    assert needle.lower() in state.ecu(vehicle.primary).attacks_detected.lower()
    record = server.vehicle(vehicle.vin)
    primary = next(e for e in record["ecus"] if e["serial"] == vehicle.primary)
    assert needle.lower() in primary["attacks_detected"].lower()
    events = [e for e in record["security_events"] if e["kind"] == "attack_reported"]
    assert events and needle.lower() in events[-1]["detail"].lower()


@pytest.fixture
def proxied(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[MaliciousProxy, Vehicle]]:
    proxy = MaliciousProxy(server.url)
    yield proxy, Vehicle(tmp_path, server, server_url=proxy.url)
    proxy.close()


def _online_signer(server: ServerProcess, name: str) -> CryptoSigner:
    return load_signer(server.data_dir / "keys" / f"{name}.key", PASSWORD.encode())


def test_director_target_hash_mismatch_is_refused(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    signer = _online_signer(server, "director-targets")

    def other_hash(signed: Targets) -> None:
        for target in signed.targets.values():
            target.hashes["sha256"] = "0" * 64

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [signer], other_hash)
            if path.startswith("/director/") and path.endswith(".targets.json")
            else None
        )
    )
    report = vehicle.run_once().report
    assert "hash differs" in report["verification_error"]
    assert vehicle.booted_image() == ""
    _assert_attack_recorded(server, vehicle, "hash differs")


def test_metadata_signed_by_unknown_key_is_refused(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    # an honest first update: the provisioned image root has verified this server's metadata,
    # so a failure from now on is evidence of an attack, not of a wrong root
    first = server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
    server.assign(vehicle.vin, vehicle.primary, first.filepath)
    assert vehicle.run_once().report["status"] == "ok"
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    stranger = generate_signer()
    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [stranger], lambda s: None)
            if path == "/image/metadata/timestamp.json"
            else None
        )
    )
    report = vehicle.run_once().report
    assert "UnsignedMetadataError" in report["verification_error"]
    assert report["verification_failure"] == "attack" and report["status"] == "failed"
    assert vehicle.booted_image() == first.filepath
    _assert_attack_recorded(server, vehicle, "timestamp")


def test_expired_timestamp_is_refused(
    server: ServerProcess, proxied: tuple[MaliciousProxy, Vehicle]
) -> None:
    proxy, vehicle = proxied
    signer = _online_signer(server, "director-timestamp")

    def expire(signed: Timestamp) -> None:
        signed.expires = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [signer], expire)
            if path.endswith("/metadata/timestamp.json") and path.startswith("/director/")
            else None
        )
    )
    report = vehicle.run_once().report
    assert "ExpiredMetadataError" in report["verification_error"]
    _assert_attack_recorded(server, vehicle, "expired")


def test_interrupted_download_is_postponed_not_failed_and_resumes(
    server: ServerProcess, tmp_path: Path
) -> None:
    proxy = MaliciousProxy(server.url)
    try:
        vehicle = Vehicle(tmp_path, server, server_url=proxy.url, secondaries=False)
        gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        server.assign(vehicle.vin, vehicle.primary, gw.filepath)
        # the link drops: the image body ends after 100 bytes
        proxy.rewrites.append(
            lambda path, body: body[:100] if path.endswith("gateway.elf") else None
        )
        outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
        assert outcome["result"] == "postponed" and "resumes" in outcome["detail"], outcome
        assert (
            vehicle.state().ecu(vehicle.primary).attacks_detected == ""
        )  # a network blip is no attack
        record = server.vehicle(vehicle.vin)
        assert record["assignments"][0]["status"] == "pending" and record["security_events"] == []
        partial = next((vehicle.state_dir / "downloads").glob("*.part"))
        assert partial.stat().st_size == 100  # kept for the resume
        proxy.rewrites.clear()
        outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
        assert outcome["result"] == "installed"
        assert vehicle.booted_image() == gw.filepath
        image_requests = [r for request, r in proxy.ranges if request.endswith("gateway.elf")]
        assert image_requests == ["", "bytes=100-"]  # the second download resumed at byte 100
    finally:
        proxy.close()


def test_secondary_killed_during_its_trial_boot_finishes_after_restart(
    server: ServerProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "hang-health-check"
    hang = ["sh", "-c", f"test ! -e {marker} || sleep 60"]
    vehicle = Vehicle(tmp_path, server, health_check=[hang, SELFTEST])
    # the interrupted trial boot counts as one failed boot: allow a second one
    config = tomllib.loads(vehicle.config_path.read_text())
    config["secondaries"][0]["options"]["bootlimit"] = 2
    vehicle.config_path.write_text(tomli_w.dumps(config))
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    marker.touch()
    proc = vehicle.spawn()
    bootenv = vehicle.state_dir / "secondaries" / vehicle.secondary / "bootenv.json"
    deadline = time.monotonic() + 60
    while not bootenv.exists() or '"upgrade_available": "1"' not in bootenv.read_text():
        assert time.monotonic() < deadline, "the secondary never started its trial boot"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()
    vehicle.run_once()  # the secondary finishes its trial when the primary next talks to it
    state = vehicle.secondary_state()
    assert state["last_install"]["result"] == "installed" and not state.get("trial")
    ecu = next(e for e in server.vehicle(vehicle.vin)["ecus"] if e["serial"] == vehicle.secondary)
    assert (
        ecu["installed"]["filepath"] == bms.filepath
        and ecu["last_install"]["result"] == "installed"
    )


def test_a_trusted_root_link_lost_to_a_kill_is_restored(
    server: ServerProcess, tmp_path: Path
) -> None:
    """python-tuf re-links root.json by removing the old link first: a kill in between took the
    vehicle's trusted root away for good, and every later poll failed. The agent restores the
    link to the newest root python-tuf verified."""
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    assert vehicle.run_once().report["status"] == "ok"
    for repo in ("director", "image"):
        link = vehicle.state_dir / "metadata" / repo / "root.json"
        if (link.parent / "root_history").is_dir():  # python-tuf has taken it over
            link.unlink()  # the instant between python-tuf's remove and symlink
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
    assert (vehicle.state_dir / "metadata" / "director" / "root.json").exists()
