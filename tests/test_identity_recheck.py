"""Vehicle identity against the attacker re-check (findings C-I of the second review).

Real servers over real mutual TLS, real certificates made with ``cryptography``:

* C: renewals are rate-limited per vehicle (each one superseding the last no longer makes
  unbounded rows), and a renewal forgets the identity cache of its own vehicle only;
* D: an expired certificate is refused on a connection kept alive since before it expired;
* E: an identity check that began before a revocation is not remembered after it;
* F: a device-CA certificate the database has no row for is refused, never recorded;
* G: any spelling of a serial number (leading zeros, upper case, colons) names the one recorded;
* H: an operator CA's certificates do not count towards the renewal cap;
* I: the first use of a renewed certificate retires the one it was renewed from.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from sqlmodel import Session

from client.vehicle_identity import certificate_request
from server.api.access import AllowedIdentities, PresentedIdentity
from server.api_client import ApiClientError
from server.certificates import CertificateAuthority, certificate_key
from server.db import Vehicle as VehicleRow
from server.db import utcnow
from server.identities import MAX_RENEWALS_PER_DAY
from tests.test_identity import _answer, _certificate, _identity_files, _pool
from tests.test_identity_revocation import _as, _metadata, _renew
from tests.uptake_fixtures import (  # the fixtures operator_ca and server
    PASSWORD,
    ServerProcess,
    Vehicle,
    operator_ca_fixture,  # noqa: F401
    operator_ca_server,  # noqa: F401
)


def _operator_ca_pool(
    server: ServerProcess, ca: CertificateAuthority, vin: str, tmp: Path
) -> tuple[object, str]:
    """A connection with a fresh certificate of ``ca`` for ``vin``; and its serial."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(ca, vin, key, expired=False)
    tmp.mkdir(parents=True, exist_ok=True)
    return _pool(server, **_identity_files(tmp, cert, key)), certificate_key(cert)[0]


def test_renewals_are_rate_limited_per_vehicle(server: ServerProcess, tmp_path: Path) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINFLOOD", secondaries=False)
    pool = _pool(server, vehicle)
    for _ in range(MAX_RENEWALS_PER_DAY):  # each supersedes the one before: the cap never bites
        status, answer, _key = _renew(pool, server, "VINFLOOD")
        assert status == 201, answer
    status, answer, _key = _renew(pool, server, "VINFLOOD")
    assert status == 429 and "24 hours" in answer["error"]["message"], answer
    assert len(server.vehicle("VINFLOOD")["certificates"]) == 1 + MAX_RENEWALS_PER_DAY
    issued = server.admin.request("GET", "/api/v1/audit?action=certificate.issue&subject=VINFLOOD")
    assert len(issued["records"]) == 1 + MAX_RENEWALS_PER_DAY
    assert _answer(pool, server, "GET", _metadata("VINFLOOD"))[0] == 200  # still itself


def test_a_renewal_forgets_only_its_own_vehicle(server: ServerProcess, tmp_path: Path) -> None:
    """Another replica revoked VINOTHER (straight in the database): this process believes its
    cache for up to IDENTITY_CACHE_SECONDS, and another vehicle's renewal must not clear it (a
    renewal flood would otherwise make every vehicle's poll a database round trip)."""
    other = _pool(server, Vehicle(tmp_path / "o", server, vin="VINOTHER", secondaries=False))
    renewing = _pool(server, Vehicle(tmp_path / "r", server, vin="VINRENEWS", secondaries=False))
    assert _answer(other, server, "GET", _metadata("VINOTHER"))[0] == 200  # remembered
    engine = create_engine(server.config.database_url, poolclass=NullPool)
    with Session(engine) as session:
        row = session.get(VehicleRow, "VINOTHER")
        assert row is not None
        row.revoked_at = utcnow()
        session.add(row)
        session.commit()
    engine.dispose()
    assert _renew(renewing, server, "VINRENEWS")[0] == 201
    assert _answer(other, server, "GET", _metadata("VINOTHER"))[0] == 200  # still cached
    time.sleep(5.5)  # IDENTITY_CACHE_SECONDS
    assert _answer(other, server, "GET", _metadata("VINOTHER"))[0] == 403


def test_an_expired_certificate_is_refused_on_a_kept_alive_connection(
    server: ServerProcess, operator_ca: tuple[CertificateAuthority, Path], tmp_path: Path
) -> None:
    Vehicle(tmp_path, server, vin="VINEXPIRES", secondaries=False)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = certificate_request(key, "VINEXPIRES")
    cert = operator_ca[0].issue(csr, "VINEXPIRES", datetime.timedelta(seconds=3))
    pool = _pool(server, **_identity_files(tmp_path, cert, key))
    assert _answer(pool, server, "GET", _metadata("VINEXPIRES"))[0] == 200
    time.sleep(max(0.0, (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC))
                   .total_seconds()) + 1.0)  # fmt: skip
    assert _answer(pool, server, "GET", _metadata("VINEXPIRES"))[0] == 403  # same connection
    assert pool.connection_from_url(server.url).num_connections == 1  # the same connection


