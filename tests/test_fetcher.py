"""ResumableFetcher against a real HTTP server on 127.0.0.1.

The server (http.server in a thread) serves files with Range/If-Range
support and can be told, per test, to cut the connection after some bytes,
to ignore Range, to trickle, to answer with an error status, or to send more
than the length the client allows. It records every request's Range and
If-Range headers, which is what the resume assertions look at.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client.fetcher import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    FetcherConfig,
    ResumableFetcher,
    SlowRetrievalError,
)

# Fast retries so the default test run stays short.
FAST = FetcherConfig(
    connect_timeout=2.0,
    read_timeout=2.0,
    backoff_initial=0.01,
    backoff_max=0.05,
    min_rate=0,
)


@dataclass
class Request:
    path: str
    range: str | None
    if_range: str | None
    user_agent: str | None


@dataclass
class Behaviour:
    """What the server does; lists are consumed one entry per request."""

    cut_after: list[int] = field(default_factory=list)  # absolute byte offsets
    statuses: list[int] = field(default_factory=list)  # error statuses to answer first
    ignore_range: bool = False
    trickle_rate: float | None = None  # bytes per second
    endless: bool = False  # no Content-Length, data until the client hangs up
    declared_length: int | None = None  # lie about Content-Length (and send that much)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    behaviour: Behaviour
    requests: list[Request]
    body_bytes_sent: int

    def handle_error(self, request: object, client_address: object) -> None:
        # The client hanging up on a body it refuses is the point of some tests.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def etag(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append(
            Request(
                self.path,
                self.headers.get("Range"),
                self.headers.get("If-Range"),
                self.headers.get("User-Agent"),
            )
        )
        behaviour = srv.behaviour
        if behaviour.statuses:
            status = behaviour.statuses.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        data = srv.files[self.path]
        etag = srv.etag(self.path)
        if behaviour.endless:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._send(b"x" * 1_000_000_000, None)
            return
        start = 0
        byte_range = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if byte_range and not behaviour.ignore_range and (if_range is None or if_range == etag):
            start = int(byte_range.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if behaviour.declared_length is not None:
            body = (data * (behaviour.declared_length // max(len(data), 1) + 1))[
                : behaviour.declared_length
            ]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = behaviour.cut_after.pop(0) if behaviour.cut_after else None
        self._send(body, None if cut is None else max(cut - start, 0))

    def _send(self, body: bytes, cut: int | None) -> None:
        """Send ``body``, or only its first ``cut`` bytes and then hang up."""
        rate = self.server.behaviour.trickle_rate
        piece = 64 * 1024 if rate is None else max(1, int(rate / 20))
        end = len(body) if cut is None else min(cut, len(body))
        try:
            for i in range(0, end, piece):
                chunk = body[i : min(i + piece, end)]
                self.wfile.write(chunk)
                self.server.body_bytes_sent += len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer(("127.0.0.1", 0), Handler)
    srv.files = {}
    srv.behaviour = Behaviour()
    srv.requests = []
    srv.body_bytes_sent = 0
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def url(srv: FileServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def payload(size: int) -> bytes:
    return os.urandom(size)


def test_plain_download(server: FileServer) -> None:
    data = server.files["/meta.json"] = payload(3000)
    fetcher = ResumableFetcher(FetcherConfig(user_agent="uptake-test/1"))
    assert fetcher.download_bytes(url(server, "/meta.json"), 3000) == data
    assert b"".join(fetcher.fetch(url(server, "/meta.json"))) == data
    assert [r.range for r in server.requests] == [None, None]
    assert server.requests[0].user_agent == "uptake-test/1"


def test_cut_at_half_resumes_with_range(server: FileServer) -> None:
    size = 1_000_000
    data = server.files["/image.bin"] = payload(size)
    server.behaviour.cut_after = [size // 2]

    assert ResumableFetcher(FAST).download_bytes(url(server, "/image.bin"), size) == data

    first, second = server.requests
    assert first.range is None
    assert second.range is not None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0.4 * size <= resumed_at <= 0.5 * size
    assert second.if_range == server.etag("/image.bin")


def test_stream_resumes_too(server: FileServer) -> None:
    data = server.files["/f"] = payload(200_000)
    server.behaviour.cut_after = [50_000, 120_000]
    assert b"".join(ResumableFetcher(FAST).fetch(url(server, "/f"))) == data
    assert [r.range is not None for r in server.requests] == [False, True, True]


def test_server_ignoring_range_restarts_cleanly(server: FileServer) -> None:
    size = 300_000
    data = server.files["/f"] = payload(size)
    server.behaviour.cut_after = [size // 2]
    server.behaviour.ignore_range = True

    assert ResumableFetcher(FAST).download_bytes(url(server, "/f"), size) == data
    assert server.requests[1].range is not None  # asked for the rest, got 200 and all

    # A stream cannot take back what it yielded: it says so instead.
    server.behaviour.cut_after = [size // 2]
    with pytest.raises(DownloadError, match="restarted the file mid-stream"):
        b"".join(ResumableFetcher(FAST).fetch(url(server, "/f")))


def test_changed_file_is_fetched_whole_again(server: FileServer, tmp_path: Path) -> None:
    size = 200_000
    server.files["/f"] = payload(size)
    server.behaviour.cut_after = [size // 2]
    partial = tmp_path / "f.part"
    with pytest.raises(DownloadError, match="gave up after 1 attempts"):
        ResumableFetcher(FetcherConfig(max_total_attempts=1, min_rate=0)).download_to(
            url(server, "/f"), partial, size
        )
    assert partial.stat().st_size == size // 2

    new = server.files["/f"] = payload(size)  # new content, new ETag
    assert ResumableFetcher(FAST).download_to(url(server, "/f"), partial, size) == size
    assert partial.read_bytes() == new
    assert server.requests[-1].if_range is not None  # If-Range did its job: 200, whole file


def test_agent_restart_continues_the_partial_file(server: FileServer, tmp_path: Path) -> None:
    size = 2_000_000
    data = server.files["/image.bin"] = payload(size)
    server.behaviour.cut_after = [size * 6 // 10]
    partial = tmp_path / "image.bin.part"

    # The agent dies (here: gives up) with 60 % on disk ...
    with pytest.raises(DownloadError):
        ResumableFetcher(FetcherConfig(max_total_attempts=1, min_rate=0)).download_to(
            url(server, "/image.bin"), partial, size
        )
    held = partial.stat().st_size
    assert 0 < held <= size * 6 // 10
    assert (tmp_path / "image.bin.part.resume").exists()

    # ... and a new agent process (new fetcher) continues from there.
    server.requests.clear()
    assert ResumableFetcher(FAST).download_to(url(server, "/image.bin"), partial, size) == size
    assert partial.read_bytes() == data
    assert [(r.range, r.if_range) for r in server.requests] == [
        (f"bytes={held}-", server.etag("/image.bin"))
    ]
    assert not (tmp_path / "image.bin.part.resume").exists()

    # A complete file is not downloaded again.
    server.requests.clear()
    assert ResumableFetcher(FAST).download_to(url(server, "/image.bin"), partial, size) == size
    assert server.requests == []


def test_partial_of_another_url_starts_over(server: FileServer, tmp_path: Path) -> None:
    server.files["/old"] = payload(100_000)
    new = server.files["/new"] = payload(100_000)
    server.behaviour.cut_after = [30_000]
    partial = tmp_path / "slot.part"
    with pytest.raises(DownloadError):
        ResumableFetcher(FetcherConfig(max_total_attempts=1, min_rate=0)).download_to(
            url(server, "/old"), partial, 100_000
        )
    server.requests.clear()
    ResumableFetcher(FAST).download_to(url(server, "/new"), partial, 100_000)
    assert partial.read_bytes() == new
    assert server.requests[0].range is None


def test_trickle_below_min_rate_aborts(server: FileServer) -> None:
    server.files["/f"] = payload(100_000)
    server.behaviour.trickle_rate = 2_000  # bytes/s
    fetcher = ResumableFetcher(
        FetcherConfig(min_rate=20_000, rate_window=1.0, read_timeout=5.0, max_attempts=1)
    )
    started = time.monotonic()
    with pytest.raises(SlowRetrievalError, match=r"bytes/s over the last .* below the minimum"):
        fetcher.download_bytes(url(server, "/f"), 100_000)
    # Bounded: one window plus a read, far below the 50 s the trickle would take.
    assert time.monotonic() - started < 10
    assert server.body_bytes_sent < 20_000


def test_over_long_body_is_refused(server: FileServer) -> None:
    server.files["/f"] = payload(10_000)
    fetcher = ResumableFetcher(FAST)
    # Announced too long: refused before reading the body.
    server.behaviour.declared_length = 50_000_000
    with pytest.raises(DownloadLengthMismatchError, match="announces 50000000 bytes"):
        fetcher.download_bytes(url(server, "/f"), 10_000)
    # Endless body without a length: refused as soon as it passes max_length.
    server.behaviour.declared_length = None
    server.behaviour.endless = True
    with pytest.raises(DownloadLengthMismatchError, match="more than the maximum"):
        fetcher.download_bytes(url(server, "/f"), 10_000)
    # Correctly announced, but longer than the signed metadata allows.
    server.behaviour.endless = False
    with pytest.raises(DownloadLengthMismatchError):
        fetcher.download_bytes(url(server, "/f"), 9_999)


def test_http_errors(server: FileServer) -> None:
    fetcher = ResumableFetcher(FAST)
    with pytest.raises(DownloadHTTPError) as info:
        fetcher.download_bytes(url(server, "/missing"), 100)
    assert info.value.status_code == 404
    assert len(server.requests) == 1  # final at once: TUF relies on a prompt 404

    data = server.files["/f"] = payload(1000)
    server.requests.clear()
    server.behaviour.statuses = [503, 502]
    assert fetcher.download_bytes(url(server, "/f"), 1000) == data
    assert len(server.requests) == 3

    server.behaviour.statuses = [503] * 10
    with pytest.raises(DownloadHTTPError, match="gave up after 5 attempts") as info:
        fetcher.download_bytes(url(server, "/f"), 1000)
    assert info.value.status_code == 503


def test_attempts_without_progress_are_bounded(server: FileServer) -> None:
    server.files["/f"] = payload(1000)
    server.behaviour.cut_after = [0] * 10
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        ResumableFetcher(
            FetcherConfig(max_attempts=3, backoff_initial=0.01, min_rate=0)
        ).download_bytes(url(server, "/f"), 1000)
    assert len(server.requests) == 3


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    fetcher = ResumableFetcher(FetcherConfig(max_attempts=2, backoff_initial=0.01))
    with pytest.raises(DownloadError, match=r"gave up after 2 attempts .*cannot connect"):
        fetcher.download_bytes(f"http://127.0.0.1:{port}/f", 10)


def test_bandwidth_cap_holds(server: FileServer) -> None:
    size = 300_000
    data = server.files["/f"] = payload(size)
    fetcher = ResumableFetcher(FetcherConfig(max_rate=600_000, min_rate=0))
    started = time.monotonic()
    assert fetcher.download_bytes(url(server, "/f"), size) == data
    # Lower bound only (a slow machine can't break it): 300 kB at 600 kB/s.
    assert time.monotonic() - started >= 0.4


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_rate"):
        FetcherConfig(min_rate=1000, max_rate=10)
    with pytest.raises(ValueError, match="jitter"):
        FetcherConfig(jitter=2)
    config = FetcherConfig(backoff_initial=1, backoff_multiplier=2, backoff_max=5, jitter=0)
    assert [config.backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
