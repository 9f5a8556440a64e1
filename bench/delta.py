"""Delta benchmark: Uptake's delta against today's tools on real firmware pairs.

For every pair in ../shared/firmware-pairs (relative to the repository) and
every pair directory given on the command line (a directory with ``old`` and
``new``, or a directory of such directories, e.g. the output of
``make-large-pairs.sh``), prints in one run the payload size of:

* the full new image compressed with zstd -19 (what a vehicle pays without deltas),
* bsdiff4 as shipped (``bsdiff4.diff``, bz2 streams),
* ``zstd --patch-from=old -19``,
* ``xdelta3 -9`` (skipped with a note when the Debian package is missing),
* ``detools create_patch -c lzma -t hdiffpatch -a hdiffpatch`` (HDiffPatch in
  detools, the delta library made for microcontrollers),
* Uptake's chosen delta (container included), its ratio to the best of the
  others and its excess over it in bytes (the acceptance bound is +64 bytes),
  and its ratio to bsdiff4;

plus Uptake's creation seconds and peak memory (sum of RSS over the process
tree, sampled every 50 ms, since creation uses worker processes) and apply
seconds and peak RSS above the interpreter's baseline (VmHWM of the child that
applies, minus its RSS after imports). Every apply is checked byte for byte.

    .venv/bin/python bench/delta.py [PAIR_DIR ...] [--bsdiff-timeout S] [--no-windowed-cost]

Each tool runs in a child process with a timeout, so bsdiff4's pathological
cases (hours on zero-filled filesystem images) show as "timeout" instead of
hanging the run. Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_PAIRS = REPO / ".." / "shared" / "firmware-pairs"
PYTHON = sys.executable

_CREATE = """
import json, sys, time
from server.delta import create_delta
old, new, out, whole_limit = sys.argv[1:5]
report = create_delta(old, new, out, whole_limit=int(whole_limit))
print(json.dumps(report.as_dict()))
"""

_APPLY = """
import json, sys, time
import client.delta_apply as delta_apply
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
baseline = status("VmRSS:")
started = time.monotonic()
result = delta_apply.apply_delta_file(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": status("VmHWM:"),
                  "sha256": result.result_sha256}))
"""

_BSDIFF4 = """
import sys, bsdiff4
old = open(sys.argv[1], "rb").read(); new = open(sys.argv[2], "rb").read()
open(sys.argv[3], "wb").write(bsdiff4.diff(old, new))
"""


def _bigger_stack() -> None:
    # bsdiff4's suffix sort recurses deeply on long uniform runs.
    resource.setrlimit(resource.RLIMIT_STACK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _tree_rss(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants, in bytes."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total = 0
    for pid in rss:
        walk = pid
        while walk and walk != root:
            walk = parents.get(walk, 0)
        if walk == root:
            total += rss[pid]
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], timeout: float, **kwargs: Any) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, peak tree RSS bytes, stdout). Raises on failure/timeout.

    The CPU seconds of the process tree are left in ``_LAST_CPU[0]``.
    """
    started = time.monotonic()
    cpu_before = _children_cpu()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kwargs,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {err.strip()[-300:]}")
    _LAST_CPU[0] = _children_cpu() - cpu_before
    return time.monotonic() - started, peak, out


