"""A small client for the server's admin API (used by the CLI and the demo)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import urllib3

from signing.exceptions import UptakeError


class ApiClientError(UptakeError):
    """The server refused a request or could not be reached; says which and why."""


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=timeout), retries=False
        )

    @classmethod
    def from_token_file(cls, base_url: str, token_file: Path) -> AdminClient:
        try:
            return cls(base_url, Path(token_file).read_text().strip())
        except OSError as exc:
            raise ApiClientError(f"cannot read admin token {token_file}: {exc.strerror}") from exc

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
            raise ApiClientError(f"{method} {url}: cannot reach the server ({exc})") from exc
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

    def get_bytes(self, path: str) -> bytes:
        url = f"{self.base_url}{path}"
        try:
            resp = self._http.request("GET", url)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiClientError(f"GET {url}: cannot reach the server ({exc})") from exc
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
