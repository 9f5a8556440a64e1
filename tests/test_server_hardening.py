"""Server holes an independent review found (issue 9), each mounted against a real server.

* names and paths (finding 1/8): "." and ".." as VIN, ECU serial or hardware id
  are refused at registration; files named from outside stay in their directory;
* unauthenticated growth (finding 3): garbage manifests for a known VIN are
  counted, not stored one by one, rate-limited (429), and every list is paged;
* report-counter lockout (finding 5): a counter may jump only so far, and an
  operator can reset one (recorded);
* noisy and unbounded connections (finding 6): half-sent bodies are timed out
  (408, connection closed) and a client that goes away costs one log line;
* tracebacks where a clear error belongs (finding 12): the CLI when the port is
  taken, the address is not here, the database driver is missing, or the
  server extra is not installed.

Nested JSON and huge integers (finding 4) are covered in ``tests/fuzz/test_fuzz_http.py``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import urllib3

from server.config import ConfigError, ServerConfig
from server.encrypted_images import EncryptedImages
from server.fleet import MAX_EVENTS_PER_VEHICLE, MAX_REPORT_COUNTER_JUMP, SUMMARY_ITEMS
from server.service import init_server
from signing.encryption import generate_encryption_key, public_key_hex
from signing.keys import load_signer
from signing.manifest import SignedEnvelope
from signing.names import PathEscapeError
from tests.uptake_fixtures import (
    ENV,
    PASSWORD,
    ServerProcess,
    Vehicle,
    free_port,
    sample,
    wait_for_http,
)

http = urllib3.PoolManager(retries=False, timeout=30.0)


def _call(
    server: ServerProcess, method: str, path: str, body: Any = None, *, admin: bool = True
) -> tuple[int, Any, urllib3.BaseHTTPResponse]:
    headers = {"Authorization": f"Bearer {server.admin.token}"} if admin else {}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    resp = http.request(method, server.url + path, body=data, headers=headers)
    return resp.status, json.loads(resp.data), resp


def _post_manifest(server: ServerProcess, vin: str, body: bytes) -> tuple[int, Any]:
    status, answer, _ = _call(server, "POST", f"/api/v1/vehicles/{vin}/manifest", body, admin=False)
    return status, answer


def _resigned(genuine: bytes, key: Any, edit: Any) -> bytes:
    """``genuine`` with only the primary's report, passed through ``edit``, re-signed with ``key``."""
    signed = copy.deepcopy(json.loads(genuine)["signed"])
    primary = signed["primary_ecu_serial"]
    report = signed["ecu_version_reports"][primary]
    edit(report["signed"])
    report["signatures"] = SignedEnvelope.create(report["signed"], key).to_dict()["signatures"]
    signed["ecu_version_reports"] = {primary: report}
    return SignedEnvelope.create(signed, key).to_bytes()


def _with_counter(genuine: bytes, key: Any, counter: int) -> bytes:
    return _resigned(genuine, key, lambda report: report.update(report_counter=counter))


def _primary_key(vehicle: Vehicle) -> Any:
    return load_signer(vehicle.state_dir / "keys" / "primary.key", PASSWORD.encode())


def _registration(vehicle: Vehicle) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((vehicle.state_dir / "registration.json").read_bytes())
    return result


def _ecu(record: dict[str, Any], serial: str) -> dict[str, Any]:
    return next(e for e in record["ecus"] if e["serial"] == serial)


def _uptake(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uptake", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,
    )


# -- A: names and paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vin", "."),
        ("vin", ".."),
        ("serial", ".."),
        ("serial", "."),
        ("serial", "a/b"),
        ("hardware_id", ".."),
        ("hardware_id", "../../etc"),
        ("hardware_id", "gw\u2024x"),
    ],
)
def test_dot_names_are_refused_at_registration(
    tmp_path: Path, shared_server: ServerProcess, field: str, value: str
) -> None:
    vin = "DOT" + hashlib.sha256(f"{field}={value}".encode()).hexdigest()[:8].upper()
    registration = _provisioned_registration(tmp_path, shared_server, vin)
    registration["encrypt_images"] = True  # where serial '..' used to write outside the vehicle
    ecu = registration["ecus"][0]
    if field == "vin":
        registration["vin"] = value
    elif field == "serial":
        ecu["serial"] = registration["primary_ecu_serial"] = value
    else:
        ecu["hardware_id"] = value
    status, answer, _ = _call(shared_server, "POST", "/api/v1/vehicles", registration)
    assert status == 400, answer
    assert "is not a name" in answer["error"]["message"], answer
    status, _, _ = _call(shared_server, "GET", f"/api/v1/vehicles/{vin}")
    assert status == 404  # nothing registered
    assert not (shared_server.data_dir / "director" / "encrypted" / "..").exists()


