"""Downloads for the agent: metadata and images over HTTP(S), resumable and bounded.

:class:`ResumableFetcher` is the one HTTP client of the agent. It is a
python-tuf :class:`~tuf.ngclient.FetcherInterface`, so both
``tuf.ngclient.Updater`` instances (director and image repository) download
metadata and targets through it; it adds :meth:`ResumableFetcher.download_to`
for large images that must survive an agent restart, and
:meth:`ResumableFetcher.post` for the vehicle manifest, so every request the
agent makes shares one connection pool, one set of timeouts and one TLS setup.

One download runs like this:

1. ``GET`` the URL. When ``N`` bytes are already held, ask for the rest with
   ``Range: bytes=N-`` and, when the first response carried a strong
   ``ETag`` (else a ``Last-Modified``), ``If-Range`` with it so a changed file
   comes back whole instead of as a spliced tail.
2. ``206 Partial Content`` starting at ``N``: append. ``200 OK``: the server
   ignored the range or the file changed; start again from byte 0.
   ``416`` for a file already complete: done.
3. While streaming, never accept more than ``max_length`` bytes (the length
   the signed metadata allows: an endless-data attack ends with
   ``DownloadLengthMismatchError``); hold the optional bandwidth cap; and
   abort with ``SlowRetrievalError`` when the average rate over the last
   ``rate_window`` seconds falls below ``min_rate`` (a slow-retrieval
   attack, or a link too poor to finish).
4. A connection reset, a timeout, a truncated body or a 5xx answer is
   transient: wait (exponential backoff with jitter) and go back to 1, from
   the byte already received. ``max_attempts`` consecutive attempts that
   bring no new byte, or ``max_total_attempts`` in all, end the download
   with ``DownloadError``. Other HTTP errors (404, 403, ...) are final at
   once: the TUF client relies on a prompt 404 to stop looking for new
   root versions.

Redirects are followed (at most five) only within the origin (scheme, host
and port) of the URL asked for: a redirect to another origin ends the
download with :class:`CrossOriginRedirectError`, so neither a compromised
CDN nor a network attacker can send the vehicle's requests elsewhere.

Every error is a ``tuf.api.exceptions.DownloadError`` subclass naming the
URL. Nothing here verifies content: hashes and lengths from signed metadata
are checked by the caller (``Updater`` for TUF downloads, the agent for
:meth:`ResumableFetcher.download_to`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import urljoin

import msgspec
import urllib3
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    SlowRetrievalError,
)
from tuf.ngclient.fetcher import FetcherInterface

from signing.atomic_file import write_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CrossOriginRedirectError",
    "DownloadError",
    "DownloadHTTPError",
    "DownloadLengthMismatchError",
    "FetcherConfig",
    "HTTPAnswer",
    "HTTPConnectionError",
    "HTTPStatusError",
    "ResumableFetcher",
    "SlowRetrievalError",
    "TLSError",
]

# Server-side trouble worth waiting out; any other 4xx/5xx is final.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class HTTPStatusError(DownloadHTTPError):
    """The server answered an HTTP error status for ``url`` (after retries for 5xx)."""

    def __init__(self, message: str, status_code: int, url: str) -> None:
        super().__init__(message, status_code)
        self.url = url


class TLSError(DownloadError):
    """The TLS handshake failed: the server's certificate does not verify with the configured
    CA (a wrong ``ca_certs``, or someone in the middle), or it refused the client's."""


class CrossOriginRedirectError(DownloadError):
    """The server redirected to another origin (scheme, host, port), which the agent refuses."""


class HTTPConnectionError(DownloadError):
    """A request could not be sent, or its answer not read (network, TLS, server gone)."""


@dataclass(frozen=True)
class HTTPAnswer:
    """A server's answer to :meth:`ResumableFetcher.post`: its status and (bounded) body."""

    status: int
    body: bytes


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib3.util.parse_url(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme or "")
    return (parts.scheme or "").lower(), (parts.host or "").lower(), parts.port or default_port


class FetcherConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the agent downloads (``[download]`` of the agent configuration).

    The defaults suit a vehicle on a cellular link; this class is the schema
    of the ``[download]`` table too, so the file and the code share them.

    Attributes:
        connect_timeout: Seconds to establish a connection (per attempt).
        read_timeout: Longest silence, in seconds, between two reads of the
            same response before the attempt counts as failed (and resumes).
        max_attempts: Consecutive attempts that bring no new byte before
            giving up. An attempt that makes progress resets the count.
        max_total_attempts: Attempts in all for one download, progress or not.
        backoff_initial: Seconds to wait before the first retry.
        backoff_multiplier: Each consecutive failure multiplies the wait.
        backoff_max: Upper bound of one wait, in seconds.
        jitter: Fraction of each wait drawn at random (0: none, 1: anywhere
            between 0 and the full wait), so a fleet that lost the server at
            the same moment does not come back in lockstep.
        min_rate: Slowest acceptable average, in bytes per second, over
            ``rate_window``; below it the download aborts with
            ``SlowRetrievalError``. ``0`` disables the check.
        rate_window: Seconds of transfer the average is taken over (time
            spent waiting between attempts is not counted).
        max_rate: Bandwidth cap in bytes per second, or ``None`` for none.
        chunk_size: Largest read from the socket, in bytes.
        user_agent: ``User-Agent`` header of every request.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    max_total_attempts: int = 50
    backoff_initial: float = 1.0
    backoff_multiplier: float = 2.0
    backoff_max: float = 60.0
    jitter: float = 0.5
    min_rate: float = 512.0
    rate_window: float = 30.0
    max_rate: float | None = None
    chunk_size: int = 64 * 1024
    user_agent: str = "uptake-agent"

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "backoff_initial", "backoff_max"):
            # not inf nor nan (TOML has both): sleeps and socket timeouts would overflow
            if not 0 < getattr(self, name) <= 10.0**8:
                raise ValueError(f"{name}: must be > 0 and at most 1e+08 seconds")
        if self.max_attempts < 1 or self.max_total_attempts < 1:
            raise ValueError("max_attempts and max_total_attempts: must be at least 1")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier: must be at least 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter: must be between 0 and 1")
        if self.min_rate < 0:
            raise ValueError("min_rate: must be >= 0 (0 disables the check)")
        if self.rate_window <= 0 or self.chunk_size <= 0:
            raise ValueError("rate_window and chunk_size: must be positive")
        if self.max_rate is not None and self.max_rate < max(self.min_rate, 1.0):
            raise ValueError("max_rate: must be at least min_rate (and at least 1 byte/s)")

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failed attempts (>= 1)."""
        delay = min(
            self.backoff_max, self.backoff_initial * self.backoff_multiplier ** (failures - 1)
        )
        return delay * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class TlsSettings:
    """How the agent's connections use TLS: whom to trust, and the client certificate.

    Attributes:
        ca_certs: CA bundle (a file) to verify the server with; "" for the system's.
        cert_file: the vehicle's client certificate (PEM), presented to the server;
            "" for none.
        key_file: its private key (PEM, encrypted with ``key_password``).
        key_password: the key's password.
    """

    ca_certs: str = ""
    cert_file: str = ""
    key_file: str = ""
    key_password: str | None = None


class _Transient(Exception):
    """An attempt failed in a way worth retrying (reset, timeout, 5xx)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class _Restart(Exception):
    """The server's answer cannot continue what we hold: start from byte 0."""


class _RateMonitor:
    """Sliding-window average rate of one download; raises when it is too slow.

    The clock only runs while an attempt is under way: backoff waits between
    attempts are not the server's fault and do not count.
    """

    def __init__(self, url: str, min_rate: float, window: float) -> None:
        self._url = url
        self._min_rate = min_rate
        self._window = window
        self._paused_total = 0.0
        self._paused_at: float | None = None
        self._origin = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(0.0, 0)])
        self._total = 0

    def _now(self) -> float:
        return time.monotonic() - self._origin - self._paused_total

    def pause(self) -> None:
        self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_total += time.monotonic() - self._paused_at
            self._paused_at = None

    def record(self, nbytes: int) -> None:
        """Count ``nbytes`` just received and check the rate over the window."""
        self._total += nbytes
        if self._min_rate <= 0:
            return
        now = self._now()
        self._samples.append((now, self._total))
        # Keep the newest sample at least one window old as the baseline.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
        start, start_total = self._samples[0]
        if now - start < self._window:
            return
        rate = (self._total - start_total) / (now - start)
        if rate < self._min_rate:
            raise SlowRetrievalError(
                f"{self._url}: {rate:.0f} bytes/s over the last {now - start:.1f} s, "
                f"below the minimum of {self._min_rate:.0f} bytes/s"
            )


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a ``Content-Range`` header, None when absent."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    first: int | None = None
    if span != "*":
        with contextlib.suppress(ValueError):
            first = int(span.partition("-")[0])
    try:
        return first, int(total)
    except ValueError:
        return first, None


