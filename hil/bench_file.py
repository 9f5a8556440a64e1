"""Bench files: what a HIL bench is made of and which scenarios to run on it.

A bench file is TOML::

    [bench]
    name = "sample"                  # names the JUnit test suite (default: the file's name)
    description = "free text"

    [primary]
    name = "primary"                 # the ECU running the agent: this host

    [secondaries.engine]             # one table per secondary ECU
    transport = "uds"                # "uds" (CAN) or "stm32-uart" (serial)
    interface = "virtual"            # "virtual" (simulated ECU) or "socketcan"
    channel = "can0"                 # socketcan interface name
    can_fd = false
    bitrate = 500000
    data_bitrate = 2000000           # CAN FD data phase
    wire_time = true                 # virtual: take as long as the real wire
    request_id = 0x7E0
    response_id = 0x7E8
    key_secret = "..."               # seed/key secret (HMAC-SHA256 algorithm)
    erase_seconds = 1.5              # virtual: how long the simulated erase takes
    boot_seconds = 2.0               # how long the ECU takes to boot after power-on
    relay = { port = "/dev/ttyUSB3", on = "A00101A2", off = "A00100A1" }

    [secondaries.body]
    transport = "stm32-uart"
    port = "virtual"                 # "virtual" (emulator on a pty) or a device
    baudrate = 115200

    [[scenario]]
    name = "engine update"           # defaults to "<kind> <secondary>"
    kind = "update"                  # update | rollback | power-loss | wrong-key | mute
    secondary = "engine"
    image_size = 131072              # generated image, or:
    image = "images/engine-2.0.bin"  # a file (relative to the bench file)
    version = "2.0.0"
    at = 0.5                         # power-loss: fraction of the transfer

The file is declared once, as the :class:`BenchSpec` schema (msgspec): each
transport has its own secondary table (:class:`UdsSecondarySpec`,
:class:`Stm32SecondarySpec`), types are strict, unknown keys are refused.
``relay`` is optional: a serial relay board that cuts the ECU's supply
(``on``/``off`` are the hex bytes it expects); without one, power-loss
scenarios on real hardware are skipped. Every mistake in the file is a
:class:`BenchFileError` that names the file, the table and the key.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from client.config import explain
from signing.exceptions import UptakeError

__all__ = [
    "BenchFileError",
    "BenchSpec",
    "RelaySpec",
    "ScenarioKind",
    "ScenarioSpec",
    "SecondarySpec",
    "Stm32SecondarySpec",
    "UdsSecondarySpec",
    "load_bench",
    "parse_bench",
]


class BenchFileError(UptakeError):
    """The bench file is missing, not TOML, or describes an impossible bench."""


class ScenarioKind(enum.StrEnum):
    UPDATE = "update"
    ROLLBACK = "rollback"
    POWER_LOSS = "power-loss"
    WRONG_KEY = "wrong-key"
    MUTE = "mute"


def _hex(name: str, text: str) -> None:
    try:
        bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{name}: not hex bytes: {text!r}") from None


class RelaySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A serial relay board that switches one ECU's supply."""

    port: str
    #: the bytes (hex) that switch the supply on and off
    on: str
    off: str
    baudrate: int = 9600

    def __post_init__(self) -> None:
        _hex("on", self.on)
        _hex("off", self.off)

    @property
    def on_bytes(self) -> bytes:
        return bytes.fromhex(self.on)

    @property
    def off_bytes(self) -> bytes:
        return bytes.fromhex(self.off)


class UdsSecondarySpec(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="transport", tag="uds"
):
    """A ``[secondaries.NAME]`` table with ``transport = "uds"``: an ECU on CAN."""

    interface: Literal["virtual", "socketcan"] = "virtual"
    #: the socketcan interface (required with interface = "socketcan")
    channel: str = ""
    can_fd: bool = False
    bitrate: int = 500_000
    data_bitrate: int = 2_000_000
    wire_time: bool = True
    request_id: int = 0x7E0
    response_id: int = 0x7E8
    #: the seed/key secret of the HMAC-SHA256 algorithm (text)
    key_secret: str | None = None
    erase_seconds: float = 0.0
    boot_seconds: float = 2.0
    relay: RelaySpec | None = None

    def __post_init__(self) -> None:
        if self.interface == "socketcan" and not self.channel:
            raise ValueError('channel: is required with interface = "socketcan"')

    @property
    def transport(self) -> str:
        return "uds"

    @property
    def virtual(self) -> bool:
        return self.interface == "virtual"

    @property
    def secret(self) -> bytes | None:
        return self.key_secret.encode() if self.key_secret is not None else None


