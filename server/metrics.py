"""What the server is doing: Prometheus metrics and structured event log lines.

Workflow:

1. Every ``uptake server run`` process keeps its own :data:`REGISTRY` (one
   process, one set of counters; nothing is shared between replicas), and
   serves it at ``GET /metrics`` (:mod:`server.api.observability`). With
   several replicas, Prometheus scrapes each of them and sums with
   ``sum by (...)``; a restart resets a process's counters, which
   Prometheus's ``rate()`` handles.
2. The code that does the work counts it where it happens: the director's
   polls and manifests (:mod:`server.api.vehicle_routes`), installs and
   attacks that manifests report (:mod:`server.fleet`), signing
   (:func:`signing_timer`), delta jobs (:mod:`server.deltas`), and every
   database statement through SQLAlchemy's cursor events
   (:func:`observe_engine`).
3. Events an operator reads in the log (publications, manifests, delta
   jobs) go through :func:`log_event`: one JSON object per line on the
   ``uptake.events`` logger, next to the access log (``uptake.access``).

Label values are bounded sets (roles, outcomes, route templates, statuses),
never VINs or paths from a URL, so a client cannot grow the registry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import event
from sqlalchemy.engine import Engine

REGISTRY = CollectorRegistry()

#: latency buckets (seconds) from sub-millisecond statements to slow uploads
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

HTTP_REQUESTS = Counter(
    "uptake_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "uptake_http_request_duration_seconds",
    "Time to answer a request, by route template",
    ["route"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DIRECTOR_POLLS = Counter(
    "uptake_director_polls",
    "Director metadata GETs by vehicles, by role (timestamp is the idle poll)",
    ["role"],
    registry=REGISTRY,
)
MANIFESTS = Counter(
    "uptake_manifests",
    "Vehicle manifests, by outcome (accepted, rejected, rate-limited, unknown-vehicle)",
    ["outcome"],
    registry=REGISTRY,
)
INSTALLS = Counter(
    "uptake_installs",
    "Installs vehicles reported in accepted manifests, by result (once per new result)",
    ["result"],
    registry=REGISTRY,
)
ATTACKS_REPORTED = Counter(
    "uptake_attacks_reported",
    "New attacks ECUs reported in accepted manifests",
    registry=REGISTRY,
)
SIGNING_SECONDS = Histogram(
    "uptake_signing_seconds",
    "Time to sign one metadata file with an online key, by repository and role",
    ["repository", "role"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DATABASE_SECONDS = Histogram(
    "uptake_database_statement_seconds",
    "Time to execute one database statement",
    buckets=_BUCKETS,
    registry=REGISTRY,
)
DELTA_JOBS = Counter(
    "uptake_delta_jobs",
    "Delta jobs, by event (created, finished, failed)",
    ["event"],
    registry=REGISTRY,
)

#: the director roles a poll is counted under; anything else counts as "other"
_ROLES = frozenset({"root", "targets", "snapshot", "timestamp"})

_events = logging.getLogger("uptake.events")


def count_poll(filename: str) -> None:
    """Count a director metadata GET under its role (``3.root.json`` → root)."""
    role = filename.removesuffix(".json").rpartition(".")[2]
    DIRECTOR_POLLS.labels(role if role in _ROLES else "other").inc()


@contextmanager
def signing_timer(repository: str, role: str) -> Iterator[None]:
    """Time one online signature (``repository`` is "image" or "director")."""
    start = time.perf_counter()
    try:
        yield
    finally:
        SIGNING_SECONDS.labels(repository, role).observe(time.perf_counter() - start)


def observe_engine(engine: Engine) -> None:
    """Time every statement ``engine`` executes (SQLAlchemy cursor events)."""

    @event.listens_for(engine, "before_cursor_execute")
    def _start(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        conn.info.setdefault("uptake_statement_start", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _stop(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        starts = conn.info.get("uptake_statement_start")
        if starts:
            DATABASE_SECONDS.observe(time.perf_counter() - starts.pop())

    @event.listens_for(engine, "handle_error")
    def _failed(context):  # type: ignore[no-untyped-def]
        connection = context.connection
        starts = connection.info.get("uptake_statement_start") if connection is not None else None
        if starts:
            DATABASE_SECONDS.observe(time.perf_counter() - starts.pop())


def log_event(kind: str, **fields: Any) -> None:
    """One JSON line on the ``uptake.events`` logger: ``{"event": kind, ...fields}``."""
    if _events.isEnabledFor(logging.INFO):
        _events.info(json.dumps({"event": kind, **fields}, default=str, separators=(",", ":")))


__all__ = [
    "ATTACKS_REPORTED",
    "DATABASE_SECONDS",
    "DELTA_JOBS",
    "DIRECTOR_POLLS",
    "HTTP_REQUESTS",
    "HTTP_SECONDS",
    "INSTALLS",
    "MANIFESTS",
    "REGISTRY",
    "SIGNING_SECONDS",
    "count_poll",
    "log_event",
    "observe_engine",
    "signing_timer",
]
