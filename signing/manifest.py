"""ECU version reports and vehicle version manifests (Uptane 2.x, 5.4.2).

Each ECU signs an :class:`EcuVersionReport`: what image it has installed,
which attacks it detected, and a report counter that only grows (so a
captured report cannot be replayed). The primary collects them into a
:class:`VehicleManifest` for its VIN and signs that with its own key. The
server verifies both layers before it believes anything.

Both are serialised like TUF metadata: ``{"signed": {...}, "signatures":
[{"keyid": ..., "sig": ...}]}`` where each signature covers the canonical
JSON (OLPC canonical JSON, via securesystemslib) of ``signed``.

Parsing is strict: any missing, extra-typed or out-of-range field raises
:class:`ManifestFormatError` whose message names the field path
(``ecu_version_reports.BMS-001.signed.report_counter``...). The JSON is
parsed with bounded size and depth (:mod:`signing.json_limits`), and VINs,
ECU serials, image paths and hashes follow :mod:`signing.names`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError, VerificationError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Key, Signature, Signer

from signing.exceptions import UptakeError
from signing.json_limits import UntrustedJsonError, parse_json
from signing.names import InvalidNameError, check_hashes, check_name, check_target_path

#: Upper bound on a serialised manifest; the server refuses larger bodies.
MAX_MANIFEST_BYTES = 1024 * 1024
_MAX_ECUS = 256


class InstallResult(enum.StrEnum):
    """How an ECU's last install attempt ended (the wire value is the string)."""

    INSTALLED = "installed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    FAILED = "failed"
    POSTPONED = "postponed"


class InstallMethod(enum.StrEnum):
    """What travelled to the vehicle: the whole image, or a delta from the image it ran."""

    FULL = "full"
    DELTA = "delta"


#: Outcomes an ECU can report for its last install attempt.
INSTALL_RESULTS = tuple(r.value for r in InstallResult)
#: Outcomes that end an assignment as failed (``postponed`` keeps it pending).
FAILED_RESULTS = (InstallResult.ROLLED_BACK, InstallResult.REFUSED, InstallResult.FAILED)


class ManifestError(UptakeError):
    """Base class of manifest and report errors."""


class ManifestFormatError(ManifestError):
    """A manifest or report is malformed; ``field`` names where."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ManifestSignatureError(ManifestError):
    """A manifest or report signature is missing or does not verify."""


def _canonical(signed: dict[str, Any]) -> bytes:
    data = encode_canonical(signed)
    assert isinstance(data, str)
    return data.encode()


# -- small strict readers ---------------------------------------------------


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestFormatError(where, "must be an object")
    return value


def _str(
    d: dict[str, Any],
    key: str,
    where: str,
    *,
    grammar: Callable[[object, str], str] | None = None,
    allow_empty: bool = False,
    max_len: int = 1024,
) -> str:
    """A string field; with ``grammar`` (:mod:`signing.names`), a name or target path."""
    value = d.get(key)
    path = f"{where}.{key}" if where else key
    if not isinstance(value, str):
        raise ManifestFormatError(path, "must be a string")
    if not value and not allow_empty:
        raise ManifestFormatError(path, "must not be empty")
    if len(value) > max_len:
        raise ManifestFormatError(path, f"longer than {max_len} characters")
    if grammar is not None and value:
        try:
            grammar(value, path)
        except InvalidNameError as exc:
            raise ManifestFormatError(path, exc.problem) from exc
    return value


def _int(d: dict[str, Any], key: str, where: str) -> int:
    value = d.get(key)
    path = f"{where}.{key}" if where else key
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 2**63:
        raise ManifestFormatError(path, "must be a non-negative integer")
    return value


# -- installed image ----------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """Length and hashes of an image, as TUF's ``fileinfo`` has them."""

    length: int
    hashes: dict[str, str]


