"""Releases of many images: one streamed upload, one signature; lower versions; reverts.

Every step is the real CLI (or the real HTTP API) against a real server, and a
real vehicle installs what was published, reverted included.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import urllib3

from tests.uptake_fixtures import ENV, ServerProcess, Vehicle, sample


def uptake(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "uptake", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _args(server: ServerProcess) -> list[str]:
    return [
        "--keys-dir", str(server.offline_dir),
        "--server", server.url, "--token-file", str(server.config.admin_token_path),
    ]  # fmt: skip


def _audit(server: ServerProcess, action: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = server.admin.request(
        "GET", f"/api/v1/audit?action={action}&limit=100"
    )["records"]
    return records


def test_a_directory_is_one_upload_and_one_targets_version(
    server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    release.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (release / name).write_bytes(name.encode() * 5000)
    shutil.copy(sample("rpi-gateway", "1.1.0"), release / "gateway.elf")
    uploads_before = len(_audit(server, "image.upload"))
    out = uptake(
        "release", "publish", str(release), "--hardware-id", "rpi-gateway",
        "--version", "1.1.0", "--json", *_args(server),
    )  # fmt: skip
    images = json.loads(out.stdout)["images"]
    assert [i["filepath"] for i in images] == [
        f"rpi-gateway/1.1.0/{n}" for n in ("a.bin", "b.bin", "c.bin", "gateway.elf")
    ]
    assert {i["targets_version"] for i in images} == {2}  # one new version for all
    assert [i["release_counter"] for i in images] == [1, 2, 3, 4]
    # one batch upload, one audit record, one publication
    uploads = _audit(server, "image.upload")
    assert len(uploads) == uploads_before + 1
    assert uploads[-1]["detail"]["count"] == 4
    assert len(_audit(server, "targets.publish")) == 1
    assert not list((server.data_dir).rglob(".batch.*")), "temporary upload files left"

    # the same directory again: every image already published, nothing changes
    again = uptake(
        "release", "publish", str(release), "--hardware-id", "rpi-gateway",
        "--version", "1.1.0", *_args(server),
    )  # fmt: skip
    assert again.stdout.count("already published") == 4
    assert len(_audit(server, "targets.publish")) == 1

    server.assign(vehicle.vin, vehicle.primary, "rpi-gateway/1.1.0/gateway.elf")
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report


def test_lower_version_needs_allow_lower_and_is_audited(server: ServerProcess) -> None:
    publish = ["release", "publish", "--hardware-id", "stm32f4-bms", *_args(server)]
    uptake(*publish, str(sample("stm32f4-bms", "2.0.0")), "--version", "2.0.0")
    refused = uptake(
        *publish, str(sample("stm32f4-bms", "1.1.0")), "--version", "1.1.0", check=False
    )
    assert refused.returncode == 1
    assert "version 1.1.0 is lower than 2.0.0" in refused.stderr
    assert "--allow-lower" in refused.stderr
    out = uptake(
        *publish, str(sample("stm32f4-bms", "1.1.0")), "--version", "1.1.0",
        "--allow-lower", "--json",
    )  # fmt: skip
    published = json.loads(out.stdout)
    assert published["release_counter"] == 2  # still above: vehicles accept it
    record = _audit(server, "targets.publish")[-1]
    assert record["detail"]["lower_versions"] == ["stm32f4-bms/1.1.0/bms.bin (1.1.0)"]
    # an explicit counter below the highest stays refused: that would be a rollback
    low = uptake(
        *publish, str(sample("stm32f4-bms", "1.0.0")), "--version", "1.0.0",
        "--allow-lower", "--release-counter", "1", check=False,
    )  # fmt: skip
    assert low.returncode == 1 and "below the highest already published (2)" in low.stderr


def test_revert_re_releases_older_bytes_and_a_vehicle_goes_back(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
    server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, "rpi-gateway/1.1.0/gateway.elf")
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"

    out = uptake("release", "revert", "rpi-gateway/1.0.0/gateway.elf", "--json", *_args(server))
    reverted = json.loads(out.stdout)
    assert reverted["filepath"] == "rpi-gateway/1.0.0/revert-3/gateway.elf"
    assert reverted["release_counter"] == 3 and reverted["targets_version"] == 4
    images = {i["filepath"]: i for i in server.admin.request("GET", "/api/v1/images")["images"]}
    old = images["rpi-gateway/1.0.0/gateway.elf"]
    assert images[reverted["filepath"]]["sha256"] == old["sha256"]
    assert images[reverted["filepath"]]["version"] == "1.0.0"
    assert _audit(server, "targets.publish")[-1]["detail"]["lower_versions"] == [
        f"{reverted['filepath']} (1.0.0)"
    ]
    missing = uptake("release", "revert", "rpi-gateway/9.9.9/x.bin", *_args(server), check=False)
    assert missing.returncode == 1 and "is not a published image" in missing.stderr

    # the older firmware installs again: its counter is the highest
    server.assign(vehicle.vin, vehicle.primary, reverted["filepath"])
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
    assert vehicle.booted_image() == reverted["filepath"]


def _post_batch(server: ServerProcess, body: bytes, content_type: str) -> tuple[int, str]:
    resp = urllib3.request(
        "POST",
        f"{server.url}/api/v1/image/uploads",
        body=body,
        headers={"Authorization": f"Bearer {server.admin.token}", "Content-Type": content_type},
        retries=False,
    )
    return resp.status, resp.data.decode()


def test_malformed_batch_uploads_are_refused_and_leave_nothing(server: ServerProcess) -> None:
    import hashlib

    image = b"firmware" * 1000
    good = struct.pack(">Q", len(image)) + image + hashlib.sha256(image).digest()
    kind = "application/x-uptake-images"
    cases = {
        "is cut off after 92 of its 8000 bytes": good[:100],
        "cut off in the frame": good + b"\x00\x00",
        "the sender stated": good[:-1] + bytes([good[-1] ^ 1]),
        "holds no image": b"",
        "larger than": struct.pack(">Q", 5 * 1024**3) + b"x" * 10,
    }
    for message, body in cases.items():
        status, text = _post_batch(server, body, kind)
        assert status == 400 and message in text, (message, status, text)
    assert _post_batch(server, good, "application/octet-stream")[0] == 415
    uploads = server.data_dir.rglob("uploads/*")
    assert not [p.name for p in uploads if p.name.startswith(".")], "temporary files left"
    status, text = _post_batch(server, good + good, kind)
    assert status == 201
    assert (
        json.loads(text)["images"]
        == [{"sha256": hashlib.sha256(image).hexdigest(), "length": len(image)}] * 2
    )


def test_a_manifest_lists_images_of_several_ecus(server: ServerProcess, tmp_path: Path) -> None:
    manifest = tmp_path / "release.toml"
    manifest.write_text(
        f"""
