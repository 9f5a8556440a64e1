"""A small client for the server's admin API (used by the CLI and the demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import urllib3

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
