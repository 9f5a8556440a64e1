"""Vehicle identities in the fleet database: certificates issued, renewed and revoked.

The device CA (:class:`server.certificates.CertificateAuthority`) signs a
vehicle's CSR at registration (:func:`issue_certificate`), and again when
the vehicle renews over mutual TLS before its certificate expires. Each
certificate issued is recorded by serial number; :func:`revoke_certificate`
refuses one at once (a stolen key), :func:`revoke_vehicle` refuses every
certificate of a vehicle (decommissioned, stolen car) until
:func:`reinstate_vehicle`. Certificates of an operator's own CA are not
issued here; they are recorded the first time they are revoked, and a
revoked vehicle refuses them all the same. Every change is audited.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from server import audit
from server.certificates import CertificateAuthority, CertificateError, certificate_key
from server.db import Vehicle, VehicleCertificate, as_utc, utcnow
from server.fleet import FleetError


def issue_certificate(
    session: Session,
    ca: CertificateAuthority | None,
    vin: str,
    csr_pem: str,
    *,
    actor: str,
    lifetime: datetime.timedelta,
) -> str:
    """A client certificate for ``vin`` from its CSR (PEM), recorded and audited."""
    if ca is None:
        raise FleetError(
            409, "this server issues no vehicle certificates (it trusts an operator's CA): "
            "have that CA sign the vehicle's CSR",
        )  # fmt: skip
    vehicle = session.get(Vehicle, vin)
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    if vehicle.revoked_at is not None:
        raise FleetError(409, f"vehicle {vin} is revoked: reinstate it first")
    try:
        cert = ca.issue(csr_pem, vin, lifetime)
    except CertificateError as exc:
        raise FleetError(400, f"tls_csr: {exc}") from exc
    serial, issuer = certificate_key(cert)
    session.add(
        VehicleCertificate(
            serial=serial, issuer_sha256=issuer, vin=vin, not_after=cert.not_valid_after_utc
        )
    )
    audit.append(
        session, actor, "certificate.issue", vin, serial=serial,
        not_after=cert.not_valid_after_utc.isoformat(),
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def certificates_of(session: Session, vin: str) -> list[dict[str, Any]]:
    rows = session.exec(
        select(VehicleCertificate)
        .where(VehicleCertificate.vin == vin)
        .order_by(col(VehicleCertificate.issued_at))
    ).all()
    return [
        {
            "serial": r.serial,
            "issued_at": as_utc(r.issued_at).isoformat(),
            "not_after": as_utc(r.not_after).isoformat(),
            "revoked_at": as_utc(r.revoked_at).isoformat() if r.revoked_at else None,
        }
        for r in rows
    ]


def revoke_certificate(session: Session, vin: str, serial: str, *, actor: str) -> dict[str, Any]:
    """Refuse the certificate ``serial`` (hex) of ``vin`` from now on."""
    rows = session.exec(
        select(VehicleCertificate).where(
            VehicleCertificate.vin == vin, VehicleCertificate.serial == serial.lower()
        )
    ).all()
    if not rows:
        raise FleetError(404, f"vehicle {vin} has no certificate with serial {serial}")
    for row in rows:
        if row.revoked_at is None:
            row.revoked_at, row.revoked_by = utcnow(), actor
            session.add(row)
    audit.append(session, actor, "certificate.revoke", vin, serial=serial.lower())
    return {"vin": vin, "serial": serial.lower(), "revoked": True}


def revoke_vehicle(session: Session, vin: str, *, actor: str, reason: str = "") -> dict[str, Any]:
    """Refuse every request of ``vin`` (any certificate) until it is reinstated."""
    vehicle = session.get(Vehicle, vin)
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    if vehicle.revoked_at is None:
        vehicle.revoked_at = utcnow()
        session.add(vehicle)
        audit.append(session, actor, "vehicle.revoke", vin, reason=reason)
    return {"vin": vin, "revoked_at": as_utc(vehicle.revoked_at).isoformat()}


def reinstate_vehicle(session: Session, vin: str, *, actor: str) -> dict[str, Any]:
    vehicle = session.get(Vehicle, vin)
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    if vehicle.revoked_at is not None:
        vehicle.revoked_at = None
        session.add(vehicle)
        audit.append(session, actor, "vehicle.reinstate", vin)
    return {"vin": vin, "revoked_at": None}
