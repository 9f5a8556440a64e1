"""Revocation holds against what a leaked key or an operator's CA can do (attacker review F3, F4).

Real servers over real mutual TLS, real certificates made with ``cryptography``:

* F3: whoever holds a leaked vehicle key can renew it; revoking the original certificate
  refuses that renewal too (every certificate renewed from it), a leaked key mints at most one
  live certificate (the first use of a renewal retires its parent), and ``rekey-vehicle``
  retires every earlier certificate.
* F4: certificates of an operator's own CA are recorded when a registered vehicle first
  presents one, listed, and revocable by serial and issuer or by PEM, even one never used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.vehicle_identity import certificate_request
from server.certificates import CertificateAuthority, certificate_key
from tests.test_identity import _answer, _certificate, _identity_files, _pool
from tests.test_postgres import pg_url  # noqa: F401 - the fixture
from tests.uptake_fixtures import (  # the fixtures operator_ca and server
    ENV,
    ServerProcess,
    Vehicle,
    operator_ca_fixture,  # noqa: F401
    operator_ca_server,  # noqa: F401
)


def _renew(
    pool: Any, server: ServerProcess, vin: str
) -> tuple[int, Any, ec.EllipticCurvePrivateKey]:
    """Renew as whoever ``pool`` presents, for a fresh key: (status, answer, the new key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    body = json.dumps({"tls_csr": certificate_request(key, vin)}).encode()
    status, data = _answer(pool, server, "POST", f"/api/v1/vehicles/{vin}/certificate", body)
    return status, json.loads(data), key


def _as(server: ServerProcess, tmp: Path, pem: str, key: ec.EllipticCurvePrivateKey) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    return _pool(server, **_identity_files(tmp, x509.load_pem_x509_certificate(pem.encode()), key))


def _metadata(vin: str) -> str:
    return f"/director/{vin}/metadata/timestamp.json"


def test_revoking_a_certificate_refuses_what_a_leaked_key_renewed_from_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINLEAK", secondaries=False)
    leaked = _pool(server, vehicle)  # the attacker holds the vehicle's key and certificate
    status, answer, key = _renew(leaked, server, "VINLEAK")
    assert status == 201, answer
    attacker = _as(server, tmp_path / "attacker", answer["tls_certificate"], key)
    assert _answer(attacker, server, "GET", _metadata("VINLEAK"))[0] == 200
    # that first use retired the certificate it was renewed from: no more renewals from it
    status, answer, _ = _renew(leaked, server, "VINLEAK")
    assert status == 403, answer
    original = server.vehicle("VINLEAK")["certificates"][0]
    server.admin.request(
        "POST", f"/api/v1/vehicles/VINLEAK/certificates/{original['serial']}/revoke", json_body={}
    )
    assert _answer(attacker, server, "GET", _metadata("VINLEAK"))[0] == 403
    assert _answer(leaked, server, "GET", _metadata("VINLEAK"))[0] == 403
    certificates = server.vehicle("VINLEAK")["certificates"]
    assert [c["renewed_from"] for c in certificates] == [None, original["serial"]]
    assert all(c["revoked_at"] for c in certificates)


def test_renewing_again_supersedes_a_renewal_whose_answer_was_lost(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINRETRY", secondaries=False)
    pool = _pool(server, vehicle)
    first = _renew(pool, server, "VINRETRY")  # the answer never reached the vehicle
    second = _renew(pool, server, "VINRETRY")
    assert first[0] == second[0] == 201, (first[1], second[1])
    lost = _as(server, tmp_path / "lost", first[1]["tls_certificate"], first[2])
    kept = _as(server, tmp_path / "kept", second[1]["tls_certificate"], second[2])
    assert _answer(lost, server, "GET", _metadata("VINRETRY"))[0] == 403
    assert _answer(kept, server, "GET", _metadata("VINRETRY"))[0] == 200


def test_rekeying_a_vehicle_retires_every_earlier_certificate(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINREKEY", secondaries=False)
    old = _pool(server, vehicle)
    _status, answer, key = _renew(old, server, "VINREKEY")
    renewed = _as(server, tmp_path / "renewed", answer["tls_certificate"], key)
    server.admin.request("POST", "/api/v1/vehicles/VINREKEY/revoke", json_body={})
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr = tmp_path / "new.csr"
    csr.write_text(certificate_request(new_key, "VINREKEY"))
    out = tmp_path / "new.crt"
    run = subprocess.run(
        [sys.executable, "-m", "uptake", "fleet", "rekey-vehicle", "VINREKEY", "--csr", str(csr),
         "--certificate-out", str(out), "--server", server.url, "--ca-cert", str(server.ca_cert),
         "--token-file", str(server.config.admin_token_path), "--json"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    fresh = _as(server, tmp_path / "fresh", out.read_text(), new_key)
    assert _answer(fresh, server, "GET", _metadata("VINREKEY"))[0] == 200  # reinstated
    for pool in (old, renewed):
        assert _answer(pool, server, "GET", _metadata("VINREKEY"))[0] == 403


def test_operator_ca_certificates_are_recorded_listed_and_revocable(
    server: ServerProcess, operator_ca: tuple[CertificateAuthority, Path], tmp_path: Path
) -> None:
    ca, _ = operator_ca
    Vehicle(tmp_path, server, vin="VINFACTORY", secondaries=False)
    key = ec.generate_private_key(ec.SECP256R1())
    used = _certificate(ca, "VINFACTORY", key, expired=False)
    pool = _pool(server, **_identity_files(tmp_path, used, key))
    assert _answer(pool, server, "GET", _metadata("VINFACTORY"))[0] == 200
    serial, issuer = certificate_key(used)
    listed = {c["serial"]: c for c in server.vehicle("VINFACTORY")["certificates"]}
    assert listed[serial]["source"] == "operator-ca" and listed[serial]["issuer_sha256"] == issuer
    server.admin.request(
        "POST", f"/api/v1/vehicles/VINFACTORY/certificates/{serial}/revoke",
        json_body={"issuer_sha256": issuer},
    )  # fmt: skip
    assert _answer(pool, server, "GET", _metadata("VINFACTORY"))[0] == 403
    # one that leaked before it was ever used: revoked by its PEM, refused on first use
    unused = _certificate(ca, "VINFACTORY", key, expired=False)
    server.admin.request(
        "POST", "/api/v1/vehicles/VINFACTORY/certificates/revoke",
        json_body={"certificate": unused.public_bytes(serialization.Encoding.PEM).decode()},
    )  # fmt: skip
    (tmp_path / "unused").mkdir()
    never = _pool(server, **_identity_files(tmp_path / "unused", unused, key))
    assert _answer(never, server, "GET", _metadata("VINFACTORY"))[0] == 403


def test_operator_ca_certificates_of_unknown_vins_are_not_recorded(
    server: ServerProcess, operator_ca: tuple[CertificateAuthority, Path], tmp_path: Path
) -> None:
    ca, _ = operator_ca
    key = ec.generate_private_key(ec.SECP256R1())
    pool = _pool(server, **_identity_files(tmp_path, _certificate(ca, "VINNOBODY", key,
                                                                   expired=False), key))  # fmt: skip
    assert _answer(pool, server, "GET", _metadata("VINNOBODY"))[0] == 403
    audit = server.admin.request("GET", "/api/v1/audit?action=certificate.seen&subject=VINNOBODY")
    assert audit["records"] == []


@pytest.mark.postgres
def test_renewals_and_operator_ca_certificates_on_postgresql(
    tmp_path: Path,
    pg_url: str,  # noqa: F811 - the fixture imported from test_postgres
    operator_ca: tuple[CertificateAuthority, Path],
) -> None:
    """The same queries (descendants, the parent join, recording on first sight) on PostgreSQL."""
    server = ServerProcess(
        tmp_path / "pg", tls=True, database_url=pg_url, client_ca_bundle=str(operator_ca[1])
    )
    try:
        vehicle = Vehicle(tmp_path, server, vin="VINPG", secondaries=False)
        leaked = _pool(server, vehicle)
        status, answer, key = _renew(leaked, server, "VINPG")
        assert status == 201, answer
        renewed = _as(server, tmp_path / "renewed", answer["tls_certificate"], key)
        factory_key = ec.generate_private_key(ec.SECP256R1())
        factory = _certificate(operator_ca[0], "VINPG", factory_key, expired=False)
        (tmp_path / "factory").mkdir()
        seen = _pool(server, **_identity_files(tmp_path / "factory", factory, factory_key))
        assert _answer(seen, server, "GET", _metadata("VINPG"))[0] == 200
        assert _answer(seen, server, "GET", _metadata("VINPG"))[0] == 200  # recorded once
        sources = [c["source"] for c in server.vehicle("VINPG")["certificates"]]
        assert sorted(sources) == ["device-ca", "device-ca", "operator-ca"], sources
        original = server.vehicle("VINPG")["certificates"][0]["serial"]
        server.admin.request(
            "POST", f"/api/v1/vehicles/VINPG/certificates/{original}/revoke", json_body={}
        )
        assert _answer(renewed, server, "GET", _metadata("VINPG"))[0] == 403
        assert _answer(seen, server, "GET", _metadata("VINPG"))[0] == 200  # another lineage
        assert "Traceback" not in server.log()
    finally:
        server.stop()
