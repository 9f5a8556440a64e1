"""TLS terminated by a real nginx in front of the server (deploy/nginx/uptake.conf.template).

nginx (Debian's) terminates TLS and verifies vehicles' client certificates against the
server's device CA; ``uptake server run`` listens on loopback with ``vehicle_identity =
"proxy"`` and believes the certificate nginx passes only from its trusted proxy address. An
agent updates end to end through nginx; a certificate header sent to nginx by a client, or
straight to the server from an address that is not the proxy, is not believed.

nginx serves the image repository's metadata and images itself, from the server's files
(deploy/nginx/uptake-image-repository.conf.template), in the TLS server and in a second,
plain-HTTP server standing for a CDN origin; an agent configured with that origin as its
``image_repository_url`` installs an image the Python server never served.
"""

from __future__ import annotations

import datetime
import json
import shutil
import signal
import socket
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import urllib3
from cryptography.hazmat.primitives import serialization

from client.config import AgentConfigError, load_config
from server.certificates import CertificateAuthority, server_certificate
from tests.uptake_fixtures import (
    PASSWORD,
    ServerProcess,
    Vehicle,
    edit_config,
    free_port,
    sample,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "nginx"
TEMPLATE = DEPLOY / "uptake.conf.template"
IMAGE_TEMPLATE = DEPLOY / "uptake-image-repository.conf.template"


@dataclass
class Proxied:
    server: ServerProcess
    url: str
    ca_cert: Path
    #: a plain-HTTP nginx server with only the image repository's static locations
    image_origin_url: str
    #: nginx's access log: "PORT METHOD URI STATUS BYTES" per line
    access_log: Path


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError("nginx did not listen")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (apt-get install nginx; .ci/run installs it)"
    tmp = tmp_path_factory.mktemp("nginx")
    server = ServerProcess(
        tmp, vehicle_identity="proxy", trusted_proxies=["127.0.0.1/32"], plain_http=True
    )
    try:
        yield from _behind_nginx(nginx, tmp, server)
    finally:
        server.stop()


def _behind_nginx(nginx: str, tmp: Path, server: ServerProcess) -> Iterator[Proxied]:
    # the TLS nginx serves: a CA of the operator's and a certificate for 127.0.0.1
    ca = CertificateAuthority.generate("operator's server CA")
    cert, key = server_certificate(ca, ["127.0.0.1"], datetime.timedelta(days=1))
    (tmp / "ca.crt").write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    (tmp / "passwords").write_text(PASSWORD + "\n")
    port, origin_port = free_port(), free_port()
    image_locations = string.Template(IMAGE_TEMPLATE.read_text()).safe_substitute(
        UPTAKE_IMAGE_DIR=server.config.image_dir
    )
    assert "${UPTAKE_" not in image_locations.split("location", 1)[1]
    (tmp / "image-locations.conf").write_text(image_locations)
    site = string.Template(TEMPLATE.read_text()).safe_substitute(
        UPTAKE_LISTEN=f"127.0.0.1:{port}",
        UPTAKE_SERVER_NAME="127.0.0.1",
        UPTAKE_TLS_CERT=tmp / "server.crt",
        UPTAKE_TLS_KEY=tmp / "server.key",
        UPTAKE_TLS_PASSWORDS=tmp / "passwords",
        UPTAKE_CLIENT_CA=server.config.device_ca_cert,
        UPTAKE_UPSTREAM=f"127.0.0.1:{server.port}",
        UPTAKE_IMAGE_LOCATIONS=tmp / "image-locations.conf",
    )
    assert "${UPTAKE_" not in site.split("upstream", 1)[1], "a variable of the template unfilled"
    (tmp / "uptake.conf").write_text(site)
    log = tmp / "nginx.log"
    (tmp / "nginx.conf").write_text(
        f"""daemon off; user root; worker_processes 1; pid {tmp}/nginx.pid;
error_log {log} info;
events {{ worker_connections 256; }}
http {{
    log_format uptake '$server_port $request_method $uri $status $body_bytes_sent';
    access_log {tmp}/access.log uptake;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    include {tmp}/uptake.conf;
    server {{ listen 127.0.0.1:{origin_port}; include {tmp}/image-locations.conf; }}
}}
"""
    )
    proc = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
    try:
        _wait_for_port(port, proc, log)
        yield Proxied(
            server, f"https://127.0.0.1:{port}", tmp / "ca.crt",
            f"http://127.0.0.1:{origin_port}", tmp / "access.log",
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(10)


def test_a_vehicle_updates_through_nginx(proxied: Proxied, tmp_path: Path) -> None:
    vehicle = Vehicle(
        tmp_path, proxied.server, vin="VINNGINX", server_url=proxied.url,
        secondaries=False, ca_cert=proxied.ca_cert,
    )  # fmt: skip
    image = proxied.server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    proxied.server.assign(vehicle.vin, vehicle.primary, image.filepath)
    run = vehicle.run_once()
    assert run.report["outcomes"][vehicle.primary]["result"] == "installed", run.report
    assert run.report["manifest"] == "accepted" and run.returncode == 0


def _served_by_python(server: ServerProcess) -> list[str]:
    """The routes of the server's access log lines (uptake.access)."""
    return [
        json.loads(line)["route"]
        for line in server.log().splitlines()
        if line.startswith('{"time"')
    ]


def test_the_image_repository_is_static_files_behind_nginx(
    proxied: Proxied, tmp_path: Path
) -> None:
    vehicle = Vehicle(
        tmp_path, proxied.server, vin="VINSTATIC", server_url=proxied.url,
        secondaries=False, ca_cert=proxied.ca_cert,
    )  # fmt: skip
    # the director through nginx's TLS server, the image repository from the static origin
    edit_config(vehicle.config_path, {"agent": {"image_repository_url": proxied.image_origin_url}})
    image = proxied.server.publish(sample("rpi-gateway", "1.1.0"), "rpi-gateway", "1.1.0")
    proxied.server.assign(vehicle.vin, vehicle.primary, image.filepath)
    served_before = len(_served_by_python(proxied.server))
    run = vehicle.run_once()
    assert run.report["outcomes"][vehicle.primary]["result"] == "installed", run.report
    assert run.report["manifest"] == "accepted" and run.returncode == 0

    origin = proxied.image_origin_url.rsplit(":", 1)[1]
    fetched = [
        line.split()
        for line in proxied.access_log.read_text().splitlines()
        if line.startswith(origin + " ")
    ]
    uris = {(uri, status) for _, _, uri, status, _ in fetched}
    assert ("/image/metadata/timestamp.json", "200") in uris
    assert any(u.endswith(".snapshot.json") and s == "200" for u, s in uris)
    assert any(u.endswith(".targets.json") and s == "200" for u, s in uris)
    digest = image.sha256
    assert any(
        u.startswith("/image/targets/") and s in ("200", "206") and digest in u for u, s in uris
    ), uris
    # the Python server served the director and the manifest, and no image repository file
    routes = _served_by_python(proxied.server)[served_before:]
    assert "/director/{vin}/metadata/{file}" in routes
    assert not [r for r in routes if r.startswith("/image/")], routes

    # the image repository's URL is held to the same rules as the server's
    for url, refusal in (
        ("http://192.0.2.10:8080", "image_repository_url: plain http:// to a host"),
        ("ftp://127.0.0.1/", "image_repository_url: must start with http:// or https://"),
    ):
        edit_config(vehicle.config_path, {"agent": {"image_repository_url": url}})
        with pytest.raises(AgentConfigError, match=refusal):
            load_config(vehicle.config_path)


def test_static_files_have_the_cache_headers_of_consistent_snapshots(proxied: Proxied) -> None:
    http = urllib3.PoolManager(ca_certs=str(proxied.ca_cert), retries=False, timeout=10.0)
    timestamp = http.request("GET", proxied.url + "/image/metadata/timestamp.json")
    assert timestamp.status == 200 and timestamp.headers["Cache-Control"] == "no-cache"
    assert timestamp.headers["Content-Type"] == "application/json"
    root = http.request("GET", proxied.url + "/image/metadata/1.root.json")
    assert root.status == 200 and "immutable" in root.headers["Cache-Control"]
    absent = http.request("GET", proxied.url + "/image/metadata/99.root.json")
    assert absent.status == 404 and "Cache-Control" not in absent.headers
    # the server's temporary files and anything outside the repository are not served
    assert http.request("GET", proxied.url + "/image/metadata/.timestamp.json.x.tmp").status == 404
    assert http.request("GET", proxied.url + "/image/metadata/../../server.json").status in (
        400,
        404,
    )


def test_identity_headers_are_believed_only_from_the_proxy(
    proxied: Proxied, tmp_path: Path
) -> None:
    vehicle = Vehicle(
        tmp_path, proxied.server, vin="VINHEADER", server_url=proxied.url,
        secondaries=False, ca_cert=proxied.ca_cert,
    )  # fmt: skip
    pem = (vehicle.state_dir / "tls" / "client.crt").read_text()
    forged = {"X-Client-Verify": "SUCCESS", "X-Client-Cert": quote(pem)}
    path = f"/director/{vehicle.vin}/metadata/timestamp.json"
    # through nginx without a certificate: nginx replaces the client's headers
    through = urllib3.PoolManager(ca_certs=str(proxied.ca_cert), retries=False, timeout=10.0)
    assert through.request("GET", proxied.url + path, headers=forged).status == 403
    # straight to the server from 127.0.0.2, not a trusted proxy: ignored
    direct = urllib3.HTTPConnectionPool(
        "127.0.0.1", proxied.server.port, source_address=("127.0.0.2", 0), retries=False
    )
    assert direct.request("GET", path, headers=forged).status == 403
    # through nginx with the vehicle's certificate: believed
    with_cert = urllib3.PoolManager(
        ca_certs=str(proxied.ca_cert), retries=False, timeout=10.0,
        cert_file=str(vehicle.state_dir / "tls" / "client.crt"),
        key_file=str(vehicle.state_dir / "tls" / "client.key"), key_password=PASSWORD,
    )  # fmt: skip
    assert with_cert.request("GET", proxied.url + path).status == 200
    # and another vehicle's certificate through nginx gets the same 403 as nobody
    assert (
        with_cert.request("GET", proxied.url + "/director/VIN-OTHER/metadata/timestamp.json").status
        == 403
    )


def test_the_dashboard_login_passes_its_origin_check_through_nginx_on_any_port(
    proxied: Proxied,
) -> None:
    """nginx forwards the Host with its port ($http_host), so a browser's Origin (with the
    port, as here: nginx listens on a random port, not 443) matches the server's Host."""
    http = urllib3.PoolManager(ca_certs=str(proxied.ca_cert), retries=False, timeout=10.0)
    resp = http.request(
        "POST",
        proxied.url + "/dashboard/login",
        body="method=token&token=not-a-token&login_csrf=x",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": "uptake_login_csrf=x",
            "Origin": proxied.url,
            "Sec-Fetch-Site": "same-origin",
        },
    )
    # past the Origin check (403 "CSRF check failed") to the token: unknown
    assert resp.status == 401, resp.data[:300]
