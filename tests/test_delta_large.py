"""Large-image deltas: windowed creation, and apply memory bounded by design.

A 160 MiB filesystem-like image pair (mostly zero free space, files that move
and change) is diffed in windows and applied in a child process whose peak
RSS above its own post-import baseline must stay under 64 MiB.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from server.delta import create_delta

REPO = Path(__file__).resolve().parents[1]

_APPLY = """
import json, sys
import client.delta_apply as delta_apply
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
baseline = status("VmRSS:")
result = delta_apply.apply_delta_file(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"above": status("VmHWM:") - baseline, "sha256": result.result_sha256}))
"""


def _filesystem_like(path_old: Path, path_new: Path, size: int) -> None:
    rng = random.Random(7)
    files = [rng.randbytes(rng.randint(4096, 512 * 1024)) for _ in range(40)]
    old = bytearray(size)
    new = bytearray(size)
    pos = 1 << 20
    for data in files:
        old[pos : pos + len(data)] = data
        pos += (len(data) + 4095) // 4096 * 4096 + 4096 * rng.randint(0, 300)
    pos = 1 << 20
    for index, data in enumerate(files):
        if index % 3 == 0:  # a new version of this file
            changed = bytearray(data)
            for _ in range(20):
                at = rng.randrange(len(changed))
                changed[at : at + 8] = rng.randbytes(8)
            data = bytes(changed)
        new[pos : pos + len(data)] = data
        pos += (len(data) + 4095) // 4096 * 4096 + 4096 * rng.randint(0, 300)
    path_old.write_bytes(old)
    path_new.write_bytes(new)


@pytest.mark.slow
def test_large_windowed_delta_applies_in_bounded_memory(tmp_path: Path) -> None:
    old, new, delta, out = (tmp_path / n for n in ("old", "new", "delta", "out"))
    _filesystem_like(old, new, 160 << 20)
    report = create_delta(old, new, delta)
    assert report.method == "windows" and report.windows == 20
    assert report.delta_length < (2 << 20)
    applied = subprocess.run(
        [sys.executable, "-c", _APPLY, str(old), str(delta), str(out)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    result = json.loads(applied.stdout)
    assert out.read_bytes() == new.read_bytes()
    assert result["above"] < 64 << 20, result
