"""Running bench files on labgrid-managed benches (optional; labgrid is imported lazily).

Labs that manage their benches with labgrid keep doing so: the adapter takes
an acquired labgrid ``Target`` and a bench file, and points each real
secondary at the target's resources by name convention:

* a UDS secondary ``engine`` uses the ``NetworkInterface`` resource named
  ``engine`` (its ``ifname`` is the socketcan interface);
* a serial secondary ``body`` uses the serial port resource named ``body``
  (``RawSerialPort``/``USBSerialPort``: its device; ``NetworkSerialPort``:
  an ``rfc2217://`` URL);
* a ``PowerProtocol`` driver named like the secondary, if the target has one,
  cuts and restores its power for power-loss scenarios.

Virtual secondaries stay simulated. Neither the agent nor this package
depends on labgrid: only calling these functions needs it installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from hil.bench_file import BenchSpec, UdsSecondarySpec, load_bench
from hil.runner import BenchRunner, PowerSwitch, ScenarioResult


class LabgridPower:
    """A labgrid ``PowerProtocol`` driver as a :class:`~hil.runner.PowerSwitch`."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver

    def on(self) -> None:
        self._driver.on()

    def off(self) -> None:
        self._driver.off()


def _resource(target: Any, class_names: tuple[str, ...], name: str) -> Any:
    for class_name in class_names:
        try:
            return target.get_resource(class_name, name=name, wait_avail=False)
        except Exception:  # labgrid raises its own NoResourceFoundError family
            continue
    raise LookupError(f"labgrid target {target.name} has no {'/'.join(class_names)} named {name!r}")


def bench_for_target(target: Any, bench: BenchSpec) -> tuple[BenchSpec, dict[str, PowerSwitch]]:
    """Point ``bench``'s real secondaries at ``target``'s resources."""
    secondaries = dict(bench.secondaries)
    power: dict[str, PowerSwitch] = {}
    for name, spec in bench.secondaries.items():
        if spec.virtual:
            continue
        if isinstance(spec, UdsSecondarySpec):
            interface = _resource(target, ("NetworkInterface",), name)
            secondaries[name] = msgspec.structs.replace(spec, channel=interface.ifname)
        else:
            port = _resource(target, ("RawSerialPort", "USBSerialPort", "NetworkSerialPort"), name)
            if hasattr(port, "host"):
                url = f"rfc2217://{port.host}:{port.port}"
                secondaries[name] = msgspec.structs.replace(spec, port=url)
            else:
                secondaries[name] = msgspec.structs.replace(spec, port=port.port)
        try:
            driver = target.get_driver("PowerProtocol", name=name)
        except Exception:  # no power driver for this ECU: power-loss scenarios are skipped
            continue
        power[name] = LabgridPower(driver)
    return msgspec.structs.replace(bench, secondaries=secondaries), power


def run_bench_on_target(target: Any, bench_file: Path | str) -> list[ScenarioResult]:
    """Load ``bench_file``, bind it to ``target`` and run it."""
    bench, power = bench_for_target(target, load_bench(bench_file))
    return BenchRunner(bench, power_switches=power).run()
