"""The labgrid adapter binds bench files to a target's resources (labgrid itself is not needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hil.bench_file import Stm32SecondarySpec, UdsSecondarySpec, parse_bench
from hil.labgrid_adapter import bench_for_target


class _Resource:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


class _PowerDriver:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on(self) -> None:
        self.calls.append("on")

    def off(self) -> None:
        self.calls.append("off")


class _Target:
    """The part of labgrid's Target API the adapter uses, as a lab would configure it."""

    name = "bench-3"

    def __init__(self) -> None:
        self.power = _PowerDriver()
        self.resources = {
            ("NetworkInterface", "engine"): _Resource(ifname="can1"),
            ("NetworkSerialPort", "body"): _Resource(host="lab-serial.local", port=4001),
        }

    def get_resource(self, cls: str, *, name: str, wait_avail: bool = True) -> Any:
        try:
            return self.resources[(cls, name)]
        except KeyError:
            raise LookupError(f"no {cls} {name}") from None

    def get_driver(self, cls: str, *, name: str) -> Any:
        if (cls, name) == ("PowerProtocol", "engine"):
            return self.power
        raise LookupError(f"no {cls} {name}")


def test_real_secondaries_are_bound_to_target_resources(tmp_path: Path) -> None:
    bench = parse_bench(
        {
            "secondaries": {
                "engine": {"transport": "uds", "interface": "socketcan", "channel": "placeholder"},
                "body": {"transport": "stm32-uart", "port": "/dev/placeholder"},
                "sim": {"transport": "uds"},
            }
        }
    )
    target = _Target()
    bound, power = bench_for_target(target, bench)
    engine, body = bound.secondaries["engine"], bound.secondaries["body"]
    assert isinstance(engine, UdsSecondarySpec) and engine.channel == "can1"
    assert isinstance(body, Stm32SecondarySpec) and body.port == "rfc2217://lab-serial.local:4001"
    assert bound.secondaries["sim"] == bench.secondaries["sim"]
    assert set(power) == {"engine"}
    power["engine"].off()
    power["engine"].on()
    assert target.power.calls == ["off", "on"]
