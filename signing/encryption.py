"""Per-ECU image encryption: the format shared by the director and the agent.

When the director is configured to encrypt a vehicle's images, each image
travels encrypted to exactly one ECU, so an eavesdropper on the network,
a CDN or a proxy learns nothing of the firmware. Composed only of
``cryptography`` primitives (no hand-rolled crypto):

* every ECU that can decrypt has an X25519 key pair, generated at
  provisioning; the public half is registered with the director;
* the director draws an ephemeral X25519 key per encrypted copy, derives
  ``key = HKDF-SHA256(ECDH(ephemeral, ecu), info=LABEL || eph_pub || ecu_pub)``
  and encrypts the image with AES-256-GCM in chunks of ``chunkSize``
  plaintext bytes (the STREAM construction): chunk ``i`` uses the nonce
  ``i`` (11 bytes, big-endian) ``|| last`` (1 byte, 1 on the final chunk),
  and every chunk authenticates the header (scheme, ephemeral key, plaintext
  length) as associated data. Reordered, truncated, extended or altered
  ciphertext fails to decrypt. The key is used for one file only, so
  counter nonces never repeat under a key. Encryption and decryption stream:
  memory stays one chunk whatever the image size;
* the director's target entry for that ECU names the ciphertext (its length
  and sha256: TUF checks them on download) and carries, in
  ``custom.encryption``, what the ECU needs::

      "encryption": {"scheme": "x25519-hkdf-sha256-aes256gcm-stream-v1",
                     "ephemeralPublicKey": "<64 hex>", "chunkSize": 65536,
                     "plaintextLength": 2664, "plaintextHashes": {"sha256": "..."}}

  The agent checks that the plaintext length and sha256 equal the image
  repository's entry before downloading, and the decrypted bytes' sha256
  after.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from tuf.api.metadata import TargetFile

from signing.atomic_file import write_atomic
from signing.exceptions import UptakeError

SCHEME = "x25519-hkdf-sha256-aes256gcm-stream-v1"
#: Director target ``custom`` field holding :class:`EncryptionInfo`.
ENCRYPTION = "encryption"
DEFAULT_CHUNK_SIZE = 64 * 1024
_MAX_CHUNK_SIZE = 16 * 1024 * 1024
_TAG = 16
_LABEL = b"uptake image encryption v1"
_HEX32_RE = re.compile(r"^[0-9a-f]{64}$")


class EncryptionFormatError(UptakeError):
    """``custom.encryption`` or an encryption key is malformed; says where."""


class DecryptionError(UptakeError):
    """Ciphertext did not decrypt to the promised plaintext (tampering or the wrong key)."""


@dataclass(frozen=True)
class EncryptionInfo:
    """What an ECU needs to decrypt its copy (``custom.encryption`` of a director target)."""

    ephemeral_public_key: bytes
    chunk_size: int
    plaintext_length: int
    plaintext_sha256: str
    scheme: str = SCHEME

    def to_custom(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "ephemeralPublicKey": self.ephemeral_public_key.hex(),
            "chunkSize": self.chunk_size,
            "plaintextLength": self.plaintext_length,
            "plaintextHashes": {"sha256": self.plaintext_sha256},
        }

    @property
    def ciphertext_length(self) -> int:
        return ciphertext_length(self.plaintext_length, self.chunk_size)

    def _aad(self) -> bytes:
        return (
            self.scheme.encode()
            + self.ephemeral_public_key
            + self.plaintext_length.to_bytes(8, "big")
        )


def ciphertext_length(plaintext_length: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    return plaintext_length + _TAG * _chunk_count(plaintext_length, chunk_size)


def _chunk_count(plaintext_length: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_length // chunk_size))


def _int(d: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise EncryptionFormatError(f"{where}.{key} must be an integer from {low} to {high}")
    return value


def encryption_info(target: TargetFile) -> EncryptionInfo | None:
    """Parse ``custom.encryption`` of a director target strictly; None when the target is plaintext."""
    custom = target.custom if isinstance(target.custom, dict) else {}
    raw = custom.get(ENCRYPTION)
    if raw is None:
        return None
    where = f"director target {target.path!r}: custom.{ENCRYPTION}"
    if not isinstance(raw, dict):
        raise EncryptionFormatError(f"{where} must be an object")
    if raw.get("scheme") != SCHEME:
        raise EncryptionFormatError(f"{where}.scheme must be {SCHEME!r}, got {raw.get('scheme')!r}")
    eph = raw.get("ephemeralPublicKey")
    if not isinstance(eph, str) or not _HEX32_RE.match(eph):
        raise EncryptionFormatError(f"{where}.ephemeralPublicKey must be 64 lowercase hex digits")
    hashes_ = raw.get("plaintextHashes")
    sha = hashes_.get("sha256") if isinstance(hashes_, dict) else None
    if not isinstance(sha, str) or not _HEX32_RE.match(sha):
        raise EncryptionFormatError(
            f"{where}.plaintextHashes.sha256 must be 64 lowercase hex digits"
        )
    unknown = set(raw) - {
        "scheme",
        "ephemeralPublicKey",
        "chunkSize",
        "plaintextLength",
        "plaintextHashes",
    }
    if unknown:
        raise EncryptionFormatError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return EncryptionInfo(
        bytes.fromhex(eph),
        _int(raw, "chunkSize", where, 1, _MAX_CHUNK_SIZE),
        _int(raw, "plaintextLength", where, 0, 2**53),
        sha,
    )


# -- keys ---------------------------------------------------------------------


def generate_encryption_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_key_hex(key: X25519PrivateKey) -> str:
    """The raw 32-byte public key, hex: what registration.json and the director store."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def parse_public_key(value: Any, where: str = "encryption key") -> X25519PublicKey:
    if not isinstance(value, str) or not _HEX32_RE.match(value):
        raise EncryptionFormatError(
            f"{where} must be an X25519 public key as 64 lowercase hex digits"
        )
    return X25519PublicKey.from_public_bytes(bytes.fromhex(value))


