"""Endless data: nothing a vehicle or the server reads may be longer than allowed.

Vehicle side (through the proxy): an image followed by data that never ends,
or longer than its signed length; image repository metadata that never
ends; director metadata larger than any the agent accepts. TUF reads at most
the signed length of a target (and a fixed maximum for metadata whose length
is not signed), so each download is cut off and refused, never filling the
disk or hanging the agent.

Server side: a manifest larger than 1 MiB, declared or streamed without a
length, is refused with 413 after reading at most 1 MiB.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import urllib3

from tests.attacks.deployment import GATEWAY, Deployment
from tests.malicious_proxy import endless, padded
from tests.uptake_fixtures import ServerProcess

TARGETS_MAX_LENGTH = 5_000_000  # tuf.ngclient.UpdaterConfig default: the agent's ceiling


@pytest.mark.parametrize(
    "what",
    [
        "endless image",
        "image longer than signed",
        "endless image metadata",
        "oversized director metadata",
    ],
)
def test_endless_data_is_cut_off_and_refused(deployment: Deployment, what: str) -> None:
    d = deployment
    new = d.publish(GATEWAY, "1.1.0")
    if what == "endless image":
        d.proxy.streams.append(endless(lambda path: path.startswith("/image/targets/")))
    elif what == "image longer than signed":
        d.proxy.rewrites.append(
            padded(lambda path: path.startswith("/image/targets/"), 1024 * 1024, b"\x90")
        )
    elif what == "endless image metadata":
        d.proxy.streams.append(endless(lambda path: path == "/image/metadata/timestamp.json"))
    else:
        prefix = d.director_path()
        d.proxy.rewrites.append(
            padded(
                lambda path: path.startswith(prefix) and path.endswith(".targets.json"),
                TARGETS_MAX_LENGTH,
            )
        )
    d.server.assign(d.vehicle.vin, d.vehicle.primary, new.filepath)
    d.assert_refused(d.attack(), "DownloadLengthMismatchError")
    # the disk never holds more than the signed length (a partial download may stay, to resume)
    leftovers = [
        p for p in d.vehicle.state_dir.rglob("*") if p.is_file() and "slots" not in p.parts
    ]
    assert max(p.stat().st_size for p in leftovers) <= TARGETS_MAX_LENGTH
    assert all(p.stat().st_size <= new.length for p in leftovers if "downloads" in p.parts)


def _post(
    server: ServerProcess, body: bytes | Iterator[bytes], chunked: bool
) -> tuple[int, dict[str, object]]:
    http = urllib3.PoolManager(retries=False, timeout=30.0)
    try:
        resp = http.request(
            "POST",
            f"{server.url}/api/v1/vehicles/VIN0001/manifest",
            body=body,
            headers={"Content-Type": "application/json"},
            chunked=chunked,
        )
    except urllib3.exceptions.ProtocolError:
        pytest.fail("the server dropped the connection instead of answering 413")
    return resp.status, json.loads(resp.data)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared length", "streamed"])
def test_oversized_manifest_is_refused_by_server(
    shared_server: ServerProcess, chunked: bool
) -> None:
    big = b'{"signatures": [], "signed": {"pad": "' + b"A" * (2 * 1024 * 1024) + b'"}}'

    def stream() -> Iterator[bytes]:
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    status, body = _post(shared_server, stream() if chunked else big, chunked)
    assert status == 413, body
    assert "larger than" in body["error"]["message"]  # type: ignore[index]
    assert "Traceback" not in shared_server.log()


def test_genuine_manifest_arriving_in_pieces_is_read_whole(deployment: Deployment) -> None:
    # the size limit must not cut a legitimate body that arrives slowly, in many small chunks

    body = deployment.vehicle.signed_manifest()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 512):
            time.sleep(0.01)
            yield body[i : i + 512]

    status, answer = _post(deployment.server, pieces(), chunked=True)
    assert status == 200, answer
