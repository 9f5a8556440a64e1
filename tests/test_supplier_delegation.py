"""Supplier delegations: a supplier signs its own images, within hardware ids and path patterns.

The release engineer delegates with the offline targets key ('uptake delegation
add'); the supplier publishes with its own key and its 'supplier' token ('uptake
delegation publish'). The server refuses anything outside the delegation, and a
vehicle fed such metadata by a man in the middle refuses it and reports an attack.
Every step is the real CLI or HTTP API against a real server and a real agent.
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
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from server.api_client import AdminClient, ApiClientError
from signing.keys import generate_signer, load_signer, save_public_key, save_signer
from signing.metadata import ImageCustom, director_custom, expiry
from tests.malicious_proxy import MaliciousProxy, resign
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
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path)
    yield srv
    srv.stop()


def _admin(server: ServerProcess) -> list[str]:
    return ["--server", server.url, "--token-file", str(server.config.admin_token_path)]


def _supplier(
    server: ServerProcess, tmp: Path, hardware_ids: list[str], token_hardware_ids: list[str]
) -> tuple[Path, Path]:
    """Delegate 'acme/*' for ``hardware_ids`` to a new supplier key; its key and token files."""
    signer = generate_signer()
    key = tmp / "acme.key"
    save_signer(signer, key, PASSWORD.encode())
    save_public_key(signer.public_key, tmp / "acme.pub.json")
    hw = [a for h in hardware_ids for a in ("--hardware-id", h)]
    added = uptake(
        "delegation", "add", "acme", *hw, "--path-pattern", "acme/*",
        "--key", str(tmp / "acme.pub.json"), "--keys-dir", str(server.offline_dir), "--json",
        *_admin(server),
    )  # fmt: skip
    assert json.loads(added.stdout)["hardware_ids"] == sorted(hardware_ids)
    answer = server.admin.request(
        "POST",
        "/api/v1/tokens",
        json_body={"name": "acme", "role": "supplier", "hardware_ids": token_hardware_ids},
    )
    token = tmp / "acme-token"
    token.write_text(answer["token"])
    return key, token


def _publish(
    server: ServerProcess, key: Path, token: Path, image: Path, hw: str, version: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return uptake(
        "delegation", "publish", "acme", str(image), "--hardware-id", hw, "--version", version,
        "--key", str(key), "--trusted-root", str(server.offline_dir / "image-root.json"),
        "--server", server.url, "--token-file", str(token), "--json", *extra, check=False,
    )  # fmt: skip


def test_a_supplier_publishes_its_own_image_and_a_vehicle_installs_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    key, token = _supplier(server, tmp_path, ["rpi-gateway"], ["rpi-gateway"])
    listed = json.loads(uptake("delegation", "list", "--json", *_admin(server)).stdout)
    assert [
        (d["name"], d["paths"], d["hardware_ids"], d["version"]) for d in listed["delegations"]
    ] == [("acme", ["acme/*"], ["rpi-gateway"], 0)]
    published = _publish(
        server, key, token, sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0",
        "--arch", "arm64",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    filepath = json.loads(published.stdout)["filepath"]
    assert filepath.startswith("acme/")
    role = json.loads(server.admin.get_bytes("/image/metadata/1.acme.json"))  # the supplier's
    assert role["signed"]["targets"][filepath]["custom"]["arch"] == "arm64"  # signed hint

    vehicle = Vehicle(tmp_path, server, secondaries=False)
    server.assign(vehicle.vin, vehicle.primary, filepath)
    report = vehicle.run_once().report
    assert report["status"] == "ok", report
    assert vehicle.booted_image() == filepath

    removed = uptake(
        "delegation", "remove", "acme", "--keys-dir", str(server.offline_dir), "--json",
        *_admin(server),
    )  # fmt: skip
    assert json.loads(removed.stdout)["removed"] == "acme"
    listed = json.loads(uptake("delegation", "list", "--json", *_admin(server)).stdout)
    assert listed["delegations"] == []


def _role_metadata(server: ServerProcess, key: Path, version: int, **images: Any) -> bytes:
    """Supplier role metadata listing ``images`` (path -> (file, hardware ids)), signed by ``key``."""
    md = Metadata(Targets(version=version, expires=expiry("targets")))
    for path, (image, hardware_ids) in images.items():
        target = TargetFile.from_file(path, str(image), ["sha256"])
        target.unrecognized_fields["custom"] = ImageCustom(
            tuple(hardware_ids), 1, "9.9.9"
        ).to_custom()
        md.signed.targets[path] = target
    md.sign(load_signer(key, PASSWORD.encode()))
    return md.to_bytes(JSONSerializer(compact=False))


def test_the_server_refuses_images_outside_the_delegation(
    server: ServerProcess, tmp_path: Path
) -> None:
    # the token would allow both hardware ids: the delegation is what refuses
    key, token = _supplier(server, tmp_path, ["stm32f4-bms"], ["stm32f4-bms", "rpi-gateway"])
    supplier = AdminClient(server.url, token.read_text())
    gateway = sample("rpi-gateway", "1.1.0")
    supplier.upload_file(
        TargetFile.from_file("x", str(gateway), ["sha256"]).hashes["sha256"], gateway
    )

    def post(body: bytes, role: str = "acme") -> str:
        with pytest.raises(ApiClientError) as refused:
            supplier.request(
                "POST", f"/api/v1/image/delegations/{role}/targets", body=body,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
        return str(refused.value)

    wrong_hw = post(_role_metadata(server, key, 1, **{"acme/gw.elf": (gateway, ["rpi-gateway"])}))
    assert "HTTP 403" in wrong_hw and "outside delegation 'acme'" in wrong_hw
    wrong_path = post(
        _role_metadata(server, key, 1, **{"other/bms.bin": (gateway, ["stm32f4-bms"])})
    )
    assert "HTTP 403" in wrong_path and "matches none of delegation 'acme'" in wrong_path
    stranger = tmp_path / "stranger.key"
    save_signer(generate_signer(), stranger, PASSWORD.encode())
    unsigned = post(
        _role_metadata(server, stranger, 1, **{"acme/b.bin": (gateway, ["stm32f4-bms"])})
    )
    assert "HTTP 400" in unsigned and "not signed by a threshold" in unsigned
    valid = _role_metadata(server, key, 1, **{"acme/b.bin": (gateway, ["stm32f4-bms"])})
    assert "HTTP 404" in post(valid, role="nobody")

    # the CLI refuses before uploading anything
    refused = _publish(server, key, token, gateway, "rpi-gateway", "1.1.0")
    assert refused.returncode == 1 and "outside delegation 'acme'" in refused.stderr
    assert (
        json.loads(uptake("delegation", "list", "--json", *_admin(server)).stdout)["delegations"][
            0
        ]["version"]
        == 0
    )  # nothing was published


def test_a_vehicle_refuses_a_supplier_image_beyond_its_delegation(
    server: ServerProcess, tmp_path: Path
) -> None:
    key, token = _supplier(server, tmp_path, ["stm32f4-bms"], ["stm32f4-bms"])
    bms = _publish(server, key, token, sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    assert bms.returncode == 0, bms.stderr
    proxy = MaliciousProxy(server.url)
    try:
        vehicle = Vehicle(tmp_path, server, server_url=proxy.url, secondaries=False)
        gateway = sample("rpi-gateway", "1.1.0")
        evil = TargetFile.from_file("acme/gw.elf", str(gateway), ["sha256"])
        # the supplier (or whoever holds its key) signs a gateway image into its role ...
        supplier_signer = load_signer(key, PASSWORD.encode())

        def add_gateway_image(signed: Any) -> None:
            image = TargetFile(evil.length, evil.hashes, evil.path)
            image.unrecognized_fields["custom"] = ImageCustom(
                ("rpi-gateway",), 9, "6.6.6"
            ).to_custom()
            signed.targets[evil.path] = image

        # ... and a compromised director (its online key) directs it to the gateway ECU
        director_signer = load_signer(
            server.data_dir / "keys" / "director-targets.key", PASSWORD.encode()
        )

        def direct_it(signed: Any) -> None:
            target = TargetFile(evil.length, evil.hashes, evil.path)
            target.unrecognized_fields["custom"] = director_custom({vehicle.primary: "rpi-gateway"})
            signed.targets = {evil.path: target}

        def rewrite(path: str, body: bytes) -> bytes | None:
            if path.startswith("/image/metadata/") and path.endswith(".acme.json"):
                return resign(body, [supplier_signer], add_gateway_image)
            if path.startswith("/director/") and path.endswith(".targets.json"):
                return resign(body, [director_signer], direct_it)
            return None

        proxy.rewrites.append(rewrite)
        report = vehicle.run_once().report
    finally:
        proxy.close()
    assert report["verification_failure"] == "attack" and report["status"] == "failed", report
    assert "outside delegation 'acme'" in report["verification_error"]
    assert vehicle.booted_image() == ""
    record = server.vehicle(vehicle.vin)
    events = [e for e in record["security_events"] if e["kind"] == "attack_reported"]
    assert events and "outside delegation" in events[-1]["detail"]


def test_a_two_key_supplier_role_and_its_expiry_in_keys_status(
    server: ServerProcess, tmp_path: Path
) -> None:
    keys = []
    for name in ("acme-1", "acme-2"):
        signer = generate_signer()
        save_signer(signer, tmp_path / f"{name}.key", PASSWORD.encode())
        save_public_key(signer.public_key, tmp_path / f"{name}.pub.json")
        keys.append(tmp_path / f"{name}.key")
    uptake(
        "delegation", "add", "acme", "--hardware-id", "rpi-gateway", "--path-pattern", "acme/*",
        "--key", str(tmp_path / "acme-1.pub.json"), "--key", str(tmp_path / "acme-2.pub.json"),
        "--threshold", "2", "--keys-dir", str(server.offline_dir), *_admin(server),
    )  # fmt: skip
    token = tmp_path / "acme-token"
    token.write_text(
        server.admin.request(
            "POST", "/api/v1/tokens",
            json_body={"name": "acme", "role": "supplier", "hardware_ids": ["rpi-gateway"]},
        )["token"]
    )  # fmt: skip
    image = sample("rpi-gateway", "1.1.0")
    one = _publish(server, keys[0], token, image, "rpi-gateway", "1.1.0")
    assert one.returncode == 1 and "not signed by a threshold" in one.stderr, one.stderr
    two = _publish(server, keys[0], token, image, "rpi-gateway", "1.1.0", "--key", str(keys[1]))
    assert two.returncode == 0, two.stderr

    data_dir = str(server.data_dir)
    roles = json.loads(uptake("keys", "status", "--data-dir", data_dir, "--json").stdout)
    acme = [r for r in roles if r["role"] == "acme"]
    assert len(acme) == 1 and acme[0]["supplier"] and acme[0]["threshold"] == 2
    assert acme[0]["version"] == 1 and len(acme[0]["keys"]) == 2 and not acme[0]["warning"]
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed")
    # 160 days on, the supplier's metadata (180 days) is 20 days from expiry
    later = subprocess.run(
        ["faketime", "-f", "+160d", sys.executable, "-m", "uptake", "keys", "status",
         "--data-dir", data_dir],
        env=ENV, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert later.returncode == 0, later.stderr
    assert "SUPPLIER" in later.stdout
    assert "supplier acme re-publishes it ('uptake delegation publish acme')" in later.stdout