def save_encryption_key(key: X25519PrivateKey, path: Path, password: bytes) -> None:
    """Write the private key encrypted (PKCS#8 PEM), like the signing keys of :mod:`signing.keys`."""
    if not password:
        raise EncryptionFormatError(f"refusing to write {path} without a password")
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(password))
    write_atomic(path, pem, mode=0o600)


def load_encryption_key(path: Path, password: bytes) -> X25519PrivateKey:
    try:
        key = load_pem_private_key(Path(path).read_bytes(), password or None)
    except OSError as exc:
        raise EncryptionFormatError(f"cannot read encryption key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise EncryptionFormatError(
            f"cannot decrypt encryption key {path}: wrong password or not PKCS#8"
        ) from exc
    if not isinstance(key, X25519PrivateKey):
        raise EncryptionFormatError(f"{path} is not an X25519 key")
    return key


# -- streams ------------------------------------------------------------------


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


def _derive(shared: bytes, eph_pub: bytes, ecu_pub: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL + eph_pub + ecu_pub
    ).derive(shared)
    return AESGCM(key)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    while len(data) < n:
        more = src.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _chunks(src: BinaryIO, total: int, size: int) -> Iterator[tuple[int, bool, bytes]]:
    count = _chunk_count(total, size)
    for i in range(count):
        last = i == count - 1
        n = total - size * i if last else size
        data = _read_exactly(src, n)
        if len(data) != n:
            raise DecryptionError(f"input ended after {size * i + len(data)} of {total} bytes")
        yield i, last, data


def encrypt_stream(
    src: BinaryIO,
    dst: Writable,
    recipient: X25519PublicKey,
    plaintext_length: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EncryptionInfo:
    """Encrypt ``plaintext_length`` bytes of ``src`` for ``recipient`` into ``dst``."""
    ephemeral = X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ecu_pub = recipient.public_bytes(Encoding.Raw, PublicFormat.Raw)
    aead = _derive(ephemeral.exchange(recipient), eph_pub, ecu_pub)
    digest = hashlib.sha256()
    # the sha256 is only known at the end, and it is not part of the AAD, so stream in one pass
    header = EncryptionInfo(eph_pub, chunk_size, plaintext_length, "")
    aad = header._aad()
    for i, last, data in _chunks(src, plaintext_length, chunk_size):
        digest.update(data)
        dst.write(aead.encrypt(_nonce(i, last), data, aad))
    return EncryptionInfo(eph_pub, chunk_size, plaintext_length, digest.hexdigest())


def decrypt_stream(
    src: BinaryIO, dst: Writable, key: X25519PrivateKey, info: EncryptionInfo
) -> None:
    """Decrypt ``src`` into ``dst``; raise :class:`DecryptionError` unless every check passes.

    ``dst`` may hold partial plaintext when this raises: the caller discards it.
    """
    ecu_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(info.ephemeral_public_key))
    except ValueError as exc:  # low-order point
        raise DecryptionError(f"unusable ephemeral public key: {exc}") from exc
    aead = _derive(shared, info.ephemeral_public_key, ecu_pub)
    aad = info._aad()
    digest = hashlib.sha256()
    size = info.chunk_size
    count = _chunk_count(info.plaintext_length, size)
    for i in range(count):
        last = i == count - 1
        n = (info.plaintext_length - size * i if last else size) + _TAG
        data = _read_exactly(src, n)
        if len(data) != n:
            raise DecryptionError(f"ciphertext ends inside chunk {i} of {count}")
        try:
            plain = aead.decrypt(_nonce(i, last), data, aad)
        except InvalidTag as exc:
            raise DecryptionError(
                f"chunk {i} of {count} fails authentication (tampered, or not for this ECU)"
            ) from exc
        digest.update(plain)
        dst.write(plain)
    if src.read(1):
        raise DecryptionError("ciphertext continues after its final chunk")
    if digest.hexdigest() != info.plaintext_sha256:
        raise DecryptionError(
            "decrypted image's sha256 differs from the director's and image repository's"
        )
