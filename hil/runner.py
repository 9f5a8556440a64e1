"""Running a bench: bring up its secondaries, run each scenario, collect results.

Each secondary of a :class:`~hil.bench_file.BenchSpec` becomes a *node*:

* a virtual UDS node is a :class:`~hil.uds_ecu.UdsEcuSimulator` on a
  :class:`~hil.can_bus.VirtualCanWire` (with the wire-time model unless
  ``wire_time = false``); a real one is a ``socketcan`` interface;
* a virtual STM32 node is a :class:`~hil.stm32_bootloader.Stm32BootloaderEmulator`
  on a pty; a real one a serial device with the part in its bootloader.

A scenario opens a fresh flasher (the same classes the agent uses), does its
thing and ends as ``passed``, ``failed`` (the ECU misbehaved: the flash
failed, or an expected failure did not happen, or the old image was not
kept), ``skipped`` (the bench cannot do it, e.g. a power loss without a
relay) or ``error`` (the bench itself broke). Faults come from the simulators
on virtual nodes and from the relay on real ones; nothing else differs, so a
lab bench and CI run the same file format.
"""

from __future__ import annotations

import io
import random
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import can

from client.secondaries.flashing import (
    EcuFlasher,
    FlashError,
    FlashTimeout,
    ImageDidNotBoot,
    ProgressCallback,
    SecurityAccessDenied,
)
from client.secondaries.stm32_uart import Stm32Config as Stm32HostConfig
from client.secondaries.stm32_uart import Stm32UartFlasher
from client.secondaries.uds import (
    HmacKeyAlgorithm,
    UdsAddressing,
    UdsConfig,
    UdsFlasher,
    UdsTimeouts,
)
from hil.bench_file import (
    BenchSpec,
    RelaySpec,
    ScenarioSpec,
    SecondarySpec,
    Stm32SecondarySpec,
    UdsSecondarySpec,
)
from hil.can_bus import VirtualCanWire
from hil.stm32_bootloader import Stm32BootloaderEmulator, Stm32Config
from hil.uds_ecu import SIMULATOR_SECRET, EcuConfig, UdsEcuSimulator
from hil.wire_time import CanTiming, SerialTiming
from signing.exceptions import UptakeError


class BenchError(UptakeError):
    """The bench could not be brought up (a device missing, a simulator failing)."""


@dataclass
class ScenarioResult:
    name: str
    kind: str
    secondary: str
    status: str  # passed | failed | skipped | error
    seconds: float
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "secondary": self.secondary,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "message": self.message,
            "metrics": {k: round(v, 3) for k, v in self.metrics.items()},
        }


class _ScenarioFailed(Exception):
    pass


class _ScenarioSkipped(Exception):
    pass


def make_image(size: int, seed: str) -> bytes:
    """A deterministic image whose vector table is not erased (so it boots)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[: min(8, size)] = b"\x00\x50\x00\x20\x41\x01\x00\x08"[: min(8, size)]
    return bytes(data)


class PowerSwitch(Protocol):
    """Switches one ECU's supply (a relay board, a labgrid power driver...)."""

    def on(self) -> None: ...

    def off(self) -> None: ...


class SerialRelay:
    """A relay board on a serial port that switches an ECU's supply."""

    def __init__(self, spec: RelaySpec) -> None:
        self.spec = spec

    def _send(self, command: bytes) -> None:
        import serial

        try:
            with serial.serial_for_url(
                self.spec.port, baudrate=self.spec.baudrate, timeout=1
            ) as port:
                port.write(command)
                port.flush()
        except (serial.SerialException, OSError) as exc:
            raise BenchError(f"relay {self.spec.port}: {exc}") from None

    def off(self) -> None:
        self._send(self.spec.off_bytes)

    def on(self) -> None:
        self._send(self.spec.on_bytes)


