"""Delta updates end to end: the server makes and signs deltas, the agent applies them or falls back."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile
from tuf.api.serialization.json import JSONSerializer

from server.api_client import ApiClientError
from server.delta.create import create_delta
from server.release import fetch_verified_targets
from signing.keys import load_signer
from signing.metadata import ImageCustom, expiry, image_custom
from tests.malicious_proxy import MaliciousProxy, resign
from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle, sample

PAD = random.Random(7).randbytes(256 * 1024)


def _image(tmp_path: Path, version: str, tweak: int = 0) -> Path:
    """A gateway image with a large, mostly shared payload, as real releases have."""
    pad = bytearray(PAD)
    for i in range(tweak):
        pad[i * 4099 % len(pad)] ^= 0x5A
    path = tmp_path / f"gateway-{version}.elf"
    path.write_bytes(
        sample("rpi-gateway", "1.0.0" if version == "1.0.0" else "1.1.0").read_bytes() + bytes(pad)
    )
    return path


def _wait_for_delta(server: ServerProcess, result_sha256: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = server.admin.request("GET", "/api/v1/deltas")
        for delta in listing["published"]:
            if delta["custom"]["delta"]["result"]["sha256"] == result_sha256:
                return dict(delta)
        failed = [j for j in listing["jobs"] if j["status"] in ("failed", "not_worth_it")]
        assert not failed, failed
        time.sleep(0.2)
    raise AssertionError(f"the server did not publish the delta within 60 s: {listing}")


def _vehicle_on_v1(server: ServerProcess, tmp_path: Path, server_url: str | None = None) -> Vehicle:
    vehicle = Vehicle(tmp_path, server, secondaries=False, server_url=server_url)
    v1 = server.publish(_image(tmp_path, "1.0.0"), "rpi-gateway", "1.0.0")
    server.assign(vehicle.vin, vehicle.primary, v1.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["method"] == "full"
    return vehicle


def test_delta_update_installs_a_byte_identical_image(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = _vehicle_on_v1(server, tmp_path)
    v2_file = _image(tmp_path, "1.1.0", tweak=40)
    v2 = server.publish(v2_file, "rpi-gateway", "1.1.0")
    delta = _wait_for_delta(server, v2.sha256)  # made at publish time, from what the fleet runs
    assert delta["length"] < v2.length / 10
    server.assign(vehicle.vin, vehicle.primary, v2.filepath)
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome == {
        "filepath": v2.filepath,
        "result": "installed",
        "detail": "",
        "method": "delta",
    }
    slot = vehicle.boot_env()["boot_slot"]
    assert (vehicle.state_dir / "slots" / f"{slot}.img").read_bytes() == v2_file.read_bytes()
    primary = next(e for e in server.vehicle(vehicle.vin)["ecus"] if e["serial"] == vehicle.primary)
    assert (
        primary["installed"]["sha256"] == v2.sha256 and primary["last_install"]["method"] == "delta"
    )


def _thumb_calls(shift: int) -> bytes:
    """A raw Cortex-M flash image: Thumb BL calls to one function, after a gap of ``shift``."""
    rng, out = random.Random(11), bytearray()
    while len(out) < 200_000:
        out += rng.randbytes(2 * rng.randint(1, 8))
        offset = (900_000 - (len(out) + shift + 4)) >> 1  # BL: halfword offset from PC + 4
        out += (0xF000 | (offset >> 11) & 0x7FF).to_bytes(2, "little")
        out += (0xF800 | offset & 0x7FF).to_bytes(2, "little")
    return bytes(out)


def test_release_names_the_machine_code_of_a_raw_image_and_its_delta_filters_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    # No ELF header says what a flash image holds: the release does ('--arch armt'), the
    # signed custom field carries it, and the server's delta job rewrites branches by it.
    vehicle = Vehicle(tmp_path, server, secondaries=False, health_check=[])  # not a gateway build
    old, new = tmp_path / "fw-1.bin", tmp_path / "fw-2.bin"
    old.write_bytes(_thumb_calls(0))
    new.write_bytes(bytes(64) + _thumb_calls(64))
    v1 = server.publish(old, "rpi-gateway", "1.0.0", arch="armt")
    server.assign(vehicle.vin, vehicle.primary, v1.filepath)
    assert vehicle.run_once().report["outcomes"][vehicle.primary]["method"] == "full"
    v2 = server.publish(new, "rpi-gateway", "1.1.0", arch="armt")
    delta = _wait_for_delta(server, v2.sha256)
    assert delta["custom"]["delta"]["method"] == "transformed", delta  # only the hint does that
    root = (server.offline_dir / "image-root.json").read_bytes()
    signed = fetch_verified_targets(server.admin, root).signed
    assert image_custom(signed.targets[v2.filepath]).arch == "armt"
    server.assign(vehicle.vin, vehicle.primary, v2.filepath)
    outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
    assert outcome["result"] == "installed" and outcome["method"] == "delta", outcome
    slot = vehicle.boot_env()["boot_slot"]
    assert (vehicle.state_dir / "slots" / f"{slot}.img").read_bytes() == new.read_bytes()


def test_server_refuses_an_arch_its_delta_creator_does_not_know(
    server: ServerProcess, tmp_path: Path
) -> None:
    # signed targets from a release engineer's own tooling: checked where they are published
    image = tmp_path / "fw.bin"
    image.write_bytes(_thumb_calls(0))
    root = (server.offline_dir / "image-root.json").read_bytes()
    md = fetch_verified_targets(server.admin, root)
    target = TargetFile.from_file("rpi-gateway/9.9.9/fw.bin", str(image), ["sha256"])
    target.unrecognized_fields["custom"] = ImageCustom(
        ("rpi-gateway",), 999, "9.9.9", arch="z80"
    ).to_custom()
    md.signed.targets[target.path] = target
    md.signed.version += 1
    md.signed.expires = expiry("targets")
    md.signatures.clear()
    md.sign(server.targets_signer)
    server.admin.upload_file(target.hashes["sha256"], image)
    with pytest.raises(ApiClientError, match=r"custom\.arch must be one of arm, arm64"):
        server.admin.request(
            "POST", "/api/v1/image/targets", body=md.to_bytes(JSONSerializer(compact=False)),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip


def _deltas_key(server: ServerProcess):  # type: ignore[no-untyped-def]
    return load_signer(server.data_dir / "keys" / "image-deltas.key", PASSWORD.encode())


def _serve_forged_delta(proxy: MaliciousProxy, server: ServerProcess, forged: bytes) -> None:
    """A compromised deltas key: sign an entry for ``forged`` under the real delta's path."""
    from tuf.api.metadata import TargetFile

    signer = _deltas_key(server)
    forged_target: dict[str, TargetFile] = {}

    def mutate(signed: Any) -> None:
        for path, target in signed.targets.items():
            new = TargetFile.from_data(path, forged, ["sha256"])
            new.unrecognized_fields["custom"] = target.custom
            signed.targets[path] = new
            forged_target["t"] = new

    def rewrite(path: str, body: bytes) -> bytes | None:
        if path.startswith("/image/metadata/") and path.endswith(".deltas.json"):
            return resign(body, [signer], mutate)
        if (
            "t" in forged_target
            and path.startswith("/image/targets/deltas/")
            and forged_target["t"].hashes["sha256"] in path
        ):
            return forged
        return None

    proxy.rewrites.append(rewrite)