def _provisioned_registration(tmp: Path, server: ServerProcess, vin: str) -> dict[str, Any]:
    """The registration.json a real ``agent init`` writes, with an encryption key."""
    from client.provisioning import EcuSpec, provision_vehicle

    state = tmp / f"state-{vin}"
    provision_vehicle(
        state,
        vin=vin,
        server_url=server.url,
        primary=EcuSpec(f"GW-{vin}", "rpi-gateway"),
        secondaries=[],
        image_root=(server.offline_dir / "image-root.json").read_bytes(),
        director_root=(server.offline_dir / "director-root.json").read_bytes(),
        password=PASSWORD.encode(),
    )
    registration: dict[str, Any] = json.loads((state / "registration.json").read_bytes())
    if not registration["ecus"][0].get("encryption_key"):
        registration["ecus"][0]["encryption_key"] = public_key_hex(generate_encryption_key())
    return registration


def test_encrypted_copies_cannot_leave_the_vehicle_directory(tmp_path: Path) -> None:
    """Second layer: even a serial that slipped past registration cannot place a file outside."""
    from tuf.api.metadata import TargetFile

    image = tmp_path / "targets" / f"{'0' * 64}.gw.bin"
    image.parent.mkdir()
    image.write_bytes(b"firmware")
    target = TargetFile(8, {"sha256": hashlib.sha256(b"firmware").hexdigest()}, "gw.bin")
    store = EncryptedImages(tmp_path / "encrypted", tmp_path / "targets")
    key = public_key_hex(generate_encryption_key())
    for vin, serial in (("VIN1", ".."), ("..", "GW"), ("VIN1", "a/../../b")):
        with pytest.raises(PathEscapeError):
            store.director_target(vin, serial, "rpi-gateway", key, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["targets"]


# -- B: unauthenticated growth -------------------------------------------------------------


def _database_bytes(server: ServerProcess) -> int:
    """The fleet database's logical size (its pages, WAL included)."""
    if not server.config.database_url.startswith("sqlite"):
        # PostgreSQL keeps dead row versions until vacuum: count the live rows' bytes
        tables = server.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return sum(
            int(server.sql(f'SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM "{name}" t')[0][0])
            for (name,) in tables
        )
    db = server.data_dir / "uptake.db"
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(pages * size)


def _event_rows(server: ServerProcess, vin: str) -> int:
    return int(server.sql("SELECT count(*) FROM securityevent WHERE vin = :vin", vin=vin)[0][0])


def _garbage(template: bytes, n: int) -> bytes:
    """A refused manifest (four reasons in turn), made from a genuine one by someone without keys.

    Each carries text the attacker chose.
    """
    name = f"ATTACKER{n:05d}" + "X" * 110  # a name of the grammar, so that it gets stored
    doc = json.loads(template)
    signed = doc["signed"]
    primary = signed["primary_ecu_serial"]
    kind = n % 4
    if kind == 0:
        return b"{not json " + name.encode()
    if kind == 1:
        signed["vin"] = name
    elif kind == 2:
        report = signed["ecu_version_reports"].pop(primary)
        report["signed"]["ecu_serial"] = signed["primary_ecu_serial"] = name
        signed["ecu_version_reports"][name] = report
    else:
        report = signed["ecu_version_reports"][primary]["signed"]
        report["attacks_detected"] = name
    return json.dumps(doc).encode()


def test_garbage_manifests_are_counted_rate_limited_and_bounded(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    template = vehicle.signed_manifest()
    before = _database_bytes(server)
    statuses: dict[int, int] = {}
    limited: Any = None
    for n in range(400):
        status, answer, resp = _call(
            server,
            "POST",
            f"/api/v1/vehicles/{vehicle.vin}/manifest",
            _garbage(template, n),
            admin=False,
        )
        assert 400 <= status < 500 and answer["error"]["status"] == status, answer
        statuses[status] = statuses.get(status, 0) + 1
        if status == 429 and limited is None:
            limited = (answer, resp.headers.get("Retry-After"))
    growth = _database_bytes(server) - before
    record = server.vehicle(vehicle.vin)
    record_size = len(json.dumps(record))
    print(f"statuses {statuses}; database grew {growth} bytes; vehicle record {record_size} bytes")

    assert statuses.get(429, 0) >= 300, statuses
    answer, retry_after = limited
    assert "not recorded" in answer["error"]["message"] and int(retry_after) >= 1
    # one row per vehicle, reason and ECU, counting every recorded refusal
    assert _event_rows(server, vehicle.vin) == 4
    assert {e["reason"] for e in record["security_events"]} == {
        "malformed",
        "other_vin",
        "other_primary",
        "bad_signature",
    }
    rejected = [e for e in record["security_events"] if e["kind"] == "manifest_rejected"]
    assert sum(e["count"] for e in rejected) == record["manifests_rejected"] < 400 - 300
    assert growth < 64 * 1024, growth
    assert record_size < 16 * 1024, record_size
    # the genuine vehicle is not locked out by the flood
    status, answer = _post_manifest(server, vehicle.vin, vehicle.signed_manifest())
    assert status == 200, answer


def test_stored_vehicle_text_and_event_history_are_bounded(
    server: ServerProcess, vehicle: Vehicle
) -> None:
    """A vehicle's own key can report attacks at will: long text is cut, old events pruned."""
    key = _primary_key(vehicle)
    genuine = vehicle.signed_manifest()
    posts = MAX_EVENTS_PER_VEHICLE + 10
    for n in range(posts):

        def attack(report: dict[str, Any], n: int = n) -> None:
            report["report_counter"] = 100 + n
            report["attacks_detected"] = f"attack {n}: " + "y" * 4000

        status, answer = _post_manifest(server, vehicle.vin, _resigned(genuine, key, attack))
        assert status == 200, answer
    record = server.vehicle(vehicle.vin)
    ecu = _ecu(record, vehicle.primary)
    assert 900 <= len(ecu["attacks_detected"]) <= 1000, len(ecu["attacks_detected"])
    assert ecu["attacks_detected"].startswith(f"attack {posts - 1}: ")
    assert record["security_events_total"] == MAX_EVENTS_PER_VEHICLE
    assert len(record["security_events"]) == SUMMARY_ITEMS
    assert record["security_events"][-1]["detail"].startswith(f"attack {posts - 1}: ")
    assert all(len(e["detail"]) <= 1000 for e in record["security_events"])


def _all_pages(server: ServerProcess, path: str, key: str, limit: int) -> list[Any]:
    items: list[Any] = []
    cursor = None
    for _ in range(1000):
        query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        status, page, _ = _call(server, "GET", path + query)
        assert status == 200, page
        assert len(page[key]) <= limit
        items += page[key]
        cursor = page["next"]
        if cursor is None:
            return items
    pytest.fail("paging did not end")


def test_every_list_is_paged(server: ServerProcess, vehicle: Vehicle) -> None:
    gw = [server.publish(sample("rpi-gateway", v), "rpi-gateway", v) for v in ("1.0.0", "1.1.0")]
    for n in range(7):  # each supersedes the one before
        server.assign(vehicle.vin, vehicle.primary, gw[n % 2].filepath)
    template = vehicle.signed_manifest()
    for n in range(4):  # four reasons for refusal, then an operator reset: five events
        _post_manifest(server, vehicle.vin, _garbage(template, n))
    _call(
        server,
        "POST",
        f"/api/v1/vehicles/{vehicle.vin}/ecus/{vehicle.primary}/report-counter/reset",
    )

    record = server.vehicle(vehicle.vin)
    assignments = _all_pages(
        server, f"/api/v1/vehicles/{vehicle.vin}/assignments", "assignments", 2
    )
    assert [a["id"] for a in assignments] == sorted({a["id"] for a in assignments})
    assert len(assignments) == record["assignments_total"] == 7
    events = _all_pages(server, f"/api/v1/vehicles/{vehicle.vin}/events", "security_events", 2)
    assert len(events) == record["security_events_total"] == 5
    assert len(_all_pages(server, "/api/v1/images", "images", 1)) == 2
    deltas = _all_pages(server, "/api/v1/deltas", "published", 1)
    status, whole, _ = _call(server, "GET", "/api/v1/deltas?limit=500")
    assert status == 200 and deltas == whole["published"]

    for query in ("limit=0", "limit=501", "limit=x", "limit=-1", "cursor=%%%", "cursor=e30"):
        status, answer, _ = _call(server, "GET", f"/api/v1/vehicles/{vehicle.vin}/events?{query}")
        assert status == 400, (query, answer)
    status, answer, _ = _call(server, "GET", "/api/v1/images?cursor=MQ")  # an id, not a path
    assert status == 400, answer

    # the CLI reads the new shapes
    show = _uptake(
        "fleet",
        "show",
        vehicle.vin,
        "--server",
        server.url,
        "--token-file",
        str(server.config.admin_token_path),
    )
    assert show.returncode == 0, show.stderr
    assert f"latest {min(SUMMARY_ITEMS, 7)} of 7 assignment(s)" in show.stdout


# -- D: report-counter lockout ----------------------------------------------------------------


def test_report_counter_jump_is_bounded_and_an_operator_can_reset_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    key = _primary_key(vehicle)
    assert _post_manifest(server, vehicle.vin, vehicle.signed_manifest())[0] == 200
    genuine_counter = _ecu(server.vehicle(vehicle.vin), vehicle.primary)["report_counter"]
    template = vehicle.signed_manifest()  # only its content is reused, re-signed with the real key

    # a stolen key (or a bug) signs the largest counter there is: refused, and nothing changes
    status, answer = _post_manifest(server, vehicle.vin, _with_counter(template, key, 2**63 - 1))
    assert (
        status == 400 and f"jumps more than {MAX_REPORT_COUNTER_JUMP}" in answer["error"]["message"]
    )
    assert _ecu(server.vehicle(vehicle.vin), vehicle.primary)["report_counter"] == genuine_counter

    # a jump within the bound is accepted: now the genuine agent's counters are behind
    ahead = genuine_counter + MAX_REPORT_COUNTER_JUMP
    status, answer = _post_manifest(server, vehicle.vin, _with_counter(template, key, ahead))
    assert status == 200, answer
    status, answer = _post_manifest(server, vehicle.vin, vehicle.signed_manifest())
    assert status == 400 and "replayed report" in answer["error"]["message"], answer

    # the operator's recorded recovery
    reset = _uptake(
        "fleet", "reset-report-counter", vehicle.vin, "--ecu", vehicle.primary,
        "--reason", "counter pushed ahead", "--json",
        "--server", server.url, "--token-file", str(server.config.admin_token_path),
    )  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    result = json.loads(reset.stdout)
    assert result["previous_report_counter"] == ahead
    assert result["report_counter_state"] == "rebaseline"
    record = server.vehicle(vehicle.vin)
    resets = [e for e in record["security_events"] if e["kind"] == "report_counter_reset"]
    assert resets and "operator reset" in resets[-1]["detail"]
    assert "counter pushed ahead" in resets[-1]["detail"]

    # the genuine agent is accepted again, and its report is the new baseline
    status, answer = _post_manifest(server, vehicle.vin, vehicle.signed_manifest())
    assert status == 200, answer
    ecu = _ecu(server.vehicle(vehicle.vin), vehicle.primary)
    assert ecu["report_counter_state"] == "bounded" and ecu["report_counter"] < 100
    too_far = ecu["report_counter"] + MAX_REPORT_COUNTER_JUMP + 1
    status, answer = _post_manifest(server, vehicle.vin, _with_counter(template, key, too_far))
    assert status == 400 and "jumps more than" in answer["error"]["message"]


def test_first_report_counter_is_bounded_from_registration(
    server: ServerProcess, tmp_path: Path
) -> None:
    vehicle = Vehicle(tmp_path, server, secondaries=False)
    key, template = _primary_key(vehicle), vehicle.signed_manifest()
    status, _ = _post_manifest(
        server, vehicle.vin, _with_counter(template, key, MAX_REPORT_COUNTER_JUMP)
    )
    assert status == 400
    status, answer = _post_manifest(
        server, vehicle.vin, _with_counter(template, key, MAX_REPORT_COUNTER_JUMP - 1)
    )
    assert status == 200, answer


def test_reset_of_an_unknown_ecu_is_refused(shared_server: ServerProcess) -> None:
    status, answer, _ = _call(
        shared_server, "POST", "/api/v1/vehicles/NOPE/ecus/GW/report-counter/reset", {}
    )
    assert status == 404, answer
    status, answer, _ = _call(
        shared_server,
        "POST",
        "/api/v1/vehicles/NOPE/ecus/GW/report-counter/reset",
        {},
        admin=False,
    )
    assert status == 401, answer


# -- E: slow and dropped bodies ----------------------------------------------------------------

BODY_TIMEOUT = 2.0


class ImpatientServer(ServerProcess):
    """A server with short body timeouts that logs at INFO (``uptake -v``)."""

    def start(self) -> None:
        config = ServerConfig.load(self.data_dir)
        config.body_timeout = config.upload_idle_timeout = BODY_TIMEOUT
        config.save()
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uptake",
                "-v",
                "server",
                "run",
                "--data-dir",
                str(self.data_dir),
            ],
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_http(f"{self.url}/health", proc=self.proc)


@pytest.fixture
def impatient_server(tmp_path: Path) -> Iterator[ImpatientServer]:
    srv = ImpatientServer(tmp_path)
    yield srv
    srv.stop()


def _half_request(server: ServerProcess, n: int) -> bytes:
    """Headers promising a body, and half of it: a manifest, a registration or an image upload."""
    kind = n % 3
    if kind == 0:
        head = "POST /api/v1/vehicles/VIN0001/manifest HTTP/1.1\r\n"
    elif kind == 1:
        head = f"POST /api/v1/vehicles HTTP/1.1\r\nAuthorization: Bearer {server.admin.token}\r\n"
    else:
        head = (
            f"PUT /api/v1/image/uploads/{'0' * 64} HTTP/1.1\r\n"
            f"Authorization: Bearer {server.admin.token}\r\n"
        )
    length = 2000 if kind < 2 else 1_000_000
    return f"{head}Host: x\r\nContent-Length: {length}\r\n\r\n".encode() + b"{" * 1000


def test_dropped_and_stalled_bodies_cost_one_line_and_are_timed_out(
    impatient_server: ImpatientServer,
) -> None:
    server = impatient_server
    log_before = len(server.log().splitlines())
    stalled: list[tuple[socket.socket, float]] = []
    connections = 240
    for n in range(connections):
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        conn.sendall(_half_request(server, n))
        if n % 2:
            stalled.append((conn, time.monotonic()))
            continue
        if n % 4 == 0:  # some vanish with a reset rather than a close
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    slack = 4.0  # a loaded 2-core machine
    for conn, sent in stalled:
        answer = b""
        with conn:
            while True:
                conn.settimeout(max(0.1, sent + BODY_TIMEOUT + slack - time.monotonic()))
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    pytest.fail(
                        f"connection still open {BODY_TIMEOUT + slack} s after its body stalled"
                    )
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"status": 408' in answer

    time.sleep(0.5)
    wait_for_http(f"{server.url}/health")
    log = server.log()
    new_lines = log.splitlines()[log_before:]
    assert "Traceback" not in log, log[-3000:]
    # one line each in the server's log, and one each in the access log (its own stream)
    access = [line for line in new_lines if line.startswith('{"time"')]
    others = [line for line in new_lines if not line.startswith('{"time"')]
    assert len(others) <= connections, "\n".join(others[:20])
    # /health lines are the readiness probes (the fixture's may be flushed late), not the bodies
    bodies = [line for line in access if '"route":"/health"' not in line]
    assert len(bodies) <= connections, "\n".join(bodies[:20])
    assert not [p for p in (server.data_dir / "image-repo" / "uploads").glob("*") if p.is_file()]


# -- F: clear errors from the command line --------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    config = ServerConfig(tmp / "server", "127.0.0.1", free_port())
    init_server(config, tmp / "offline-keys", PASSWORD.encode(), PASSWORD.encode())
    return config.data_dir


def _assert_one_line_error(run: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], run.stderr


def test_server_run_on_a_port_in_use_says_so(data_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = _uptake("server", "run", "--data-dir", str(data_dir), "--port", str(port))
    _assert_one_line_error(run, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_server_run_on_an_address_not_on_this_host_says_so(data_dir: Path) -> None:
    # TEST-NET-3 (RFC 5737): never assigned to this host; binding fails locally, nothing is sent
    run = _uptake("server", "run", "--data-dir", str(data_dir), "--host", "203.0.113.7")
    _assert_one_line_error(run, "cannot listen on 203.0.113.7", "assign")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mysql://uptake@127.0.0.1/fleet", "is not installed"),
        ("postgresql+asyncpg://uptake@127.0.0.1/fleet", "asyncio driver"),
        ("foo://x", "unknown database 'foo'"),
        ("not a url at all", "is not a URL"),
    ],
)
def test_server_init_with_an_unusable_database_url_leaves_nothing(
    tmp_path: Path, url: str, needle: str
) -> None:
    if url.startswith("mysql") and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("a MySQL driver is installed here")
    data, offline = tmp_path / "server", tmp_path / "offline-keys"
    run = _uptake(
        "server", "init", "--data-dir", str(data), "--offline-keys-dir", str(offline),
        "--database-url", url,
    )  # fmt: skip
    _assert_one_line_error(run, needle)
    assert not data.exists() and not offline.exists()


def test_demo_without_the_server_extra_says_what_to_install() -> None:
    # as if uptake[server] were not installed: importing aiohttp fails
    script = (
        "import sys; sys.modules['aiohttp'] = None; "
        "sys.argv = ['uptake', 'demo']; "
        "from uptake.cli import main; main()"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _assert_one_line_error(run, "aiohttp", "pip install 'uptake[server")


@pytest.mark.parametrize("value", [-1, 513, 1.5, True, "64"])
def test_delta_recompress_memory_setting_is_checked(tmp_path: Path, value: object) -> None:
    config = ServerConfig(tmp_path, "127.0.0.1", 8443)
    config.save()
    ServerConfig.load(tmp_path)  # the default is valid
    raw = json.loads((tmp_path / "server.json").read_bytes())
    raw["delta_max_recompress_mib"] = value
    (tmp_path / "server.json").write_text(json.dumps(raw))
    with pytest.raises(
        ConfigError, match="delta_max_recompress_mib must be an integer from 0 to 512"
    ):
        ServerConfig.load(tmp_path)


@pytest.mark.parametrize("value", [0, 65, -1, "4", 2.5, True, None])
def test_vehicle_thread_count_is_checked(tmp_path: Path, value: object) -> None:
    config = ServerConfig(tmp_path, "127.0.0.1", 8443)
    config.save()
    assert ServerConfig.load(tmp_path).vehicle_db_threads == 4  # the default is valid
    raw = json.loads((tmp_path / "server.json").read_bytes())
    raw["vehicle_db_threads"] = value
    (tmp_path / "server.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="vehicle_db_threads must be an integer from 1 to 64"):
        ServerConfig.load(tmp_path)


def test_vehicle_threads_must_fit_the_connection_pool(tmp_path: Path) -> None:
    config = ServerConfig(tmp_path, "127.0.0.1", 8443)
    config.vehicle_db_threads, config.database_pool_size, config.database_max_overflow = 9, 10, 10
    config.save()
    with pytest.raises(ConfigError, match=r"at least 21 \(now 20\)"):
        ServerConfig.load(tmp_path)
    config.database_max_overflow = 11  # one more connection: every thread may hold one
    config.save()
    assert ServerConfig.load(tmp_path).vehicle_db_threads == 9
