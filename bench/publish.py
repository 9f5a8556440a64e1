"""Publishing benchmark: releases of 1, 100 and 1,000 images against hashing the same bytes.

Starts a real server (plain HTTP on loopback, SQLite) in a temporary
directory and, for each release size, writes that many distinct random
images, then prints in one run:

* hashing: SHA-256 of every image's bytes (the floor any publish pays);
* publishing: ``publish_images`` (verify the current targets; one streamed
  batch upload that hashes every image while sending it, each file read once,
  the server hashing, writing and fsyncing each once; sign once; upload the
  targets; the server checks the new entries and publishes one snapshot +
  timestamp), one new targets version per release;

and the ratio publish / hash (goal: at most 2x); the time of storing the same
bytes durably by themselves (hash, write and fsync a copy of each image on the
server's file system, :func:`_store_all`: the least of four orders of writing and
syncing, the server's among them; each measurement begins after a sync(), so that none
pays for another's writeback), and publish / store: what the disk makes durable storage
cost here. It is no strict floor: this virtual disk's speed varies from run to run and
with the writing pattern (publishing 100 images of 4 MiB has beaten it). With the CPU seconds the
publishing client and the server process spent (on a loaded machine the wall
clock also counts waiting for a core). Figures depend on the machine: a
release of one image is all fixed costs (metadata round trips, three
signatures, fsyncs) against well under a millisecond of hashing.

    .venv/bin/python bench/publish.py [--image-kb 256] [--sizes 1,100,1000]
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.release import ReleaseImage, publish_images
from tests.uptake_fixtures import PASSWORD, ServerProcess


def _hash_all(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
    return time.perf_counter() - start


class StoreOrder(enum.Enum):
    """When the copies of :func:`_store_all` are made durable."""

    EACH = "fsync each file after writing it"
    OVERLAPPED = (
        "fsync each file in a thread while the next are written, 16 at most (as the server)"
    )
    AT_END = "write every file, then fsync each"
    SYNC = "write every file, then one sync() of the whole system"


def _sync_and_close(out: BinaryIO) -> None:
    try:
        os.fsync(out.fileno())
    finally:
        out.close()


def _store_all(paths: list[Path], directory: Path, order: StoreOrder) -> float:
    """What storing the bytes durably costs by itself: hash and write a copy of every
    image into ``directory`` (the server's file system) and make them durable in ``order``,
    then fsync the directory. The least of the orders, as a ratio to hashing, is what
    durable storage costs on this machine's disk."""
    directory.mkdir()
    threads = ThreadPoolExecutor(16)
    syncing: list[Future[None]] = []
    start = time.perf_counter()
    written = []
    for n, path in enumerate(paths):
        digest = hashlib.sha256()
        out = open(directory / str(n), "wb")  # noqa: SIM115 - closed below, maybe later
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
        out.flush()
        if order is StoreOrder.EACH:
            os.fsync(out.fileno())
            out.close()
        elif order is StoreOrder.OVERLAPPED:
            syncing.append(threads.submit(_sync_and_close, out))
            if len(syncing) >= 16:
                syncing[-16].result()
        else:
            written.append(out)
    for future in syncing:
        future.result()
    threads.shutdown()
    fd = os.open(directory, os.O_RDONLY)
    try:
        if order is StoreOrder.SYNC:
            os.sync()
        for out in written:
            if order is StoreOrder.AT_END:
                os.fsync(out.fileno())
            out.close()
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-kb", type=int, default=256)
    parser.add_argument("--sizes", default="1,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("UPTAKE_KEY_PASSWORD", PASSWORD)
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp))
        try:
            root = (server.offline_dir / "image-root.json").read_bytes()
            print(f"images of {args.image_kb} KiB; SHA-256 vs publish_images on loopback")
            print(
                f"{'images':>7} {'hash s':>9} {'store s':>9} {'publish s':>10} {'ratio':>7}"
                f" {'vs store':>9} {'client cpu s':>13} {'server cpu s':>13}"
            )
            assert server.proc is not None
            pid = server.proc.pid
            for n, size in enumerate(sizes):
                images_dir = Path(tmp) / f"release-{n}"
                images_dir.mkdir()
                paths = []
                for i in range(size):
                    path = images_dir / f"image-{i}.bin"
                    path.write_bytes(os.urandom(args.image_kb * 1024))
                    paths.append(path)
                # each measurement starts with nothing left to write back (the images just
                # made, an earlier store), so that none pays for another's writes
                os.sync()
                hashed = _hash_all(paths)
                stores = {}
                for order in StoreOrder:
                    os.sync()
                    stores[order] = _store_all(paths, Path(tmp) / f"store-{n}-{order.name}", order)
                stored = min(stores.values())
                os.sync()
                specs = [
                    ReleaseImage(p, ["bench-ecu"], f"{n}.{i}", filepath=f"bench/{n}/{p.name}")
                    for i, p in enumerate(paths)
                ]
                server_cpu, client_cpu = _cpu_seconds(pid), time.process_time()
                start = time.perf_counter()
                publish_images(server.admin, specs, [server.targets_signer], root)
                published = time.perf_counter() - start
                client_cpu = time.process_time() - client_cpu
                server_cpu = _cpu_seconds(pid) - server_cpu
                print(
                    f"{size:>7} {hashed:>9.3f} {stored:>9.3f} {published:>10.3f}"
                    f" {published / hashed:>6.1f}x {published / stored:>8.1f}x"
                    f" {client_cpu:>13.3f} {server_cpu:>13.3f}"
                )
                for order, seconds in stores.items():
                    print(f"{'':>17} store, {order.value}: {seconds:.3f} s")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
