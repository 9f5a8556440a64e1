"""Fleet load: idle polls and signed manifests from N simulated vehicles, against baselines.

Simulated vehicles are light: each has its own ed25519 ECU key and TLS client certificate
(registered through the API like a real one, so the server checks its identity on every
request), and no agent. Everything is real HTTP on loopback against real
``uptake server run`` processes on PostgreSQL (a database of its own, dropped at the end),
with the server's default transport: HTTPS with the vehicle's client certificate (mutual
TLS) on every request, over one kept-alive connection per vehicle.

For 1 and then 2 server processes (the same data directory and database; the second one
is a replica behind the same vehicles, which alternate between them), in one run:

* idle polls: every vehicle GETs its director ``timestamp.json`` in a closed loop for
  ``--seconds``; prints polls/s, per process, p50 and p99 latency;
* manifests: every vehicle POSTs signed manifests (one ECU report signed by the ECU key
  inside a manifest signed by the primary key: two ed25519 signatures each, signed before
  the clock starts) in a closed loop; prints manifests/s, per core, p50 and p99;
* nginx: the same client, vehicles and connections GET a static file of the size of
  ``timestamp.json`` from Debian's nginx over the same TLS (one worker process);
* the verification bound: the time to verify the two signatures of one manifest
  in-process with ``cryptography`` (one core);
* bare aiohttp (``bench/aiohttp_ceiling.py``): one process of a minimal aiohttp
  application over the same TLS doing only what no server can skip (the poll's
  bytes from memory; a manifest parsed, canonicalised and its two signatures
  verified), the framework's ceiling on this machine.

Prints the ratios: idle polls/s per process to nginx (goal at least 0.25) and
manifests/s per server core to the verification bound (goal at least 0.7), and both
against bare aiohttp (how much of the gap is the framework's). The load client
runs on the same machine, so it takes CPU from the server: figures are lower bounds.

    .venv/bin/python bench/fleet_load.py [--vehicles 200] [--seconds 10] [--processes 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.formats import encode_canonical

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.vehicle_identity import certificate_request
from server.certificates import CertificateAuthority, server_certificate
from signing.keys import generate_signer, public_key_to_dict
from signing.manifest import NO_IMAGE, EcuVersionReport, SignedEnvelope, VehicleManifest
from tests.uptake_fixtures import ENV, ServerProcess, free_port, wait_for_http

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
MAX_VEHICLES = 2000
MAX_SECONDS = 60.0


def _canonical(signed: dict[str, Any]) -> bytes:
    """The canonical JSON bytes a signature covers (what the server verifies)."""
    text = encode_canonical(signed)
    assert text is not None  # None only when an output function is given
    return text.encode()


@dataclass
class SimulatedVehicle:
    vin: str
    signer: Any
    ssl_context: ssl.SSLContext
    counter: int = 0
    manifests: list[bytes] = field(default_factory=list)

    def sign_manifests(self, count: int) -> None:
        """Pre-sign ``count`` manifests with increasing report counters (off the clock)."""
        self.manifests = []
        for _ in range(count):
            self.counter += 1
            report = EcuVersionReport(f"GW-{self.vin}", NO_IMAGE, self.counter)
            manifest = VehicleManifest(
                self.vin, f"GW-{self.vin}", {f"GW-{self.vin}": report.sign(self.signer)}
            )
            self.manifests.append(manifest.sign(self.signer).to_bytes())


def _register(server: ServerProcess, tmp: Path, count: int) -> list[SimulatedVehicle]:
    vehicles = []
    assert server.ca_cert is not None
    for i in range(count):
        vin = f"LOAD{i:06d}"
        signer = generate_signer()
        tls_key = ec.generate_private_key(ec.SECP256R1())
        answer = server.admin.request(
            "POST",
            "/api/v1/vehicles",
            json_body={
                "vin": vin,
                "primary_ecu_serial": f"GW-{vin}",
                "ecus": [
                    {
                        "serial": f"GW-{vin}",
                        "hardware_id": "load-gateway",
                        "public_key": public_key_to_dict(signer.public_key),
                    }
                ],
                "tls_csr": certificate_request(tls_key, vin),
            },
        )
        cert, key = tmp / f"{vin}.crt", tmp / f"{vin}.key"
        cert.write_text(answer["tls_certificate"])
        key.write_bytes(
            tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.create_default_context(cafile=str(server.ca_cert))
        context.load_cert_chain(cert, key)
        vehicles.append(SimulatedVehicle(vin, signer, context))
    return vehicles


@dataclass
class Phase:
    name: str
    latencies: list[float]
    seconds: float
    failures: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def quantile(self, q: int) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1000


async def _closed_loop(
    name: str,
    vehicles: list[SimulatedVehicle],
    urls: list[str],
    seconds: float,
    request: str,
) -> Phase:
    """Each vehicle sends requests back to back on its own connection for ``seconds``."""
    latencies: list[float] = []
    failures = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def one(vehicle: SimulatedVehicle, index: int) -> None:
        nonlocal failures
        # one kept-alive connection per vehicle and server process
        connector = aiohttp.TCPConnector(ssl=vehicle.ssl_context, limit=len(urls), limit_per_host=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            sent = 0
            while time.perf_counter() < deadline:
                # vehicles alternate between the server processes
                base = urls[(index + sent) % len(urls)]
                t0 = time.perf_counter()
                if request == "manifest":
                    if sent >= len(vehicle.manifests):
                        return
                    response = await session.post(
                        f"{base}/api/v1/vehicles/{vehicle.vin}/manifest",
                        data=vehicle.manifests[sent],
                        headers={"Content-Type": "application/json"},
                    )
                elif request == "poll":
                    response = await session.get(
                        f"{base}/director/{vehicle.vin}/metadata/timestamp.json"
                    )
                else:
                    response = await session.get(f"{base}/static/timestamp.json")
                await response.read()
                sent += 1
                if response.status != 200:
                    failures += 1
                    if failures < 5:
                        print(f"  {name}: {response.status} {(await response.text())[:200]}")
                    continue
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(v, i) for i, v in enumerate(vehicles)))
    return Phase(name, latencies, time.perf_counter() - start, failures)


def verification_bound(vehicle: SimulatedVehicle, rounds: int = 4000) -> float:
    """Manifests/s one core verifies: two ed25519 signatures each, with ``cryptography`` alone
    (the bytes the two signatures cover canonicalised beforehand, off the clock)."""
    envelope = SignedEnvelope.from_bytes(vehicle.manifests[0])
    report = next(iter(envelope.signed["ecu_version_reports"].values()))
    inner = SignedEnvelope.from_dict(report)
    key = Ed25519PublicKey.from_public_bytes(
        bytes.fromhex(vehicle.signer.public_key.keyval["public"])
    )
    pairs = [
        (bytes.fromhex(e.signatures[0].signature), _canonical(e.signed)) for e in (inner, envelope)
    ]
    start = time.perf_counter()
    for _ in range(rounds):
        for signature, data in pairs:
            key.verify(signature, data)
    return rounds / (time.perf_counter() - start)


def _start_replica(server: ServerProcess, tmp: Path, database_url: str) -> tuple[Any, str]:
    port = free_port()
    log = open(tmp / "replica.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "uptake", "server", "run", "--data-dir", str(server.data_dir),
            "--port", str(port), "--database-url", database_url,
        ],
        env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", proc=proc, ca_cert=server.ca_cert)
    return proc, url


def _start_nginx(tmp: Path, server: ServerProcess, size: int) -> tuple[Any, str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    static = tmp / "static"
    static.mkdir()
    (static / "timestamp.json").write_bytes(b"x" * size)
    ca = CertificateAuthority.generate("bench CA")
    import datetime

    cert, key = server_certificate(ca, ["127.0.0.1"], datetime.timedelta(days=1))
    (tmp / "nginx.crt").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca.certificate.public_bytes(serialization.Encoding.PEM)
    )
    (tmp / "nginx.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp / "nginx-ca.crt").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    port = free_port()
    conf = string.Template(
        """daemon off; user root; worker_processes 1; pid $tmp/nginx.pid;
