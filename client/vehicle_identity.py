"""The vehicle's TLS identity: its own key, the certificate that binds its VIN, renewal.

``uptake agent init`` makes the key (ECDSA P-256, encrypted like the ECU
keys, ``STATE/tls/client.key``) and a certificate signing request whose
subject is the VIN; the CSR goes to the server in ``registration.json``,
and ``uptake fleet add-vehicle`` writes the certificate the server's device
CA signs to ``STATE/tls/client.crt`` (or an operator's own CA signs the CSR:
``docs/identity.md``). The agent presents it on every request; the server
serves the vehicle's director metadata and takes its manifests only for the
VIN in it.

Before the certificate expires (``[tls] renew_before_days``), the agent
makes a new key and asks for a new certificate over mutual TLS with the
current one (:meth:`ClientIdentity.renew`). The new key and certificate
are written as ``*.next`` files first and then renamed into place, one after
the other. A power cut at any point leaves a working pair among the four
files, and the next start (:meth:`ClientIdentity.finish_interrupted_renewal`)
puts it in place by matching public keys: the new pair if both its files
survive, else the old one, never a key with another key's certificate.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signing.atomic_file import fsync_directory, write_atomic
from signing.exceptions import UptakeError

log = logging.getLogger(__name__)

#: Sends a CSR (PEM) to the server and returns the certificate (PEM) it issues.
RequestCertificate = Callable[[str], str]

KEY_FILE = "tls/client.key"
CERT_FILE = "tls/client.crt"


class IdentityError(UptakeError):
    """The vehicle's TLS key or certificate is unusable, or renewal failed; says which."""


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _spki(public: Any) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: what pairs a key file with a certificate."""
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )


def certificate_request(key: ec.EllipticCurvePrivateKey, vin: str) -> str:
    """A PEM CSR for ``key`` whose subject common name is ``vin``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vin)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def create_identity(key_path: Path, vin: str, password: bytes) -> str:
    """Make the vehicle's TLS key at ``key_path`` (encrypted); return its CSR (PEM)."""
    key = _new_key()
    write_atomic(key_path, _key_pem(key, password), mode=0o600)
    return certificate_request(key, vin)


@dataclass(frozen=True)
class ClientIdentity:
    """The key and certificate files the agent presents (see module docstring)."""

    cert_path: Path
    key_path: Path
    password: bytes

    @property
    def _next(self) -> tuple[Path, Path]:
        return (
            self.cert_path.with_name(self.cert_path.name + ".next"),
            self.key_path.with_name(self.key_path.name + ".next"),
        )

    def _public_of_key(self, path: Path) -> bytes | None:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), self.password)
        except (OSError, ValueError, TypeError):
            return None
        return _spki(key.public_key())

    @staticmethod
    def _public_of_certificate(path: Path) -> bytes | None:
        try:
            return _spki(x509.load_pem_x509_certificate(path.read_bytes()).public_key())
        except (OSError, ValueError):
            return None

    def finish_interrupted_renewal(self) -> None:
        """After a renewal cut short, put in place the newest key and certificate that belong
        together (same public key), wherever the crash left them; drop the leftovers.

        Safe to cut short itself: each rename keeps a matching pair among the files.
        """
        cert_next, key_next = self._next
        if not (cert_next.exists() or key_next.exists()):
            return
        keys = [(p, self._public_of_key(p)) for p in (key_next, self.key_path) if p.exists()]
        certs = [(p, self._public_of_certificate(p)) for p in (cert_next, self.cert_path)]
        pairs = [
            (cert, key)
            for cert, cert_public in certs
            for key, key_public in keys
            if cert_public is not None and cert_public == key_public
        ]
        if not pairs:
            raise IdentityError(
                f"interrupted certificate renewal: no key among {[str(p) for p, _ in keys]} "
                f"matches a certificate in {self.cert_path.parent}; register the vehicle's "
                "key anew (docs/identity.md)"
            )
        cert, key = pairs[0]  # the renewed certificate first, when it has its key
        if key != self.key_path:
            os.replace(key, self.key_path)
            fsync_directory(self.key_path.parent)
        if cert != self.cert_path:
            os.replace(cert, self.cert_path)
        key_next.unlink(missing_ok=True)
        cert_next.unlink(missing_ok=True)
        fsync_directory(self.cert_path.parent)
        log.info("finished an interrupted certificate renewal (%s)", "new pair" if
                 cert == cert_next else "old pair kept")  # fmt: skip

    def available(self) -> bool:
        return self.cert_path.is_file() and self.key_path.is_file()

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"client certificate {self.cert_path}: {exc}") from exc

    def renewal_due(self, before: datetime.timedelta, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.UTC)
        return self.certificate().not_valid_after_utc - now <= before

    def renew(self, vin: str, request_certificate: RequestCertificate) -> datetime.datetime:
        """A new key and certificate (``request_certificate`` sends the CSR over mutual TLS)."""
        key = _new_key()
        cert_next, key_next = self._next
        write_atomic(key_next, _key_pem(key, self.password), mode=0o600)
        try:
            pem = request_certificate(certificate_request(key, vin))
            cert = x509.load_pem_x509_certificate(pem.encode())
        except (UptakeError, ValueError) as exc:
            key_next.unlink(missing_ok=True)
            raise IdentityError(f"certificate renewal: {exc}") from exc
        if _spki(key.public_key()) != _spki(cert.public_key()):
            key_next.unlink(missing_ok=True)
            raise IdentityError("certificate renewal: the server certified another key")
        write_atomic(cert_next, pem.encode())
        self.finish_interrupted_renewal()
        return cert.not_valid_after_utc


def certificate_from_answer(body: bytes) -> str:
    """The ``tls_certificate`` of the server's answer to a renewal."""
    try:
        answer = json.loads(body)
        pem = answer["tls_certificate"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"the server's answer holds no certificate: {body[:200]!r}") from exc
    if not isinstance(pem, str):
        raise IdentityError("the server's answer holds no certificate")
    return pem