@dataclass(frozen=True)
class ImageInfo:
    """An image as TUF describes it: path, length, hashes (fields laid out as on the wire)."""

    filepath: str
    fileinfo: FileInfo

    def __post_init__(self) -> None:
        # every ImageInfo, built here or decoded from a state file, follows the grammar
        if self.filepath:
            check_target_path(self.filepath, "filepath")
        if self.fileinfo.length < 0:
            raise ValueError("fileinfo.length must not be negative")
        if self.filepath or self.fileinfo.hashes:
            check_hashes(self.fileinfo.hashes, "fileinfo.hashes")

    @classmethod
    def of(cls, filepath: str, length: int, hashes: dict[str, str]) -> ImageInfo:
        return cls(filepath, FileInfo(length, dict(hashes)))

    @property
    def length(self) -> int:
        return self.fileinfo.length

    @property
    def hashes(self) -> dict[str, str]:
        return self.fileinfo.hashes

    @property
    def sha256(self) -> str:
        """The image's sha256 ('' for no image)."""
        return self.fileinfo.hashes.get("sha256", "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "filepath": self.filepath,
            "fileinfo": {"length": self.length, "hashes": dict(self.hashes)},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ImageInfo:
        d = _obj(data, where)
        filepath = _str(d, "filepath", where, allow_empty=True, grammar=check_target_path)
        info = _obj(d.get("fileinfo"), f"{where}.fileinfo")
        length = _int(info, "length", f"{where}.fileinfo")
        hashes = _obj(info.get("hashes"), f"{where}.fileinfo.hashes")
        if hashes or filepath:  # only "no image" (factory state) reports no hashes
            try:
                check_hashes(hashes, f"{where}.fileinfo.hashes")
            except InvalidNameError as exc:
                raise ManifestFormatError(exc.where, exc.problem) from exc
        return cls.of(filepath, length, dict(hashes))


#: What an ECU with no image (factory state) reports.
NO_IMAGE = ImageInfo.of("", 0, {})


@dataclass(frozen=True)
class InstallOutcome:
    """The result of the ECU's last install attempt, kept until reported."""

    filepath: str
    result: InstallResult
    detail: str = ""
    method: InstallMethod = InstallMethod.FULL

    def __post_init__(self) -> None:
        check_target_path(self.filepath, "filepath")
        # the wire strings become the enums (ValueError for any other string)
        object.__setattr__(self, "result", InstallResult(self.result))
        object.__setattr__(self, "method", InstallMethod(self.method))

    def to_dict(self) -> dict[str, Any]:
        return {
            "filepath": self.filepath,
            "result": self.result.value,
            "detail": self.detail,
            "method": self.method.value,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> InstallOutcome:
        d = _obj(data, where)
        result = _str(d, "result", where)
        if result not in INSTALL_RESULTS:
            raise ManifestFormatError(
                f"{where}.result", f"must be one of {', '.join(INSTALL_RESULTS)}"
            )
        method = _str(d, "method", where)
        if method not in ("full", "delta"):
            raise ManifestFormatError(f"{where}.method", "must be 'full' or 'delta'")
        return cls(
            _str(d, "filepath", where, grammar=check_target_path),
            InstallResult(result),
            _str(d, "detail", where, allow_empty=True, max_len=4096),
            InstallMethod(method),
        )


# -- ECU version report -------------------------------------------------------


@dataclass(frozen=True)
class EcuVersionReport:
    """What one ECU says it has installed (signed by that ECU's key)."""

    ecu_serial: str
    installed_image: ImageInfo
    report_counter: int
    attacks_detected: str = ""
    last_install: InstallOutcome | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "ecu_serial": self.ecu_serial,
            "installed_image": self.installed_image.to_dict(),
            "attacks_detected": self.attacks_detected,
            "report_counter": self.report_counter,
        }
        if self.last_install is not None:
            d["last_install"] = self.last_install.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "signed") -> EcuVersionReport:
        d = _obj(data, where)
        last = d.get("last_install")
        return cls(
            ecu_serial=_str(d, "ecu_serial", where, grammar=check_name),
            installed_image=ImageInfo.from_dict(
                d.get("installed_image"), f"{where}.installed_image"
            ),
            report_counter=_int(d, "report_counter", where),
            attacks_detected=_str(d, "attacks_detected", where, allow_empty=True, max_len=4096),
            last_install=None
            if last is None
            else InstallOutcome.from_dict(last, f"{where}.last_install"),
        )

    def sign(self, signer: Signer) -> SignedEnvelope:
        return SignedEnvelope.create(self.to_dict(), signer)


# -- vehicle version manifest -----------------------------------------------