class Stm32SecondarySpec(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    tag_field="transport",
    tag="stm32-uart",
):
    """A ``[secondaries.NAME]`` table with ``transport = "stm32-uart"``: a ROM bootloader."""

    #: "virtual" (an emulator on a pty) or the serial device
    port: str
    baudrate: int = 115_200
    wire_time: bool = True
    boot_seconds: float = 2.0
    relay: RelaySpec | None = None

    @property
    def transport(self) -> str:
        return "stm32-uart"

    @property
    def virtual(self) -> bool:
        return self.port == "virtual"


SecondarySpec = UdsSecondarySpec | Stm32SecondarySpec


class ScenarioSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[scenario]]``."""

    kind: ScenarioKind
    secondary: str
    #: defaults to "<kind> <secondary>" (and " at N%" for a power loss)
    name: str = ""
    image_size: int | None = None
    #: an image file, relative to the bench file
    image: str | None = None
    version: str | None = None
    at: float | None = None

    def __post_init__(self) -> None:
        given = (self.image_size is None) != (self.image is None)
        if not given and self.kind is not ScenarioKind.MUTE:
            raise ValueError("image: give exactly one of 'image_size' or 'image'")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError("image_size: must be positive")
        if self.kind is ScenarioKind.POWER_LOSS and (self.at is None or not 0 < self.at < 1):
            raise ValueError("at: power-loss needs 'at', a fraction between 0 and 1 (e.g. 0.5)")

    @property
    def image_path(self) -> Path | None:
        return Path(self.image) if self.image is not None else None


class BenchSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = ""
    description: str = ""


class PrimaryNode(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = "primary"


class BenchSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole bench file (see module docstring)."""

    secondaries: dict[str, SecondarySpec]
    bench: BenchSection = msgspec.field(default_factory=BenchSection)
    primary: PrimaryNode = msgspec.field(default_factory=PrimaryNode)
    scenario: tuple[ScenarioSpec, ...] = ()

    @property
    def name(self) -> str:
        return self.bench.name

    @property
    def description(self) -> str:
        return self.bench.description

    @property
    def scenarios(self) -> tuple[ScenarioSpec, ...]:
        return self.scenario


_CHOICES: Mapping[str, tuple[str, ...]] = {
    "transport": ("uds", "stm32-uart"),
    "kind": tuple(k.value for k in ScenarioKind),
    "interface": ("virtual", "socketcan"),
}


def load_bench(path: Path | str) -> BenchSpec:
    """Read and check a bench file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchFileError(f"{path}: no such bench file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchFileError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BenchFileError(f"{path}: not valid TOML: {exc}") from None
    return parse_bench(raw, path)


def parse_bench(raw: object, path: Path | None = None) -> BenchSpec:
    """Check the parsed TOML document ``raw`` against the schema and the bench's own rules."""
    where = str(path) if path else "bench"
    tables = raw.get("secondaries") if isinstance(raw, dict) else None
    for name, table in tables.items() if isinstance(tables, dict) else ():
        try:  # each alone first, so that an error names its table (msgspec says "[...]")
            msgspec.convert(table, SecondarySpec, strict=True)
        except msgspec.ValidationError as exc:
            raise BenchFileError(explain(exc, where, _CHOICES, f"secondaries.{name}")) from None
    try:
        spec = msgspec.convert(raw, BenchSpec, strict=True)
    except msgspec.ValidationError as exc:
        raise BenchFileError(explain(exc, where, _CHOICES)) from None
    if not spec.secondaries:
        raise BenchFileError(f"{where}: [secondaries] names no ECU")
    base = path.parent if path else Path.cwd()
    scenarios = []
    for index, item in enumerate(spec.scenario):
        at = f"{where}: scenario[{index}]"
        secondary = spec.secondaries.get(item.secondary)
        if secondary is None:
            raise BenchFileError(
                f"{at}: no secondary named {item.secondary!r} (have {', '.join(spec.secondaries)})"
            )
        needs_uds = item.kind in (ScenarioKind.ROLLBACK, ScenarioKind.WRONG_KEY)
        if needs_uds and not isinstance(secondary, UdsSecondarySpec):
            raise BenchFileError(
                f"{at}: '{item.kind}' needs a UDS secondary (the STM32 ROM bootloader has neither)"
            )
        default_name = f"{item.kind} {item.secondary}" + (f" at {item.at:.0%}" if item.at else "")
        scenarios.append(
            msgspec.structs.replace(
                item,
                name=item.name or default_name,
                image=str(base / item.image) if item.image is not None else None,
            )
        )
    names = [s.name for s in scenarios]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchFileError(f"{where}: scenario names must be unique: {', '.join(duplicates)}")
    bench = msgspec.structs.replace(
        spec.bench, name=spec.bench.name or (path.stem if path else "bench")
    )
    return msgspec.structs.replace(spec, bench=bench, scenario=tuple(scenarios))
