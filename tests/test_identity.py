"""Vehicle identity over real TLS: each vehicle sees only its own data, and the agent trusts only
its server.

A server made by ``uptake server init`` (its own server CA and device CA) serves HTTPS; vehicles
registered with the CSR of their own TLS key get a client certificate that binds their VIN, and
the agent presents it. Requests are made with real certificates (``cryptography``), never
mocked: the answer to a vehicle that is not the one in the URL is the same whether that VIN
exists or not; revoked, expired and foreign certificates are refused; the agent refuses a
server certificate from another CA and plain HTTP to a host that is not loopback; and renews
its certificate before it expires.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.certificates import CertificateAuthority
from signing.atomic_file import write_atomic
from tests.uptake_fixtures import PASSWORD, ServerProcess, Vehicle, sample


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("tls"), tls=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fleet(
    tls_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Vehicle]:
    tmp = tmp_path_factory.mktemp("fleet")
    return {vin: Vehicle(tmp, tls_server, vin=vin, secondaries=False) for vin in ("VINA", "VINB")}


def _pool(server: ServerProcess, vehicle: Vehicle | None = None, /, **kwargs: Any) -> Any:
    """A connection as ``vehicle`` presents itself (its certificate), or with none."""
    args: dict[str, Any] = {"ca_certs": str(server.ca_cert), "retries": False, "timeout": 10.0}
    if vehicle is not None:
        args.update(
            cert_file=str(vehicle.state_dir / "tls" / "client.crt"),
            key_file=str(vehicle.state_dir / "tls" / "client.key"),
            key_password=PASSWORD,
        )
    args.update(kwargs)
    return urllib3.PoolManager(**args)


def _answer(pool: Any, server: ServerProcess, method: str, path: str, body: bytes = b"") -> Any:
    resp = pool.request(method, server.url + path, body=body or None)
    return resp.status, resp.data


def test_a_vehicle_updates_over_mutual_tls(
    tls_server: ServerProcess, fleet: dict[str, Vehicle]
) -> None:
    vehicle = fleet["VINA"]
    image = tls_server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    tls_server.assign(vehicle.vin, vehicle.primary, image.filepath)
    run = vehicle.run_once()
    assert run.report["outcomes"][vehicle.primary]["result"] == "installed", run.report
    assert run.report["manifest"] == "accepted" and run.returncode == 0
    record = tls_server.vehicle(vehicle.vin)
    assert record["certificates"] and record["certificates"][0]["revoked_at"] is None


def _vehicle_paths(vin: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/director/{vin}/metadata/timestamp.json"),
        ("GET", f"/director/{vin}/metadata/1.root.json"),
        ("GET", f"/director/{vin}/metadata/1.targets.json"),
        ("POST", f"/api/v1/vehicles/{vin}/manifest"),
        ("POST", f"/api/v1/vehicles/{vin}/certificate"),
    ]


def test_a_vehicle_cannot_read_or_post_for_another_nor_learn_which_vins_exist(
    tls_server: ServerProcess, fleet: dict[str, Vehicle]
) -> None:
    a = _pool(tls_server, fleet["VINA"])
    anonymous = _pool(tls_server)
    manifest = fleet["VINB"].signed_manifest()  # B's own, genuine
    for who in (a, anonymous):
        for (method, existing), (_, unknown) in zip(
            _vehicle_paths("VINB"), _vehicle_paths("NO-SUCH-VIN"), strict=True
        ):
            body = manifest if method == "POST" else b""
            seen = _answer(who, tls_server, method, existing, body)
            assert seen[0] == 403, (existing, seen)
            assert seen == _answer(who, tls_server, method, unknown, body), existing
    # its own data it may read
    status, _ = _answer(a, tls_server, "GET", "/director/VINA/metadata/timestamp.json")
    assert status == 200
    assert tls_server.vehicle("VINB")["manifests_rejected"] == 0  # nothing of B was touched


def _certificate(
    ca: CertificateAuthority, vin: str, key: ec.EllipticCurvePrivateKey, *, expired: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    if not expired:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vin)]))
            .sign(key, hashes.SHA256())
        )
        return ca.issue(csr.public_bytes(serialization.Encoding.PEM), vin)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vin)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )


def _identity_files(
    tmp: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> dict[str, str]:
    write_atomic(tmp / "c.crt", cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(
        tmp / "c.key",
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )  # fmt: skip
    return {"cert_file": str(tmp / "c.crt"), "key_file": str(tmp / "c.key")}


#: How a refused client certificate looks to the client: an alert in the handshake, or (TLS 1.3,
#: where the client's side of the handshake is done first) the connection closed at once.
_REFUSED = (urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError)


def test_expired_and_foreign_certificates_are_refused(
    tls_server: ServerProcess, fleet: dict[str, Vehicle], tmp_path: Path
) -> None:
    device_ca = CertificateAuthority.load(
        tls_server.config.device_ca_cert,
        tls_server.config.keys_dir / "device-ca.key",
        PASSWORD.encode(),
    )
    key = ec.generate_private_key(ec.SECP256R1())
    expired = _pool(tls_server, **_identity_files(tmp_path, _certificate(
        device_ca, "VINA", key, expired=True), key))  # fmt: skip
    with pytest.raises(_REFUSED):
        expired.request("GET", tls_server.url + "/director/VINA/metadata/timestamp.json")
    stranger_ca = CertificateAuthority.generate("not the device CA")
    (tmp_path / "other").mkdir()
    foreign = _pool(tls_server, **_identity_files(tmp_path / "other", _certificate(
        stranger_ca, "VINA", key, expired=False), key))  # fmt: skip
    with pytest.raises(_REFUSED):
        foreign.request("GET", tls_server.url + "/director/VINA/metadata/timestamp.json")


def test_a_revoked_vehicle_and_a_revoked_certificate_are_refused_at_once(
    tls_server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, tls_server, vin="VINREVOKED", secondaries=False)
    pool = _pool(tls_server, vehicle)
    path = "/director/VINREVOKED/metadata/timestamp.json"
    assert _answer(pool, tls_server, "GET", path)[0] == 200
    tls_server.admin.request("POST", "/api/v1/vehicles/VINREVOKED/revoke", json_body={})
    assert _answer(pool, tls_server, "GET", path)[0] == 403  # the same connection, at once
    assert vehicle.run_once().report["status"] == "failed"
    tls_server.admin.request("POST", "/api/v1/vehicles/VINREVOKED/reinstate", json_body={})
    assert _answer(pool, tls_server, "GET", path)[0] == 200
    serial = tls_server.vehicle("VINREVOKED")["certificates"][0]["serial"]
    tls_server.admin.request(
        "POST", f"/api/v1/vehicles/VINREVOKED/certificates/{serial}/revoke", json_body={}
    )
    assert _answer(pool, tls_server, "GET", path)[0] == 403


def test_the_agent_refuses_a_server_certificate_from_another_ca(
    tls_server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, tls_server, vin="VINCA", secondaries=False)
    other = CertificateAuthority.generate("someone else's CA")
    other_ca_file = vehicle.state_dir / "tls" / "server-ca.crt"
    other_ca_file.write_bytes(other.certificate.public_bytes(serialization.Encoding.PEM))
    run = vehicle.run_once()
    assert run.returncode == 1, run.report
    assert run.report["verification_failure"] == "configuration", run.report
    assert "certificate" in run.report["verification_error"].lower(), run.report
    assert vehicle.state().ecu(vehicle.primary).attacks_detected == ""


def test_the_agent_refuses_plain_http_to_a_host_that_is_not_loopback(
    tls_server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, tls_server, vin="VINPLAIN", secondaries=False)
    vehicle.configure(agent={"server_url": "http://192.0.2.10:8080"})
    run = vehicle.run_text()
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "plain http:// to a host that is not loopback is refused" in run.stderr, run.stderr
    vehicle.configure(tls={"allow_plain_http": True})  # the explicit escape hatch
    assert "plain http" not in vehicle.run_text().stderr


def test_the_agent_renews_its_certificate_before_it_expires(
    tls_server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, tls_server, vin="VINRENEW", secondaries=False)
    before = x509.load_pem_x509_certificate((vehicle.state_dir / "tls" / "client.crt").read_bytes())
    vehicle.configure(tls={"renew_before_days": 400.0})  # a 365-day certificate is due now
    run = vehicle.run_once()
    assert run.report["status"] == "ok", run.report
    after = x509.load_pem_x509_certificate((vehicle.state_dir / "tls" / "client.crt").read_bytes())
    assert after.serial_number != before.serial_number
    assert after.public_key() != before.public_key()  # a new key, too
    serials = [c["serial"] for c in tls_server.vehicle("VINRENEW")["certificates"]]
    assert format(after.serial_number, "x") in serials and len(serials) == 2
    audit = tls_server.admin.request(
        "GET", "/api/v1/audit?action=certificate.issue&subject=VINRENEW"
    )
    assert [r["actor"] for r in audit["records"]] == ["operator:admin", "vehicle:VINRENEW"]
    vehicle.configure(tls={"renew_before_days": 30.0})
    assert vehicle.run_once().report["status"] == "ok"  # the renewed certificate works


def test_tls_versions_below_1_2_are_refused(tls_server: ServerProcess) -> None:
    context = ssl.create_default_context(cafile=str(tls_server.ca_cert))
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    pool = urllib3.PoolManager(ssl_context=context, retries=False, timeout=5.0)
    with pytest.raises(urllib3.exceptions.SSLError):
        pool.request("GET", tls_server.url + "/health")


def test_the_certificate_a_vehicle_gets_binds_its_vin(
    tls_server: ServerProcess, fleet: dict[str, Vehicle]
) -> None:
    pem = (fleet["VINB"].state_dir / "tls" / "client.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:uptake:vin:VINB"]
