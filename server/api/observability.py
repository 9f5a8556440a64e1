"""Health, readiness, metrics and the access log.

* ``GET /healthz`` (and its older name ``/health``): the process answers. For
  a liveness probe: restart the process if this fails.
* ``GET /readyz``: 200 when this process can serve, 503 with the reasons when
  it cannot (the database does not answer ``SELECT 1`` within
  :data:`READY_TIMEOUT` seconds, or an online key is missing). For a load
  balancer: send no traffic to a replica that is not ready.
* ``GET /metrics``: this process's :data:`server.metrics.REGISTRY` in the
  Prometheus text format. Fleet counts are operator information, so it needs
  a token with ``read-fleet`` (a ``viewer`` token is enough; Prometheus sends
  it with ``authorization: {credentials_file: ...}``). Each replica answers
  for itself: scrape every one.

:func:`observe_middleware` runs outermost: it counts and times every
request under its route template (``/director/{vin}/metadata/{file}``, never
the concrete path). :class:`JsonAccessLogger` writes one JSON line per
request, once it is sent, on the ``uptake.access`` logger: time, method, route, status, duration in ms, bytes
sent, and who asked (``vehicle`` with its VIN, ``operator`` with the token's
name, or ``anonymous``). Tokens, certificates, query strings and bodies are
never logged. A VIN is logged: it names the vehicle, it is no secret, and the
fleet database holds it anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from server.api.access import Audience, Route, actor_of
from server.api.context import DIRECTOR, ENGINE, IMAGE_REPO
from server.api.responses import Health
from server.metrics import HTTP_REQUESTS, HTTP_SECONDS, REGISTRY
from server.roles import Permission

#: seconds /readyz waits for the database
READY_TIMEOUT = 3.0
UNMATCHED = "unmatched"
MALFORMED = "malformed"

#: where :class:`JsonAccessLogger` writes (``uptake server run`` sends it to stderr)
ACCESS_LOG = logging.getLogger("uptake.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_template(request: web.Request) -> str:
    """The route the request matched, as declared (bounded: a label and a log field)."""
    try:
        resource = request.match_info.route.resource
    except AssertionError:  # aiohttp refused it as malformed HTTP before routing
        return MALFORMED
    return resource.canonical if resource is not None else UNMATCHED


def _identity(request: web.Request) -> dict[str, str]:
    kind, _, name = actor_of(request).partition(":")
    if kind == "vehicle":
        return {"client": kind, "vin": name}
    if kind == "operator":
        return {"client": kind, "operator": name}
    return {"client": "anonymous"}


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request under its route template (see module docstring)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # redirects and what the router raises
        status = exc.status
        raise
    finally:
        route = route_template(request)
        HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
        HTTP_SECONDS.labels(route).observe(time.perf_counter() - start)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request, written once the response is sent (so its size is known)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not isinstance(request, web.Request):
            return
        self.logger.info(
            json.dumps(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "method": request.method,
                    "route": route_template(request),
                    "status": response.status,
                    "ms": round(time * 1000, 2),
                    "bytes": response.body_length,
                    **_identity(request),
                },
                separators=(",", ":"),
            )
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _database_answers(request: web.Request) -> None:
    with request.app[ENGINE].connect() as connection:
        connection.execute(text("SELECT 1"))


async def readyz(request: web.Request) -> web.Response:
    reasons = []
    try:
        await asyncio.wait_for(asyncio.to_thread(_database_answers, request), READY_TIMEOUT)
    except TimeoutError:
        reasons.append(f"database: no answer within {READY_TIMEOUT:g} s")
    except Exception as exc:  # whatever the driver raises: not ready, and why
        reasons.append(f"database: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    missing = request.app[DIRECTOR].missing_signers() + request.app[IMAGE_REPO].missing_signers()
    if missing:
        reasons.append(f"online keys not loaded: {', '.join(missing)}")
    if reasons:
        return web.json_response({"status": "unready", "reasons": reasons}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


ROUTES = [
    Route("GET", "/healthz", healthz, Audience.PUBLIC, "Liveness: the process answers",
          response=Health),
    Route("GET", "/health", healthz, Audience.PUBLIC, "Liveness (older name of /healthz)",
          response=Health),
    Route(
        "GET", "/readyz", readyz, Audience.PUBLIC,
        "Readiness: 200 when the database answers and the online keys are loaded, else 503 "
        "with the reasons",
    ),
    Route(
        "GET", "/metrics", metrics, Permission.READ_FLEET,
        "This process's Prometheus metrics (text format); scrape every replica",
    ),
]  # fmt: skip
