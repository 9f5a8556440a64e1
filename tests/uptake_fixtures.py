"""Real Uptake deployments for tests: a server process on loopback and provisioned vehicles.

Nothing here is a mock: :class:`ServerProcess` runs ``uptake server run`` as a
child process on a free 127.0.0.1 port; :class:`Vehicle` provisions a real
agent state directory and runs ``uptake agent run --once`` as a child process.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import urllib3
from cryptography.hazmat.primitives import serialization
from sqlalchemy.pool import NullPool

from client.provisioning import EcuSpec, provision_vehicle
from client.state import AgentState, StateStore
from server.api_client import AdminClient
from server.certificates import CertificateAuthority
from server.config import ServerConfig
from server.release import Published, publish_image
from server.service import init_server
from signing.keys import load_signer

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "firmware-samples"
PASSWORD = "test-password"
#: Set to a PostgreSQL URL, the tests run every :class:`ServerProcess` on PostgreSQL: each
#: one gets a fresh database of its own on that server (dropped after the test).
DATABASE_URL_ENV = "UPTAKE_DATABASE_URL"
_TEST_DATABASE = os.environ.get(DATABASE_URL_ENV, "")
ON_POSTGRES = _TEST_DATABASE.startswith("postgresql")
# child processes read server.json's database, not the suite's variable
ENV = {
    **{k: v for k, v in os.environ.items() if k != DATABASE_URL_ENV},
    "UPTAKE_KEY_PASSWORD": PASSWORD,
    "UPTAKE_SERVER_KEY_PASSWORD": PASSWORD,
}
#: Databases :func:`fresh_database_url` made and nobody dropped yet.
CREATED_DATABASES: list[str] = []
SELFTEST = [sys.executable, "-m", "uptake.firmware_info", "selftest", "{slot_path}"]


def edit_config(path: Path, tables: dict[str, Any]) -> None:
    """Merge ``tables`` into the TOML file at ``path`` (tables merge, other values replace)."""

    def merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    document = tomllib.loads(path.read_text())
    merge(document, tables)
    path.write_text(tomli_w.dumps(document))


def sample(hardware_id: str, version: str) -> Path:
    name = "bms.bin" if hardware_id == "stm32f4-bms" else "gateway.elf"
    return SAMPLES / hardware_id / version / name


def _admin_engine() -> Any:
    from sqlalchemy import create_engine

    return create_engine(_TEST_DATABASE, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def fresh_database_url() -> str:
    """A new, empty PostgreSQL database on the suite's server (``""``: SQLite, the default)."""
    if not ON_POSTGRES:
        return ""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"uptake_test_{secrets.token_hex(8)}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    CREATED_DATABASES.append(name)
    url = make_url(_TEST_DATABASE).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_databases(names: list[str]) -> None:
    """Drop test databases (their servers' connections too)."""
    if not names:
        return
    from sqlalchemy import text

    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@contextlib.contextmanager
