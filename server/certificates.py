"""Certificates: vehicle identities from the server's device CA (or an operator's), TLS for the server.

A vehicle proves *who is asking* with a TLS client certificate that binds
its VIN; its manifest signatures still prove *what is installed*. Two ways to
get such a certificate (``docs/identity.md`` walks through both):

1. **The server's device CA** (the default). ``uptake agent init`` makes the
   vehicle's own TLS key and a certificate signing request (CSR) whose
   subject common name is the VIN; the CSR travels in ``registration.json``;
   at registration the server checks the CSR's signature and VIN and
   signs it with this CA (:meth:`CertificateAuthority.issue`). The
   agent renews it before it expires over mutual TLS, with a new CSR.
2. **An operator's own CA** (a factory PKI or an HSM-backed CA): the operator
   signs the vehicle's CSR and configures the server to trust that CA
   (``client_ca_bundle`` in ``server.json``). Such certificates must carry
   the VIN the same way.

Either way the VIN is read back from a verified certificate by
:func:`vin_of`: the ``urn:uptake:vin:<VIN>`` URI of its subject alternative
name, else its subject common name; it must follow :mod:`signing.names`.
Revocation is the fleet database's (:mod:`server.fleet`), by serial number,
checked on every request.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError
from signing.names import InvalidNameError, check_name

#: URI scheme of the subject alternative name that carries a vehicle's VIN.
VIN_URI_PREFIX = "urn:uptake:vin:"
#: Lifetime of a certificate the device CA issues; agents renew well before it ends.
DEFAULT_VEHICLE_CERT_LIFETIME = datetime.timedelta(days=365)
_CA_LIFETIME = datetime.timedelta(days=20 * 365)
_MAX_CSR_BYTES = 16 * 1024
_CLOCK_SKEW = datetime.timedelta(minutes=5)

CertificateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class CertificateError(UptakeError):
    """A certificate or CSR is unusable (malformed, wrong VIN, weak key...); says which."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def vin_of(cert: x509.Certificate) -> str:
    """The VIN a vehicle certificate binds (SAN ``urn:uptake:vin:<VIN>``, else subject CN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        uris = []
    vins = [u.removeprefix(VIN_URI_PREFIX) for u in uris if u.startswith(VIN_URI_PREFIX)]
    if len(vins) > 1:
        raise CertificateError("certificate names more than one VIN")
    if not vins:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        vins = [str(n.value) for n in names]
    if len(vins) != 1:
        raise CertificateError("certificate names no VIN (subject CN or urn:uptake:vin: SAN)")
    try:
        return check_name(vins[0], "certificate VIN")
    except InvalidNameError as exc:
        raise CertificateError(str(exc)) from exc


#: Longest serial text :func:`canonical_serial` reads (20 octets, as colon-separated hex pairs).
MAX_SERIAL_TEXT = 96


def canonical_serial(text: str) -> str:
    """A serial number as the fleet database names it: lower-case hex, no leading zeros.

    Reads what tools print (``openssl x509 -serial``: ``01FAD9...``; ``-text``:
    ``01:fa:d9:...``), so every spelling of one serial names one certificate.
    """
    digits = text.replace(":", "")
    if not (0 < len(text) <= MAX_SERIAL_TEXT and digits and all(c in _HEX for c in digits)):
        raise CertificateError(f"serial number {text[:100]!r} is not hexadecimal")
    return format(int(digits, 16), "x")


_HEX = frozenset("0123456789abcdefABCDEF")


def issuer_key(name: x509.Name) -> str:
    """How the fleet database names an issuer: SHA-256 of its DER-encoded name."""
    return hashlib.sha256(name.public_bytes()).hexdigest()


def certificate_key(cert: x509.Certificate) -> tuple[str, str]:
    """How the fleet database names a certificate: hex serial, SHA-256 of the issuer name."""
    return format(cert.serial_number, "x"), issuer_key(cert.issuer)


def _check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise CertificateError("CSR key: elliptic curves of at least 256 bits only")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CertificateError("CSR key: RSA keys of at least 2048 bits only")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CertificateError("CSR key: ECDSA, Ed25519 or RSA only")


def parse_csr(pem: bytes | str, vin: str) -> x509.CertificateSigningRequest:
    """A CSR for ``vin``, its signature checked (proof that the requester holds the key)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > _MAX_CSR_BYTES:
        raise CertificateError(f"CSR larger than {_MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate signing request ({exc})") from exc
    if not csr.is_signature_valid:
        raise CertificateError("CSR signature does not verify")
    _check_public_key(csr.public_key())
    names = [str(n.value) for n in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [vin]:
        raise CertificateError(f"CSR subject CN must be the VIN {vin!r}, got {names}")
    return csr


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA key and certificate: the device CA that signs vehicles' CSRs (see module
    docstring), or, for embedded deployments, the server CA that signs the server's TLS
    certificate. Two separate CAs, so one never vouches for the other's kind."""

    certificate: x509.Certificate
    key: CertificateKey

    @classmethod
    def generate(cls, name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path, password: bytes) -> None:
        """The certificate (public) and the key (encrypted with ``password``, 0600)."""
        write_atomic(cert_path, self.certificate.public_bytes(serialization.Encoding.PEM))
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        write_atomic(key_path, key_pem, mode=0o600)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, password: bytes) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password)
        except (OSError, ValueError, TypeError) as exc:
            raise CertificateError(f"CA {cert_path} / {key_path}: {exc}") from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                                rsa.RSAPrivateKey)):  # fmt: skip
            raise CertificateError(f"CA key {key_path}: unsupported key type")
        return cls(cert, key)

    def issue(
        self,
        csr_pem: bytes | str,
        vin: str,
        lifetime: datetime.timedelta = DEFAULT_VEHICLE_CERT_LIFETIME,
    ) -> x509.Certificate:
        """A client certificate binding ``vin`` to the key of ``csr_pem``."""
        csr = parse_csr(csr_pem, vin)
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vin)]))
            .issuer_name(self.certificate.subject)
            .public_key(csr.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(VIN_URI_PREFIX + vin)]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(
                self.key,
                None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256(),
            )
        )


def server_certificate(
    ca: CertificateAuthority, hostnames: list[str], lifetime: datetime.timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for ``hostnames`` (DNS names or IP addresses), signed by ``ca``.

    For embedded and development deployments (``uptake server init`` without
    an operator's certificate): vehicles then trust ``ca``'s certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key
