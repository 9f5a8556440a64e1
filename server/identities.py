"""Vehicle identities in the fleet database: certificates issued, renewed, seen and revoked.

The device CA (:class:`server.certificates.CertificateAuthority`) signs a
vehicle's CSR at registration (:func:`issue_certificate`), and again when
the vehicle renews over mutual TLS before its certificate expires. Every
certificate a vehicle may use has a row, named by (serial, SHA-256 of the
issuer name):

* the device CA's, recorded when issued; a renewal records the certificate
  that asked for it (``renewed_from``), so :func:`revoke_certificate` refuses
  the certificate *and every certificate renewed from it*: a leaked key
  cannot keep its access by renewing first;
* an operator's own CA's (``client_ca_bundle``), recorded the first time a
  registered vehicle presents one (:func:`record_seen_certificate`, called
  by the access check; unregistered VINs are never recorded), or when an
  operator revokes it by serial and issuer or by its PEM
  (:func:`revoke_certificate_pem`), seen or not.

A vehicle has at most :data:`MAX_LIVE_CERTIFICATES` live (unexpired,
unrevoked) certificates of the device CA: renewing again from the same
certificate supersedes (revokes) its earlier renewal, and a renewal that
would exceed the cap is refused (an operator CA's certificates do not count:
the cap is on what renewals mint). The first time the vehicle uses its
renewed certificate, the one it renewed from is *retired*
(:func:`retire_parent`: its ``not_after`` becomes now), so a copy of the
old key can neither connect nor renew over the vehicle's new certificate.
Renewals are rate-limited: at most :data:`MAX_RENEWALS_PER_DAY` per vehicle
in any 24 hours (429 past it, nothing written), which bounds the rows and
audit records one certificate can make. For a leaked key, revoke the vehicle (:func:`revoke_vehicle`:
every certificate refused until reinstated) and give it a new key with
:func:`rekey_vehicle`, which revokes every earlier certificate. Every change
is audited.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from server import audit
from server.certificates import (
    CertificateAuthority,
    CertificateError,
    canonical_serial,
    certificate_key,
    vin_of,
)
from server.db import CertificateSource, Vehicle, VehicleCertificate, as_utc, utcnow
from server.fleet import FleetError

#: Live certificates a vehicle may hold through renewals (the current one and its successor).
MAX_LIVE_CERTIFICATES = 2
#: Renewals a vehicle may make in any 24 hours (its agent renews once per lifetime, plus retries).
MAX_RENEWALS_PER_DAY = 5
_RENEWAL_WINDOW = datetime.timedelta(days=1)
_MAX_PEM = 16 * 1024
#: RFC 5280 serials are at most 20 octets; the database column holds 64 hex digits.
MAX_SERIAL_HEX = 64

CertificateName = tuple[str, str]  # (hex serial, SHA-256 of the issuer name)


def _live(row: VehicleCertificate, now: datetime.datetime) -> bool:
    return row.revoked_at is None and as_utc(row.not_after) > now


def _certificates(session: Session, vin: str) -> list[VehicleCertificate]:
    return list(
        session.exec(
            select(VehicleCertificate)
            .where(VehicleCertificate.vin == vin)
            .order_by(col(VehicleCertificate.issued_at))
        ).all()
    )


def _revoke_rows(rows: list[VehicleCertificate], actor: str, session: Session) -> list[str]:
    now, revoked = utcnow(), []
    for row in rows:
        if row.revoked_at is None:
            row.revoked_at, row.revoked_by = now, actor
            session.add(row)
            revoked.append(row.serial)
    return revoked


def _with_descendants(
    all_rows: list[VehicleCertificate], roots: list[VehicleCertificate]
) -> list[VehicleCertificate]:
    """``roots`` and every certificate renewed from them, transitively."""
    children: dict[CertificateName, list[VehicleCertificate]] = {}
    for row in all_rows:
        if row.renewed_from_serial:
            parent = (row.renewed_from_serial, row.renewed_from_issuer)
            children.setdefault(parent, []).append(row)
    found: dict[CertificateName, VehicleCertificate] = {}
    todo = list(roots)
    while todo:
        row = todo.pop()
        name = (row.serial, row.issuer_sha256)
        if name not in found:
            found[name] = row
            todo.extend(children.get(name, []))
    return list(found.values())


def issue_certificate(
    session: Session,
    ca: CertificateAuthority | None,
    vin: str,
    csr_pem: str,
    *,
    actor: str,
    lifetime: datetime.timedelta,
    renewed_from: CertificateName | None = None,
) -> str:
    """A client certificate for ``vin`` from its CSR (PEM), recorded and audited.

    ``renewed_from``: the certificate of a vehicle renewing its own; its earlier
    renewals are superseded, and the vehicle's live certificates are capped.
    """
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
    superseded: list[str] = []
    if renewed_from is not None:
        rows, now = _certificates(session, vin), utcnow()
        parent = [r for r in rows if (r.serial, r.issuer_sha256) == renewed_from]
        if not parent or not _live(parent[0], now):
            raise FleetError(403, "the certificate asking for renewal is not a live one")
        recent = [
            r for r in rows if r.renewed_from_serial and as_utc(r.issued_at) > now - _RENEWAL_WINDOW
        ]
        if len(recent) >= MAX_RENEWALS_PER_DAY:
            raise FleetError(
                429, f"vehicle {vin} renewed its certificate {len(recent)} times in the last 24 "
                f"hours (at most {MAX_RENEWALS_PER_DAY}): try again later",
            )  # fmt: skip
        earlier = [
            r for r in rows if (r.renewed_from_serial, r.renewed_from_issuer) == renewed_from
        ]
        superseded = _revoke_rows(_with_descendants(rows, earlier), actor, session)
        live = [r for r in rows if _live(r, now) and r.source == CertificateSource.DEVICE_CA]
        if len(live) >= MAX_LIVE_CERTIFICATES:
            raise FleetError(
                409, f"vehicle {vin} already has {len(live)} live certificates (at most "
                f"{MAX_LIVE_CERTIFICATES}): an operator must revoke the extra ones (a leaked key?)",
            )  # fmt: skip
    try:
        cert = ca.issue(csr_pem, vin, lifetime)
    except CertificateError as exc:
        raise FleetError(400, f"tls_csr: {exc}") from exc
    serial, issuer = certificate_key(cert)
    session.add(
        VehicleCertificate(
            serial=serial, issuer_sha256=issuer, vin=vin, not_after=cert.not_valid_after_utc,
            source=CertificateSource.DEVICE_CA,
            renewed_from_serial=renewed_from[0] if renewed_from else "",
            renewed_from_issuer=renewed_from[1] if renewed_from else "",
        )
    )  # fmt: skip
    details: dict[str, Any] = {"serial": serial, "not_after": cert.not_valid_after_utc.isoformat()}
    if renewed_from is not None:
        details.update(renewed_from=renewed_from[0], superseded=superseded)
    audit.append(session, actor, "certificate.issue", vin, **details)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def rekey_vehicle(
    session: Session,
    ca: CertificateAuthority | None,
    vin: str,
    csr_pem: str,
    *,
    actor: str,
    lifetime: datetime.timedelta,
) -> str:
    """A new certificate for a new key of ``vin``: every earlier one is revoked, and the vehicle
    reinstated (after a leaked key: :func:`revoke_vehicle` first, then this)."""
    vehicle = session.get(Vehicle, vin)
    if vehicle is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    if ca is None:
        issue_certificate(session, ca, vin, csr_pem, actor=actor, lifetime=lifetime)  # 409
    revoked = _revoke_rows(_certificates(session, vin), actor, session)
    vehicle.revoked_at = None
    session.add(vehicle)
    audit.append(session, actor, "vehicle.rekey", vin, revoked=revoked)
    return issue_certificate(session, ca, vin, csr_pem, actor=actor, lifetime=lifetime)


def record_seen_certificate(
    session: Session, vin: str, name: CertificateName, not_after: datetime.datetime
) -> None:
    """Record a certificate of an operator's CA that registered vehicle ``vin`` presented."""
    serial, issuer = name
    session.add(
        VehicleCertificate(
            serial=serial, issuer_sha256=issuer, vin=vin, not_after=not_after,
            source=CertificateSource.OPERATOR_CA,
        )
    )  # fmt: skip
    audit.append(
        session, f"vehicle:{vin}", "certificate.seen", vin, serial=serial, issuer_sha256=issuer
    )