def scratch_postgres_database(prefix: str = "uptake_scratch") -> Iterator[str]:
    """A new PostgreSQL database on 127.0.0.1:5432 for one test (skips when there is none)."""
    import pytest
    from sqlalchemy import create_engine, text

    admin_url = (
        _TEST_DATABASE if ON_POSTGRES else "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no server, no driver
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        from sqlalchemy.engine import make_url

        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@atexit.register
def _drop_leftover_databases() -> None:
    drop_databases(CREATED_DATABASES)
    CREATED_DATABASES.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(
    url: str,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    ca_cert: Path | None = None,
) -> None:
    http = urllib3.PoolManager(
        retries=False, timeout=1.0, ca_certs=str(ca_cert) if ca_cert else None
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before serving {url}")
        try:
            if http.request("GET", url).status == 200:
                return
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not up after {timeout} s")


class ServerProcess:
    """An initialised data directory and ``uptake server run`` serving it.

    By default a development server: plain HTTP on loopback, no vehicle identities (the
    Uptane defences the attack suite tests hold without TLS). With ``tls``, the real
    thing: HTTPS with the CA ``server init`` made, and vehicles proving their VIN with
    client certificates; ``config_changes`` edit server.json before it starts.
    """

    def __init__(
        self,
        tmp: Path,
        database_url: str = "",
        tls: bool = False,
        **config_changes: Any,
    ) -> None:
        self.data_dir = tmp / "server"
        self.offline_dir = tmp / "offline-keys"
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.config = ServerConfig(
            self.data_dir, "127.0.0.1", self.port, database_url or fresh_database_url()
        )
        if not tls:
            self.config.plain_http, self.config.vehicle_identity = True, "none"
        for key, value in config_changes.items():
            setattr(self.config, key, value)
        init_server(self.config, self.offline_dir, PASSWORD.encode(), PASSWORD.encode())
        self.ca_cert: Path | None = self.config.server_ca_cert if tls else None
        self.log_path = tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self.admin = AdminClient.from_token_file(
            self.url, self.config.admin_token_path, ca_cert=self.ca_cert
        )
        # with a key set of several targets keys ('uptake keys init'), the first of them
        targets_key = self.offline_dir / "image-targets.key"
        if not targets_key.exists():
            targets_key = self.offline_dir / "image-targets-1.key"
        self.targets_signer = load_signer(targets_key, PASSWORD.encode())

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uptake", "server", "run", "--data-dir", str(self.data_dir)],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_http(f"{self.url}/health", proc=self.proc, ca_cert=self.ca_cert)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run ``statement`` on the server's own database (SQLite or PostgreSQL); its rows."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.config.database_url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def publish(self, image: Path, hardware_id: str, version: str, **kwargs: Any) -> Published:
        root = (self.offline_dir / "image-root.json").read_bytes()
        return publish_image(
            self.admin, image, [hardware_id], version, [self.targets_signer], root, **kwargs
        )

    def assign(self, vin: str, ecu: str, filepath: str) -> dict[str, Any]:
        result: dict[str, Any] = self.admin.request(
            "POST",
            f"/api/v1/vehicles/{vin}/assignments",
            json_body={"ecu_serial": ecu, "filepath": filepath},
        )
        return result

    def vehicle(self, vin: str) -> dict[str, Any]:
        result: dict[str, Any] = self.admin.request("GET", f"/api/v1/vehicles/{vin}")
        return result


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.stdout)
        return result


class Vehicle:
    """A provisioned agent (primary ``GW-<n>`` + local secondary ``BMS-<n>``) registered with a server."""

    def __init__(
        self,
        tmp: Path,
        server: ServerProcess,
        vin: str = "VIN0001",
        server_url: str | None = None,
        secondaries: bool = True,
        health_check: list[list[str]] | None = None,
        ca_cert: Path | None = None,
    ) -> None:
        self.vin = vin
        self.primary = f"GW-{vin}"
        self.secondary = f"BMS-{vin}"
        self.state_dir = tmp / f"vehicle-{vin}"
        checks = [SELFTEST] if health_check is None else health_check
        self.config_path = provision_vehicle(
            self.state_dir,
            vin=vin,
            server_url=server_url or server.url,
            primary=EcuSpec(self.primary, "rpi-gateway"),
            secondaries=[EcuSpec(self.secondary, "stm32f4-bms")] if secondaries else [],
            image_root=(server.offline_dir / "image-root.json").read_bytes(),
            director_root=(server.offline_dir / "director-root.json").read_bytes(),
            password=PASSWORD.encode(),
            health_check=checks,
            secondary_health_check=checks,
            server_ca=ca.read_bytes() if (ca := ca_cert or server.ca_cert) else None,
        )
        registration = json.loads((self.state_dir / "registration.json").read_bytes())
        answer = server.admin.request("POST", "/api/v1/vehicles", json_body=registration)
        if answer.get("tls_certificate"):  # as 'uptake fleet add-vehicle' writes it
            (self.state_dir / "tls" / "client.crt").write_text(answer["tls_certificate"])

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uptake",
            "agent",
            "run",
            "--config",
            str(self.config_path),
            "--once",
            "--json",
        ]

    def run_once(self, timeout: float = 120) -> AgentRun:
        """One ``uptake agent run --once --json``; its exit code must match what it reports."""
        proc = subprocess.run(
            self.argv(), env=ENV, capture_output=True, timeout=timeout, check=False
        )
        run = AgentRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        try:
            report = run.report
        except ValueError:
            raise AssertionError(
                f"agent printed no JSON (exit {run.returncode}): {run.stderr}"
            ) from None
        assert run.returncode == report["exit_code"], (run.returncode, report, run.stderr)
        return run

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def state(self) -> AgentState:
        return StateStore(self.state_dir / "state.json").load()

    def signed_manifest(self) -> bytes:
        """A manifest this vehicle's agent signs now (its report counters move on)."""
        from client.agent import Agent
        from client.config import load_config

        agent = Agent(load_config(self.config_path), PASSWORD.encode())
        return agent.reporter.signed_manifest(agent.store.load())

    def run_text(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """One ``uptake agent run --once`` in text mode (what an operator reads)."""
        return subprocess.run(
            self.argv()[:-1], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
        )

    def configure(self, **tables: Any) -> None:
        """Change keys of agent.toml: ``configure(installer={"type": "uboot"})`` (a TOML edit)."""
        edit_config(self.config_path, tables)

    def boot_env(self) -> dict[str, str]:
        """The bootloader variables, through whatever environment the agent is configured with."""
        from client.bootenv import open_boot_environment
        from client.config import load_config

        return open_boot_environment(load_config(self.config_path)).read()

    def booted_image(self) -> str:
        slot = self.boot_env().get("boot_slot", "a")
        image = next((i for s, i in self.state().slot_images.items() if s == slot), None)
        return image.filepath if image else ""

    def secondary_state(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            (self.state_dir / "secondaries" / self.secondary / "state.json").read_bytes()
        )
        return result


# --- an operator's own CA, and a TLS server that trusts it: a module that imports
# operator_ca_fixture and operator_ca_server has the fixtures operator_ca and server ---


@pytest.fixture(scope="module", name="operator_ca")
def operator_ca_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CertificateAuthority, Path]:
    """A CA of the operator's own (a factory's), and its certificate's PEM file."""
    ca = CertificateAuthority.generate("factory CA")
    path = tmp_path_factory.mktemp("factory") / "factory-ca.pem"
    path.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    return ca, path


@pytest.fixture(scope="module", name="server")
def operator_ca_server(
    tmp_path_factory: pytest.TempPathFactory, operator_ca: tuple[CertificateAuthority, Path]
) -> Iterator[ServerProcess]:
    """``server`` in a module that imports this: one TLS server for the module's tests that
    also accepts vehicle certificates of the ``operator_ca`` fixture's CA."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("operator-ca-server"),
        tls=True,
        client_ca_bundle=str(operator_ca[1]),
    )
    yield srv
    srv.stop()
