"""Peak memory of the agent while it installs a large image.

Starts a real server on loopback, publishes an image of SIZE MiB (the sample
gateway firmware padded with random bytes, so it passes the health check),
and runs ``uptake agent run --once`` twice as child processes: once with
nothing to do (the baseline: interpreter, libraries, TUF refresh) and once
installing the image (download, hash, write to the inactive slot, read-back,
health check, commit). Prints each run's peak RSS and the difference,
against the 64 MiB budget.

Peak RSS is the agent's own ``VmHWM`` (``/proc/PID/status``), sampled every
10 ms: ``getrusage``/``wait4`` would report the high-water mark of the
pre-exec fork of this (much larger) benchmark process instead.

    .venv/bin/python bench/agent_memory.py [--size-mib 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.uptake_fixtures import ENV, ServerProcess, Vehicle, sample

BUDGET_MIB = 64


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_agent(vehicle: Vehicle) -> tuple[float, float]:
    """Run one agent cycle; return (seconds, peak RSS in MiB) of that process."""
    import subprocess

    started = time.monotonic()
    proc = subprocess.Popen(
        vehicle.argv(), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm_kib(proc.pid) or 0)
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"agent failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return time.monotonic() - started, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uptake-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = ServerProcess(tmp)
        try:
            vehicle = Vehicle(tmp, server, secondaries=False)
            image = tmp / "big-gateway.elf"
            with open(image, "wb") as f:
                f.write(sample("rpi-gateway", "1.1.0").read_bytes())
                for _ in range(args.size_mib):
                    f.write(os.urandom(1024 * 1024))
            size = image.stat().st_size
            pub = server.publish(image, "rpi-gateway", "9.0.0")
            image.unlink()
            base_s, base_rss = run_agent(vehicle)
            server.assign(vehicle.vin, vehicle.primary, pub.filepath)
            inst_s, inst_rss = run_agent(vehicle)
            if vehicle.booted_image() != pub.filepath:
                raise SystemExit(
                    "the image was not installed: the figures below would mean nothing"
                )
        finally:
            server.stop()
    print(
        f"agent installing a {size / 2**20:.0f} MiB image (download, verify, write slot, read-back, health check):"
    )
    print(f"  {'run':<34}{'seconds':>9}{'peak RSS MiB':>14}")
    print(f"  {'baseline: poll, nothing to do':<34}{base_s:>9.1f}{base_rss:>14.1f}")
    print(f"  {'install':<34}{inst_s:>9.1f}{inst_rss:>14.1f}")
    print(
        f"  install peak RSS {inst_rss:.1f} MiB (budget {BUDGET_MIB} MiB): "
        f"{'OK' if inst_rss < BUDGET_MIB else 'OVER BUDGET'}; above the baseline: {inst_rss - base_rss:+.1f} MiB;"
        f" throughput {size / 2**20 / inst_s:.0f} MiB/s over loopback"
    )


if __name__ == "__main__":
    main()
