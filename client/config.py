"""Agent configuration (TOML), declared once as a typed schema.

The file ``uptake agent init`` writes, and that ``client/agent.example.toml``
shows with every option, has these tables; each is a msgspec struct below,
and the struct *is* the schema: its types, its defaults and its checks
(``__post_init__``) are the only ones there are.

=====================  =====================================================
table                  schema
=====================  =====================================================
``[agent]``            :class:`AgentSection`
``[primary]``          :class:`PrimarySection`
``[installer]``        :class:`InstallerConfig`
``[health_check]``     :class:`HealthCheckConfig`
``[download]``         :class:`client.fetcher.FetcherConfig`
``[tls]``              :class:`TlsSection`
``[[preconditions]]``  :class:`client.preconditions.Precondition`
``[[secondaries]]``    :class:`LocalSecondaryConfig` or :class:`UdsSecondaryConfig`,
                       chosen by ``transport``; each has its own typed ``options``
=====================  =====================================================

Types are strict (``"false"`` is not a boolean, ``true`` is not a number),
unknown tables and keys are refused, and every VIN, ECU serial and hardware
id follows :mod:`signing.names`. Relative paths are relative to
``agent.state_dir``, itself relative to the file. Every problem is one
:class:`AgentConfigError` naming the file, the table and the key.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from client.fetcher import FetcherConfig
from client.preconditions import Precondition
from signing.exceptions import UptakeError
from signing.names import check_name

__all__ = [
    "AgentConfig",
    "AgentConfigError",
    "AgentSection",
    "HealthCheckConfig",
    "InstallerConfig",
    "InstallerType",
    "LocalOptions",
    "LocalSecondaryConfig",
    "PrimarySection",
    "SecondaryConfig",
    "SlotType",
    "TlsSection",
    "UdsOptions",
    "UdsSecondaryConfig",
    "load_config",
    "parse_config",
]


class AgentConfigError(UptakeError):
    """The agent configuration is invalid; says which file, table and key."""


class SlotType(enum.StrEnum):
    """What a slot path must be: a block device (partitions booted by U-Boot or GRUB) or a file."""

    BLOCK = "block"
    FILE = "file"


class InstallerType(enum.StrEnum):
    """How the primary installs its own image."""

    #: A/B slots, boot variables in a JSON file (development, tests, the demo)
    FILE = "file"
    #: A/B partitions, boot variables in the U-Boot environment (fw_printenv/fw_setenv)
    UBOOT = "uboot"
    #: A/B partitions, boot variables in a GRUB environment block (grub-editenv)
    GRUB = "grub"
    #: the integrator's own installer command; the health checks decide
    COMMAND = "command"


#: Largest duration in seconds a setting may hold (about three years): whatever the agent
#: makes of a larger one (a timedelta, a sleep, a socket timeout) could overflow.
MAX_SECONDS = 10.0**8


def _positive(name: str, value: float, at_most: float = MAX_SECONDS) -> None:
    """Above 0 and at most ``at_most`` (so neither inf nor nan: TOML has both)."""
    if not 0 < value <= at_most:
        raise ValueError(f"{name}: must be > 0 and at most {at_most:g}")


def _commands(name: str, commands: tuple[tuple[str, ...], ...]) -> None:
    if not all(commands):
        raise ValueError(f"{name}: every command must be a non-empty list of strings")


class AgentSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[agent]``: who the vehicle is, where it keeps its state, how often it polls."""

    vin: str
    #: the director, manifests and certificates (and the image repository unless set below)
    server_url: str
    #: keys/, metadata/{director,image}/root.json, slots, state.json
    state_dir: str
    #: seconds between polls
    poll_interval: float = 300.0
    #: +/- this fraction of poll_interval, so fleets don't poll in lockstep
    poll_jitter: float = 0.2
    #: refuse larger images whatever the metadata says (endless data, on top of TUF lengths)
    max_image_size: int = 4 * 1024**3
    #: send the signed manifest when something changed, else at most this often (seconds)
    manifest_heartbeat: float = 3600.0
    #: the image repository (metadata/ and targets/ under it), when it is served apart from the
    #: director, e.g. static files behind nginx or a CDN; "" for server_url
    image_repository_url: str = ""

    def __post_init__(self) -> None:
        check_name(self.vin, "vin")
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError("server_url: must start with http:// or https://")
        if self.image_repository_url and not self.image_repository_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError("image_repository_url: must start with http:// or https://")
        _positive("poll_interval", self.poll_interval)
        if not 0 <= self.poll_jitter <= 1:
            raise ValueError("poll_jitter: must be between 0 and 1")
        _positive("max_image_size", self.max_image_size, at_most=2**62)
        _positive("manifest_heartbeat", self.manifest_heartbeat)

    @property
    def image_url(self) -> str:
        """Where the image repository is served (``image_repository_url`` or ``server_url``)."""
        return (self.image_repository_url or self.server_url).rstrip("/")


class TlsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[tls]``: whom the agent trusts, and how it proves its VIN (:mod:`client.vehicle_identity`)."""

    #: CA certificate(s) that signed the server's TLS certificate; "" for the system's CAs
    ca_certs: str = ""
    #: the vehicle's client certificate (binds its VIN) and its key (encrypted like the ECU keys)
    client_cert: str = "tls/client.crt"
    client_key: str = "tls/client.key"
    #: renew the client certificate this many days before it expires
    renew_before_days: float = 30.0
    #: plain http:// to a host that is not loopback is refused unless this is true
    allow_plain_http: bool = False

    def __post_init__(self) -> None:
        _positive("renew_before_days", self.renew_before_days, at_most=3650)


def _is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PrimarySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[primary]``: the ECU the agent runs on."""

    ecu_serial: str
    hardware_id: str
    #: the ECU's signing key (encrypted; password from $UPTAKE_KEY_PASSWORD)
    key: str = "keys/primary.key"
    #: X25519 key for images the director encrypts to this ECU; optional
    encryption_key: str = "keys/encryption.key"

    def __post_init__(self) -> None:
        check_name(self.ecu_serial, "ecu_serial")
        check_name(self.hardware_id, "hardware_id")


class InstallerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[installer]``: the primary's A/B slots, boot environment and reboot."""

    type: InstallerType = InstallerType.FILE
    slot_a: str = "slots/a.img"
    slot_b: str = "slots/b.img"
    #: block devices for "uboot" and "grub", image files for "file" and "command" (the default)
    slot_type: SlotType | None = None
    #: file: the JSON env file; uboot: fw_env.config; grub: the grubenv file
    boot_env: str = "bootenv.json"
    #: trial boots before the bootloader falls back to the old slot
    bootlimit: int = 3
    #: "simulate" plays the bootloader in-process (development, tests, demo);
    #: otherwise the command that reboots the machine, e.g. ["systemctl", "reboot"]
    reboot: str | tuple[str, ...] = "simulate"
    #: type "command": installs with this command ({image}, {filepath}, {sha256} substituted),
    #: then runs the health checks; on failure runs rollback_command (if any)
    install_command: tuple[str, ...] = ()
    rollback_command: tuple[str, ...] = ()
    command_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.bootlimit < 1:
            raise ValueError("bootlimit: must be >= 1")
        if self.type in (InstallerType.UBOOT, InstallerType.GRUB) and self.bootlimit > 8:
            # client/boot/: U-Boot's setexpr counts in hex, GRUB cannot count at all
            raise ValueError(f"bootlimit: at most 8 with type = {self.type.value!r}")
        if isinstance(self.reboot, str) and self.reboot != "simulate":
            raise ValueError('reboot: must be "simulate" or a command list')
        if not self.reboot:
            raise ValueError('reboot: must be "simulate" or a non-empty command list')
        if self.type is InstallerType.COMMAND and not self.install_command:
            raise ValueError('install_command: is required with type = "command"')
        _positive("command_timeout", self.command_timeout)

    @property
    def slots_are(self) -> SlotType:
        """What the slot paths must be (``slot_type``, or the installer type's default)."""
        if self.slot_type is not None:
            return self.slot_type
        if self.type in (InstallerType.UBOOT, InstallerType.GRUB):
            return SlotType.BLOCK
        return SlotType.FILE

    @property
    def reboot_command(self) -> tuple[str, ...] | None:
        """The reboot command, or None when the bootloader is simulated."""
        return None if isinstance(self.reboot, str) else self.reboot


class HealthCheckConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[health_check]``: what decides whether a freshly booted slot commits."""

    #: all must exit 0 within timeout; {slot} and {slot_path} are replaced
    commands: tuple[tuple[str, ...], ...] = ()
    timeout: float = 60.0

    def __post_init__(self) -> None:
        _commands("commands", self.commands)
        _positive("timeout", self.timeout)


class LocalOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``options`` of a ``transport = "local"`` secondary (a simulated MCU in a directory)."""

    #: run after the secondary boots its new bank; {slot} and {slot_path} are replaced
    health_check: tuple[tuple[str, ...], ...] = ()
    #: trial boots before the secondary's bootloader falls back
    bootlimit: int = 1

    def __post_init__(self) -> None:
        _commands("health_check", self.health_check)
        if self.bootlimit < 1:
            raise ValueError("bootlimit: must be >= 1")


class UdsOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``options`` of a ``transport = "uds"`` secondary (UDS over ISO-TP over CAN)."""

    #: python-can interface and channel, e.g. "socketcan" and "can0"
    interface: str = "socketcan"
    channel: str = "can0"
    request_id: int = 0x7E0
    response_id: int = 0x7E8
    can_fd: bool = False
    #: hex secret of the HMAC seed/key algorithm ...
    security_secret: str = ""
    #: ... or "package.module:factory" returning a (level, seed) -> key callable
    key_algorithm: str = ""
    request_timeout: float = 2.0
    erase_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("request_id", "response_id"):
            if not 0 <= getattr(self, name) <= 0x1FFFFFFF:
                raise ValueError(f"{name}: must be a CAN identifier (0 to 0x1FFFFFFF)")
        if self.security_secret and self.key_algorithm:
            raise ValueError("give security_secret or key_algorithm, not both")
        if self.security_secret:
            try:
                bytes.fromhex(self.security_secret)
            except ValueError:
                raise ValueError("security_secret: must be hex bytes") from None
        if self.key_algorithm and ":" not in self.key_algorithm:
            raise ValueError('key_algorithm: must look like "package.module:factory"')
        _positive("request_timeout", self.request_timeout)
        _positive("erase_timeout", self.erase_timeout)


class LocalSecondaryConfig(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="transport", tag="local"
):
    """A ``[[secondaries]]`` table with ``transport = "local"``."""

    ecu_serial: str
    hardware_id: str
    #: the ECU's key, banks and state ("" means secondaries/<ecu_serial>)
    directory: str = ""
    options: LocalOptions = msgspec.field(default_factory=LocalOptions)

    def __post_init__(self) -> None:
        check_name(self.ecu_serial, "ecu_serial")
        check_name(self.hardware_id, "hardware_id")

    @property
    def transport(self) -> str:
        return "local"

    @property
    def state_directory(self) -> str:
        return self.directory or f"secondaries/{self.ecu_serial}"


class UdsSecondaryConfig(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="transport", tag="uds"
):
    """A ``[[secondaries]]`` table with ``transport = "uds"``."""

    ecu_serial: str
    hardware_id: str
    options: UdsOptions = msgspec.field(default_factory=UdsOptions)

    def __post_init__(self) -> None:
        check_name(self.ecu_serial, "ecu_serial")
        check_name(self.hardware_id, "hardware_id")

    @property
    def transport(self) -> str:
        return "uds"


SecondaryConfig = LocalSecondaryConfig | UdsSecondaryConfig


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole agent configuration file (see module docstring)."""

    agent: AgentSection
    primary: PrimarySection
    installer: InstallerConfig = msgspec.field(default_factory=InstallerConfig)
    health_check: HealthCheckConfig = msgspec.field(default_factory=HealthCheckConfig)
    download: FetcherConfig = msgspec.field(default_factory=FetcherConfig)
    tls: TlsSection = msgspec.field(default_factory=TlsSection)
    preconditions: tuple[Precondition, ...] = ()
    secondaries: tuple[SecondaryConfig, ...] = ()

    def __post_init__(self) -> None:
        for name, url in (
            ("server_url", self.agent.server_url),
            ("image_repository_url", self.agent.image_repository_url),
        ):
            if (
                url.startswith("http://")
                and not _is_loopback_url(url)
                and not self.tls.allow_plain_http
            ):
                raise ValueError(
                    f"{name}: plain http:// to a host that is not loopback is refused "
                    "(use https://, or set tls.allow_plain_http = true)"
                )
        serials = [self.primary.ecu_serial] + [s.ecu_serial for s in self.secondaries]
        twice = sorted({s for s in serials if serials.count(s) > 1})
        if twice:
            raise ValueError(
                f"ECU serials must be unique across primary and secondaries: {', '.join(twice)}"
            )

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir)

    def path(self, p: str | Path) -> Path:
        """``p`` (from this file) as a path: relative ones are under ``agent.state_dir``."""
        path = Path(p)
        return path if path.is_absolute() else self.state_dir / path

    @property
    def ecu_serials(self) -> dict[str, str]:
        """Every ECU of this vehicle: serial -> hardware id."""
        ecus = {self.primary.ecu_serial: self.primary.hardware_id}
        ecus.update({s.ecu_serial: s.hardware_id for s in self.secondaries})
        return ecus


