"""A route missing from the route table is refused, not public (attacker review, minor).

The real access and errors middlewares on a real aiohttp server on loopback: a declared public
route answers, a route registered without a declaration in the route table answers 403, and a
path no route matches answers 404, all as JSON errors.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest
import urllib3
from aiohttp import web

from server.api.access import (
    ROUTE_TABLE,
    VEHICLE_ACCESS,
    Audience,
    Route,
    access_middleware,
    route_table,
)
from server.api.boundary import errors_middleware
from server.config import VehicleAccess, VehicleIdentityMode


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = web.Application(middlewares=[errors_middleware, access_middleware])
    app[ROUTE_TABLE] = route_table([Route("GET", "/declared", _ok, Audience.PUBLIC, "declared")])
    app[VEHICLE_ACCESS] = VehicleAccess(VehicleIdentityMode.NONE)
    app.router.add_get("/declared", _ok)
    app.router.add_get("/undeclared", _ok)  # e.g. added by a later change that forgot the table
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/declared", 200), ("GET", "/undeclared", 403), ("HEAD", "/undeclared", 403),
     ("GET", "/nowhere", 404), ("POST", "/declared", 405)],
)  # fmt: skip
def test_undeclared_routes_are_refused(url: str, method: str, path: str, status: int) -> None:
    resp = urllib3.request(method, url + path, retries=False, timeout=10)
    assert resp.status == status, resp.data
    if status >= 400 and method != "HEAD":
        assert json.loads(resp.data)["error"]["status"] == status
