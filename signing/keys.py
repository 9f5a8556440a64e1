"""Keys and signers.

Every signing key in Uptake is a ``securesystemslib`` :class:`CryptoSigner`
(pyca/cryptography underneath). On disk a key is two files:

* ``NAME.key``: the private key, PKCS#8 PEM, always encrypted with a
  password (``BestAvailableEncryption``);
* ``NAME.pub.json``: the public key in TUF's key format plus its key id,
  safe to copy anywhere (it goes into root metadata, the fleet database...).

Passwords come from the caller: the CLI takes them from an environment
variable (:data:`PASSWORD_ENV`) or prompts for them.

A key can also live outside any file: in a hardware security module, a
YubiKey or SoftHSM2 token (PKCS#11), or a cloud key service. Such a key is
named by a *signer reference*, ``NAME.signer.json``::

    {"uri": "hsm:1?label=uptake", "public_key": {"keyid": "…", "keytype": "ecdsa", …}}

where ``uri`` is a securesystemslib private key URI
(``Signer.from_priv_key_uri``: ``hsm:``, ``gcpkms:``, ``awskms:``,
``azurekms:``... each needing its library). :func:`load_key` opens either
kind, so every role's key (offline or online) can be either. A PKCS#11 PIN
comes from :data:`HSM_PIN_ENV`.
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
    Signer,
    SSlibKey,
)

from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError

#: Environment variable holding the password of private key files.
PASSWORD_ENV = "UPTAKE_KEY_PASSWORD"

#: Environment variable holding the PIN of a PKCS#11 token (HSM, YubiKey, SoftHSM2).
HSM_PIN_ENV = "UPTAKE_HSM_PIN"
#: File name suffix of a signer reference (a key kept in an HSM or a key service).
SIGNER_REFERENCE_SUFFIX = ".signer.json"

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


def save_signer_reference(uri: str, key: Key, path: Path) -> None:
    """Write a signer reference (see module docstring): the URI of a key kept elsewhere."""
    if not str(path).endswith(SIGNER_REFERENCE_SUFFIX):
        raise KeyFileError(
            f"{path}: a signer reference file name ends with {SIGNER_REFERENCE_SUFFIX}"
        )
    body = {"uri": uri, "public_key": public_key_to_dict(key)}
    write_atomic(path, json.dumps(body, indent=2).encode() + b"\n")


def _read_signer_reference(path: Path) -> tuple[str, SSlibKey]:
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read signer reference {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise KeyFileError(f"signer reference {path} is not valid JSON: {exc}") from exc
    uri = data.get("uri") if isinstance(data, dict) else None
    if not isinstance(uri, str) or ":" not in uri:
        raise KeyFileError(f"{path}: expected an object with a signer URI in 'uri'")
    return uri, public_key_from_dict(data.get("public_key"), where=f"{path}: public_key")


def hsm_pin(_message: str) -> str:
    """The PKCS#11 PIN, from :data:`HSM_PIN_ENV` (a securesystemslib secrets handler)."""
    pin = os.environ.get(HSM_PIN_ENV)
    if not pin:
        raise KeyFileError(f"the PKCS#11 token needs its PIN: set {HSM_PIN_ENV}")
    return pin


def load_signer_reference(path: Path) -> Signer:
    """The signer a reference file names (``Signer.from_priv_key_uri``)."""
    uri, public = _read_signer_reference(path)
    try:
        return Signer.from_priv_key_uri(uri, public, hsm_pin)
    except ImportError as exc:
        raise KeyFileError(
            f"{path}: the signer for {uri.split(':', 1)[0]}: URIs needs a library that is not "
            f"installed ({exc.name or exc}); for PKCS#11: pip install 'uptake[hsm]'"
        ) from exc
    except ValueError as exc:
        raise KeyFileError(f"{path}: cannot use signer URI {uri!r}: {exc}") from exc


def is_signer_reference(path: Path) -> bool:
    return str(path).endswith(SIGNER_REFERENCE_SUFFIX)


def load_key(path: Path, password: bytes | None) -> Signer:
    """Any key: an encrypted ``NAME.key`` file or a ``NAME.signer.json`` reference."""
    if is_signer_reference(path):
        return load_signer_reference(path)
    if password is None:
        raise KeyFileError(f"{path} is encrypted: a password is needed")
    return load_signer(path, password)


def key_public_half(path: Path) -> SSlibKey:
    """The public key of a key file, a public key file or a signer reference."""
    path = Path(path)
    if is_signer_reference(path):
        return _read_signer_reference(path)[1]
    if path.name.endswith(".key"):
        return load_public_key(public_key_path(path))
    return load_public_key(path)


def key_name(path: Path) -> str:
    """The name a key file is known by (``image-targets-2`` for ``…/image-targets-2.key``)."""
    name = Path(path).name
    for suffix in (SIGNER_REFERENCE_SUFFIX, ".pub.json", ".key"):
        name = name.removesuffix(suffix)
    return name
