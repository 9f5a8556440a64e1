"""Eavesdropping: with per-ECU encryption on, nothing on the wire reveals the firmware.

The server is configured to encrypt every vehicle's images
(``encrypt_images`` in ``server.json``); a :class:`MaliciousProxy` between
the vehicle and the server records every byte the vehicle downloads. The
update still installs, yet no 64-byte window of the image and not its
firmware-info magic crossed the wire. Ciphertext tampered by an attacker who
even holds the director's online targets key (so TUF's hash checks pass)
fails authentication: the vehicle refuses it, keeps its image, and reports
the attack.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.api_client import ApiClientError
from signing.atomic_file import write_atomic
from tests.attacks.vehicle_checks import assert_attack_reported, installed_on_server, online_signer
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import ServerProcess, Vehicle, sample

MAGIC = b"UPTKFWI1"


@pytest.fixture
def encrypting(
    server: ServerProcess, tmp_path: Path
) -> Iterator[tuple[MaliciousProxy, Vehicle, list[tuple[str, bytes]]]]:
    server.stop()
    config_path = server.data_dir / "server.json"
    config = json.loads(config_path.read_bytes())
    config["encrypt_images"] = True
    write_atomic(config_path, json.dumps(config).encode())
    server.start()
    proxy = MaliciousProxy(server.url)
    wire: list[tuple[str, bytes]] = []
    vehicle = Vehicle(tmp_path, server, server_url=proxy.url)
    yield proxy, vehicle, wire
    proxy.close()


def _record(proxy: MaliciousProxy, wire: list[tuple[str, bytes]]) -> None:
    # last rewrite: sees exactly the bytes the proxy sends on to the vehicle
    proxy.rewrites.append(lambda path, body: wire.append((path, body)) or None)  # type: ignore[func-returns-value]


def test_eavesdropper_sees_no_plaintext_and_the_update_installs(
    server: ServerProcess, encrypting: tuple[MaliciousProxy, Vehicle, list[tuple[str, bytes]]]
) -> None:
    proxy, vehicle, wire = encrypting
    image = sample("rpi-gateway", "1.1.0").read_bytes()
    assert MAGIC in image
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)
    # fail closed: an ECU that cannot decrypt gets nothing rather than plaintext
    bms = server.publish(sample("stm32f4-bms", "1.1.0"), "stm32f4-bms", "1.1.0")
    with pytest.raises(ApiClientError, match=r"409.*no encryption key"):
        server.assign(vehicle.vin, vehicle.secondary, bms.filepath)
    _record(proxy, wire)

    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
    assert (vehicle.state_dir / "slots" / "b.img").read_bytes() == image
    assert installed_on_server(server, vehicle)[vehicle.primary] == gw.filepath

    seen = b"".join(body for _, body in wire)
    assert MAGIC not in seen
    leaked = [i for i in range(len(image) - 63) if image[i : i + 64] in seen]
    assert leaked == [], f"{len(leaked)} 64-byte windows of the image crossed the wire"
    paths = [p for p, _ in wire]
    assert any(
        p.startswith(f"/director/{vehicle.vin}/targets/{vehicle.primary}/") for p in paths
    ), paths
    assert not any(p.startswith("/image/targets/") for p in paths), paths


def test_tampered_ciphertext_is_refused_and_reported(
    server: ServerProcess, encrypting: tuple[MaliciousProxy, Vehicle, list[tuple[str, bytes]]]
) -> None:
    proxy, vehicle, _ = encrypting
    old = server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
    server.assign(vehicle.vin, vehicle.primary, old.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["result"] == "installed"
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(vehicle.vin, vehicle.primary, gw.filepath)

    stored = next(
        (server.data_dir / "director" / "encrypted" / vehicle.vin).rglob("1.1.0/*.gateway.elf")
    )
    tampered = bytearray(stored.read_bytes())
    tampered[100] ^= 0x01
    tampered_sha = hashlib.sha256(tampered).hexdigest()
    stolen = online_signer(server, "director-targets")

    def point_at_tampered(signed: Any) -> None:
        signed.targets[gw.filepath].hashes = {"sha256": tampered_sha}

    proxy.rewrites.append(
        lambda path, body: (
            resign(body, [stolen], point_at_tampered)
            if path.startswith("/director/") and path.endswith(".targets.json")
            else None
        )
    )
    proxy.rewrites.append(
        lambda path, body: bytes(tampered) if path.endswith(f"{tampered_sha}.gateway.elf") else None
    )
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome["result"] == "refused" and "fails authentication" in outcome["detail"], outcome
    assert vehicle.booted_image() == old.filepath
    assert installed_on_server(server, vehicle)[vehicle.primary] == old.filepath
    assert_attack_reported(server, vehicle, "fails authentication")


def test_per_vehicle_encryption_flag(server: ServerProcess, tmp_path: Path) -> None:
    """Without the server-wide option, a vehicle registered with "encrypt_images" gets ciphertext, others don't."""
    from signing.encryption import generate_encryption_key, public_key_hex
    from signing.keys import generate_signer, public_key_to_dict

    ecu_key = generate_encryption_key()
    plain = Vehicle(tmp_path, server, vin="PLAIN01", secondaries=False)
    server.admin.request(
        "POST",
        "/api/v1/vehicles",
        json_body={
            "vin": "SECRET1",
            "primary_ecu_serial": "GW-SECRET1",
            "encrypt_images": True,
            "ecus": [
                {
                    "serial": "GW-SECRET1",
                    "hardware_id": "rpi-gateway",
                    "public_key": public_key_to_dict(generate_signer().public_key),
                    "encryption_key": public_key_hex(ecu_key),
                }
            ],
        },
    )
    gw = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    server.assign(plain.vin, plain.primary, gw.filepath)
    server.assign("SECRET1", "GW-SECRET1", gw.filepath)

    def director_target(vin: str) -> dict[str, Any]:
        ts = json.loads(server.admin.get_bytes(f"/director/{vin}/metadata/timestamp.json"))
        snap_v = ts["signed"]["meta"]["snapshot.json"]["version"]
        snap = json.loads(
            server.admin.get_bytes(f"/director/{vin}/metadata/{snap_v}.snapshot.json")
        )
        targets_v = snap["signed"]["meta"]["targets.json"]["version"]
        targets = json.loads(
            server.admin.get_bytes(f"/director/{vin}/metadata/{targets_v}.targets.json")
        )
        result: dict[str, Any] = targets["signed"]["targets"][gw.filepath]
        return result

    assert "encryption" not in director_target(plain.vin)["custom"]
    secret = director_target("SECRET1")
    info = secret["custom"]["encryption"]
    assert info["plaintextHashes"]["sha256"] == gw.sha256 and info["plaintextLength"] == gw.length
    assert secret["length"] > gw.length
    served = server.admin.get_bytes(
        f"/director/SECRET1/targets/GW-SECRET1/rpi-gateway/1.1.0/{secret['hashes']['sha256']}.gateway.elf"
    )
    assert hashlib.sha256(served).hexdigest() == secret["hashes"]["sha256"] and MAGIC not in served
    # another vehicle's path does not reach this copy
    with pytest.raises(ApiClientError, match="404"):
        server.admin.get_bytes(
            f"/director/PLAIN01/targets/GW-SECRET1/rpi-gateway/1.1.0/{secret['hashes']['sha256']}.gateway.elf"
        )
