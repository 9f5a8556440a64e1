"""Keys in a PKCS#11 token (SoftHSM2) through securesystemslib signer URIs.

A private SoftHSM2 token per test holds ECDSA P-256 key pairs; ``uptake keys
import-hsm`` writes signer references (``hsm:1?label=uptake``) for them. One
becomes the image targets key and signs a release on a "separate machine";
another becomes the server's ONLINE image timestamp key, which the running
server signs with through the token.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_key_rotation import rotate
from tests.test_release_signing import uptake
from tests.uptake_fixtures import ENV, ServerProcess, Vehicle, sample

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "5678"

pytestmark = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not MODULE.exists(),
    reason="SoftHSM2 is not installed (Debian package softhsm2)",
)

# key pairs are made with the same binding securesystemslib uses (python-pkcs11), in a child
_MAKE_KEYS = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters
token = pkcs11.lib(sys.argv[1]).get_token(token_label="uptake")
with token.open(rw=True, user_pin=sys.argv[2]) as session:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    for keyid in sys.argv[3:]:
        params.generate_keypair(store=True, id=bytes([int(keyid)]), label=f"uptake-{keyid}")
"""


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh SoftHSM2 token 'uptake' with key pairs 1 and 2; the environment to use it."""
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {"SOFTHSM2_CONF": str(conf), "PYKCS11LIB": str(MODULE), "UPTAKE_HSM_PIN": PIN}
    for key, value in env.items():
        monkeypatch.setitem(ENV, key, value)  # for every child process the fixtures start
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "uptake",
         "--so-pin", "1234", "--pin", PIN],
        env=ENV, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", _MAKE_KEYS, str(MODULE), PIN, "1", "2"],
        env=ENV, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return env


def _reference(tmp_path: Path, name: str, hsm_keyid: int) -> tuple[Path, str]:
    reference = tmp_path / f"{name}.signer.json"
    made = uptake("keys", "import-hsm", str(reference), "--hsm-keyid", str(hsm_keyid), "--json")
    answer = json.loads(made.stdout)
    assert answer["uri"] == f"hsm:{hsm_keyid}?label=uptake"
    keyid: str = answer["keyid"]
    return reference, keyid


def test_a_release_signed_in_softhsm2_through_a_pkcs11_signer_uri(
    token: dict[str, Any], server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    reference, keyid = _reference(tmp_path, "hsm-targets", 1)
    server.stop()
    rotated = rotate(server, "image", "targets", "--new-key", str(reference))
    assert rotated["new_keyids"] == {"hsm-targets": keyid}
    server.start()
    args = ["--server", server.url, "--token-file", str(server.config.admin_token_path)]
    uptake(
        "release", "stage", str(sample("rpi-gateway", "1.1.0")), "--hardware-id", "rpi-gateway",
        "--version", "1.1.0", "--trusted-root", str(server.offline_dir / "image-root.json"), *args,
    )  # fmt: skip
    release_file = tmp_path / "release.json"
    uptake("release", "export", str(release_file), *args)
    signed = uptake(
        "release", "sign", str(release_file), "--key", str(reference), "--yes", "--json"
    )
    assert json.loads(signed.stdout)["keyid"] == keyid
    status = json.loads(uptake("release", "import", str(release_file), "--json", *args).stdout)
    assert status["published"] and status["signed_by"] == ["hsm-targets"]
    metadata = server.data_dir / "image-repo" / "metadata"
    newest = max(int(p.name.split(".")[0]) for p in metadata.glob("*.targets.json"))
    targets = json.loads((metadata / f"{newest}.targets.json").read_bytes())
    assert [s["keyid"] for s in targets["signatures"]] == [keyid]
    server.assign(vehicle.vin, vehicle.primary, "rpi-gateway/1.1.0/gateway.elf")
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report


def test_the_server_signs_with_an_online_key_in_softhsm2(
    token: dict[str, Any], server: ServerProcess, vehicle: Vehicle, tmp_path: Path
) -> None:
    reference, keyid = _reference(tmp_path, "hsm-timestamp", 2)
    server.stop()
    rotate(server, "image", "timestamp", "--new-key", str(reference))
    keys_dir = server.data_dir / "keys"
    assert (keys_dir / "image-timestamp.signer.json").exists()
    assert not (keys_dir / "image-timestamp.key").exists()  # the old key is gone for good
    server.start()
    published = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    timestamp = json.loads((server.data_dir / "image-repo/metadata/timestamp.json").read_bytes())
    assert [s["keyid"] for s in timestamp["signatures"]] == [keyid]
    server.assign(vehicle.vin, vehicle.primary, published.filepath)
    report = vehicle.run_once().report
    assert report["outcomes"][vehicle.primary]["result"] == "installed", report