# -- loading ------------------------------------------------------------------------------

_AT = re.compile(r"(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
#: What each enumerated key of the agent configuration may be, for error messages.
_CHOICES: Mapping[str, tuple[str, ...]] = {
    "type": tuple(t.value for t in InstallerType),
    "slot_type": tuple(t.value for t in SlotType),
    "transport": ("local", "uds"),
}


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def explain(
    exc: msgspec.ValidationError,
    source: str,
    choices: Mapping[str, tuple[str, ...]] = _CHOICES,
    within: str = "",
) -> str:
    """A msgspec validation error as "FILE: table.key problem" (bench files use it too).

    ``choices`` names the values each enumerated key may take, for "must be one of";
    ``within`` is the table the validated value came from, when it was validated alone.
    """
    match = _AT.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    problem, path = match["problem"], _key(within, (match["path"] or "").lstrip("."))
    if found := re.fullmatch(r"Object missing required field `(.+)`", problem):
        return f"{source}: {_key(path, found[1])} is required"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", problem):
        return f"{source}: unknown key {_key(path, found[1])}"
    if found := re.fullmatch(r"Expected `(.+?)`, got `(.+?)`", problem):
        return f"{source}: {path} must be {found[1]}, not {found[2]}"
    if found := re.fullmatch(r"Invalid (?:enum )?value (.+)", problem):
        allowed = choices.get(path.rsplit(".", 1)[-1], ())
        return f"{source}: {path} must be one of {', '.join(allowed)}, not {found[1]}"
    if found := re.fullmatch(r"(\w+): (.+)", problem, re.DOTALL):  # our own checks name the key
        return f"{source}: {_key(path, found[1])}: {found[2]}"
    return f"{source}: {path}: {problem}" if path else f"{source}: {problem}"


def parse_config(raw: object, source: str = "<config>", base: Path = Path()) -> AgentConfig:
    """Check the parsed TOML document ``raw`` against the schema; paths relative to ``base``."""
    try:
        config = msgspec.convert(raw, AgentConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise AgentConfigError(explain(exc, source)) from exc
    state_dir = Path(config.agent.state_dir)
    if not state_dir.is_absolute():
        state_dir = base / state_dir
    return msgspec.structs.replace(
        config,
        agent=msgspec.structs.replace(
            config.agent, state_dir=str(state_dir), server_url=config.agent.server_url.rstrip("/")
        ),
    )


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent configuration at ``path``."""
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise AgentConfigError(f"{source}: cannot read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"{source}: not valid TOML ({exc})") from exc
    except RecursionError as exc:
        raise AgentConfigError(f"{source}: not valid TOML (nested too deeply)") from exc
    return parse_config(raw, source, Path(path).resolve().parent)