_LAST_CPU = [0.0]
PEERS = ("bsdiff4", "zstd_patch_from", "xdelta3", "detools")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _pairs(extra: list[str]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    roots = [SHARED_PAIRS.resolve()] + [Path(p) for p in extra]
    for root in roots:
        if (root / "old").is_file() and (root / "new").is_file():
            found.append((root.name, root))
            continue
        if not root.is_dir():
            print(f"note: {root} is not a pair directory, skipped", file=sys.stderr)
            continue
        for sub in sorted(root.iterdir()):
            if (sub / "old").is_file() and (sub / "new").is_file():
                found.append((sub.name, sub))
    return found


def _measure_pair(name: str, pair: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    old, new = pair / "old", pair / "new"
    row: dict[str, Any] = {"pair": name, "new_bytes": new.stat().st_size}
    notes: list[str] = []

    import zstandard

    row["full_zstd19"] = len(zstandard.ZstdCompressor(level=19).compress(new.read_bytes()))

    try:
        _run(
            [PYTHON, "-c", _BSDIFF4, str(old), str(new), str(work / "b4")],
            args.bsdiff_timeout,
            preexec_fn=_bigger_stack,
        )
        row["bsdiff4"] = (work / "b4").stat().st_size
    except subprocess.TimeoutExpired:
        row["bsdiff4"] = None
        notes.append(f"bsdiff4 gave no result within {args.bsdiff_timeout:.0f} s")
    except RuntimeError as exc:
        row["bsdiff4"] = None
        notes.append(f"bsdiff4 failed: {exc}")

    try:
        _run(
            ["zstd", "-q", "-f", "-19", f"--patch-from={old}", str(new), "-o", str(work / "z")],
            args.tool_timeout,
        )
        row["zstd_patch_from"] = (work / "z").stat().st_size
    except (subprocess.TimeoutExpired, RuntimeError, FileNotFoundError) as exc:
        row["zstd_patch_from"] = None
        notes.append(f"zstd --patch-from failed: {exc}")

    detools = Path(PYTHON).parent / "detools"
    try:
        _run(
            [
                str(detools),
                "create_patch",
                "-c",
                "lzma",
                "-t",
                "hdiffpatch",
                "-a",
                "hdiffpatch",
                str(old),
                str(new),
                str(work / "dt"),
            ],
            args.tool_timeout,
        )
        row["detools"] = (work / "dt").stat().st_size
    except (subprocess.TimeoutExpired, RuntimeError, FileNotFoundError) as exc:
        row["detools"] = None
        notes.append(f"detools failed: {exc}")

    if shutil.which("xdelta3"):
        try:
            _run(
                [
                    "xdelta3",
                    "-9",
                    "-S",
                    "lzma",
                    "-f",
                    "-e",
                    "-s",
                    str(old),
                    str(new),
                    str(work / "x"),
                ],
                args.tool_timeout,
            )
            row["xdelta3"] = (work / "x").stat().st_size
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            row["xdelta3"] = None
            notes.append(f"xdelta3 failed: {exc}")
    else:
        row["xdelta3"] = None
        notes.append("xdelta3 not installed (apt-get install xdelta3): column skipped")

    seconds, peak, out = _run(
        [PYTHON, "-c", _CREATE, str(old), str(new), str(work / "u"), str(args.whole_limit)],
        args.tool_timeout,
    )
    report = json.loads(out)
    row.update(
        uptake=report["delta_bytes"],
        uptake_method=report["method"],
        uptake_detail=report["detail"],
        create_s=seconds,
        create_cpu=_LAST_CPU[0],
        create_peak=peak,
    )

    seconds, _, out = _run(
        [PYTHON, "-c", _APPLY, str(old), str(work / "u"), str(work / "r")], args.tool_timeout
    )
    applied = json.loads(out)
    if applied["sha256"] != _sha256(new) or _sha256(work / "r") != _sha256(new):
        raise SystemExit(f"{name}: applied image differs from new")
    row.update(apply_s=applied["seconds"], apply_peak=applied["peak"] - applied["baseline"])

    if args.windowed_cost and report["method"] != "windows" and new.stat().st_size > 8 << 20:
        _, peak_w, out = _run(
            [PYTHON, "-c", _CREATE, str(old), str(new), str(work / "w"), "0"], args.tool_timeout
        )
        row["windowed"] = json.loads(out)["delta_bytes"]
        row["windowed_peak"] = peak_w
    row["notes"] = notes
    for leftover in work.iterdir():
        leftover.unlink()
    return row


def _kib(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1024:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="*", help="extra pair directories (old + new inside)")
    parser.add_argument("--bsdiff-timeout", type=float, default=300.0)
    parser.add_argument("--tool-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--whole-limit",
        type=int,
        default=64 << 20,
        help="Uptake's whole-image limit in bytes (default 64 MiB)",
    )
    parser.add_argument(
        "--no-windowed-cost",
        dest="windowed_cost",
        action="store_false",
        help="skip re-creating whole-mode pairs > 8 MiB in windowed mode",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--only", action="append", help="measure only this pair (repeatable)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="uptake-bench-") as tmp:
        for name, pair in _pairs(args.pairs):
            if args.only and name not in args.only:
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            rows.append(_measure_pair(name, pair, Path(tmp), args))

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(
        "sizes in KiB; best = smallest of bsdiff4, zstd --patch-from, xdelta3, detools; "
        "+B = Uptake minus best in bytes (bound: +64)"
    )
    head = (
        f"{'pair':<16}{'full zstd':>10}{'bsdiff4':>10}{'zstd pf':>10}{'xdelta3':>10}"
        f"{'detools':>10}{'Uptake':>10}{'+B':>8}{'/best':>7}{'/bs4':>7}  {'create s':>8}"
        f"{'cpu s':>7}{'MiB':>6}{'apply s':>8}{'MiB':>6}  method"
    )
    print(head)
    print("-" * len(head))
    ratios = []
    failed = []
    apply_peaks: dict[str, float] = {}
    for row in rows:
        others = [row[k] for k in PEERS if row.get(k) is not None]
        best = min(others) if others else None
        ratio = row["uptake"] / best if best else None
        excess = row["uptake"] - best if best else None
        if excess is not None and excess > 64:
            failed.append(row["pair"])
        to_bs4 = "-"
        if row["bsdiff4"]:
            ratios.append(row["uptake"] / row["bsdiff4"])
            to_bs4 = f"{ratios[-1]:.3f}"
        method = row["uptake_method"]
        apply_peaks[method] = max(apply_peaks.get(method, 0.0), row["apply_peak"] / 2**20)
        print(
            f"{row['pair']:<16}{_kib(row['full_zstd19']):>10}{_kib(row['bsdiff4']):>10}"
            f"{_kib(row['zstd_patch_from']):>10}{_kib(row['xdelta3']):>10}"
            f"{_kib(row.get('detools')):>10}{_kib(row['uptake']):>10}"
            f"{'-' if excess is None else f'{excess:+d}':>8}"
            f"{'-' if ratio is None else f'{ratio:.3f}':>7}{to_bs4:>7}  {row['create_s']:>8.1f}"
            f"{row['create_cpu']:>7.1f}{row['create_peak'] / 2**20:>6.0f}"
            f"{row['apply_s']:>8.2f}{row['apply_peak'] / 2**20:>6.1f}  {row['uptake_detail']}"
        )
    print()
    for row in rows:
        if "windowed" in row:
            cost = row["windowed"] / row["uptake"] - 1
            print(
                f"windowing cost on {row['pair']}: {_kib(row['windowed'])} KiB windowed vs "
                f"{_kib(row['uptake'])} KiB whole ({100 * cost:+.1f}%), creation peak "
                f"{row['windowed_peak'] / 2**20:.0f} MiB vs {row['create_peak'] / 2**20:.0f} MiB"
            )
        for note in row["notes"]:
            print(f"note: {row['pair']}: {note}")
    if ratios:
        median = statistics.median(ratios)
        print(
            f"median Uptake / bsdiff4: {median:.3f} over {len(ratios)} pairs with a bsdiff4 "
            f"result ({'within' if median <= 0.85 else 'ABOVE'} 0.85)"
        )
    for row in rows:
        if row["pair"] == "vmlinuz":
            best = min(row[k] for k in PEERS if row.get(k) is not None)
            print(f"vmlinuz: Uptake / best other = {row['uptake'] / best:.3f} (bound 0.45)")
    print(
        "Uptake within best other + 64 bytes on every pair: "
        + ("yes" if not failed else f"NO ({', '.join(failed)})")
    )
    print(
        "apply peak above the interpreter, worst per method: "
        + ", ".join(f"{m} {v:.1f} MiB" for m, v in sorted(apply_peaks.items()))
    )
    print(
        "create MiB: peak RSS summed over the process tree; apply MiB: peak above the "
        "interpreter baseline"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
