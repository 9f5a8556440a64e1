"""Threshold signing of releases on separate machines: stage, export, sign, import, publish.

The targets role has 3 keys, any 2 of which must sign ('uptake keys init'); each
key lives in its own directory (its holder's machine). Every step is the real
CLI against a real server; a real vehicle installs what was published.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.release import PublishError, ReleaseImage, publish_images
from signing.keys import load_signer
from tests.uptake_fixtures import ENV, PASSWORD, ServerProcess, Vehicle, sample


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


@pytest.fixture
def threshold_server(tmp_path: Path) -> Iterator[ServerProcess]:
    offline = tmp_path / "offline-keys"
    made = uptake(
        "keys", "init", "--offline-keys-dir", str(offline),
        "--role", "image-targets=2/3", "--role", "image-root=2/3", "--json",
    )  # fmt: skip
    assert json.loads(made.stdout)["image-targets"] == {
        "threshold": 2,
        "keys": ["image-targets-1", "image-targets-2", "image-targets-3"],
    }
    server = ServerProcess(tmp_path)
    # each targets key goes to its holder's machine
    for i in (1, 2, 3):
        holder = tmp_path / f"holder-{i}"
        holder.mkdir()
        for suffix in (".key", ".pub.json"):
            shutil.move(offline / f"image-targets-{i}{suffix}", holder)
    yield server
    server.stop()


def _server_args(server: ServerProcess) -> list[str]:
    return ["--server", server.url, "--token-file", str(server.config.admin_token_path)]


def test_two_of_three_targets_keys_on_separate_machines(
    threshold_server: ServerProcess, tmp_path: Path
) -> None:
    server = threshold_server
    vehicle = Vehicle(tmp_path, server)
    image = sample("rpi-gateway", "1.1.0")
    staged = uptake(
        "release", "stage", str(image), "--hardware-id", "rpi-gateway", "--version", "1.1.0",
        "--trusted-root", str(server.offline_dir / "image-root.json"), "--json",
        *_server_args(server),
    )  # fmt: skip
    stage = json.loads(staged.stdout)
    filepath = stage["images"][0]["filepath"]
    assert stage["status"]["missing"] == ["image-targets-1", "image-targets-2", "image-targets-3"]

    release_file = tmp_path / "release.json"
    uptake("release", "export", str(release_file), *_server_args(server))
    carried = [tmp_path / f"holder-{i}" / "release.json" for i in (1, 2)]
    shutil.copy(release_file, carried[0])

    # holder 1 signs offline: sees what it signs first
    signed = uptake(
        "release", "sign", str(carried[0]), "--yes", "--json",
        "--key", str(tmp_path / "holder-1" / "image-targets-1.key"),
        "--trusted-root", str(server.offline_dir / "image-root.json"),
    )  # fmt: skip
    summary = signed.stderr
    for needed in (filepath, image.stat().st_size, "rpi-gateway", "release counter 1", "expires"):
        assert str(needed) in summary, summary
    assert "ADDED" in summary and "verifies under your trusted root" in summary

    # one signature: refused, and the server says who is missing
    one = uptake("release", "import", str(carried[0]), "--json", *_server_args(server), check=False)
    assert one.returncode == 3, one.stderr
    status = json.loads(one.stdout)
    assert status["published"] is False and status["signatures_needed"] == 1
    assert status["signed_by"] == ["image-targets-1"]
    assert status["missing"] == ["image-targets-2", "image-targets-3"]
    text = uptake("release", "status", *_server_args(server)).stdout
    assert "image-targets-2, image-targets-3" in text and "1 more signature" in text
    assert filepath not in [
        i["filepath"] for i in server.admin.request("GET", "/api/v1/images")["images"]
    ]

    # holder 2 signs the file holder 1 passed on: published at the threshold
    shutil.copy(carried[0], carried[1])
    uptake(
        "release", "sign", str(carried[1]), "--yes",
        "--key", str(tmp_path / "holder-2" / "image-targets-2.key"),
    )  # fmt: skip
    two = uptake("release", "import", str(carried[1]), "--json", *_server_args(server))
    assert json.loads(two.stdout)["published"] is True
    assert uptake("release", "status", *_server_args(server), check=False).returncode == 1

    server.assign(vehicle.vin, vehicle.primary, filepath)
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
    assert vehicle.booted_image() == filepath


def test_bad_signatures_are_refused_by_name(
    threshold_server: ServerProcess, tmp_path: Path
) -> None:
    server = threshold_server
    root = (server.offline_dir / "image-root.json").read_bytes()
    holder_3 = load_signer(tmp_path / "holder-3" / "image-targets-3.key", PASSWORD.encode())
    holder_1 = load_signer(tmp_path / "holder-1" / "image-targets-1.key", PASSWORD.encode())
    spec = ReleaseImage(sample("stm32f4-bms", "1.1.0"), ["stm32f4-bms"], "1.1.0")
    # the one-machine shortcut: one key is below the threshold, two publish
    with pytest.raises(PublishError, match="threshold"):
        publish_images(server.admin, [spec], [holder_3], root)
    published = publish_images(server.admin, [spec], [holder_3, holder_1], root)
    assert published[0].targets_version == 2 and not published[0].already_published
    again = publish_images(server.admin, [spec], [holder_3, holder_1], root)
    assert again[0].already_published and again[0].targets_version == 2

    # a signature over something else, and a key that is not a targets key
    uptake(
        "release", "stage", str(sample("stm32f4-bms", "2.0.0")), "--hardware-id", "stm32f4-bms",
        "--version", "2.0.0", "--trusted-root", str(server.offline_dir / "image-root.json"),
        *_server_args(server),
    )  # fmt: skip
    release_file = tmp_path / "release.json"
    uptake("release", "export", str(release_file), *_server_args(server))
    data: dict[str, Any] = json.loads(release_file.read_bytes())
    signature = holder_1.sign(b"something else").to_dict()
    data["staged"]["signatures"] = [signature]
    release_file.write_text(json.dumps(data))
    bad = uptake("release", "import", str(release_file), *_server_args(server), check=False)
    assert bad.returncode == 1 and "image-targets-1 does not verify" in bad.stderr
    uptake("release", "export", str(release_file), *_server_args(server))
    uptake("release", "sign", str(release_file), "--yes", "--key",
           str(server.data_dir / "keys" / "image-snapshot.key"))  # fmt: skip
    wrong = uptake("release", "import", str(release_file), *_server_args(server), check=False)
    assert wrong.returncode == 1
    assert "key image-snapshot is not one of root's targets keys" in wrong.stderr


def test_keys_status_lists_every_role_and_warns_ahead_of_offline_expiry(
    threshold_server: ServerProcess,
) -> None:
    data_dir = str(threshold_server.data_dir)
    roles = json.loads(uptake("keys", "status", "--data-dir", data_dir, "--json").stdout)
    by_role = {(r["repository"], r["role"]): r for r in roles}
    assert len(by_role) == 8
    targets = by_role[("image", "targets")]
    assert targets["threshold"] == 2 and not targets["online"]
    assert targets["keys"] == ["image-targets-1", "image-targets-2", "image-targets-3"]
    assert by_role[("image", "timestamp")]["online"] and by_role[("image", "timestamp")]["version"]
    assert by_role[("director", "timestamp")]["version"] is None  # per vehicle
    assert not any(r["warning"] for r in roles)
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed")
    # 340 days on: both roots (a year) are 25 days from expiry, the targets already expired
    later = subprocess.run(
        ["faketime", "-f", "+340d", sys.executable, "-m", "uptake", "keys", "status",
         "--data-dir", data_dir],
        env=ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert later.stdout.count("WARNING") == 3, later.stdout
    assert "EXPIRED" in later.stdout and "expires in 2" in later.stdout