class Node(ABC):
    """One secondary on the bench."""

    def __init__(self, name: str, spec: SecondarySpec, power: PowerSwitch | None = None) -> None:
        self.name = name
        self.spec: SecondarySpec = spec
        self.relay: PowerSwitch | None = power or (SerialRelay(spec.relay) if spec.relay else None)

    @abstractmethod
    def open_flasher(self, *, key_secret: bytes | None = None) -> EcuFlasher: ...

    @abstractmethod
    def wire_limit(self) -> float | None:
        """Payload bytes/s the wire allows at best (None: unlimited, no model)."""

    def arm_power_loss(self, fraction: float, length: int) -> ProgressCallback | None:
        """Prepare a power cut at ``fraction`` of a ``length``-byte transfer."""
        if self.relay is None:
            raise _ScenarioSkipped("power loss on real hardware needs a relay in the bench file")
        relay = self.relay
        cut = {"done": False}

        def progress(done: int, total: int) -> None:
            if not cut["done"] and done >= fraction * total:
                cut["done"] = True
                relay.off()

        return progress

    def restore_power(self) -> None:
        if self.relay is not None:
            self.relay.on()
            time.sleep(self.spec.boot_seconds)

    def set_mute(self, mute: bool) -> None:
        raise _ScenarioSkipped("a mute ECU can only be simulated")

    def close(self) -> None:  # noqa: B027 - nodes without resources need nothing
        pass


class UdsNode(Node):
    def __init__(
        self, name: str, spec: UdsSecondarySpec, state_dir: Path, power: PowerSwitch | None = None
    ) -> None:
        super().__init__(name, spec, power)
        self.spec: UdsSecondarySpec = spec
        self.addressing = UdsAddressing(
            request_id=spec.request_id, response_id=spec.response_id, can_fd=spec.can_fd
        )
        self.timing = CanTiming(nominal_bitrate=spec.bitrate, data_bitrate=spec.data_bitrate)
        self.simulator: UdsEcuSimulator | None = None
        self.wire: VirtualCanWire | None = None
        self._ecu_bus: can.BusABC | None = None
        if spec.virtual:
            self.wire = VirtualCanWire(self.timing if spec.wire_time else None)
            self._ecu_bus = self.wire.open_bus()
            config = EcuConfig(
                addressing=self.addressing,
                serial=f"SIM-{name}",
                erase_seconds=spec.erase_seconds,
                key_algorithm=HmacKeyAlgorithm(spec.secret or SIMULATOR_SECRET),
            )
            self.simulator = UdsEcuSimulator(self._ecu_bus, state_dir / name, config)
            self.simulator.power_on()

    def _bus(self) -> can.BusABC:
        if self.wire is not None:
            return self.wire.open_bus()
        try:
            bus: can.BusABC = can.Bus(
                interface="socketcan", channel=self.spec.channel, fd=self.spec.can_fd
            )
        except (can.CanError, OSError) as exc:
            raise BenchError(
                f"{self.name}: cannot open socketcan {self.spec.channel}: {exc}"
            ) from None
        return bus

    def open_flasher(self, *, key_secret: bytes | None = None) -> EcuFlasher:
        secret = key_secret or self.spec.secret or SIMULATOR_SECRET
        # An infinitely fast simulated wire answers in milliseconds: fail faster there.
        instant = self.spec.virtual and not self.spec.wire_time
        config = UdsConfig(
            addressing=self.addressing,
            timeouts=UdsTimeouts(
                request=0.5 if instant else 1.0,
                transfer_block=0.5 if instant else 2.0,
                boot=max(5.0, self.spec.boot_seconds * 3),
            ),
            key_algorithm=HmacKeyAlgorithm(secret),
            block_retries=2,
        )
        return UdsFlasher(self._bus(), config, owns_bus=True)

    def wire_limit(self) -> float | None:
        if self.spec.virtual and not self.spec.wire_time:
            return None
        return self.timing.payload_limit(fd=self.spec.can_fd, bitrate_switch=self.spec.can_fd)

    def arm_power_loss(self, fraction: float, length: int) -> ProgressCallback | None:
        if self.simulator is None:
            return super().arm_power_loss(fraction, length)
        self.simulator.config.faults.power_loss_at = fraction
        return None

    def restore_power(self) -> None:
        if self.simulator is None:
            super().restore_power()
            return
        if not self.simulator.wait_power_lost(10):
            raise BenchError(f"{self.name}: the simulator never lost power")
        self.simulator.power_on()

    def set_mute(self, mute: bool) -> None:
        if self.simulator is None:
            super().set_mute(mute)
            return
        self.simulator.config.faults.mute = mute

    def close(self) -> None:
        if self.simulator is not None:
            self.simulator.power_off()
        if self._ecu_bus is not None:
            self._ecu_bus.shutdown()