def test_a_check_begun_before_a_revocation_is_not_remembered() -> None:
    cache = AllowedIdentities(seconds=60)
    now = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    revoked = PresentedIdentity("VINA", ("1a", "ff"), now)
    bystander = PresentedIdentity("VINB", ("2b", "ff"), now)
    cache.remember(bystander, cache.generation())
    began = cache.generation()  # a database check starts, and reads "allowed"...
    cache.forget("VINA")  # ...a revocation commits meanwhile
    cache.remember(revoked, began)  # ...and the check ends
    assert not cache.allowed(revoked)
    assert cache.allowed(bystander)  # forgetting VINA left VINB alone
    cache.remember(revoked, cache.generation())
    assert cache.allowed(revoked)


def test_a_device_ca_certificate_without_a_row_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A database restored from before a revocation, or another server sharing the device CA:
    the certificate is the device CA's, but this database never issued it."""
    Vehicle(tmp_path, server, vin="VINRESTORED", secondaries=False)
    device_ca = CertificateAuthority.load(
        server.config.device_ca_cert, server.config.keys_dir / "device-ca.key", PASSWORD.encode()
    )
    (tmp_path / "unrecorded").mkdir()
    pool, serial = _operator_ca_pool(server, device_ca, "VINRESTORED", tmp_path / "unrecorded")
    assert _answer(pool, server, "GET", _metadata("VINRESTORED"))[0] == 403
    serials = [c["serial"] for c in server.vehicle("VINRESTORED")["certificates"]]
    assert serial not in serials and len(serials) == 1


def test_any_spelling_of_a_serial_names_the_recorded_certificate(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINSERIAL", secondaries=False)
    pool = _pool(server, vehicle)
    serial = server.vehicle("VINSERIAL")["certificates"][0]["serial"]
    as_openssl_prints = format(int(serial, 16), "040X")  # openssl x509 -serial: 01FAD9...
    answer = server.admin.request(
        "POST", f"/api/v1/vehicles/VINSERIAL/certificates/{as_openssl_prints}/revoke",
        json_body={},
    )  # fmt: skip
    assert answer["serial"] == serial, answer
    assert _answer(pool, server, "GET", _metadata("VINSERIAL"))[0] == 403
    colons = ":".join(as_openssl_prints[i : i + 2] for i in range(0, 40, 2)).lower()
    answer = server.admin.request(
        "POST", f"/api/v1/vehicles/VINSERIAL/certificates/{colons}/revoke", json_body={}
    )
    assert answer["serial"] == serial, answer
    with pytest.raises(ApiClientError, match=r"HTTP 400.*not hexadecimal"):
        server.admin.request(
            "POST", "/api/v1/vehicles/VINSERIAL/certificates/xyz/revoke", json_body={}
        )


def test_operator_ca_certificates_do_not_count_towards_the_renewal_cap(
    server: ServerProcess, operator_ca: tuple[CertificateAuthority, Path], tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINMIXED", secondaries=False)
    factory, _serial = _operator_ca_pool(server, operator_ca[0], "VINMIXED", tmp_path / "f")
    assert _answer(factory, server, "GET", _metadata("VINMIXED"))[0] == 200  # recorded
    status, answer, _key = _renew(_pool(server, vehicle), server, "VINMIXED")
    assert status == 201, answer


def test_the_first_use_of_a_renewal_retires_the_certificate_it_came_from(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, vin="VINRETIRE", secondaries=False)
    thief = _pool(server, vehicle)  # a copy of the vehicle's first key and certificate
    status, answer, key = _renew(_pool(server, vehicle), server, "VINRETIRE")
    assert status == 201, answer
    renewed = _as(server, tmp_path / "renewed", answer["tls_certificate"], key)
    assert _answer(renewed, server, "GET", _metadata("VINRETIRE"))[0] == 200  # first use
    assert _answer(thief, server, "GET", _metadata("VINRETIRE"))[0] == 403
    status, answer, _key = _renew(thief, server, "VINRETIRE")  # would supersede the vehicle's
    assert status == 403, answer
    assert _answer(renewed, server, "GET", _metadata("VINRETIRE"))[0] == 200  # not locked out
    retired = server.admin.request(
        "GET", "/api/v1/audit?action=certificate.retire&subject=VINRETIRE"
    )
    assert len(retired["records"]) == 1