@dataclass(frozen=True)
class VehicleManifest:
    """The primary's signed bundle of every ECU's signed report."""

    vin: str
    primary_ecu_serial: str
    ecu_version_reports: dict[str, SignedEnvelope] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vin": self.vin,
            "primary_ecu_serial": self.primary_ecu_serial,
            "ecu_version_reports": {
                s: e.to_dict() for s, e in sorted(self.ecu_version_reports.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "signed") -> VehicleManifest:
        d = _obj(data, where)
        reports_raw = _obj(d.get("ecu_version_reports"), f"{where}.ecu_version_reports")
        if len(reports_raw) > _MAX_ECUS:
            raise ManifestFormatError(f"{where}.ecu_version_reports", f"more than {_MAX_ECUS} ECUs")
        reports: dict[str, SignedEnvelope] = {}
        for serial, env in reports_raw.items():
            rwhere = f"{where}.ecu_version_reports.{serial}"
            try:
                check_name(serial, f"{where}.ecu_version_reports key")
            except InvalidNameError as exc:
                raise ManifestFormatError(exc.where, exc.problem) from exc
            envelope = SignedEnvelope.from_dict(env, rwhere)
            report = envelope.ecu_report(rwhere)
            if report.ecu_serial != serial:
                raise ManifestFormatError(
                    f"{rwhere}.signed.ecu_serial",
                    f"says {report.ecu_serial!r}, listed under {serial!r}",
                )
            reports[serial] = envelope
        manifest = cls(
            vin=_str(d, "vin", where, grammar=check_name),
            primary_ecu_serial=_str(d, "primary_ecu_serial", where, grammar=check_name),
            ecu_version_reports=reports,
        )
        if manifest.primary_ecu_serial not in reports:
            raise ManifestFormatError(
                f"{where}.ecu_version_reports", "has no report from the primary ECU"
            )
        return manifest

    def reports(self) -> dict[str, EcuVersionReport]:
        """The parsed (not yet signature-checked) reports, by ECU serial."""
        return {
            s: e.ecu_report(f"signed.ecu_version_reports.{s}")
            for s, e in self.ecu_version_reports.items()
        }

    def sign(self, signer: Signer) -> SignedEnvelope:
        return SignedEnvelope.create(self.to_dict(), signer)


# -- envelope -----------------------------------------------------------------


@dataclass(frozen=True)
class SignedEnvelope:
    """``{"signed": ..., "signatures": [...]}`` as used by TUF and Uptane."""

    signed: dict[str, Any]
    signatures: tuple[Signature, ...]

    @classmethod
    def create(cls, signed: dict[str, Any], signer: Signer) -> SignedEnvelope:
        return cls(signed, (signer.sign(_canonical(signed)),))

    def to_dict(self) -> dict[str, Any]:
        return {"signatures": [s.to_dict() for s in self.signatures], "signed": self.signed}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> SignedEnvelope:
        prefix = f"{where}." if where else ""
        d = _obj(data, where or "document")
        signed = _obj(d.get("signed"), f"{prefix}signed")
        try:
            _canonical(signed)  # what verify() will hash: floats, for one, have no canonical form
        except FormatError as exc:
            raise ManifestFormatError(
                f"{prefix}signed", f"has no canonical JSON form ({exc})"
            ) from exc
        sigs_raw = d.get("signatures")
        if not isinstance(sigs_raw, list) or not sigs_raw or len(sigs_raw) > 16:
            raise ManifestFormatError(f"{prefix}signatures", "must be a list of 1 to 16 signatures")
        sigs = []
        for i, raw in enumerate(sigs_raw):
            s = _obj(raw, f"{prefix}signatures[{i}]")
            _str(s, "keyid", f"{prefix}signatures[{i}]", max_len=256)
            _str(s, "sig", f"{prefix}signatures[{i}]", max_len=4096)
            sigs.append(Signature(s["keyid"], s["sig"]))
        return cls(signed, tuple(sigs))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "") -> SignedEnvelope:
        try:
            parsed = parse_json(data, where=where or "document", max_bytes=MAX_MANIFEST_BYTES)
        except UntrustedJsonError as exc:
            raise ManifestFormatError(where or "document", str(exc).split(": ", 1)[-1]) from exc
        return cls.from_dict(parsed, where)

    def verify(self, key: Key, what: str) -> None:
        """Check that ``key`` signed this envelope; raise naming ``what`` otherwise."""
        data = _canonical(self.signed)
        for sig in self.signatures:
            if sig.keyid != key.keyid:
                continue
            try:
                key.verify_signature(sig, data)
                return
            except (UnverifiedSignatureError, VerificationError) as exc:
                raise ManifestSignatureError(
                    f"{what}: signature by key {key.keyid[:12]} does not verify"
                ) from exc
        raise ManifestSignatureError(f"{what}: not signed by the expected key {key.keyid[:12]}")

    def ecu_report(self, where: str = "") -> EcuVersionReport:
        prefix = f"{where}." if where else ""
        return EcuVersionReport.from_dict(self.signed, f"{prefix}signed")

    def vehicle_manifest(self) -> VehicleManifest:
        return VehicleManifest.from_dict(self.signed, "signed")


def parse_vehicle_manifest(data: bytes) -> tuple[SignedEnvelope, VehicleManifest]:
    """Parse a serialised vehicle manifest (signatures are not checked yet)."""
    envelope = SignedEnvelope.from_bytes(data)
    return envelope, envelope.vehicle_manifest()
