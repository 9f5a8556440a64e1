"""The metadata a primary hands a secondary over a byte transport (UDS, serial).

A secondary doing partial verification needs the director targets exactly
as the primary fetched them, plus any director roots newer than the one it
trusts (so it can follow a key rotation), and the target path it is meant
to install. Over UDS this blob goes to the ECU's metadata region before the
image (RequestDownload to ``METADATA_ADDRESS``). Format: UTF-8 JSON
``{"filepath": str, "targets": base64, "roots": [base64, ...]}``, at most
:data:`MAX_BUNDLE_BYTES`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from signing.exceptions import UptakeError
from signing.names import InvalidNameError, check_target_path

MAX_BUNDLE_BYTES = 256 * 1024


class MetadataBundleError(UptakeError, ValueError):
    """The bundle is malformed; says which field."""


@dataclass(frozen=True)
class MetadataBundle:
    filepath: str
    director_targets: bytes
    director_roots: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        data = json.dumps(
            {
                "filepath": self.filepath,
                "targets": base64.b64encode(self.director_targets).decode(),
                "roots": [base64.b64encode(r).decode() for r in self.director_roots],
            }
        ).encode()
        if len(data) > MAX_BUNDLE_BYTES:
            raise MetadataBundleError(
                f"metadata bundle is {len(data)} bytes, more than {MAX_BUNDLE_BYTES}"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> MetadataBundle:
        if len(data) > MAX_BUNDLE_BYTES:
            raise MetadataBundleError(f"metadata bundle larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MetadataBundleError(f"metadata bundle is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("filepath"), str):
            raise MetadataBundleError("metadata bundle: filepath must be a string")
        roots = raw.get("roots", [])
        if (
            not isinstance(raw.get("targets"), str)
            or not isinstance(roots, list)
            or not all(isinstance(r, str) for r in roots)
        ):
            raise MetadataBundleError(
                "metadata bundle: targets must be base64, roots a list of base64"
            )
        try:
            check_target_path(raw["filepath"], "metadata bundle: filepath")
        except InvalidNameError as exc:
            raise MetadataBundleError(str(exc)) from exc
        try:
            return cls(
                raw["filepath"],
                base64.b64decode(raw["targets"], validate=True),
                tuple(base64.b64decode(r, validate=True) for r in roots),
            )
        except binascii.Error as exc:
            raise MetadataBundleError(f"metadata bundle: bad base64 ({exc})") from exc
