"""Agent configuration (TOML).

A complete example with every default is in ``client/agent.example.toml``;
``uptake agent init`` writes one for a new vehicle. Relative paths are
relative to ``agent.state_dir``. Every problem raises
:class:`AgentConfigError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.fetcher import FetcherConfig
from client.installer import SlotType
from client.preconditions import Precondition
from signing.names import InvalidNameError, check_name

INSTALLER_TYPES = ("file", "uboot", "grub", "command")
SECONDARY_TRANSPORTS = ("local", "uds")


class AgentConfigError(Exception):
    """The agent configuration is invalid; says which file and key."""


@dataclass(frozen=True)
class InstallerConfig:
    type: str = "file"
    slot_a: Path = Path("slots/a.img")
    slot_b: Path = Path("slots/b.img")
    #: block devices for "uboot" and "grub" (the default), image files for "file" and "command"
    slot_type: SlotType = SlotType.FILE
    #: file: the JSON env file; uboot: fw_env.config; grub: the grubenv file
    boot_env: Path = Path("bootenv.json")
    bootlimit: int = 3
    #: "simulate" plays the bootloader in-process (development, tests, demo);
    #: otherwise the command that reboots the machine, e.g. ["systemctl", "reboot"].
    reboot: str | tuple[str, ...] = "simulate"
    #: type "command": installs with this command ({image}, {filepath}, {sha256} substituted),
    #: then runs the health checks; on failure runs rollback_command (if any).
    install_command: tuple[str, ...] = ()
    rollback_command: tuple[str, ...] = ()
    command_timeout: float = 600.0


@dataclass(frozen=True)
class HealthCheckConfig:
    #: Commands run after booting a new slot; all must exit 0 within timeout.
    #: ``{slot}`` and ``{slot_path}`` are replaced by the booted slot and its path.
    commands: tuple[tuple[str, ...], ...] = ()
    timeout: float = 60.0


@dataclass(frozen=True)
class SecondaryConfig:
    ecu_serial: str
    hardware_id: str
    transport: str = "local"
    #: transport "local": the directory holding the ECU's key, banks and state.
    directory: Path = Path()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentConfig:
    vin: str
    server_url: str
    state_dir: Path
    primary_serial: str
    primary_hardware_id: str
    primary_key: Path
    #: X25519 key for images the director encrypts for this ECU (signing.encryption); optional
    encryption_key: Path = Path("keys/encryption.key")
    installer: InstallerConfig = InstallerConfig()
    health_check: HealthCheckConfig = HealthCheckConfig()
    secondaries: tuple[SecondaryConfig, ...] = ()
    preconditions: tuple[Precondition, ...] = ()
    download: FetcherConfig = field(default_factory=FetcherConfig)
    poll_interval: float = 300.0
    poll_jitter: float = 0.2
    #: Send the (signed, costly to verify) manifest when something changed, else at most this often.
    manifest_heartbeat: float = 3600.0
    #: Largest image the agent will download (endless-data defence on top of TUF lengths).
    max_image_size: int = 4 * 1024**3
    source: Path | None = None

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.state_dir / p

    @property
    def ecu_serials(self) -> dict[str, str]:
        """Every ECU of this vehicle: serial -> hardware id."""
        ecus = {self.primary_serial: self.primary_hardware_id}
        ecus.update({s.ecu_serial: s.hardware_id for s in self.secondaries})
        return ecus


class _Table:
    """Typed access to a TOML table that names the file and key on errors."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, dict):
            raise AgentConfigError(f"{source}: [{where}] must be a table")
        self.data, self.where, self.source = data, where, source
        self.used: set[str] = set()

    def _err(self, key: str, problem: str) -> AgentConfigError:
        return AgentConfigError(f"{self.source}: {self.where}.{key} {problem}")

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self._err(key, "is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise self._err(key, f"must be {getattr(typ, '__name__', typ)}, not a boolean")
        if not isinstance(value, typ):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self._err(key, f"must be {names}, got {type(value).__name__}")
        return value

    def name(self, key: str) -> str:
        """A required VIN, ECU serial or hardware id (the grammar of :mod:`signing.names`)."""
        value = self.get(key, str)
        try:
            return check_name(value, f"{self.source}: {self.where}.{key}")
        except InvalidNameError as exc:
            raise AgentConfigError(str(exc)) from exc

    def positive(self, key: str, default: float) -> float:
        value = self.get(key, (int, float), default)
        if value <= 0:
            raise self._err(key, "must be > 0")
        return float(value)

    def check_unknown(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise AgentConfigError(
                f"{self.source}: unknown key(s) in [{self.where}]: {', '.join(sorted(unknown))}"
            )


def _array_of_tables(raw: dict[str, Any], key: str, source: str) -> list[_Table]:
    """The ``[[key]]`` tables of the file (none when absent)."""
    items = raw.get(key, [])
    if not isinstance(items, list):
        raise AgentConfigError(f"{source}: [[{key}]] must be an array of tables")
    return [_Table(item, f"{key}[{i}]", source) for i, item in enumerate(items)]


def _command(table: _Table, key: str) -> tuple[str, ...]:
    argv = table.get(key, list, [])
    if not all(isinstance(a, str) for a in argv):
        raise AgentConfigError(f"{table.source}: {table.where}.{key} must be a list of strings")
    return tuple(argv)


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


def parse_config(raw: dict[str, Any], source: str = "<config>", base: Path = Path()) -> AgentConfig:
    unknown = set(raw) - {
        "agent",
        "primary",
        "installer",
        "health_check",
        "secondaries",
        "preconditions",
        "download",
    }
    if unknown:
        raise AgentConfigError(f"{source}: unknown table(s): {', '.join(sorted(unknown))}")
    agent = _Table(raw.get("agent"), "agent", source)
    state_dir = Path(agent.get("state_dir", str))
    if not state_dir.is_absolute():
        state_dir = base / state_dir
    server_url = agent.get("server_url", str)
    if not server_url.startswith(("http://", "https://")):
        raise AgentConfigError(f"{source}: agent.server_url must start with http:// or https://")
    vin = agent.name("vin")
    poll_interval = agent.positive("poll_interval", 300.0)
    jitter = agent.get("poll_jitter", (int, float), 0.2)
    if not 0 <= jitter <= 1:
        raise AgentConfigError(f"{source}: agent.poll_jitter must be between 0 and 1")
    max_image = agent.get("max_image_size", int, 4 * 1024**3)
    heartbeat = agent.positive("manifest_heartbeat", 3600.0)
    agent.check_unknown()

    primary = _Table(raw.get("primary"), "primary", source)
    serial = primary.name("ecu_serial")
    hw = primary.name("hardware_id")
    key = Path(primary.get("key", str, f"keys/{serial}.key"))
    encryption_key = Path(primary.get("encryption_key", str, "keys/encryption.key"))
    primary.check_unknown()

    inst = _Table(raw.get("installer", {}), "installer", source)
    itype = inst.get("type", str, "file")
    if itype not in INSTALLER_TYPES:
        raise AgentConfigError(
            f"{source}: installer.type must be one of {', '.join(INSTALLER_TYPES)}"
        )
    reboot = inst.get("reboot", (str, list), "simulate")
    if isinstance(reboot, list):
        if not reboot or not all(isinstance(a, str) for a in reboot):
            raise AgentConfigError(
                f'{source}: installer.reboot must be "simulate" or a command list'
            )
        reboot = tuple(reboot)
    elif reboot != "simulate":
        raise AgentConfigError(f'{source}: installer.reboot must be "simulate" or a command list')
    bootlimit = inst.get("bootlimit", int, 3)
    if bootlimit < 1:
        raise AgentConfigError(f"{source}: installer.bootlimit must be >= 1")
    slot_type = inst.get("slot_type", str, "block" if itype in ("uboot", "grub") else "file")
    if slot_type not in {t.value for t in SlotType}:
        raise AgentConfigError(f'{source}: installer.slot_type must be "block" or "file"')
    installer = InstallerConfig(
        type=itype,
        slot_a=Path(inst.get("slot_a", str, "slots/a.img")),
        slot_b=Path(inst.get("slot_b", str, "slots/b.img")),
        slot_type=SlotType(slot_type),
        boot_env=Path(inst.get("boot_env", str, "bootenv.json")),
        bootlimit=bootlimit,
        reboot=reboot,
        install_command=_command(inst, "install_command"),
        rollback_command=_command(inst, "rollback_command"),
        command_timeout=inst.positive("command_timeout", 600.0),
    )
    if itype == "command" and not installer.install_command:
        raise AgentConfigError(
            f'{source}: installer.install_command is required with type = "command"'
        )
    inst.check_unknown()

    hc = _Table(raw.get("health_check", {}), "health_check", source)
    commands = hc.get("commands", list, [])
    if not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in commands):
        raise AgentConfigError(
            f"{source}: health_check.commands must be a list of non-empty string lists"
        )
    health = HealthCheckConfig(tuple(tuple(c) for c in commands), hc.positive("timeout", 60.0))
    hc.check_unknown()

    secondaries = []
    for i, t in enumerate(_array_of_tables(raw, "secondaries", source)):
        transport = t.get("transport", str, "local")
        if transport not in SECONDARY_TRANSPORTS:
            raise AgentConfigError(
                f"{source}: secondaries[{i}].transport must be one of {', '.join(SECONDARY_TRANSPORTS)}"
            )
        sec = SecondaryConfig(
            ecu_serial=t.name("ecu_serial"),
            hardware_id=t.name("hardware_id"),
            transport=transport,
            directory=Path(t.get("directory", str, f"secondaries/{t.data.get('ecu_serial', i)}")),
            options=t.get("options", dict, {}),
        )
        t.check_unknown()
        secondaries.append(sec)
    preconditions = []
    for i, t in enumerate(_array_of_tables(raw, "preconditions", source)):
        name = t.get("name", str)
        command = t.get("command", list, [])
        hook = t.get("hook", str, "")
        if bool(command) == bool(hook) or not all(isinstance(a, str) for a in command):
            raise AgentConfigError(
                f'{source}: preconditions[{i}] needs exactly one of command (a list of strings) or hook ("module:function")'
            )
        if hook and ":" not in hook:
            raise AgentConfigError(
                f'{source}: preconditions[{i}].hook must look like "package.module:function"'
            )
        preconditions.append(Precondition(name, tuple(command), hook, t.positive("timeout", 10.0)))
        t.check_unknown()
    dl = _Table(raw.get("download", {}), "download", source)
    defaults = FetcherConfig()
    max_rate = dl.get("max_rate", (int, float), 0)
    min_rate = dl.get("min_rate", (int, float), defaults.min_rate)
    try:
        download = FetcherConfig(
            connect_timeout=dl.positive("connect_timeout", defaults.connect_timeout),
            read_timeout=dl.positive("read_timeout", defaults.read_timeout),
            max_attempts=dl.get("max_attempts", int, defaults.max_attempts),
            backoff_initial=dl.positive("backoff_initial", defaults.backoff_initial),
            backoff_max=dl.positive("backoff_max", defaults.backoff_max),
            min_rate=float(min_rate),
            rate_window=dl.positive("rate_window", defaults.rate_window),
            max_rate=float(max_rate) if max_rate else None,
        )
    except ValueError as exc:
        raise AgentConfigError(f"{source}: [download] {exc}") from exc
    dl.check_unknown()
    serials = [serial] + [s.ecu_serial for s in secondaries]
    if len(set(serials)) != len(serials):
        raise AgentConfigError(
            f"{source}: ECU serials must be unique across primary and secondaries"
        )
    return AgentConfig(
        vin=vin,
        server_url=server_url.rstrip("/"),
        state_dir=state_dir,
        primary_serial=serial,
        primary_hardware_id=hw,
        primary_key=key,
        encryption_key=encryption_key,
        installer=installer,
        health_check=health,
        secondaries=tuple(secondaries),
        preconditions=tuple(preconditions),
        download=download,
        poll_interval=poll_interval,
        poll_jitter=float(jitter),
        max_image_size=max_image,
        manifest_heartbeat=heartbeat,
        source=Path(source),
    )
