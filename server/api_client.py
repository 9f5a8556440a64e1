"""A small client for the server's admin API (used by the CLI and the demo)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import urllib3

from server.image_batch import (
    ImageBatchError,
    UploadedImage,
    batch_lengths,
    body_length,
    encode_images,
)
from signing.exceptions import UptakeError


class ApiClientError(UptakeError):
    """The server refused a request or could not be reached; says which and why."""


def _unreachable(method: str, url: str, exc: Exception) -> ApiClientError:
    reason = exc.reason if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    if isinstance(reason, urllib3.exceptions.SSLError):
        return ApiClientError(
            f"{method} {url}: the server's TLS certificate does not verify ({reason}); "
            "pass the CA that signed it with --ca-cert or $UPTAKE_CA_CERT"
        )
    return ApiClientError(f"{method} {url}: cannot reach the server ({exc})")


class AdminClient:
    """An operator's connection to the server: HTTPS verified against ``ca_cert`` (or the
    system's CAs), the operator's token on every request."""

    def __init__(
        self, base_url: str, token: str, timeout: float = 60.0, ca_cert: Path | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        if ca_cert is not None and not Path(ca_cert).is_file():
            raise ApiClientError(f"CA certificate {ca_cert} is not a file")
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=timeout),
            retries=False,
            ca_certs=str(ca_cert) if ca_cert is not None else None,
        )

    @staticmethod
    def read_token(token_file: Path) -> str:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ApiClientError(f"cannot read token file {token_file}: {exc.strerror}") from exc

    @classmethod
    def from_token_file(
        cls, base_url: str, token_file: Path, ca_cert: Path | None = None
    ) -> AdminClient:
        return cls(base_url, cls.read_token(token_file), ca_cert=ca_cert)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        url = f"{self.base_url}{path}"
        try:
            resp = self._http.request(method, url, body=body, headers=hdrs, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable(method, url, exc) from exc
        try:
            data = json.loads(resp.data) if resp.data else None
        except ValueError:
            data = None
        if resp.status >= 400:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise ApiClientError(
                f"{method} {path}: HTTP {resp.status}: {message or resp.data[:200]!r}"
            )
        return data

    def get(self, url: str, max_length: int) -> tuple[int, bytes]:
        """GET an absolute ``url`` over this client's TLS: the status and at most ``max_length``
        bytes of the body (no error for an HTTP error status)."""
        try:
            resp = self._http.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable("GET", url, exc) from exc
        try:
            body = resp.read(max_length + 1)
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable("GET", url, exc) from exc
        finally:
            resp.release_conn()
        if len(body) > max_length:
            raise ApiClientError(f"GET {url}: answer longer than {max_length} bytes")
        return resp.status, body

    def download(self, path: str, out: BinaryIO, chunk_size: int = 64 * 1024) -> int:
        """GET ``path`` (with the token) into ``out`` a chunk at a time; returns the byte count.

        A refusal raises like :meth:`request`; an answer cut off midway (the
        server stopped, the connection broke) raises too, so that the caller
        (writing ``out`` atomically) keeps no partial file.
        """
        url = f"{self.base_url}{path}"
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            resp = self._http.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable("GET", url, exc) from exc
        try:
            if resp.status >= 400:
                data = resp.read(64 * 1024)
                try:
                    message = json.loads(data)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = data[:200]
                raise ApiClientError(f"GET {path}: HTTP {resp.status}: {message!r}")
            written = 0
            for chunk in resp.stream(chunk_size):
                out.write(chunk)
                written += len(chunk)
            return written
        except urllib3.exceptions.HTTPError as exc:
            raise ApiClientError(f"GET {url}: the answer was cut off ({exc})") from exc
        finally:
            resp.release_conn()

    def get_bytes(self, path: str) -> bytes:
        url = f"{self.base_url}{path}"
        try:
            resp = self._http.request("GET", url)
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable("GET", url, exc) from exc
        if resp.status != 200:
            raise ApiClientError(f"GET {url}: HTTP {resp.status}")
        return bytes(resp.data)

    def upload_file(self, sha256: str, path: Path) -> Any:
        with open(path, "rb") as f:
            return self.request(
                "PUT",
                f"/api/v1/image/uploads/{sha256}",
                body=f,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
            )

    def upload_images(
        self, paths: Sequence[Path], progress: Callable[[int], None] | None = None
    ) -> list[UploadedImage]:
        """Stage ``paths`` in one streamed request, each read once (:mod:`server.image_batch`).

        Returns each image's length and the SHA-256 computed while sending it,
        once the server has checked and stored them all.
        """
        sent: list[UploadedImage] = []
        try:
            lengths = batch_lengths(paths)
            answer = self.request(
                "POST",
                "/api/v1/image/uploads",
                body=encode_images(paths, lengths, sent, progress),
                headers={
                    "Content-Type": "application/x-uptake-images",
                    # not chunked: no framing (and no copy) of every chunk
                    "Content-Length": str(body_length(lengths)),
                },
            )
        except ImageBatchError as exc:
            raise ApiClientError(str(exc)) from exc
        stored = [(i["sha256"], i["length"]) for i in answer["images"]]
        if stored != [(i.sha256, i.length) for i in sent]:
            raise ApiClientError("the server stored other images than were sent")
        return sent