class Stm32Node(Node):
    def __init__(
        self,
        name: str,
        spec: Stm32SecondarySpec,
        state_dir: Path,
        power: PowerSwitch | None = None,
    ) -> None:
        super().__init__(name, spec, power)
        self.spec: Stm32SecondarySpec = spec
        self.timing = SerialTiming(baudrate=spec.baudrate)
        self.emulator: Stm32BootloaderEmulator | None = None
        if spec.virtual:
            self.emulator = Stm32BootloaderEmulator(
                state_dir / name, Stm32Config(timing=self.timing if spec.wire_time else None)
            )
            self.emulator.power_on()

    def open_flasher(self, *, key_secret: bytes | None = None) -> EcuFlasher:
        port = self.emulator.port if self.emulator is not None else self.spec.port
        return Stm32UartFlasher(
            port, Stm32HostConfig(baudrate=self.spec.baudrate, start_application=False)
        )

    def wire_limit(self) -> float | None:
        if self.spec.virtual and not self.spec.wire_time:
            return None
        return self.timing.payload_limit()

    def start_application(self, flasher: Stm32UartFlasher) -> None:
        """Jump to the new image, then get back into the bootloader for the next scenario.

        BOOT0 stays high on a bench, so a power cycle (the emulator's reset or
        the relay) re-enters the bootloader; without a relay the part is left
        in its bootloader.
        """
        if self.emulator is not None:
            flasher.go()
            self.emulator.reset_into_bootloader()
        elif self.relay is not None:
            flasher.go()
            self.relay.off()
            self.restore_power()

    def arm_power_loss(self, fraction: float, length: int) -> ProgressCallback | None:
        if self.emulator is None:
            return super().arm_power_loss(fraction, length)
        self.emulator.arm_power_loss(max(1, int(length * fraction)))
        return None

    def restore_power(self) -> None:
        if self.emulator is None:
            super().restore_power()
            return
        if not self.emulator.power_lost.wait(10):
            raise BenchError(f"{self.name}: the emulator never lost power")
        self.emulator.power_on()

    def set_mute(self, mute: bool) -> None:
        if self.emulator is None:
            super().set_mute(mute)
            return
        self.emulator.config.faults.mute = mute

    def close(self) -> None:
        if self.emulator is not None:
            self.emulator.close()


