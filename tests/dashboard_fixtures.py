"""A browser-like HTTP client for the dashboard, and a deployment with a campaign to look at.

:class:`DashboardClient` keeps cookies, does not follow redirects, and reads
the CSRF token from the pages' forms, as a browser would send them.
:class:`CampaignDeployment` is a real server with two images of one hardware
id published, a release, simulated vehicles (:mod:`tests.simulated_fleet`:
real keys, real signed manifests over HTTP) and a campaign over them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import urllib3

from signing.manifest import ImageInfo
from tests.simulated_fleet import SimVehicle, http, in_parallel, make_fleet
from tests.uptake_fixtures import ServerProcess, sample

BMS = "stm32f4-bms"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]+)"')


class DashboardClient:
    """Cookies, no redirects followed, CSRF token from the last page (see module docstring)."""

    def __init__(self, base: str, ca_cert: str | None = None) -> None:
        self.base = base
        kwargs: dict[str, Any] = {"ca_certs": ca_cert} if ca_cert else {}
        self.http = urllib3.PoolManager(**kwargs)
        self.cookies: dict[str, str] = {}
        self.csrf = ""
        self.last_set_cookies: list[str] = []

    def request(self, method: str, path: str, fields: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:  # fmt: skip
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if fields is not None:
            resp = self.http.request(method, self.base + path, fields=fields, headers=sent,
                                     encode_multipart=False, redirect=False)  # fmt: skip
        else:
            resp = self.http.request(method, self.base + path, headers=sent, redirect=False)
        self.last_set_cookies = resp.headers.getlist("Set-Cookie")
        for header in self.last_set_cookies:
            cookie = SimpleCookie()
            cookie.load(header)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        found = _CSRF.search(resp.data.decode(errors="replace"))
        if found:
            self.csrf = found.group(1)
        return resp

    def get(self, path: str) -> urllib3.BaseHTTPResponse:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str] | None = None, *, csrf: bool = True,
             headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:  # fmt: skip
        sent = dict(fields or {})
        if csrf:
            sent.setdefault("csrf", self.csrf)
        return self.request("POST", path, sent, headers)

    def login(self, **fields: str) -> urllib3.BaseHTTPResponse:
        """Log in with ``token=`` or ``name=`` and ``password=`` from the login page's form."""
        page = self.get("/dashboard/login")
        found = LOGIN_CSRF.search(page.data.decode())
        assert found, page.data[:500]
        method = "token" if "token" in fields else "password"
        return self.request(
            "POST", "/dashboard/login", {"login_csrf": found.group(1), "method": method, **fields}
        )


class CampaignDeployment:
    """A server, bms 1.0.0 and 1.1.0, release ``bms-1.1``, an approver token, simulated vehicles."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv, self.url, self.token = srv, srv.url, srv.admin.token
        self.old = srv.publish(sample(BMS, "1.0.0"), BMS, "1.0.0")
        self.new = srv.publish(sample(BMS, "1.1.0"), BMS, "1.1.0")
        self.api(
            "POST", "/api/v1/releases", {"name": "bms-1.1", "images": {BMS: self.new.filepath}}
        )
        self.approver = self.new_token("approver", "release-engineer")

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return http(self.url, method, path, self.token if token is None else token, body)

    def new_token(self, name: str, role: str) -> str:
        token: str = self.api("POST", "/api/v1/tokens", {"name": name, "role": role})["token"]
        return token

    def enrol(self, count: int, prefix: str, behaviour: str = "install",
              **attributes: Any) -> list[SimVehicle]:  # fmt: skip
        """Register ``count`` simulated vehicles running bms 1.0.0; each posts a first manifest."""
        vehicles = make_fleet(count, (BMS,), prefix=prefix)

        def run(v: SimVehicle) -> None:
            v.behaviour = behaviour
            self.api("POST", "/api/v1/vehicles", v.registration(attributes or None))
            v.ecus[0].installed = ImageInfo.of(
                self.old.filepath, self.old.length, {"sha256": self.old.sha256}
            )
            v.report(self.url)

        in_parallel(run, vehicles)
        return vehicles

    def start_campaign(self, name: str, phases: list[dict[str, Any]]) -> None:
        self.api(
            "POST", "/api/v1/campaigns", {"name": name, "release": "bms-1.1", "phases": phases}
        )
        self.api("POST", f"/api/v1/campaigns/{name}/approve", {}, token=self.approver)
        self.api("POST", f"/api/v1/campaigns/{name}/start", {})

    def show(self, name: str) -> dict[str, Any]:
        record: dict[str, Any] = self.api("GET", f"/api/v1/campaigns/{name}")
        return record

    def cycle(self, vehicles: list[SimVehicle]) -> int:
        """Each vehicle polls its director targets once and reports what it did; how many did."""
        return sum(in_parallel(lambda v: v.cycle(self.url), vehicles))

    def wait(self, name: str, done: Callable[[dict[str, Any]], bool],
             vehicles: list[SimVehicle], timeout: float = 60) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            record = self.show(name)
            if done(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"campaign {name} did not get there: {record}")
            if not self.cycle(vehicles):
                time.sleep(0.3)
