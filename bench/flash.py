"""Flash throughput per secondary transport, next to what the wire allows.

For each transport the same image is flashed twice in this run:

* with the wire-time model (500 kbit/s classic CAN, CAN FD 500 kbit/s /
  2 Mbit/s, 115200 baud 8E1 UART): the figure a vehicle would see, printed as
  KiB/s and as a fraction of the wire's theoretical payload limit;
* without it (infinitely fast wire): the baseline, i.e. what our Python
  stacks cost; when it is far above the wire limit, the wire is what bounds
  flashing, not the host.

The STM32 figure includes the read-back that ``flash()`` does (every byte
crosses the line twice), so about 50 % of the line rate is the ceiling.

Then one real firmware update (``../shared/firmware-pairs/tasmota_esp8266``,
or the sample BMS firmware when the shared pairs are absent) is timed on the
wire model twice, on classic CAN and on CAN FD: the new image flashed in full,
and the same update sent as a delta (Uptake's delta re-encoded as the ECU's
sequential patch, applied by the ECU from its active bank); the ECU runs the
new image after each.

    .venv/bin/python bench/flash.py            # ~2 min
    .venv/bin/python bench/flash.py --full     # 1 MiB everywhere (classic CAN ~1 min alone)
    .venv/bin/python bench/flash.py --json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.secondaries.ecu_patch import DEFAULT_DICT_LOG
from client.secondaries.stm32_uart import Stm32Config as Stm32HostConfig
from client.secondaries.stm32_uart import Stm32UartFlasher
from client.secondaries.uds import HmacKeyAlgorithm, UdsAddressing, UdsConfig, UdsFlasher
from hil.can_bus import VirtualCanWire
from hil.stm32_bootloader import Stm32BootloaderEmulator, Stm32Config
from hil.uds_ecu import SIMULATOR_SECRET, EcuConfig, UdsEcuSimulator
from hil.wire_time import CanTiming, SerialTiming

KIB = 1024
REPO = Path(__file__).resolve().parents[1]
BLOCK = 0x4002
"""maxNumberOfBlockLength the benched ECU offers: 16 KiB of data per TransferData (its RAM
holds one block); large blocks make the per-block turnaround a small share of the wire time."""
PAIR = REPO / ".." / "shared" / "firmware-pairs" / "tasmota_esp8266"


@dataclass
class Figure:
    transport: str
    image_bytes: int
    seconds: float
    baseline_seconds: float
    wire_limit: float  # payload bytes/s

    @property
    def achieved(self) -> float:
        return self.image_bytes / self.seconds

    def as_json(self) -> dict[str, float | str]:
        return {
            "transport": self.transport,
            "image_bytes": self.image_bytes,
            "seconds": round(self.seconds, 3),
            "kib_per_s": round(self.achieved / KIB, 2),
            "wire_limit_kib_per_s": round(self.wire_limit / KIB, 2),
            "fraction_of_wire_limit": round(self.achieved / self.wire_limit, 3),
            "no_wire_baseline_kib_per_s": round(self.image_bytes / self.baseline_seconds / KIB, 1),
        }


def image_of(size: int) -> bytes:
    data = bytearray(random.Random(size).randbytes(size))
    data[:8] = b"\x00\x50\x00\x20\x41\x01\x00\x08"
    return bytes(data)


def flash_uds(image: bytes, timing: CanTiming | None, can_fd: bool) -> float:
    addressing = UdsAddressing(can_fd=can_fd)
    wire = VirtualCanWire(timing)
    ecu_bus, host_bus = wire.open_bus(), wire.open_bus()
    with tempfile.TemporaryDirectory() as state:
        ecu = UdsEcuSimulator(
            ecu_bus, Path(state), EcuConfig(addressing=addressing, max_block_length=BLOCK)
        )
        ecu.power_on()
        flasher = UdsFlasher(
            host_bus,
            UdsConfig(addressing=addressing, key_algorithm=HmacKeyAlgorithm(SIMULATOR_SECRET)),
        )
        try:
            started = time.monotonic()
            flasher.flash(io.BytesIO(image), len(image), version="bench")
            seconds = time.monotonic() - started
            flasher.verify(io.BytesIO(image), len(image))
        finally:
            flasher.close()
            ecu.power_off()
            ecu_bus.shutdown()
            host_bus.shutdown()
    return seconds


def flash_stm32(image: bytes, timing: SerialTiming | None) -> float:
    with (
        tempfile.TemporaryDirectory() as state,
        Stm32BootloaderEmulator(state, Stm32Config(timing=timing)) as emulator,
        Stm32UartFlasher(emulator.port, Stm32HostConfig(start_application=False)) as flasher,
    ):
        started = time.monotonic()
        flasher.flash(io.BytesIO(image), len(image))
        return time.monotonic() - started


def measure(name: str, size: int, run: Callable[[bytes, bool], float], limit: float) -> Figure:
    image = image_of(size)
    baseline = run(image, False)
    seconds = run(image, True)
    return Figure(name, size, seconds, baseline, limit)


def _pair() -> tuple[str, bytes, bytes]:
    if (PAIR / "old").is_file():
        return "tasmota_esp8266", (PAIR / "old").read_bytes(), (PAIR / "new").read_bytes()
    samples = REPO / "firmware-samples" / "stm32f4-bms"
    old, new = (next((samples / v).glob("*.bin")).read_bytes() for v in ("1.0.0", "1.1.0"))
    return "stm32f4-bms sample", old, new


def update_by_delta_and_full(timing: CanTiming, can_fd: bool) -> dict[str, float | int | str]:
    """Seconds to update one ECU from old to new: full image, then by delta (same wire)."""
    import hashlib

    from client.secondaries.uds_delta import ecu_patch_from_delta
    from server.delta import create_delta

    name, old, new = _pair()
    addressing = UdsAddressing(can_fd=can_fd)
    result = (len(new), hashlib.sha256(new).digest())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "old").write_bytes(old)
        (work / "new").write_bytes(new)
        create_delta(work / "old", work / "new", work / "delta", workers=1)
        patch_length = ecu_patch_from_delta(
            work / "delta",
            work / "patch",
            hashlib.sha256(old).digest(),
            result,
            DEFAULT_DICT_LOG,
        )
        delta_bytes = (work / "delta").stat().st_size
        seconds: dict[str, float] = {}
        for mode in ("full", "delta"):
            wire = VirtualCanWire(timing)
            ecu_bus, host_bus = wire.open_bus(), wire.open_bus()
            ecu = UdsEcuSimulator(
                ecu_bus,
                work / f"ecu-{mode}",
                EcuConfig(addressing=addressing, factory_image=old, max_block_length=BLOCK),
            )
            ecu.power_on()
            config = UdsConfig(
                addressing=addressing, key_algorithm=HmacKeyAlgorithm(SIMULATOR_SECRET)
            )
            flasher = UdsFlasher(host_bus, config)
            try:
                started = time.monotonic()
                if mode == "full":
                    flasher.flash(io.BytesIO(new), len(new), version="new")
                else:
                    with open(work / "patch", "rb") as patch:
                        flasher.flash_patch(patch, patch_length, result, version="new")
                seconds[mode] = time.monotonic() - started
                flasher.verify(io.BytesIO(new), len(new))
            finally:
                flasher.close()
                ecu.power_off()
                ecu_bus.shutdown()
                host_bus.shutdown()
    return {
        "pair": name,
        "transport": "CAN FD 500k/2M" if can_fd else "classic CAN 500k",
        "image_bytes": len(new),
        "delta_bytes": delta_bytes,
        "patch_bytes": patch_length,
        "full_seconds": round(seconds["full"], 2),
        "delta_seconds": round(seconds["delta"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="1 MiB images on every transport")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    for name in ("UdsClient", "isotp", "can"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    classic = CanTiming(nominal_bitrate=500_000)
    fd = CanTiming(nominal_bitrate=500_000, data_bitrate=2_000_000)
    uart = SerialTiming(baudrate=115_200)
    sizes = (
        {"classic": 1024 * KIB, "fd": 1024 * KIB, "uart": 1024 * KIB}
        if args.full
        else {
            "classic": 256 * KIB,
            "fd": 1024 * KIB,
            "uart": 64 * KIB,
        }
    )
    figures = [
        measure(
            "UDS classic CAN 500k",
            sizes["classic"],
            lambda image, wired: flash_uds(image, classic if wired else None, False),
            classic.payload_limit(),
        ),
        measure(
            "UDS CAN FD 500k/2M",
            sizes["fd"],
            lambda image, wired: flash_uds(image, fd if wired else None, True),
            fd.payload_limit(fd=True, bitrate_switch=True),
        ),
        measure(
            "STM32 UART 115200 8E1",
            sizes["uart"],
            lambda image, wired: flash_stm32(image, uart if wired else None),
            uart.payload_limit(),
        ),
    ]
    updates = [
        update_by_delta_and_full(classic, False),
        update_by_delta_and_full(fd, True),
    ]
    if args.json:
        print(
            json.dumps({"throughput": [f.as_json() for f in figures], "updates": updates}, indent=2)
        )
        return
    print(
        f"{'transport':<24}{'image':>10}{'time':>9}{'achieved':>14}{'wire limit':>14}{'of limit':>10}{'no-wire baseline':>19}"
    )
    for f in figures:
        print(
            f"{f.transport:<24}{f.image_bytes // KIB:>6} KiB{f.seconds:>8.1f}s"
            f"{f.achieved / KIB:>9.1f} KiB/s{f.wire_limit / KIB:>9.1f} KiB/s{f.achieved / f.wire_limit:>10.0%}"
            f"{f.image_bytes / f.baseline_seconds / KIB:>13.0f} KiB/s"
        )
    print()
    print(f"one ECU update on the wire model ({updates[0]['pair']}):")
    for u in updates:
        print(
            f"  {u['transport']:<18} full image {int(u['image_bytes']) // KIB} KiB "
            f"{u['full_seconds']:>6.1f} s   by delta ({int(u['patch_bytes']) // KIB} KiB patch) "
            f"{u['delta_seconds']:>5.1f} s   ({float(u['full_seconds']) / float(u['delta_seconds']):.0f}x faster)"
        )


if __name__ == "__main__":
    main()