@pytest.mark.parametrize("attack", ["corrupted", "wrong_base", "wrong_result"])
def test_bad_delta_is_refused_and_the_full_image_installed(
    server: ServerProcess, tmp_path: Path, attack: str
) -> None:
    proxy = MaliciousProxy(server.url)
    try:
        vehicle = _vehicle_on_v1(server, tmp_path, server_url=proxy.url)
        v2_file = _image(tmp_path, "1.1.0", tweak=40)
        v2 = server.publish(v2_file, "rpi-gateway", "1.1.0")
        _wait_for_delta(server, v2.sha256)
        if attack == "corrupted":
            stored = next((server.data_dir / "image-repo" / "targets" / "deltas").iterdir())
            data = bytearray(stored.read_bytes())
            data[-10] ^= 0xFF
            stored.write_bytes(bytes(data))
            expected = "hash"
        else:
            other = _image(tmp_path, "other", tweak=400)
            if attack == "wrong_base":  # a real delta, but from another image
                create_delta(other, v2_file, tmp_path / "forged.delta")
                expected = "base"
            else:  # from the right base, but to another image
                create_delta(_image(tmp_path, "1.0.0"), other, tmp_path / "forged.delta")
                expected = "other than"
            _serve_forged_delta(proxy, server, (tmp_path / "forged.delta").read_bytes())
        server.assign(vehicle.vin, vehicle.primary, v2.filepath)
        outcome = vehicle.run_once().report["outcomes"][vehicle.primary]
        assert outcome["result"] == "installed" and outcome["method"] == "full", outcome
        assert "delta refused" in outcome["detail"] and expected in outcome["detail"], outcome
        slot = vehicle.boot_env()["boot_slot"]
        assert (vehicle.state_dir / "slots" / f"{slot}.img").read_bytes() == v2_file.read_bytes()
        primary = next(
            e for e in server.vehicle(vehicle.vin)["ecus"] if e["serial"] == vehicle.primary
        )
        assert (
            primary["last_install"]["method"] == "full"
            and "delta refused" in primary["last_install"]["detail"]
        )
    finally:
        proxy.close()


def test_secondary_update_is_rebuilt_from_a_delta_by_the_primary(
    server: ServerProcess, tmp_path: Path
) -> None:
    def bms(version: str, tweak: int) -> Path:
        pad = bytearray(PAD)
        for i in range(tweak):
            pad[i * 4099 % len(pad)] ^= 0x33
        path = tmp_path / f"bms-{version}.bin"
        path.write_bytes(sample("stm32f4-bms", version).read_bytes() + bytes(pad))
        return path

    proxy = MaliciousProxy(server.url)
    try:
        vehicle = Vehicle(tmp_path, server, server_url=proxy.url)
        v1 = server.publish(bms("1.0.0", 0), "stm32f4-bms", "1.0.0")
        server.assign(vehicle.vin, vehicle.secondary, v1.filepath)
        assert vehicle.run_once().report["outcomes"][vehicle.secondary]["result"] == "installed"
        v2_file = bms("1.1.0", 30)
        v2 = server.publish(v2_file, "stm32f4-bms", "1.1.0")
        _wait_for_delta(server, v2.sha256)
        server.assign(vehicle.vin, vehicle.secondary, v2.filepath)
        proxy.requests.clear()
        outcome = vehicle.run_once().report["outcomes"][vehicle.secondary]
        assert outcome["result"] == "installed"
        # the full image never crossed the link: only the delta did
        assert not [r for r in proxy.requests if r.endswith("bms.bin") or "bms-1.1.0" in r]
        assert any("/image/targets/deltas/" in r for r in proxy.requests)
        state = vehicle.secondary_state()
        bank = (
            vehicle.state_dir
            / "secondaries"
            / vehicle.secondary
            / f"bank-{json.loads((vehicle.state_dir / 'secondaries' / vehicle.secondary / 'bootenv.json').read_bytes())['boot_slot']}.bin"
        )
        assert bank.read_bytes() == v2_file.read_bytes()
        assert state["last_install"]["result"] == "installed"
    finally:
        proxy.close()
