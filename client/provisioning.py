"""Provisioning a vehicle's agent (the factory step).

``provision_vehicle`` creates, under the agent's state directory, the
primary's ECU key and its X25519 encryption key (for images the director
encrypts to it, :mod:`signing.encryption`), each local secondary's own key and trusted director
root, the trusted roots of both repositories (``metadata/*/root.json``, the
anchors of full verification), the agent configuration, and
``registration.json``: the VIN, ECU serials, hardware ids and *public* keys
(signing keys, and the primary's ``encryption_key``)
that the fleet operator registers with the director
(``uptake fleet add-vehicle --from-agent``). Private keys never leave the
vehicle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import tomli_w
import urllib3
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from client.bootenv import (
    BootEnvironment,
    BootEnvironmentError,
    GrubEnvironment,
    UBootEnvironment,
)
from client.config import (
    AgentConfig,
    AgentSection,
    HealthCheckConfig,
    InstallerConfig,
    InstallerType,
    LocalOptions,
    LocalSecondaryConfig,
    PrimarySection,
    TlsSection,
)
from client.installer import InstallError, check_slot
from client.secondaries.local import provision_local_secondary
from client.vehicle_identity import create_identity
from signing.atomic_file import write_atomic
from signing.encryption import generate_encryption_key, public_key_hex, save_encryption_key
from signing.exceptions import UptakeError
from signing.keys import generate_signer, load_public_key, public_key_to_dict, save_signer
from signing.metadata import MetadataFormatError, root_identity
from signing.names import InvalidNameError, check_name

#: Where ``agent init --ca-cert`` puts the CA that signed the server's TLS certificate.
SERVER_CA_FILE = "tls/server-ca.crt"


class ProvisioningError(UptakeError):
    """Provisioning refused (bad root, existing state...); says why."""


@dataclass(frozen=True)
class EcuSpec:
    serial: str
    hardware_id: str


def _check_root(data: bytes, what: str) -> Metadata[Root]:
    try:
        md = Metadata[Root].from_bytes(data)
    except DeserializationError as exc:
        raise ProvisioningError(f"{what} is not valid root metadata: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise ProvisioningError(f"{what} is {md.signed.type} metadata, not root")
    try:
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as exc:
        raise ProvisioningError(f"{what} is not signed by its own root keys: {exc}") from exc
    return md


def check_trust_anchors(image_root: bytes, director_root: bytes) -> None:
    """Refuse trusted roots that cannot be this vehicle's (a provisioning mistake, not an attack).

    Both must be TUF roots signed by their own keys; they must be two different
    roots; and where ``uptake server init`` marked them (``signed.custom``),
    the image root must be the image repository's and the director root the
    director's, of one and the same deployment.
    """
    roots = {
        "image": _check_root(image_root, "--image-root"),
        "director": _check_root(director_root, "--director-root"),
    }
    root_keys = {repo: set(md.signed.roles[Root.type].keyids) for repo, md in roots.items()}
    if image_root == director_root or root_keys["image"] == root_keys["director"]:
        raise ProvisioningError(
            "--image-root and --director-root are the same root: the image repository and the "
            "director each have their own (image-root.json and director-root.json)"
        )
    identities = {}
    for repo, md in roots.items():
        try:
            identity = root_identity(md.signed)
        except MetadataFormatError as exc:
            raise ProvisioningError(f"--{repo}-root: {exc}") from exc
        if identity is not None and identity.repository != repo:
            raise ProvisioningError(
                f"--{repo}-root is the {identity.repository} repository's root: pass it as "
                f"--{identity.repository}-root (swapped files?)"
            )
        identities[repo] = identity
    image_id, director_id = identities["image"], identities["director"]
    if image_id and director_id and image_id.deployment != director_id.deployment:
        raise ProvisioningError(
            f"--image-root belongs to deployment {image_id.deployment} and --director-root to "
            f"{director_id.deployment}: both must come from the same 'uptake server init'"
        )


def check_image_root_with_server(
    server_url: str, image_root: bytes, timeout: float = 5.0, ca_cert: Path | None = None
) -> str:
    """Compare ``image_root`` with the same version on the server, where it can be reached.

    Catches roots of another deployment, which nothing inside the files can.
    Returns a note for the operator (checked, or why not); raises
    :class:`ProvisioningError` when the server holds a different root.
    """
    version = _check_root(image_root, "--image-root").signed.version
    url = f"{server_url.rstrip('/')}/image/metadata/{version}.root.json"
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(total=timeout),
        retries=False,
        ca_certs=str(ca_cert) if ca_cert else None,
    )
    try:
        response = http.request("GET", url, redirect=False)
    except urllib3.exceptions.HTTPError as exc:
        return f"could not check --image-root against the server ({exc}); checked offline only"
    if response.status != 200:
        raise ProvisioningError(
            f"the server has no image repository root v{version} ({url}: HTTP {response.status}):"
            " is --image-root from this deployment, and --server this deployment's URL?"
        )
    try:
        served = Metadata[Root].from_bytes(response.data)
    except DeserializationError as exc:
        raise ProvisioningError(f"{url} is not root metadata: {exc}") from exc
    if served.signed_bytes != Metadata[Root].from_bytes(image_root).signed_bytes:
        raise ProvisioningError(
            f"--image-root differs from the server's image repository root v{version} ({url}):"
            " a root of another deployment?"
        )
    return f"--image-root matches the server's image repository root v{version}"


def check_names(vin: str, ecus: Sequence[EcuSpec]) -> None:
    """VIN, serials and hardware ids follow :mod:`signing.names`; serials are unique."""
    try:
        check_name(vin, "VIN")
        for ecu in ecus:
            check_name(ecu.serial, "ECU serial")
            check_name(ecu.hardware_id, f"hardware id of ECU {ecu.serial}")
    except InvalidNameError as exc:
        raise ProvisioningError(str(exc)) from exc
    serials = [e.serial for e in ecus]
    twice = sorted({s for s in serials if serials.count(s) > 1})
    if twice:
        raise ProvisioningError(f"ECU serial(s) {', '.join(twice)} given more than once")


def check_installer(installer: InstallerConfig, state_dir: Path) -> None:
    """Refuse an ``[installer]`` this device cannot run, before anything is written.

    The slots must be two different paths of the installer's kind (block devices for
    U-Boot and GRUB, unless ``slot_type`` says otherwise), the boot environment must be
    readable with its tools, and the reboot and install commands must exist.
    """
    config_dir = state_dir.resolve()

    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else config_dir / p

    problems = []
    slot_a, slot_b = path(installer.slot_a), path(installer.slot_b)
    if os.path.realpath(slot_a) == os.path.realpath(slot_b):
        problems.append(f"--slot-a and --slot-b are the same ({slot_a})")
    for name, slot in (("a", slot_a), ("b", slot_b)):
        try:
            check_slot(name, slot, installer.slots_are)
        except InstallError as exc:
            problems.append(str(exc).replace("installer.slot_", "--slot-"))
    if installer.type in (InstallerType.UBOOT, InstallerType.GRUB):
        env: BootEnvironment = (
            UBootEnvironment(path(installer.boot_env))
            if installer.type is InstallerType.UBOOT
            else GrubEnvironment(path(installer.boot_env))
        )
        try:
            env.read()
        except BootEnvironmentError as exc:
            problems.append(f"--boot-env: {exc}")
    for what, argv in (
        ("--reboot", installer.reboot_command or ()),
        ("--install-command", installer.install_command),
        ("--rollback-command", installer.rollback_command),
    ):
        if argv and shutil.which(argv[0]) is None:
            problems.append(f"{what}: {argv[0]!r} is not an executable on this machine")
    if problems:
        raise ProvisioningError("; ".join(problems))


def configuration_toml(config: AgentConfig) -> bytes:
    """``config`` as the TOML of an agent.toml: every option with its value (tomli-w)."""

    def without_none(value: Any) -> Any:  # TOML has no null; an absent key is the default
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None and v != []}
        if isinstance(value, list):
            return [without_none(v) for v in value]
        return value

    document = without_none(msgspec.json.decode(msgspec.json.encode(config)))
    header = (
        "# Uptake agent configuration, written by 'uptake agent init'.\n"
        "# Every option is listed with its value; client/agent.example.toml explains each.\n\n"
    )
    return header.encode() + tomli_w.dumps(document).encode()


def provision_vehicle(
    state_dir: Path,
    *,
    vin: str,
    server_url: str,
    primary: EcuSpec,
    secondaries: Sequence[EcuSpec],
    image_root: bytes,
    director_root: bytes,
    password: bytes,
    installer: InstallerConfig | None = None,
    health_check: Sequence[Sequence[str]] = (),
    secondary_health_check: Sequence[Sequence[str]] = (),
    server_ca: bytes | None = None,
    allow_plain_http: bool = False,
) -> Path:
    """Create a ready-to-run agent under ``state_dir``; returns the config path.

    Everything is checked before anything is written: the names, the trusted
    roots, and the configuration as a whole (the same schema the agent loads).
    The vehicle's TLS key is made here too; its CSR goes into
    ``registration.json`` for the server's device CA (:mod:`client.vehicle_identity`).
    ``server_ca`` (PEM) is the CA the agent verifies the server with.
    """
    if (state_dir / "agent.toml").exists():
        raise ProvisioningError(f"{state_dir} already holds a provisioned agent")
    check_names(vin, [primary, *secondaries])
    check_trust_anchors(image_root, director_root)
    check_installer(installer or InstallerConfig(), state_dir)
    try:
        config = AgentConfig(
            agent=AgentSection(vin, server_url, str(state_dir.resolve())),
            primary=PrimarySection(primary.serial, primary.hardware_id),
            installer=installer or InstallerConfig(),
            health_check=HealthCheckConfig(tuple(tuple(c) for c in health_check)),
            tls=TlsSection(
                ca_certs=SERVER_CA_FILE if server_ca else "", allow_plain_http=allow_plain_http
            ),
            secondaries=tuple(
                LocalSecondaryConfig(
                    sec.serial,
                    sec.hardware_id,
                    f"secondaries/{sec.serial}",
                    LocalOptions(tuple(tuple(c) for c in secondary_health_check)),
                )
                for sec in secondaries
            ),
        )
    except ValueError as exc:  # the schema's own checks (a bad URL, an empty command...)
        raise ProvisioningError(str(exc)) from exc
    state_dir.mkdir(parents=True, exist_ok=True)
    save_signer(generate_signer(), state_dir / "keys" / "primary.key", password)
    encryption_key = generate_encryption_key()  # images the director encrypts for the primary
    save_encryption_key(encryption_key, state_dir / "keys" / "encryption.key", password)
    write_atomic(state_dir / "metadata" / "image" / "root.json", image_root)
    write_atomic(state_dir / "metadata" / "director" / "root.json", director_root)
    if server_ca:
        write_atomic(state_dir / SERVER_CA_FILE, server_ca)
    tls_csr = create_identity(config.path(config.tls.client_key), vin, password)
    ecus = [
        {
            "serial": primary.serial,
            "hardware_id": primary.hardware_id,
            "public_key": public_key_to_dict(
                load_public_key(state_dir / "keys" / "primary.pub.json")
            ),
            "encryption_key": public_key_hex(encryption_key),
        }
    ]
    for sec in config.secondaries:
        assert isinstance(sec, LocalSecondaryConfig)  # agent init provisions local ones
        pub = provision_local_secondary(config.path(sec.state_directory), director_root, password)
        ecus.append(
            {
                "serial": sec.ecu_serial,
                "hardware_id": sec.hardware_id,
                "public_key": public_key_to_dict(load_public_key(pub)),
            }
        )
    registration = {
        "vin": vin, "primary_ecu_serial": primary.serial, "ecus": ecus, "tls_csr": tls_csr,
    }  # fmt: skip
    write_atomic(
        state_dir / "registration.json", json.dumps(registration, indent=2).encode() + b"\n"
    )
    config_path = state_dir / "agent.toml"
    write_atomic(config_path, configuration_toml(config))
    return config_path