[[image]]
file = "{sample("stm32f4-bms", "1.1.0")}"
hardware_ids = ["stm32f4-bms"]
version = "1.1.0"

[[image]]
file = "{sample("rpi-gateway", "1.1.0")}"
hardware_ids = ["rpi-gateway"]
version = "1.1.0"
requires = {{ "stm32f4-bms" = ">=1.1.0" }}
"""
    )
    out = uptake("release", "publish", "--manifest", str(manifest), "--json", *_args(server))
    images = json.loads(out.stdout)["images"]
    assert [(i["filepath"], i["release_counter"], i["targets_version"]) for i in images] == [
        ("stm32f4-bms/1.1.0/bms.bin", 1, 2),
        ("rpi-gateway/1.1.0/gateway.elf", 1, 2),
    ]
    manifest.write_text(
        '[[image]]\nfile = "x.bin"\nhardware_ids = ["h"]\nversion = "1"\ncolour = 1\n'
    )
    bad = uptake("release", "publish", "--manifest", str(manifest), *_args(server), check=False)
    assert bad.returncode == 1 and "unknown field `colour`" in bad.stderr, bad.stderr
    both = uptake(
        "release", "publish", "--manifest", str(manifest), "--version", "1", *_args(server),
        check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "give no IMAGES" in both.stderr