def retire_parent(session: Session, vin: str, name: CertificateName) -> str | None:
    """The vehicle uses ``name``, a renewed certificate, for the first time: the certificate it
    was renewed from expires now (not revoked: that would refuse ``name`` too). Its serial if it
    was still live, else None."""
    row = session.get(VehicleCertificate, name)
    if row is None or not row.renewed_from_serial:
        return None
    parent = session.get(VehicleCertificate, (row.renewed_from_serial, row.renewed_from_issuer))
    now = utcnow()
    if parent is None or parent.vin != vin or not _live(parent, now):
        return None
    parent.not_after = now
    session.add(parent)
    audit.append(
        session, f"vehicle:{vin}", "certificate.retire", vin, serial=parent.serial,
        issuer_sha256=parent.issuer_sha256, successor=row.serial,
    )  # fmt: skip
    return parent.serial


def certificates_of(session: Session, vin: str) -> list[dict[str, Any]]:
    return [
        {
            "serial": r.serial,
            "issuer_sha256": r.issuer_sha256,
            "source": r.source.value if isinstance(r.source, CertificateSource) else r.source,
            "issued_at": as_utc(r.issued_at).isoformat(),
            "not_after": as_utc(r.not_after).isoformat(),
            "revoked_at": as_utc(r.revoked_at).isoformat() if r.revoked_at else None,
            "renewed_from": r.renewed_from_serial or None,
        }
        for r in _certificates(session, vin)
    ]


