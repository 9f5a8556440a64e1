"""Health checks: the commands that decide whether a freshly booted image commits.

Each command runs with a timeout; ``{slot}`` and ``{slot_path}`` in its
arguments are replaced by the booted slot and its storage path. The first
failure's output is kept (it travels in the install outcome and survives the
rollback), so whoever reads the vehicle's record sees *why* it rolled back.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_MAX_OUTPUT = 2000


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    reason: str = ""


def run_command(argv: Sequence[str], timeout: float, label: str) -> HealthResult:
    """Run one command; ``reason`` names ``label`` and keeps the end of its output on failure."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return HealthResult(False, f"{label} {argv[0]} timed out after {timeout:g} s")
    except OSError as exc:
        return HealthResult(False, f"{label} {argv[0]} could not run: {exc.strerror}")
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-_MAX_OUTPUT:]
        return HealthResult(False, f"{label} {argv[0]} exited {proc.returncode}: {output}")
    return HealthResult(True)


def run_health_checks(
    commands: Sequence[Sequence[str]], slot: str, slot_path: Path, timeout: float
) -> HealthResult:
    for template in commands:
        argv = [a.replace("{slot}", slot).replace("{slot_path}", str(slot_path)) for a in template]
        result = run_command(argv, timeout, "health check")
        if not result.ok:
            return result
    return HealthResult(True)
