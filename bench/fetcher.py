"""Download benchmark: ResumableFetcher against python-tuf's Urllib3Fetcher on loopback.

Serves one random file from a threaded ``http.server`` on 127.0.0.1 and
prints, in one run:

* Urllib3Fetcher.download_file (python-tuf's default fetcher): the baseline;
* ResumableFetcher.download_file (what ``Updater`` uses in the agent);
* ResumableFetcher.download_to a partial file (large images);
* the same with the connection cut at 25 %, 50 % and 75 % (three resumes);
* the same with a bandwidth cap of 10 MB/s, to show the cap holds;

as MB/s (best of ``--repeat`` runs) and the ratio to the baseline. Every
download is checked byte for byte. Figures depend on the machine.

    .venv/bin/python bench/fetcher.py [--size-mb 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from client.fetcher import FetcherConfig, ResumableFetcher

DATA = b""
CUTS: list[int] = []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        start = 0
        byte_range = self.headers.get("Range")
        if byte_range:
            start = int(byte_range.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(DATA) - start))
        self.send_header("ETag", '"bench"')
        self.end_headers()
        end = CUTS.pop(0) if CUTS else len(DATA)
        view = memoryview(DATA)
        try:
            for i in range(start, end, 1 << 20):
                self.wfile.write(view[i : min(i + (1 << 20), end)])
        except ConnectionError:
            return
        if end < len(DATA):
            self.close_connection = True


def _best_rate(
    run: Callable[[], object],
    result: Callable[[object], bytes],
    repeat: int,
    before: Callable[[], None],
) -> float:
    """Best rate in MB/s of ``run`` over ``repeat`` runs; ``result`` is checked untimed."""
    best = float("inf")
    for _ in range(repeat):
        before()
        started = time.perf_counter()
        outcome = run()
        elapsed = time.perf_counter() - started
        if result(outcome) != DATA:
            raise SystemExit("benchmark download differs from the served file")
        best = min(best, elapsed)
    return len(DATA) / best / 1e6


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    DATA = os.urandom(args.size_mb << 20)
    size = len(DATA)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/image.bin"
    workdir = Path(tempfile.mkdtemp(prefix="uptake-bench-fetcher."))
    partial = workdir / "image.part"

    def no_cuts() -> None:
        CUTS.clear()
        partial.unlink(missing_ok=True)

    def three_cuts() -> None:
        no_cuts()
        CUTS.extend([size // 4, size // 2, size * 3 // 4])

    def via_partial(fetcher: ResumableFetcher) -> Callable[[], object]:
        return lambda: fetcher.download_to(url, partial, size)

    def partial_bytes(_: object) -> bytes:
        return partial.read_bytes()

    def same(outcome: object) -> bytes:
        assert isinstance(outcome, bytes)
        return outcome

    fast = FetcherConfig(backoff_initial=0.001, backoff_max=0.001, min_rate=0)
    repeat = args.repeat
    baseline = _best_rate(lambda: Urllib3Fetcher().download_bytes(url, size), same, repeat, no_cuts)
    rows = [
        ("Urllib3Fetcher.download_bytes (baseline)", baseline),
        (
            "ResumableFetcher.download_bytes",
            _best_rate(
                lambda: ResumableFetcher(fast).download_bytes(url, size), same, repeat, no_cuts
            ),
        ),
        (
            "ResumableFetcher.download_to (+fsync)",
            _best_rate(via_partial(ResumableFetcher(fast)), partial_bytes, repeat, no_cuts),
        ),
        (
            "ResumableFetcher.download_to, 3 cuts",
            _best_rate(via_partial(ResumableFetcher(fast)), partial_bytes, repeat, three_cuts),
        ),
    ]
    cap = 10e6
    capped = ResumableFetcher(FetcherConfig(max_rate=cap, min_rate=0))
    capped_rate = _best_rate(via_partial(capped), partial_bytes, 1, no_cuts)
    rows.append((f"download_to, capped at {cap / 1e6:.0f} MB/s", capped_rate))

    print(f"{args.size_mb} MiB over loopback, best of {repeat} (capped: 1 run)")
    print(f"{'fetcher':45} {'MB/s':>9} {'x baseline':>11}")
    for name, rate in rows:
        print(f"{name:45} {rate:9.1f} {rate / baseline:11.2f}")
    print(f"bandwidth cap held at {capped_rate * 1e6 / cap:.0%} of the cap")
    server.shutdown()
    partial.unlink(missing_ok=True)
    (workdir / "image.part.resume").unlink(missing_ok=True)
    workdir.rmdir()


if __name__ == "__main__":
    main()
