"""The Uptane parts of TUF metadata.

Uptane adds meaning to TUF's free-form ``custom`` fields. This module is the
one place that writes and reads them, so the server (which signs) and the
agent (which verifies) cannot disagree:

Image repository targets (one entry per firmware image)::

    "custom": {"hardwareIds": ["stm32f4-bms"], "releaseCounter": 3,
               "version": "1.1.0",
               "requires": {"rpi-gateway": ">=1.1.0,<2"}}

``requires`` (optional) is what the image needs of the *other* ECUs of the
same vehicle: every ECU with that hardware id must run an image whose
``version`` satisfies all the comma-separated clauses (``>=``, ``>``,
``<=``, ``<``, ``==``, ``!=`` against dotted decimal versions, 1 to 4
numbers). It is signed with the offline targets key like the rest, so a
compromised director cannot drop half of a bundle: the server refuses to
direct an incompatible combination and the agent refuses to install one
(:func:`unmet_requirements`, used by both).

Director repository targets (one entry per image to install)::

    "custom": {"ecuIdentifiers": {"<ecu serial>": {"hardwareId": "stm32f4-bms"}},
               "installOnConsent": true}

``installOnConsent`` (optional, default false) is set by a campaign in
"download now, install on consent" mode: the agent installs the image only
once its precondition named ``consent`` holds, and waits when it has none.

and each of the director's targets, snapshot and timestamp metadata carries
the vehicle it was made for, also when targets list no image, so that
metadata for one vehicle can never be replayed to another (the agent checks
it before python-tuf trusts a file, :mod:`client.verification`)::

    "signed": {"_type": "timestamp", ..., "custom": {"vin": "WVW..."}}

Every parser raises :class:`MetadataFormatError` naming the target and field;
names, target paths and hashes are checked against :mod:`signing.names`, so
nothing read here can later climb out of a directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tuf.api.metadata import DelegatedRole, Root, Snapshot, TargetFile, Targets, Timestamp

from signing.delta_format import ARCH_NAMES
from signing.exceptions import UptakeError
from signing.names import (
    InvalidNameError,
    check_hashes,
    check_name,
    check_sha256,
    check_target_path,
    is_name,
)

HARDWARE_IDS = "hardwareIds"
RELEASE_COUNTER = "releaseCounter"
VERSION = "version"
ECU_IDENTIFIERS = "ecuIdentifiers"
HARDWARE_ID = "hardwareId"
#: Optional director-target field: install only with the driver's consent (campaigns).
INSTALL_ON_CONSENT = "installOnConsent"
VIN = "vin"
#: Field of a delta target (deltas role) naming the images it joins.
DELTA = "delta"
#: Optional image-target field: what the image needs of the vehicle's other ECUs.
REQUIRES = "requires"
#: the machine code of a raw image (no ELF header says it), so deltas filter its branches
ARCH = "arch"

#: Top-level roles of both repositories.
TOP_LEVEL_ROLES = ("root", "targets", "snapshot", "timestamp")

#: Default metadata lifetimes: long for offline roles, short for online ones.
DEFAULT_EXPIRY = {
    "root": timedelta(days=365),
    "targets": timedelta(days=180),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
#: Director targets are online: a vehicle offline longer than this sees expired
#: metadata and must refresh, which is the freeze-attack defence.
DIRECTOR_TARGETS_EXPIRY = timedelta(days=7)


class MetadataFormatError(UptakeError):
    """Uptane custom metadata is missing or malformed; the message names where.

    Names, target paths and hashes follow :mod:`signing.names`; in signed
    metadata a violation is evidence of an attack.
    """


def check_target(target: TargetFile, where: str) -> None:
    """The path and hashes of a target entry follow :mod:`signing.names` (else MetadataFormatError)."""
    try:
        check_target_path(target.path, f"{where} path")
        check_hashes(target.hashes, f"{where} {target.path!r} hashes")
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc


def consistent_target_path(path: str, sha256: str) -> str:
    """Where a target is served with consistent snapshots: ``dir/<sha256>.<name>`` (TUF 5.7.3)."""
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def expiry(role: str, now: datetime | None = None) -> datetime:
    """Default expiry time for ``role`` metadata signed ``now``."""
    now = now or datetime.now(UTC)
    return (now + DEFAULT_EXPIRY[role]).replace(microsecond=0)


_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")
_CLAUSE_RE = re.compile(r"^(>=|<=|==|!=|>|<)(.+)$")
_MAX_REQUIREMENTS = 32
_MAX_HARDWARE_IDS = 64
_COMPARE = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def version_key(version: str) -> tuple[int, ...] | None:
    """``"1.10.2"`` -> ``(1, 10, 2, 0)``, or None when not a dotted decimal version."""
    if not _VERSION_RE.match(version):
        return None
    numbers = tuple(int(n) for n in version.split("."))
    return numbers + (0,) * (4 - len(numbers))


@dataclass(frozen=True)
class Requirement:
    """One ``requires`` entry: ECUs of ``hardware_id`` must run a version matching ``spec``."""

    hardware_id: str
    spec: str
    clauses: tuple[tuple[str, tuple[int, ...]], ...]

    def allows(self, version: str) -> bool:
        key = version_key(version)
        return key is not None and all(_COMPARE[op](key, bound) for op, bound in self.clauses)


def parse_requires(value: Any, where: str) -> tuple[Requirement, ...]:
    """Parse a ``requires`` object strictly; raise :class:`MetadataFormatError` naming the entry."""
    if not isinstance(value, dict) or not value or len(value) > _MAX_REQUIREMENTS:
        raise MetadataFormatError(
            f"{where}: custom.{REQUIRES} must be an object of 1 to {_MAX_REQUIREMENTS} hardware id -> version spec"
        )
    result = []
    for hw, spec in sorted(value.items()):
        entry = f"{where}: custom.{REQUIRES}.{hw}"
        try:
            check_name(hw, f"{entry}: hardware id")
        except InvalidNameError as exc:
            raise MetadataFormatError(str(exc)) from exc
        if not isinstance(spec, str) or not spec or len(spec) > 256:
            raise MetadataFormatError(f'{entry}: must be a version spec such as ">=1.1.0,<2"')
        clauses = []
        for clause in spec.split(","):
            match = _CLAUSE_RE.match(clause.strip())
            bound = version_key(match.group(2)) if match else None
            if match is None or bound is None:
                raise MetadataFormatError(
                    f"{entry}: {clause.strip()!r} is not OPERATOR VERSION (>=, >, <=, <, ==, != and a dotted decimal version)"
                )
            clauses.append((match.group(1), bound))
        result.append(Requirement(hw, spec, tuple(clauses)))
    return tuple(result)


@dataclass(frozen=True)
class ImageCustom:
    """The Uptane fields of an image repository target."""

    hardware_ids: tuple[str, ...]
    release_counter: int
    version: str
    requires: tuple[Requirement, ...] = ()
    #: the machine code of a raw image, a hint for deltas: a name (servers publish only those
    #: of :data:`signing.delta_format.ARCH_NAMES`, :func:`check_arch`), or None
    arch: str | None = None

    def to_custom(self) -> dict[str, Any]:
        custom: dict[str, Any] = {
            HARDWARE_IDS: list(self.hardware_ids),
            RELEASE_COUNTER: self.release_counter,
            VERSION: self.version,
        }
        if self.requires:
            custom[REQUIRES] = {r.hardware_id: r.spec for r in self.requires}
        if self.arch is not None:
            custom[ARCH] = self.arch
        return custom


@dataclass(frozen=True)
class EcuImage:
    """What one ECU of a vehicle runs, or would run after an update (for :func:`unmet_requirements`)."""

    ecu_serial: str
    hardware_id: str
    filepath: str  # "" when nothing known is installed
    image: ImageCustom | None  # None: not an image of the repository (factory image, nothing)


def unmet_requirements(ecus: Iterable[EcuImage]) -> list[str]:
    """Every ``requires`` of an image in ``ecus`` that the other ECUs of ``ecus`` do not meet.

    ``ecus`` is the whole vehicle after the update (installed images overlaid
    with directed ones). An empty list means the combination is compatible.
    """
    vehicle = list(ecus)
    problems = []
    for ecu in vehicle:
        for req in ecu.image.requires if ecu.image else ():
            others = [e for e in vehicle if e.hardware_id == req.hardware_id]
            if not others:
                problems.append(
                    f"{ecu.filepath} on {ecu.ecu_serial} requires {req.hardware_id} {req.spec}, "
                    f"and this vehicle has no {req.hardware_id} ECU"
                )
            for other in others:
                if other.image is None or not req.allows(other.image.version):
                    runs = (
                        f"{other.filepath} ({other.image.version})"
                        if other.image
                        else (
                            f"{other.filepath} (not in the image repository)"
                            if other.filepath
                            else "no known image"
                        )
                    )
                    problems.append(
                        f"{ecu.filepath} on {ecu.ecu_serial} requires {req.hardware_id} {req.spec}, "
                        f"but {other.ecu_serial} would run {runs}"
                    )
    return problems


def _custom_of(target: TargetFile) -> dict[str, Any]:
    custom = target.custom
    if not isinstance(custom, dict):
        raise MetadataFormatError(f"target {target.path!r}: 'custom' must be an object")
    return custom


def image_custom(target: TargetFile) -> ImageCustom:
    """Parse the image-repository ``custom`` of ``target``."""
    custom = _custom_of(target)
    where = f"image target {target.path!r}"
    hw_ids = custom.get(HARDWARE_IDS)
    if not isinstance(hw_ids, list) or not 0 < len(hw_ids) <= _MAX_HARDWARE_IDS:
        raise MetadataFormatError(
            f"{where}: custom.{HARDWARE_IDS} must be a list of 1 to {_MAX_HARDWARE_IDS} hardware ids"
        )
    try:
        for i, hw in enumerate(hw_ids):
            check_name(hw, f"{where}: custom.{HARDWARE_IDS}[{i}]")
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc
    counter = custom.get(RELEASE_COUNTER)
    if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
        raise MetadataFormatError(f"{where}: custom.{RELEASE_COUNTER} must be an integer >= 0")
    version = custom.get(VERSION)
    if not isinstance(version, str) or not 0 < len(version) <= 128 or not version.isprintable():
        raise MetadataFormatError(
            f"{where}: custom.{VERSION} must be 1 to 128 printable characters"
        )
    requires = parse_requires(custom[REQUIRES], where) if REQUIRES in custom else ()
    arch = None
    if ARCH in custom:
        # any name: vehicles never use it (a delta names its own filter), so an architecture
        # a newer server knows is no attack here; servers check it with check_arch
        try:
            arch = check_name(custom[ARCH], f"{where}: custom.{ARCH}")
        except InvalidNameError as exc:
            raise MetadataFormatError(str(exc)) from exc
    return ImageCustom(tuple(hw_ids), counter, version, requires, arch)


def check_arch(arch: object, where: str) -> str:
    """``arch`` if it names a branch filter of :data:`signing.delta_format.ARCH_NAMES` (what
    this version's delta creator can use: checked wherever an image is published)."""
    if not isinstance(arch, str) or arch not in ARCH_NAMES.values():
        raise MetadataFormatError(
            f"{where} must be one of {', '.join(sorted(ARCH_NAMES.values()))}, not {arch!r}"[:300]
        )
    return arch


def director_custom(ecus: dict[str, str], *, install_on_consent: bool = False) -> dict[str, Any]:
    """``custom`` for a director target installing on ``ecus`` (serial -> hardware id)."""
    custom: dict[str, Any] = {
        ECU_IDENTIFIERS: {serial: {HARDWARE_ID: hw} for serial, hw in sorted(ecus.items())}
    }
    if install_on_consent:
        custom[INSTALL_ON_CONSENT] = True
    return custom


def director_install_on_consent(target: TargetFile) -> bool:
    """Whether a director target may be installed only with the driver's consent."""
    value = _custom_of(target).get(INSTALL_ON_CONSENT, False)
    if not isinstance(value, bool):
        raise MetadataFormatError(
            f"director target {target.path!r}: custom.{INSTALL_ON_CONSENT} must be true or false"
        )
    return value


def director_ecus(target: TargetFile) -> dict[str, str]:
    """The ECUs (serial -> hardware id) a director target is meant for."""
    custom = _custom_of(target)
    where = f"director target {target.path!r}"
    ids = custom.get(ECU_IDENTIFIERS)
    if not isinstance(ids, dict) or not ids:
        raise MetadataFormatError(f"{where}: custom.{ECU_IDENTIFIERS} must be a non-empty object")
    ecus: dict[str, str] = {}
    try:
        for serial, entry in ids.items():
            check_name(serial, f"{where}: custom.{ECU_IDENTIFIERS} key")
            hw = entry.get(HARDWARE_ID) if isinstance(entry, dict) else None
            ecus[serial] = check_name(
                hw, f"{where}: custom.{ECU_IDENTIFIERS}.{serial}.{HARDWARE_ID}"
            )
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc
    return ecus


#: ``signed.custom`` of the roots ``uptake server init`` makes: which repository and deployment
#: a root belongs to, so that provisioning can refuse a root given for the wrong repository.
ROOT_REPOSITORY = "repository"
ROOT_DEPLOYMENT = "deployment"
REPOSITORIES = ("image", "director")


@dataclass(frozen=True)
class RootIdentity:
    """Which repository (``image`` or ``director``) of which deployment a root belongs to."""

    repository: str
    deployment: str


def set_root_identity(root: Root, identity: RootIdentity) -> None:
    """Mark ``root`` (before signing) as the root of one repository of one deployment."""
    root.unrecognized_fields["custom"] = {
        ROOT_REPOSITORY: identity.repository,
        ROOT_DEPLOYMENT: identity.deployment,
    }


def root_identity(root: Root) -> RootIdentity | None:
    """The identity :func:`set_root_identity` gave ``root``; None for roots made without one."""
    custom = root.unrecognized_fields.get("custom")
    if not isinstance(custom, dict) or ROOT_REPOSITORY not in custom:
        return None
    repository, deployment = custom.get(ROOT_REPOSITORY), custom.get(ROOT_DEPLOYMENT)
    if repository not in REPOSITORIES or not is_name(deployment):
        raise MetadataFormatError(
            f"root metadata: signed.custom must name a {ROOT_REPOSITORY} "
            f"({' or '.join(REPOSITORIES)}) and a {ROOT_DEPLOYMENT} id"
        )
    assert isinstance(repository, str) and isinstance(deployment, str)
    return RootIdentity(repository, deployment)


#: ``signed.custom`` of a root: key id -> the name its holder knows it by (``image-targets-2``),
#: so that a release waiting for signatures can say whose are missing.
ROOT_KEY_NAMES = "keyNames"


def set_key_names(root: Root, names: dict[str, str]) -> None:
    """Record (before signing) the names of ``root``'s keys, dropping names of keys it lost."""
    custom = root.unrecognized_fields.setdefault("custom", {})
    known = {**key_names(root), **names}
    custom[ROOT_KEY_NAMES] = {k: v for k, v in sorted(known.items()) if k in root.keys}


def key_names(root: Root) -> dict[str, str]:
    """Key id -> name, as :func:`set_key_names` recorded them (unnamed keys are left out)."""
    custom = root.unrecognized_fields.get("custom")
    names = custom.get(ROOT_KEY_NAMES) if isinstance(custom, dict) else None
    if not isinstance(names, dict):
        return {}
    return {k: v for k, v in names.items() if isinstance(k, str) and is_name(v)}


def set_director_vin(signed: Targets | Snapshot | Timestamp, vin: str) -> None:
    """Bind director metadata (targets, snapshot or timestamp) to the vehicle ``vin``."""
    signed.unrecognized_fields["custom"] = {VIN: vin}


def director_vin(signed: Targets | Snapshot | Timestamp) -> str:
    """The VIN director metadata was signed for."""
    return director_vin_of(
        signed.unrecognized_fields.get("custom"), f"director {signed.type} metadata"
    )


def director_vin_of(custom: Any, where: str) -> str:
    """The VIN in the ``signed.custom`` of director metadata (parsed or not yet parsed)."""
    vin = custom.get(VIN) if isinstance(custom, dict) else None
    if vin is None:
        raise MetadataFormatError(f"{where}: signed.custom.vin is missing")
    try:
        return check_name(vin, f"{where}: signed.custom.vin")
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc


# -- deltas --------------------------------------------------------------------------
#
# Deltas are targets of their own, signed by the image repository's online
# "deltas" role, which the offline targets role delegates ``deltas/*`` to.
# A delta's custom names the exact images it joins; the agent uses one only
# when its installed image is the base and the result is the very image the
# offline-signed targets (and the director) name, so a compromised deltas
# key cannot make a vehicle install anything else.

#: The delegated role that signs delta targets, and the paths it may sign.
DELTAS_ROLE = "deltas"
DELTAS_PATH_PATTERN = "deltas/*"


def delta_target_path(base_sha256: str, result_sha256: str) -> str:
    """The target path of the delta from one image to another (both by SHA-256)."""
    return f"deltas/{base_sha256}-{result_sha256}"


@dataclass(frozen=True)
class DeltaCustom:
    """What a delta target joins: base and result images (length + sha256) and the method."""

    base_sha256: str
    base_length: int
    result_sha256: str
    result_length: int
    method: str

    def to_custom(self) -> dict[str, Any]:
        return {
            DELTA: {
                "base": {"sha256": self.base_sha256, "length": self.base_length},
                "result": {"sha256": self.result_sha256, "length": self.result_length},
                "method": self.method,
            }
        }


def delta_custom(target: TargetFile) -> DeltaCustom:
    """Parse the custom of a delta target, raising :class:`MetadataFormatError` naming the field."""
    where = f"delta target {target.path!r}: custom.{DELTA}"
    delta = _custom_of(target).get(DELTA)
    if not isinstance(delta, dict):
        raise MetadataFormatError(f"{where} must be an object")
    try:
        check_hashes(target.hashes, f"delta target {target.path!r} hashes")
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc
    ends = {}
    for end in ("base", "result"):
        info = delta.get(end)
        sha = info.get("sha256") if isinstance(info, dict) else None
        length = info.get("length") if isinstance(info, dict) else None
        try:
            check_sha256(sha, f"{where}.{end}.sha256")
        except InvalidNameError as exc:
            raise MetadataFormatError(str(exc)) from exc
        assert isinstance(sha, str)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise MetadataFormatError(f"{where}.{end}.length must be an integer >= 0")
        ends[end] = (sha, length)
    method = delta.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 128 or not method.isprintable():
        raise MetadataFormatError(f"{where}.method must be 1 to 128 printable characters")
    if target.path != delta_target_path(ends["base"][0], ends["result"][0]):
        raise MetadataFormatError(f"{where}: path does not match the base and result it names")
    return DeltaCustom(
        ends["base"][0], ends["base"][1], ends["result"][0], ends["result"][1], method
    )


# -- supplier delegations ----------------------------------------------------------
#
# A supplier signs its own images in a TERMINATING delegated targets role that the
# offline targets keys create (``uptake delegation add``). What the supplier may
# sign is in that signed delegation, never anywhere the supplier controls:
# ``paths`` (TUF path patterns, which python-tuf enforces when it walks the
# delegation) and the hardware ids, kept in the delegated role's own
# ``x-uptake-hardware-ids`` field (an unrecognized field python-tuf preserves and
# signs). Every image found through the delegation must list only those hardware
# ids: the server refuses anything else, and so does the vehicle.

#: The DelegatedRole field holding the hardware ids a supplier may publish for.
DELEGATION_HARDWARE_IDS = "x-uptake-hardware-ids"
#: Names a supplier delegation may not take (top-level roles and the online deltas role).
RESERVED_ROLE_NAMES = (*TOP_LEVEL_ROLES, DELTAS_ROLE)


def check_supplier_path_pattern(pattern: object, where: str) -> str:
    """A path pattern of a supplier delegation: its first segment a literal name, not deltas.

    A literal first segment keeps one supplier's patterns from covering the
    whole repository (``*``) or the online deltas role's ``deltas/*``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise MetadataFormatError(f"{where} must be a non-empty string")
    first, _, rest = pattern.partition("/")
    try:
        check_name(first, f"{where} (its first segment)")
    except InvalidNameError as exc:
        raise MetadataFormatError(f"{exc}: the first segment must be a plain name") from exc
    if any(c in first for c in "*?[]") or first == DELTAS_ROLE or not rest:
        raise MetadataFormatError(
            f"{where} {pattern!r}: must look like 'NAME/…' with a literal NAME other than "
            f"{DELTAS_ROLE!r}, e.g. 'acme/*'"
        )
    if len(pattern) > 256:
        raise MetadataFormatError(f"{where}: longer than 256 characters")
    return pattern


def delegation_hardware_ids(role: DelegatedRole) -> tuple[str, ...]:
    """The hardware ids a supplier delegation allows (signed by the delegating targets keys)."""
    where = f"delegation {role.name!r}: {DELEGATION_HARDWARE_IDS}"
    value = role.unrecognized_fields.get(DELEGATION_HARDWARE_IDS)
    if not isinstance(value, list) or not value or len(value) > _MAX_HARDWARE_IDS:
        raise MetadataFormatError(f"{where} must be a list of 1 to {_MAX_HARDWARE_IDS} names")
    try:
        return tuple(check_name(hw, where) for hw in value)
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc


def check_supplier_delegation(role: DelegatedRole) -> tuple[str, ...]:
    """Check a supplier delegation's shape; return its hardware ids, or MetadataFormatError."""
    where = f"delegation {role.name!r}"
    try:
        check_name(role.name, "delegation name")
    except InvalidNameError as exc:
        raise MetadataFormatError(str(exc)) from exc
    if role.name in RESERVED_ROLE_NAMES:
        raise MetadataFormatError(f"{where}: the name is reserved")
    if not role.terminating:
        raise MetadataFormatError(f"{where} must be terminating")
    if not role.paths or role.path_hash_prefixes:
        raise MetadataFormatError(f"{where} must delegate by path patterns (paths)")
    for pattern in role.paths:
        check_supplier_path_pattern(pattern, f"{where} path pattern")
    return delegation_hardware_ids(role)


def supplier_delegation(
    name: str, keyids: list[str], threshold: int, paths: list[str], hardware_ids: list[str]
) -> DelegatedRole:
    """The terminating delegated role of a supplier (checked as the server and vehicles will)."""
    role = DelegatedRole(
        name,
        keyids,
        threshold,
        True,
        paths=paths,
        unrecognized_fields={DELEGATION_HARDWARE_IDS: sorted(set(hardware_ids))},
    )
    check_supplier_delegation(role)
    return role


def images_outside_delegation(role: DelegatedRole, targets: Iterable[TargetFile]) -> list[str]:
    """Why each of ``targets`` does not belong in ``role`` (path or hardware ids); [] if all do."""
    allowed = set(delegation_hardware_ids(role))
    problems = []
    for target in targets:
        if not role.is_delegated_path(target.path):
            problems.append(
                f"{target.path!r} matches none of delegation {role.name!r}'s path patterns "
                f"({', '.join(role.paths or ())})"
            )
            continue
        outside = sorted(set(image_custom(target).hardware_ids) - allowed)
        if outside:
            problems.append(
                f"{target.path!r} is for hardware id(s) {', '.join(outside)}, outside delegation "
                f"{role.name!r} ({', '.join(sorted(allowed))})"
            )
    return problems
