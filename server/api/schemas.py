"""The request bodies of the HTTP API, declared once (msgspec).

Strict types (``"false"`` is not a boolean, ``"1"`` not a number), unknown
keys refused, names and target paths of the grammar of :mod:`signing.names`
(the patterns document it in the OpenAPI description, and ``__post_init__``
applies the one validator). A body that does not fit answers 400 with
msgspec's message, which names the field (``$.ecus[0].serial``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

from server.roles import Role
from signing.names import (
    MAX_TARGET_PATH_LENGTH,
    NAME_PATTERN,
    TARGET_PATH_PATTERN,
    check_name,
    check_target_path,
)

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description="VIN, ECU serial, id")]
TargetPath = Annotated[
    str, msgspec.Meta(pattern=TARGET_PATH_PATTERN, max_length=MAX_TARGET_PATH_LENGTH)
]
ShortText = Annotated[str, msgspec.Meta(max_length=1000)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class EcuRegistration(_Body):
    serial: Name
    hardware_id: Name
    #: the ECU's signing key, in the ``*.pub.json`` format
    public_key: dict[str, Any]
    #: X25519 public key (hex) for images encrypted to this ECU; "" when it cannot decrypt
    encryption_key: Annotated[str, msgspec.Meta(max_length=64)] = ""

    def __post_init__(self) -> None:
        check_name(self.serial, "ecus[].serial")
        check_name(self.hardware_id, f"ecus[{self.serial}].hardware_id")


class VehicleRegistration(_Body):
    vin: Name
    primary_ecu_serial: Name
    ecus: Annotated[list[EcuRegistration], msgspec.Meta(min_length=1, max_length=256)]
    #: deliver this vehicle's images encrypted to each ECU's key
    encrypt_images: bool = False
    #: PEM certificate signing request of the vehicle's TLS key (subject CN = VIN)
    tls_csr: Annotated[str, msgspec.Meta(max_length=16384)] = ""

    def __post_init__(self) -> None:
        check_name(self.vin, "vin")
        check_name(self.primary_ecu_serial, "primary_ecu_serial")


class AssignmentRequest(_Body):
    ecu_serial: Name
    filepath: TargetPath

    def __post_init__(self) -> None:
        check_name(self.ecu_serial, "ecu_serial")
        check_target_path(self.filepath, "filepath")


class ReportCounterReset(_Body):
    reason: ShortText = ""


class TokenRequest(_Body):
    name: Name
    role: Role
    #: suppliers only: the hardware ids whose images the token may publish
    hardware_ids: Annotated[list[Name], msgspec.Meta(max_length=64)] = []
    #: when the token stops working (ISO 8601 with a time zone); null: never
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for hw in self.hardware_ids:
            check_name(hw, "hardware_ids[]")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone (e.g. 2027-01-01T00:00:00Z)")


class CertificateRequest(_Body):
    """A vehicle asks for a (new) client certificate for a new key."""

    tls_csr: Annotated[str, msgspec.Meta(max_length=16384)]
