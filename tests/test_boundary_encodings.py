"""Bodies that cannot be decoded answer 400 JSON, never 500 (attacker review F6).

A real ``uptake server run`` and raw HTTP over a socket (no client library
that would fix the request up): a ``Content-Encoding`` the body does not follow,
truncated or corrupt gzip and deflate, chunked bodies whose content cannot be
decoded, on JSON routes, the streaming manifest route and the streaming image
upload; a deflate bomb stops at the body limit (413). What aiohttp's own parser refuses (a
bad request line, bad chunked framing, a small undecodable body that arrives with its headers)
is answered in the same JSON. No answer is a 500 and the log shows no traceback.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib

import pytest

from tests.uptake_fixtures import ServerProcess

GZIP_JSON = gzip.compress(b'{"vin": "VINX"}')
#: 50 MiB of JSON whitespace in about 50 KB of deflate
DEFLATE_BOMB = zlib.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", 9)


def _raw(server: ServerProcess, method: str, path: str, headers: dict[str, str],
         body: bytes, *, chunked: bool = False) -> tuple[int, str, bytes]:  # fmt: skip
    """Status, content type and body of the answer to one hand-made request."""
    token = server.config.admin_token_path.read_text().strip()
    head = {"Host": "127.0.0.1", "Authorization": f"Bearer {token}", "Connection": "close",
            **headers}  # fmt: skip
    if chunked:
        head["Transfer-Encoding"] = "chunked"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        head["Content-Length"] = str(len(body))
    request = f"{method} {path} HTTP/1.1\r\n".encode()
    request += "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    header, _, content = answer.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields.get("Content-Type", ""), content


UNDECODABLE = [
    ("gzip", b"this is not gzip"),
    ("deflate", b"this is not deflate"),
    ("gzip", GZIP_JSON[:-12]),  # truncated: no trailer
    ("gzip", GZIP_JSON[:12] + b"\xff" * 8 + GZIP_JSON[20:]),  # corrupt in the middle
]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(("encoding", "body"), UNDECODABLE)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/vehicles"), ("POST", "/api/v1/vehicles/VINX/manifest"),
     ("PUT", "/api/v1/image/uploads/" + "0" * 64)],
)  # fmt: skip
def test_an_undecodable_body_answers_400_json(
    shared_server: ServerProcess, method: str, path: str, encoding: str, body: bytes,
    chunked: bool,
) -> None:  # fmt: skip
    status, content_type, content = _raw(
        shared_server, method, path, {"Content-Encoding": encoding}, body, chunked=chunked
    )
    assert 400 <= status < 500, (status, content)
    assert content_type.startswith("application/json"), content
    assert json.loads(content)["error"]["status"] == status
    assert "Traceback" not in shared_server.log()
    uploads = shared_server.config.image_dir / "uploads"
    assert not uploads.is_dir() or not any(uploads.iterdir()), "a half-written upload"


def test_a_deflate_bomb_stops_at_the_body_limit(shared_server: ServerProcess) -> None:
    status, _, content = _raw(
        shared_server, "POST", "/api/v1/vehicles", {"Content-Encoding": "deflate"}, DEFLATE_BOMB
    )
    assert status == 413, content
    assert "larger than" in json.loads(content)["error"]["message"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /api/v1/vehicles HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\nzz\r\n",
        b"POST /api/v1/vehicles HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
        b"Content-Length: 2\r\n\r\n[]",
        b"POST /api/v1/vehicles HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\n"
        b"Content-Length: 2\r\n\r\n[]",
    ],
)
def test_what_the_http_parser_refuses_is_answered_in_json(
    shared_server: ServerProcess, request_bytes: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=30) as conn:
        conn.sendall(request_bytes)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    header, _, content = answer.partition(b"\r\n\r\n")
    assert header.split(b"\r\n")[0].split()[1] == b"400", answer
    assert b"application/json" in header, answer
    assert json.loads(content)["error"]["message"].startswith("malformed request"), content
    assert "Traceback" not in shared_server.log()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_ends_truncated_after_its_headers_answers_400_at_once(
    shared_server: ServerProcess, encoding: str
) -> None:
    """The body arrives after the handler started reading it, and fails to decode at its end."""
    whole = GZIP_JSON if encoding == "gzip" else zlib.compress(b'{"reason": "xxxxxxxxxxxxx"}')
    body = whole[: len(whole) // 2]
    token = shared_server.config.admin_token_path.read_text().strip()
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as conn:
        conn.sendall(
            f"POST /api/v1/vehicles/VINX/revoke HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Encoding: {encoding}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        time.sleep(0.3)  # the handler is reading the body by now
        conn.sendall(body)
        answer = conn.recv(65536)  # not the 408 of the body deadline, 60 s later
    header, _, content = answer.partition(b"\r\n\r\n")
    assert header.split(b"\r\n")[0].split()[1] == b"400", answer
    assert json.loads(content)["error"]["status"] == 400


@pytest.mark.parametrize(
    ("path", "status"),
    [("/dashboard", 303), ("/dashboard/audit", 200), ("/api/v1/releases", 200), ("/nope", 404)],
)
def test_an_answer_that_leaves_a_body_unread_closes_the_connection(
    shared_server: ServerProcess, path: str, status: int
) -> None:
    """Returned or raised (a redirect), the answer says so: a client must not reuse it.

    Found by the HTTP fuzzer: the dashboard's redirect left an undecodable body unread
    without ``Connection: close``; aiohttp then dropped the connection while draining it,
    and the client's next request on it found it gone.
    """
    token = shared_server.config.admin_token_path.read_text().strip()
    body = b"this is not gzip"
    with socket.create_connection(("127.0.0.1", shared_server.port), timeout=10) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
    lines = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert int(lines[0].split()[1]) == status, answer
    assert fields.get("connection", "").lower() == "close", answer
