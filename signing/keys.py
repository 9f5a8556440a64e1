"""Keys and signers.

Every signing key in Uptake is a ``securesystemslib`` :class:`CryptoSigner`
(pyca/cryptography underneath). On disk a key is two files:

* ``NAME.key``: the private key, PKCS#8 PEM, always encrypted with a
  password (``BestAvailableEncryption``);
* ``NAME.pub.json``: the public key in TUF's key format plus its key id,
  safe to copy anywhere (it goes into root metadata, the fleet database...).

Passwords come from the caller: the CLI takes them from an environment
variable (:data:`PASSWORD_ENV`) or prompts for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    load_pem_private_key,
)
from securesystemslib.signer import (
    ECDSA_SHA2_NISTP256,
    ED25519,
    RSASSA_PSS_SHA256,
    CryptoSigner,
    Key,
    SSlibKey,
)

from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError

#: Environment variable holding the password of private key files.
PASSWORD_ENV = "UPTAKE_KEY_PASSWORD"

#: Accepted key types, by the name users type.
KEY_TYPES = ("ed25519", "ecdsa-p256", "rsa-pss")


class KeyFileError(UptakeError):
    """A key file is missing, malformed, or cannot be decrypted."""


def generate_signer(key_type: str = "ed25519") -> CryptoSigner:
    """Generate a new key pair of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "ed25519":
        return CryptoSigner.generate_ed25519()
    if key_type == "ecdsa-p256":
        return CryptoSigner.generate_ecdsa(scheme=ECDSA_SHA2_NISTP256)
    if key_type == "rsa-pss":
        return CryptoSigner.generate_rsa(scheme=RSASSA_PSS_SHA256)
    raise ValueError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")


def public_key_path(private_path: Path) -> Path:
    """The public key file that accompanies ``private_path``."""
    return private_path.with_name(private_path.name.removesuffix(".key") + ".pub.json")


def save_signer(signer: CryptoSigner, path: Path, password: bytes) -> None:
    """Write ``signer`` to ``path`` (encrypted) and its public key beside it."""
    if not password:
        raise KeyFileError(f"refusing to write {path} without a password")
    private_key = signer._private_key  # the only way to re-encrypt a CryptoSigner key
    pem = private_key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password)
    )
    write_atomic(path, pem, mode=0o600)
    save_public_key(signer.public_key, public_key_path(path))


def load_signer(path: Path, password: bytes) -> CryptoSigner:
    """Load the encrypted private key at ``path`` with its public key file."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from exc
    public = load_public_key(public_key_path(Path(path)))
    try:
        private_key = load_pem_private_key(pem, password or None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"cannot decrypt private key {path}: wrong password or not a PKCS#8 PEM key"
        ) from exc
    try:
        return CryptoSigner(private_key, public)
    except Exception as exc:  # KeyMismatchError, ValueError
        raise KeyFileError(
            f"private key {path} does not match {public_key_path(Path(path))}"
        ) from exc


def public_key_to_dict(key: Key) -> dict[str, Any]:
    """Serialise a public key with its key id (the ``*.pub.json`` format)."""
    return {"keyid": key.keyid, **key.to_dict()}


def public_key_from_dict(data: Any, where: str = "public key") -> SSlibKey:
    """Parse the ``*.pub.json`` format, raising :class:`KeyFileError` naming ``where``."""
    if not isinstance(data, dict) or not isinstance(data.get("keyid"), str):
        raise KeyFileError(f"{where}: expected an object with a string 'keyid'")
    fields = {k: v for k, v in data.items() if k != "keyid"}
    try:
        key = SSlibKey.from_dict(data["keyid"], fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{where}: not a valid public key ({exc})") from exc
    if key.scheme not in (ED25519, ECDSA_SHA2_NISTP256, RSASSA_PSS_SHA256):
        raise KeyFileError(f"{where}: unsupported signature scheme {key.scheme!r}")
    return key


def save_public_key(key: Key, path: Path) -> None:
    write_atomic(path, json.dumps(public_key_to_dict(key), indent=2).encode() + b"\n")


def load_public_key(path: Path) -> SSlibKey:
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise KeyFileError(f"public key {path} is not valid JSON: {exc}") from exc
    return public_key_from_dict(data, where=str(path))


def password_from_env(env_var: str = PASSWORD_ENV) -> bytes | None:
    """The key password from ``env_var``, or ``None`` when unset."""
    value = os.environ.get(env_var)
    return value.encode() if value else None
