"""Bench files, the bench runner and ``uptake hil run`` (on simulated secondaries)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from hil.bench_file import BenchFileError, load_bench, parse_bench
from hil.cli import hil
from hil.wire_time import CanTiming, SerialTiming, WireClock, canfd_padded_length

SAMPLE = Path(__file__).resolve().parents[2] / "hil" / "benches" / "sample.toml"

FAST_BENCH = """
[bench]
name = "fast"

[secondaries.engine]
transport = "uds"
interface = "virtual"
wire_time = false

[secondaries.body]
transport = "stm32-uart"
port = "virtual"
wire_time = false

[[scenario]]
kind = "update"
secondary = "engine"
image_size = 65536
version = "2.0.0"

[[scenario]]
kind = "update"
secondary = "body"
image_size = 16384

[[scenario]]
kind = "power-loss"
secondary = "engine"
at = 0.3
image_size = 32768

[[scenario]]
kind = "power-loss"
secondary = "body"
at = 0.7
image_size = 8192

[[scenario]]
kind = "rollback"
secondary = "engine"
image_size = 8192

[[scenario]]
kind = "wrong-key"
secondary = "engine"
image_size = 1024

[[scenario]]
kind = "mute"
secondary = "body"
"""


def test_fast_bench_runs_and_writes_junit(tmp_path: Path) -> None:
    bench = tmp_path / "fast.toml"
    bench.write_text(FAST_BENCH)
    junit = tmp_path / "out.xml"
    result = CliRunner().invoke(hil, ["run", str(bench), "--junit", str(junit)])
    assert result.exit_code == 0, result.output
    assert "7 passed, 0 failed" in result.output
    assert "PASS  power-loss engine at 30%" in result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "0", "0")
    names = [case.get("name") for case in suite.iter("testcase")]
    assert names[0] == "update engine"
    update = suite.find("testcase")
    assert update is not None
    assert {p.get("name") for p in update.iter("property")} >= {"kib_per_s", "bytes"}


def test_json_output_and_failure_exit_code(tmp_path: Path) -> None:
    # A bench whose ECU secret differs from the flasher's: the update must fail.
    bench = tmp_path / "bad.toml"
    bench.write_text(
        FAST_BENCH.split("[[scenario]]")[0]
        + '[[scenario]]\nkind = "update"\nsecondary = "body"\nimage_size = 4096\n'
        + '[[scenario]]\nkind = "update"\nsecondary = "body"\nname = "too big"\nimage_size = 2000000\n'
    )
    result = CliRunner().invoke(hil, ["run", str(bench), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    statuses = {r["name"]: r["status"] for r in report["results"]}
    assert statuses == {"update body": "passed", "too big": "failed"}
    failed = next(r for r in report["results"] if r["name"] == "too big")
    assert failed["message"].startswith("erase:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[secondaries]\n", "names no ECU"),
        ('[secondaries.a]\ntransport = "lin"\n', "transport must be one of"),
        (
            '[secondaries.a]\ntransport = "uds"\ninterface = "socketcan"\n',
            "secondaries.a.channel: is required",
        ),
        ('[secondaries.a]\ntransport = "uds"\nbogus = 1\n', "unknown key secondaries.a.bogus"),
        (
            '[secondaries.a]\ntransport = "uds"\n[[scenario]]\nkind = "update"\nsecondary = "b"\nimage_size = 1\n',
            "no secondary named 'b'",
        ),
        (
            '[secondaries.a]\ntransport = "uds"\n[[scenario]]\nkind = "power-loss"\nsecondary = "a"\nimage_size = 1\n',
            "power-loss needs 'at'",
        ),
        (
            '[secondaries.a]\ntransport = "stm32-uart"\nport = "virtual"\n[[scenario]]\nkind = "rollback"\nsecondary = "a"\nimage_size = 9\n',
            "needs a UDS secondary",
        ),
        (
            '[secondaries.a]\ntransport = "uds"\n[[scenario]]\nkind = "update"\nsecondary = "a"\n',
            "exactly one of 'image_size' or 'image'",
        ),
        (
            '[secondaries.a]\ntransport = "uds"\nbitrate = "fast"\n',
            "secondaries.a.bitrate must be int, not str",
        ),
    ],
)
def test_bench_file_errors_name_the_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(BenchFileError, match=message):
        load_bench(path)


def test_cli_reports_bench_file_errors_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[secondaries\n")
    result = CliRunner().invoke(hil, ["run", str(path)])
    assert result.exit_code == 1
    assert "not valid TOML" in result.output
    assert "Traceback" not in result.output


def test_sample_bench_parses_with_real_device_variant() -> None:
    bench = load_bench(SAMPLE)
    assert {s.transport for s in bench.secondaries.values()} == {"uds", "stm32-uart"}
    assert all(s.virtual for s in bench.secondaries.values())
    real = parse_bench(
        {
            "secondaries": {
                "engine": {
                    "transport": "uds",
                    "interface": "socketcan",
                    "channel": "can0",
                    "relay": {"port": "/dev/ttyUSB3", "on": "A00101A2", "off": "A00100A1"},
                },
                "body": {"transport": "stm32-uart", "port": "/dev/ttyUSB0"},
            }
        }
    )
    assert real.secondaries["engine"].relay is not None
    assert real.secondaries["engine"].relay.off_bytes == bytes.fromhex("A00100A1")
    assert not real.secondaries["body"].virtual


@pytest.mark.slow
def test_sample_bench_at_wire_speed(tmp_path: Path) -> None:
    junit = tmp_path / "sample.xml"
    result = CliRunner().invoke(hil, ["run", str(SAMPLE), "--junit", str(junit)])
    assert result.exit_code == 0, result.output
    assert "wire limit" in result.output


def test_wire_time_model_figures() -> None:
    classic = CanTiming(nominal_bitrate=500_000)
    # 8 data bytes: 111 bits + 24 worst-case stuff bits = 135 bits = 270 us at 500 kbit/s.
    assert classic.classic_bits(8) == 135
    assert classic.frame_seconds(8) == pytest.approx(270e-6)
    assert classic.payload_limit() == pytest.approx(7 / 270e-6)
    fd = CanTiming(nominal_bitrate=500_000, data_bitrate=2_000_000)
    # A 64-byte FD frame with bit-rate switch carries 9x the data of a classic frame
    # for about twice the time, and much less without the switch.
    assert fd.frame_seconds(64, fd=True, bitrate_switch=True) < 3 * classic.frame_seconds(8)
    assert fd.frame_seconds(64, fd=True, bitrate_switch=False) > 3 * fd.frame_seconds(
        64, fd=True, bitrate_switch=True
    )
    assert canfd_padded_length(13) == 16
    serial_line = SerialTiming(baudrate=115_200)
    assert serial_line.bits_per_byte == 11  # 8E1
    assert serial_line.payload_limit() == pytest.approx(115_200 / 11)
    clock = WireClock()
    clock.occupy(0.0001)
    assert clock.booked_seconds == pytest.approx(0.0001)
