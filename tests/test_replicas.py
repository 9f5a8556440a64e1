"""Two ``uptake server run`` processes on one PostgreSQL database and one data directory.

Vehicles poll both in turn while their director metadata expires every few
seconds (so both processes race to re-sign it), releases are published
through one process and assigned through the other. Every vehicle installs
exactly its assigned images, every signed report is counted once (a copy
sent to the other process is refused), and no director role version is ever
served with two different contents, nor is any version of the image
repository's snapshot or timestamp (which both processes re-sign at half-life).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3

from server.api_client import AdminClient
from server.config import ServerConfig
from server.release import publish_image
from server.service import init_server
from tests.uptake_fixtures import (
    ENV,
    PASSWORD,
    ServerProcess,
    Vehicle,
    edit_config,
    free_port,
    sample,
    scratch_postgres_database,
    wait_for_http,
)

#: Director metadata lives seconds: both processes re-sign it over and over during the test.
LIFETIMES = {
    "director-timestamp": 3,
    "director-snapshot": 4,
    "director-targets": 6,
    "timestamp": 6,
    "snapshot": 8,
    "deltas": 10,
}
POLL_SECONDS = 12.0


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_postgres_database("uptake_replicas") as url:
        yield url


class Replica:
    """A second ``uptake server run`` on the first one's data directory and database."""

    def __init__(self, first: ServerProcess, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "uptake", "server", "run",
                "--data-dir", str(first.data_dir), "--port", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(argv, env=ENV, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_for_http(f"{self.url}/health", proc=self.proc)
        self.admin = AdminClient.from_token_file(self.url, first.config.admin_token_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Observer:
    """Polls director metadata of every vehicle from both processes; remembers each content."""

    def __init__(self, urls: list[str], vins: list[str]) -> None:
        self.urls, self.vins = urls, vins
        self.seen: dict[tuple[str, str, int], set[str]] = defaultdict(set)
        self.requests = 0
        self.errors: list[str] = []
        self._http = urllib3.PoolManager(maxsize=4, retries=False, timeout=10)
        self._stop = threading.Event()

    def _get(self, url: str) -> bytes | None:
        response = self._http.request("GET", url)
        self.requests += 1
        if response.status == 404:
            return None  # a version already deleted (only the newest few are kept)
        if response.status != 200:
            self.errors.append(f"GET {url}: {response.status} {response.data[:200]!r}")
            return None
        return bytes(response.data)

    def _record(self, vin: str, role: str, data: bytes) -> dict[str, object]:
        signed: dict[str, object] = json.loads(data)["signed"]
        version = signed["version"]
        assert isinstance(version, int)
        self.seen[(vin, role, version)].add(hashlib.sha256(data).hexdigest())
        return signed

    def run(self, worker: int) -> None:
        turn = worker
        while not self._stop.is_set():
            # the image repository: both processes re-sign its snapshot and timestamp at half-life
            data = self._get(f"{self.urls[turn % 2]}/image/metadata/timestamp.json")
            if data is not None:
                timestamp = self._record("image", "timestamp", data)
                snapshot_version = timestamp["meta"]["snapshot.json"]["version"]  # type: ignore[index]
                other = f"{self.urls[(turn + 1) % 2]}/image/metadata"
                data = self._get(f"{other}/{snapshot_version}.snapshot.json")
                if data is not None:
                    self._record("image", "snapshot", data)
            for vin in self.vins:
                base = f"{self.urls[turn % 2]}/director/{vin}/metadata"
                turn += 1
                data = self._get(f"{base}/timestamp.json")
                if data is None:
                    continue
                timestamp = self._record(vin, "timestamp", data)
                snapshot_version = timestamp["meta"]["snapshot.json"]["version"]  # type: ignore[index]
                # the snapshot from the OTHER process: both must agree on it
                other = f"{self.urls[turn % 2]}/director/{vin}/metadata"
                data = self._get(f"{other}/{snapshot_version}.snapshot.json")
                if data is None:
                    continue
                snapshot = self._record(vin, "snapshot", data)
                targets_version = snapshot["meta"]["targets.json"]["version"]  # type: ignore[index]
                data = self._get(f"{base}/{targets_version}.targets.json")
                if data is not None:
                    self._record(vin, "targets", data)

    def stop(self) -> None:
        self._stop.set()


def _point_at(vehicle: Vehicle, url: str) -> None:
    edit_config(vehicle.config_path, {"agent": {"server_url": url}})


def _post_manifest(url: str, vin: str, manifest: bytes) -> int:
    response = urllib3.request(
        "POST", f"{url}/api/v1/vehicles/{vin}/manifest", body=manifest,
        headers={"Content-Type": "application/json"}, retries=False,
    )  # fmt: skip
    return response.status


@pytest.mark.postgres
def test_two_processes_on_one_postgresql_give_the_same_answers(tmp_path: Path, pg_url: str) -> None:
    first = ServerProcess(tmp_path, database_url=pg_url, metadata_lifetimes=LIFETIMES)
    second = Replica(first, tmp_path / "replica.log")
    urls = [first.url, second.url]
    observer: Observer | None = None
    threads: list[threading.Thread] = []
    try:
        vehicles = [Vehicle(tmp_path, first, vin=f"REPLICA{i:03d}") for i in range(3)]
        # a release through each process: the second publishes on top of the first's targets
        gateway = first.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        root = (first.offline_dir / "image-root.json").read_bytes()
        bms = publish_image(
            second.admin, sample("stm32f4-bms", "1.1.0"), ["stm32f4-bms"], "1.1.0",
            [first.targets_signer], root,
        )  # fmt: skip
        for vehicle in vehicles:  # assigned through both processes
            first.assign(vehicle.vin, vehicle.primary, gateway.filepath)
            second.admin.request(
                "POST", f"/api/v1/vehicles/{vehicle.vin}/assignments",
                json_body={"ecu_serial": vehicle.secondary, "filepath": bms.filepath},
            )  # fmt: skip

        observer = Observer(urls, [v.vin for v in vehicles])
        threads = [threading.Thread(target=observer.run, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()

        # real agents, each cycle against the other process
        started = time.monotonic()
        cycle = 0
        while cycle < 2 or time.monotonic() - started < POLL_SECONDS:
            for n, vehicle in enumerate(vehicles):
                _point_at(vehicle, urls[(n + cycle) % 2])
                run = vehicle.run_once()
                assert run.returncode == 0, (run.report, run.stderr)
            cycle += 1

        # lightweight signers: fresh signed reports to one process, the same bytes to the other
        accepted_before = {v.vin: first.vehicle(v.vin)["manifests_accepted"] for v in vehicles}
        for n, vehicle in enumerate(vehicles):
            for k in range(4):
                manifest = vehicle.signed_manifest()
                assert _post_manifest(urls[(n + k) % 2], vehicle.vin, manifest) == 200
                assert _post_manifest(urls[(n + k + 1) % 2], vehicle.vin, manifest) >= 400
    finally:
        if observer is not None:
            observer.stop()
        for thread in threads:
            thread.join(30)
        second.stop()
        first.stop()
    first.start()
    try:
        for vehicle in vehicles:
            record = first.vehicle(vehicle.vin)
            installed = {e["serial"]: e["installed"]["filepath"] for e in record["ecus"]}
            assert installed == {vehicle.primary: gateway.filepath, vehicle.secondary: bms.filepath}
            assert sorted(a["status"] for a in record["assignments"]) == ["installed"] * 2
            assert vehicle.booted_image() == gateway.filepath
            assert record["manifests_accepted"] == accepted_before[vehicle.vin] + 4, record
    finally:
        first.stop()

    assert observer is not None and not observer.errors, observer.errors[:5]
    doubled = {key: hashes for key, hashes in observer.seen.items() if len(hashes) > 1}
    assert not doubled, doubled
    versions = {key[:2]: 0 for key in observer.seen}
    for vin, role, version in observer.seen:
        versions[(vin, role)] = max(versions[(vin, role)], version)
    print(
        f"{observer.requests} metadata requests over both processes; "
        f"{len(observer.seen)} distinct director role versions seen, each with one content; "
        f"newest timestamp versions {sorted((k, v) for (k, r), v in versions.items() if r == 'timestamp')}"
    )
    # the processes really re-signed meanwhile (the race was run, not avoided)
    assert min(v for (vin, role), v in versions.items() if role == "timestamp") >= 4
    assert versions[("image", "timestamp")] >= 4


def test_a_delta_job_left_running_by_a_dead_process_is_made_after_a_restart(
    tmp_path: Path,
) -> None:
    """The job table survives the process: what a crashed server was making is made again."""
    server = ServerProcess(tmp_path)  # SQLite, or PostgreSQL with UPTAKE_DATABASE_URL
    try:
        base = server.publish(sample("rpi-gateway", "1.0.0"), "rpi-gateway", "1.0.0")
        result = server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
        server.stop()
        # as a server killed while making the delta leaves it: running, claimed by a dead pid
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        server.sql(
            "INSERT INTO deltajob (base_sha256, result_filepath, status, detail, delta_length,"
            " result_length, claimed_by, claimed_at, updated_at) VALUES (:base, :result,"
            " 'running', '', 0, 0, :claimed_by, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            base=base.sha256,
            result=result.filepath,
            claimed_by=f"{socket.gethostname()}:{dead.pid}",
        )
        server.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = server.admin.request("GET", "/api/v1/deltas")["jobs"]
            if jobs and jobs[0]["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert [j["status"] for j in jobs] in (["published"], ["not_worth_it"]), jobs
    finally:
        server.stop()


def _resign_repeatedly(config: ServerConfig, times: int, start: Any) -> None:
    from server.image_repository import ImageRepository
    from server.service import load_online_signers

    signers = load_online_signers(config, PASSWORD.encode())
    repo = ImageRepository(
        config.image_dir, signers["image-snapshot"], signers["image-timestamp"],
        signers["image-deltas"],
    )  # fmt: skip
    start.wait()
    later = datetime.now(UTC) + timedelta(days=3650)  # everything due: every call re-signs
    for _ in range(times):
        assert repo.refresh_online_metadata(later)


def test_two_processes_re_signing_one_image_repository_never_lose_a_version(
    tmp_path: Path,
) -> None:
    """Each re-signing starts from the other process's newest files (flock + reload)."""
    config = ServerConfig(tmp_path / "server", plain_http=True, vehicle_identity="none")
    init_server(config, tmp_path / "offline", PASSWORD.encode(), PASSWORD.encode())
    metadata = config.image_dir / "metadata"

    def version(name: str) -> int:
        return int(json.loads((metadata / name).read_bytes())["signed"]["version"])

    before = version("timestamp.json")
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [
        context.Process(target=_resign_repeatedly, args=(config, 25, start)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    # 50 re-signings, each a new deltas, snapshot and timestamp version: none lost, none twice
    assert version("timestamp.json") == before + 50
    snapshot = json.loads((metadata / "timestamp.json").read_bytes())["signed"]["meta"]
    newest = snapshot["snapshot.json"]["version"]
    assert sorted(int(p.name.split(".")[0]) for p in metadata.glob("*.snapshot.json"))[
        -51:
    ] == list(range(newest - 50, newest + 1))