error_log $tmp/nginx.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $tmp/body; proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fcgi; uwsgi_temp_path $tmp/uwsgi; scgi_temp_path $tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $tmp/nginx.crt; ssl_certificate_key $tmp/nginx.key;
        ssl_client_certificate $ca; ssl_verify_client optional;
        location /static/ { alias $tmp/static/; default_type application/json; }
    }
}
"""
    ).substitute(tmp=tmp, port=port, ca=server.config.device_ca_cert)
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
    url = f"https://127.0.0.1:{port}"
    _wait_for_port(proc, port, tmp / "nginx.log")
    return proc, url


def _wait_for_port(proc: Any, port: int, log: Path, seconds: float = 10.0) -> None:
    """Until ``proc`` accepts connections on ``port``; its ``log`` if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds:g} s: {log.read_text()}")


def _start_ceiling(
    tmp: Path, server: ServerProcess, vehicles: list[SimulatedVehicle], sample: Path
) -> tuple[Any, str]:
    """``bench/aiohttp_ceiling.py`` on nginx's certificate, trusting the vehicles' CA."""
    keys = {v.vin: v.signer.public_key.keyval["public"] for v in vehicles}
    (tmp / "ceiling-keys.json").write_text(json.dumps(keys))
    port = free_port()
    log = open(tmp / "ceiling.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            sys.executable, str(Path(__file__).with_name("aiohttp_ceiling.py")),
            "--port", str(port), "--cert", str(tmp / "nginx.crt"), "--key", str(tmp / "nginx.key"),
            "--ca", str(server.config.device_ca_cert), "--keys", str(tmp / "ceiling-keys.json"),
            "--timestamp", str(sample),
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    _wait_for_port(proc, port, tmp / "ceiling.log")
    return proc, f"https://127.0.0.1:{port}"


def _stop(proc: Any, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _line(label: str, phase: Phase, per: int = 1) -> str:
    return (
        f"  {label:34} {phase.rate:9.0f}/s {phase.rate / per:9.0f}/s/proc "
        f"p50 {phase.quantile(50):7.2f} ms  p99 {phase.quantile(99):7.2f} ms"
        + (f"  ({phase.failures} failed)" if phase.failures else "")
    )


def run(args: argparse.Namespace) -> None:
    import psycopg

    dbname = f"edge_load_{secrets.token_hex(4)}"
    admin = psycopg.connect(ADMIN_DSN, autocommit=True)
    admin.execute(f"CREATE DATABASE {dbname}")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
    tmp = Path(tempfile.mkdtemp(prefix="fleet-load-"))
    server = ServerProcess(tmp, database_url=url, tls=True)
    procs: list[Any] = []
    try:
        t0 = time.perf_counter()
        vehicles = _register(server, tmp, args.vehicles)
        print(
            f"{args.vehicles} vehicles registered in {time.perf_counter() - t0:.1f} s; "
            f"mutual TLS (the default), PostgreSQL, {os.cpu_count()} cores on this machine, "
            f"{args.seconds:g} s per phase"
        )
        for v in vehicles:
            v.sign_manifests(1)
        bound = verification_bound(vehicles[0])
        asyncio.run(_closed_loop("warm-up", vehicles, [server.url], 2.0, "poll"))
        sample = tmp / "sample-timestamp.json"
        ctx = vehicles[0].ssl_context
        import urllib.request

        with urllib.request.urlopen(
            f"{server.url}/director/{vehicles[0].vin}/metadata/timestamp.json", context=ctx
        ) as answer:
            sample.write_bytes(answer.read())
        nginx, nginx_url = _start_nginx(tmp, server, sample.stat().st_size)
        procs.append(nginx)
        for v in vehicles:  # nginx's CA next to the server's: one client for both
            v.ssl_context.load_verify_locations(cafile=str(tmp / "nginx-ca.crt"))
        static = asyncio.run(_closed_loop("nginx", vehicles, [nginx_url], args.seconds, "static"))
        print(f"nginx, 1 worker, static file of {sample.stat().st_size} bytes:")
        print(_line("GET (TLS, same client)", static))
        print(f"verification bound: {bound:.0f} manifests/s per core (2 ed25519 verifications)")
        ceiling, ceiling_url = _start_ceiling(tmp, server, vehicles, sample)
        procs.append(ceiling)
        asyncio.run(_closed_loop("warm-up", vehicles, [ceiling_url], 2.0, "poll"))
        bare_polls = asyncio.run(
            _closed_loop("bare polls", vehicles, [ceiling_url], args.seconds, "poll")
        )
        for v in vehicles:
            v.sign_manifests(max(1, int(args.seconds * 4000 / max(1, len(vehicles)))))
        bare_manifests = asyncio.run(
            _closed_loop("bare manifests", vehicles, [ceiling_url], args.seconds, "manifest")
        )
        _stop(ceiling)
        print("bare aiohttp, 1 process (bench/aiohttp_ceiling.py: no identity, no database):")
        print(_line("idle polls (bytes from memory)", bare_polls))
        print(_line("manifests (parse, canonicalise, verify)", bare_manifests))
        print(
            f"  ratios: polls / nginx = {bare_polls.rate / static.rate:.3f}; "
            f"manifests / verification bound = {bare_manifests.rate / bound:.3f}"
        )
        urls = [server.url]
        for count in sorted({int(c) for c in args.processes.split(",")}):
            while len(urls) < count:
                proc, replica_url = _start_replica(server, tmp, url)
                procs.append(proc)
                urls.append(replica_url)
            # warm-up, not measured: connections to the new replica, its caches
            asyncio.run(_closed_loop("warm-up", vehicles, urls, 3.0, "poll"))
            polls = asyncio.run(_closed_loop("polls", vehicles, urls, args.seconds, "poll"))
            per_manifest_phase = max(1, int(args.seconds * 2000 / max(1, len(vehicles))))
            for v in vehicles:
                v.sign_manifests(per_manifest_phase)
            manifests = asyncio.run(
                _closed_loop("manifests", vehicles, urls, args.seconds, "manifest")
            )
            cores = min(count, os.cpu_count() or 1)
            print(f"{count} server process(es):")
            print(_line("idle polls (timestamp.json)", polls, count))
            print(_line("manifests (2 signatures each)", manifests, count))
            print(
                f"  ratios: idle polls/s per process / nginx = "
                f"{polls.rate / count / static.rate:.3f} (goal >= 0.25); "
                f"manifests/s per core / verification bound = "
                f"{manifests.rate / cores / bound:.3f} (goal >= 0.7)"
            )
            print(
                f"  against bare aiohttp: polls per process {polls.rate / count / bare_polls.rate:.3f}"
                f", manifests per core {manifests.rate / cores / bare_manifests.rate:.3f}"
            )
    finally:
        for proc in procs:
            _stop(proc, signal.SIGQUIT if proc is procs[0] else signal.SIGINT)
        server.stop()
        admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        admin.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", default="1,2", help="server process counts to run")
    args = parser.parse_args()
    if not 1 <= args.vehicles <= MAX_VEHICLES or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--vehicles 1..{MAX_VEHICLES}, --seconds up to {MAX_SECONDS:g}")
    run(args)


if __name__ == "__main__":
    main()