class BenchRunner:
    """Runs a bench's scenarios in order and returns their results."""

    def __init__(
        self,
        bench: BenchSpec,
        state_dir: Path | None = None,
        log: Callable[[str], None] | None = None,
        power_switches: Mapping[str, PowerSwitch] | None = None,
    ) -> None:
        self.bench = bench
        self._power = dict(power_switches or {})
        self._state_dir = state_dir
        self._log = log or (lambda _line: None)

    def run(self) -> list[ScenarioResult]:
        with tempfile.TemporaryDirectory(prefix="uptake-hil-") as tmp:
            state_dir = self._state_dir or Path(tmp)
            nodes: dict[str, Node] = {}
            try:
                for name, spec in self.bench.secondaries.items():
                    power = self._power.get(name)
                    nodes[name] = (
                        UdsNode(name, spec, state_dir, power)
                        if isinstance(spec, UdsSecondarySpec)
                        else Stm32Node(name, spec, state_dir, power)
                    )
                return [
                    self._run_one(scenario, nodes[scenario.secondary])
                    for scenario in self.bench.scenarios
                ]
            finally:
                for node in nodes.values():
                    node.close()

    def _run_one(self, scenario: ScenarioSpec, node: Node) -> ScenarioResult:
        self._log(f"running {scenario.name} ...")
        started = time.monotonic()
        result = ScenarioResult(scenario.name, scenario.kind, scenario.secondary, "passed", 0.0)
        try:
            image = self._image(scenario)
            run = getattr(self, "_" + scenario.kind.replace("-", "_"))
            result.message = run(scenario, node, image, result.metrics)
        except _ScenarioSkipped as exc:
            result.status, result.message = "skipped", str(exc)
        except (_ScenarioFailed, FlashError) as exc:
            result.status, result.message = "failed", str(exc)
        except Exception as exc:  # the bench itself broke: report, keep running
            result.status, result.message = "error", f"{type(exc).__name__}: {exc}"
            result.detail = traceback.format_exc()
        result.seconds = time.monotonic() - started
        return result

    def _image(self, scenario: ScenarioSpec) -> bytes:
        if scenario.image_path is not None:
            try:
                return scenario.image_path.read_bytes()
            except OSError as exc:
                raise BenchError(f"image {scenario.image}: {exc}") from None
        return make_image(scenario.image_size or 4096, scenario.name)

    def _flash_and_verify(
        self,
        node: Node,
        image: bytes,
        version: str | None,
        metrics: dict[str, float],
        progress: ProgressCallback | None = None,
    ) -> None:
        with node.open_flasher() as flasher:
            started = time.monotonic()
            if isinstance(flasher, UdsFlasher):
                flasher.flash(io.BytesIO(image), len(image), progress, version=version)
            else:
                flasher.flash(io.BytesIO(image), len(image), progress)
            seconds = time.monotonic() - started
            flasher.verify(io.BytesIO(image), len(image))
            if isinstance(node, Stm32Node) and isinstance(flasher, Stm32UartFlasher):
                node.start_application(flasher)
        metrics["bytes"] = float(len(image))
        metrics["flash_seconds"] = seconds
        metrics["kib_per_s"] = len(image) / 1024 / seconds
        limit = node.wire_limit()
        if limit is not None:
            metrics["wire_limit_kib_per_s"] = limit / 1024

    def _update(
        self, scenario: ScenarioSpec, node: Node, image: bytes, metrics: dict[str, float]
    ) -> str:
        self._flash_and_verify(node, image, scenario.version, metrics)
        return _throughput(metrics)

    def _rollback(
        self, scenario: ScenarioSpec, node: Node, image: bytes, metrics: dict[str, float]
    ) -> str:
        broken = b"\xff" * 8 + image[8:]  # an erased vector table cannot boot
        with node.open_flasher() as flasher:
            before = flasher.identify()
            try:
                assert isinstance(flasher, UdsFlasher)
                flasher.flash(io.BytesIO(broken), len(broken), version=scenario.version or "broken")
            except ImageDidNotBoot:
                pass
            else:
                raise _ScenarioFailed("the ECU accepted an image that cannot boot")
            after = flasher.identify()
        if after != before:
            raise _ScenarioFailed(f"the ECU did not fall back: it was {before}, now {after}")
        return f"fell back to {after.software_version} (bank {after.details.get('active_bank')})"

    def _power_loss(
        self, scenario: ScenarioSpec, node: Node, image: bytes, metrics: dict[str, float]
    ) -> str:
        assert scenario.at is not None
        with node.open_flasher() as flasher:
            before = flasher.identify() if isinstance(flasher, UdsFlasher) else None
        progress = node.arm_power_loss(scenario.at, len(image))
        try:
            with node.open_flasher() as flasher:
                if isinstance(flasher, UdsFlasher):
                    flasher.flash(io.BytesIO(image), len(image), progress, version=scenario.version)
                else:
                    flasher.flash(io.BytesIO(image), len(image), progress)
        except FlashError as exc:
            interrupted = f"interrupted at {exc.step}"
        else:
            raise _ScenarioFailed("the flash completed although power was cut")
        finally:
            node.restore_power()
        if before is not None:
            with node.open_flasher() as flasher:
                after = flasher.identify()
            if after != before:
                raise _ScenarioFailed(
                    f"after the power loss the ECU is not on its old image: {after}"
                )
        self._flash_and_verify(node, image, scenario.version, metrics)
        kept = "old image kept, " if before is not None else ""
        return f"{interrupted}; {kept}retry ok, {_throughput(metrics)}"

    def _wrong_key(
        self, scenario: ScenarioSpec, node: Node, image: bytes, metrics: dict[str, float]
    ) -> str:
        with node.open_flasher(key_secret=b"deliberately-wrong-secret") as flasher:
            try:
                flasher.flash(io.BytesIO(image), len(image))
            except SecurityAccessDenied as exc:
                return f"refused: {exc.message}"
        raise _ScenarioFailed("the ECU accepted a wrong security key")

    def _mute(
        self, scenario: ScenarioSpec, node: Node, image: bytes, metrics: dict[str, float]
    ) -> str:
        node.set_mute(True)
        try:
            with node.open_flasher() as flasher:
                try:
                    flasher.identify()
                except FlashTimeout as exc:
                    return f"clear timeout: {exc}"
        finally:
            node.set_mute(False)
        raise _ScenarioFailed("a mute ECU answered")


def _throughput(metrics: dict[str, float]) -> str:
    text = f"{metrics['bytes'] / 1024:.0f} KiB in {metrics['flash_seconds']:.2f} s = {metrics['kib_per_s']:.1f} KiB/s"
    limit = metrics.get("wire_limit_kib_per_s")
    if limit:
        text += f" (wire limit {limit:.1f} KiB/s, {metrics['kib_per_s'] / limit:.0%})"
    return text