def _validator(response: urllib3.BaseHTTPResponse) -> str | None:
    """The value If-Range may carry for this response: a strong ETag, else Last-Modified."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return str(etag)
    modified = response.headers.get("Last-Modified")
    return str(modified) if modified else None


class _Transfer:
    """One download's HTTP exchanges, as a stream of ``(offset, chunk)`` events.

    A consumer writes each chunk at its offset; an offset lower than what it
    holds (only ever 0, possibly with an empty chunk) means "start again".
    ``validator`` and ``total`` describe the server's current version of the
    file as soon as a response announced them.
    """

    def __init__(
        self,
        fetcher: ResumableFetcher,
        url: str,
        start: int,
        max_length: int | None,
        validator: str | None,
    ) -> None:
        self._fetcher = fetcher
        self._config = fetcher.config
        self.url = url
        self.received = start
        self.max_length = max_length
        self.validator = validator
        self.total: int | None = None
        self.attempts = 0
        self.transferred = 0  # body bytes over all attempts, restarts included
        self._body_complete = False

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        config = self._config
        monitor = _RateMonitor(self.url, config.min_rate, config.rate_window)
        failures = 0
        while True:
            self.attempts += 1
            before = self.transferred
            error: _Transient | _Restart
            try:
                yield from self._attempt(monitor)
                return
            except _Restart as exc:
                logger.info("%s: restarting from byte 0: %s", self.url, exc)
                self.received = 0
                self.validator = None
                yield 0, b""
                error = exc
            except _Transient as exc:
                logger.info("%s: attempt %d failed: %s", self.url, self.attempts, exc)
                error = exc
                failures = 0 if self.transferred > before else failures + 1
            if failures >= config.max_attempts or self.attempts >= config.max_total_attempts:
                message = (
                    f"{self.url}: gave up after {self.attempts} attempts "
                    f"({self.received} bytes received): {error}"
                )
                if isinstance(error, _Transient) and error.status is not None:
                    raise HTTPStatusError(message, error.status, self.url) from error
                raise DownloadError(message) from error
            if isinstance(error, _Restart):
                continue  # the server told us what to do; no need to wait
            monitor.pause()
            time.sleep(config.backoff(max(failures, 1)))
            monitor.resume()

    def _attempt(self, monitor: _RateMonitor) -> Iterator[tuple[int, bytes]]:
        response = self._fetcher._request(self.url, self.received, self.validator)
        self._body_complete = False
        try:
            yield from self._read(response, monitor)
        finally:
            # A connection with unread body bytes must not go back to the pool.
            if self._body_complete:
                response.release_conn()
            else:
                response.close()

    def _read(
        self, response: urllib3.BaseHTTPResponse, monitor: _RateMonitor
    ) -> Iterator[tuple[int, bytes]]:
        status = response.status
        first, total = _content_range_total(response.headers.get("Content-Range"))
        if status == 416 and self.received > 0:
            if total == self.received:
                self.total = total
                return  # we already hold the whole file
            raise _Restart(f"range from byte {self.received} not satisfiable (length {total})")
        if status in _RETRY_STATUSES:
            raise _Transient(f"HTTP {status}", status)
        if status >= 400:
            raise HTTPStatusError(f"{self.url}: HTTP error {status}", status, self.url)
        if status == 206:
            if first != self.received:
                raise _Restart(f"asked for byte {self.received}, got Content-Range {first}")
            new_validator = _validator(response)
            if self.validator and new_validator and new_validator != self.validator:
                raise _Restart("file changed on the server (validator differs)")
        elif status == 200:
            if self.received > 0:
                logger.info("%s: server sent the whole file, restarting", self.url)
                self.received = 0
                yield 0, b""
            self.validator = None
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isascii() and length.isdigit() else None
        else:
            raise DownloadError(f"{self.url}: unexpected HTTP status {status}")

        self.validator = _validator(response) or self.validator
        self.total = total
        if self.max_length is not None and total is not None and total > self.max_length:
            raise DownloadLengthMismatchError(
                f"{self.url}: server announces {total} bytes, more than the "
                f"maximum allowed length of {self.max_length}"
            )
        yield from self._body(response, monitor)

    def _body(
        self, response: urllib3.BaseHTTPResponse, monitor: _RateMonitor
    ) -> Iterator[tuple[int, bytes]]:
        config = self._config
        read_size = config.chunk_size
        if config.max_rate is not None:
            # About ten reads a second at the cap keeps the pace smooth.
            read_size = max(1, min(read_size, int(config.max_rate / 10)))
        attempt_start = time.monotonic()
        attempt_bytes = 0
        while True:
            try:
                chunk = response.read1(read_size)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _Transient(f"transfer interrupted: {exc}") from exc
            if not chunk:
                break
            if self.max_length is not None and self.received + len(chunk) > self.max_length:
                raise DownloadLengthMismatchError(
                    f"{self.url}: received more than the maximum allowed length "
                    f"of {self.max_length} bytes"
                )
            yield self.received, chunk
            self.received += len(chunk)
            self.transferred += len(chunk)
            attempt_bytes += len(chunk)
            monitor.record(len(chunk))
            if config.max_rate is not None:
                ahead = attempt_bytes / config.max_rate - (time.monotonic() - attempt_start)
                if ahead > 0:
                    time.sleep(ahead)
        if self.total is not None and self.received < self.total:
            raise _Transient(f"body ended at byte {self.received} of {self.total}")
        self._body_complete = True


class ResumableFetcher(FetcherInterface):
    """The agent's HTTP client: a TUF fetcher that resumes, caps and times downloads.

    Pass it to ``tuf.ngclient.Updater(..., fetcher=...)``; use
    :meth:`download_to` for images too large to restart from zero.
    """

    def __init__(self, config: FetcherConfig | None = None, tls: TlsSettings | None = None) -> None:
        self.config = config or FetcherConfig()
        # Identity encoding: byte offsets must be those of the file itself.
        self._headers = {"User-Agent": self.config.user_agent, "Accept-Encoding": "identity"}
        self._pool = self._new_pool(tls or TlsSettings())

    def _new_pool(self, tls: TlsSettings) -> urllib3.PoolManager:
        pool_args: dict[str, Any] = {}
        if tls.ca_certs:
            pool_args["ca_certs"] = tls.ca_certs
        if tls.cert_file:
            pool_args.update(
                cert_file=tls.cert_file, key_file=tls.key_file, key_password=tls.key_password
            )
        return urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=self.config.connect_timeout, read=self.config.read_timeout
            ),
            # Our own loop retries, from the right byte, and follows only same-origin redirects.
            retries=False,
            **pool_args,
        )

    def use_tls(self, tls: TlsSettings) -> None:
        """Connect with other TLS files from now on (a renewed client certificate)."""
        old, self._pool = self._pool, self._new_pool(tls)
        old.clear()

    def _request(self, url: str, offset: int, validator: str | None) -> urllib3.BaseHTTPResponse:
        headers = dict(self._headers)  # per-request headers replace the pool's
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        origin, location = _origin(url), url
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._send(location, headers)
            if response.status not in _REDIRECT_STATUSES:
                return response
            target = response.headers.get("Location")
            response.close()  # never read a redirect's body: it may not end
            if not target:
                raise DownloadError(f"{url}: HTTP {response.status} redirect without a Location")
            location = urllib3.util.parse_url(urljoin(location, target)).url
            if _origin(location) != origin:
                raise CrossOriginRedirectError(
                    f"{url}: redirect to another origin refused ({location})"
                )
        raise DownloadError(f"{url}: more than {_MAX_REDIRECTS} redirects")

    def _send(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=False,
            )
        except urllib3.exceptions.SSLError as exc:
            raise TLSError(f"{url}: TLS: {exc}") from exc
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.SSLError):
                raise TLSError(f"{url}: TLS: {exc.reason}") from exc
            if isinstance(exc.reason, urllib3.exceptions.ResponseError):
                raise DownloadError(f"{url}: {exc.reason}") from exc
            raise _Transient(f"cannot connect: {exc.reason}") from exc
        except (
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ConnectTimeoutError,
        ) as exc:
            # urllib3 >= 2.8 raises these directly when retries are off
            raise _Transient(f"cannot connect: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"request failed: {exc}") from exc

    def post(
        self, url: str, body: bytes, content_type: str = "application/json", max_answer: int = 65536
    ) -> HTTPAnswer:
        """Send ``body`` to ``url`` once, over the same pool, timeouts and TLS as every download.

        No retries and no redirects: a report that did not get through is sent
        again at the next poll. The answer's body is read up to ``max_answer``
        bytes (an endless answer cannot hold the agent).

        Raises:
            HTTPConnectionError: the server could not be reached or the answer broke off.
        """
        headers = {**self._headers, "Content-Type": content_type}
        try:
            response = self._pool.request(
                "POST", url, body=body, headers=headers, preload_content=False, redirect=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise HTTPConnectionError(f"{url}: {exc}") from exc
        try:
            answer = response.read(max_answer, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise HTTPConnectionError(f"{url}: reading the answer failed: {exc}") from exc
        finally:
            response.close()  # never return a half-read connection to the pool
        return HTTPAnswer(response.status, bytes(answer))

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Stream ``url`` (FetcherInterface API), resuming on interruptions.

        A stream cannot take back bytes it already yielded, so a server
        that answers a resume with the whole file again ends it with
        ``DownloadError``; :meth:`download_file` and :meth:`download_to`
        restart cleanly instead.
        """
        transfer = _Transfer(self, url, 0, None, None)
        return self._stream(transfer)

    @staticmethod
    def _stream(transfer: _Transfer) -> Iterator[bytes]:
        position = 0
        for offset, chunk in transfer.chunks():
            if offset != position:
                raise DownloadError(f"{transfer.url}: server restarted the file mid-stream")
            position += len(chunk)
            if chunk:
                yield chunk

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` into a temporary file (FetcherInterface API).

        Raises:
            DownloadLengthMismatchError: more than ``max_length`` bytes.
            SlowRetrievalError: the rate stayed below ``min_rate``.
            DownloadHTTPError: an HTTP error status (after retries for 5xx).
            DownloadError: any other failure, after retries where they make sense.
        """
        with tempfile.TemporaryFile() as out:
            self._write(_Transfer(self, url, 0, max_length, None), out, None)
            out.seek(0)
            yield out

    def download_to(self, url: str, dest_partial_path: Path | str, max_length: int) -> int:
        """Download ``url`` into ``dest_partial_path``, continuing what is already there.

        The partial file keeps whatever has arrived, across failures and
        agent restarts; calling again continues from its size with a Range
        request (a ``<name>.resume`` file next to it remembers the URL and
        the server's validator, so a changed file or URL starts over). A
        file already ``max_length`` long is returned as is. The caller
        verifies hashes and deletes the file when done with it.

        Returns:
            The size of the complete file in bytes.

        Raises:
            The errors of :meth:`download_file`; the partial file stays.
        """
        path = Path(dest_partial_path)
        sidecar = path.with_name(path.name + ".resume")
        state = self._load_resume_state(sidecar)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DownloadError(f"cannot open partial file {path}: {exc}") from exc
        with os.fdopen(fd, "r+b") as out:
            size = out.seek(0, os.SEEK_END)
            validator = None
            if state is not None and state.get("url") != url:
                size = self._truncate(out, path)  # bytes of another URL: start over
            elif state is not None and isinstance(state.get("validator"), str):
                validator = str(state["validator"])
            if size > max_length:
                size = self._truncate(out, path)
            if size == max_length:
                with contextlib.suppress(FileNotFoundError):
                    sidecar.unlink()
                return size
            if state is None or state.get("url") != url:
                self._save_resume_state(sidecar, url, None)
            if size > 0:
                logger.info("%s: resuming %s from byte %d", url, path, size)
            transfer = _Transfer(self, url, size, max_length, validator)
            try:
                self._write(transfer, out, sidecar)
            finally:
                with contextlib.suppress(OSError):
                    out.flush()
                    os.fsync(out.fileno())
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()
            return transfer.received

    @staticmethod
    def _truncate(out: BinaryIO, path: Path) -> int:
        try:
            out.seek(0)
            out.truncate()
        except OSError as exc:
            raise DownloadError(f"cannot truncate partial file {path}: {exc}") from exc
        return 0

    @staticmethod
    def _load_resume_state(sidecar: Path) -> dict[str, Any] | None:
        """What a previous :meth:`download_to` recorded about its partial file."""
        try:
            state = json.loads(sidecar.read_bytes())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    @staticmethod
    def _save_resume_state(sidecar: Path, url: str, validator: str | None) -> None:
        try:
            write_atomic(sidecar, json.dumps({"url": url, "validator": validator}).encode())
        except OSError as exc:
            raise DownloadError(f"cannot write resume state {sidecar}: {exc}") from exc

    @classmethod
    def _write(cls, transfer: _Transfer, out: BinaryIO, sidecar: Path | None) -> None:
        """Run ``transfer`` into ``out`` (positioned at ``transfer.received``).

        With a ``sidecar``, a new server validator is saved before the bytes
        it describes are written, so a later resume asks with If-Range.
        """
        saved_validator = transfer.validator
        try:
            for offset, chunk in transfer.chunks():
                if offset != out.tell():
                    out.seek(offset)
                    out.truncate()
                if sidecar is not None and transfer.validator != saved_validator:
                    saved_validator = transfer.validator
                    cls._save_resume_state(sidecar, transfer.url, saved_validator)
                out.write(chunk)
        except OSError as exc:
            raise DownloadError(f"{transfer.url}: cannot write the download: {exc}") from exc