def revoke_certificate(
    session: Session, vin: str, serial: str, *, actor: str, issuer_sha256: str = ""
) -> dict[str, Any]:
    """Refuse the certificate ``serial`` (hex) of ``vin``, of ``issuer_sha256`` if given (else
    of any issuer), and every certificate renewed from it, from now on."""
    try:
        serial = canonical_serial(serial)
    except CertificateError as exc:
        raise FleetError(400, f"serial: {exc}") from exc
    issuer_sha256 = issuer_sha256.lower()
    rows = _certificates(session, vin)
    matching = [
        r for r in rows
        if r.serial == serial and (not issuer_sha256 or r.issuer_sha256 == issuer_sha256)
    ]  # fmt: skip
    if not matching:
        raise FleetError(
            404, f"vehicle {vin} has no recorded certificate with serial {serial}"
            + (f" from issuer {issuer_sha256}" if issuer_sha256 else "")
            + " (revoke an operator CA's certificate never seen by uploading its PEM)",
        )  # fmt: skip
    revoked = _revoke_rows(_with_descendants(rows, matching), actor, session)
    audit.append(
        session, actor, "certificate.revoke", vin, serial=serial,
        issuer_sha256=issuer_sha256, revoked=revoked,
    )  # fmt: skip
    return {"vin": vin, "serial": serial, "revoked": True, "revoked_serials": revoked}


def revoke_certificate_pem(session: Session, vin: str, pem: str, *, actor: str) -> dict[str, Any]:
    """Refuse a certificate of ``vin`` given as PEM, recorded first if never seen (an operator
    CA's certificate that leaked before the vehicle used it)."""
    if len(pem) > _MAX_PEM:
        raise FleetError(400, f"certificate: larger than {_MAX_PEM} bytes")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        certified = vin_of(cert)
    except (ValueError, CertificateError) as exc:
        raise FleetError(400, f"certificate: not a vehicle certificate in PEM ({exc})") from exc
    if certified != vin:
        raise FleetError(400, f"certificate: it binds VIN {certified!r}, not {vin!r}")
    if session.get(Vehicle, vin) is None:
        raise FleetError(404, f"unknown vehicle {vin}")
    serial, issuer = certificate_key(cert)
    if len(serial) > MAX_SERIAL_HEX:
        raise FleetError(400, f"certificate: serial number longer than {MAX_SERIAL_HEX} hex digits")
    if session.get(VehicleCertificate, (serial, issuer)) is None:
        session.add(
            VehicleCertificate(
                serial=serial, issuer_sha256=issuer, vin=vin,
                not_after=cert.not_valid_after_utc, source=CertificateSource.OPERATOR_CA,
            )
        )  # fmt: skip
        session.flush()
    return revoke_certificate(session, vin, serial, actor=actor, issuer_sha256=issuer)


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
