"""The aiohttp application: every route in one table, with who may call it.

The routes, grouped by who calls them:

* :mod:`server.api.observability`: probes and Prometheus (health, readiness,
  metrics), and the access log every request writes;
* :mod:`server.api.vehicle_routes`: vehicles and CDNs (repository metadata,
  images, director metadata, manifests, certificate renewal);
* :mod:`server.api.fleet_routes`: fleet operators (vehicles, assignments,
  events, identities);
* :mod:`server.api.inventory_routes`: lists of vehicles, ECUs and events,
  the inventory ledger and its exports;
* :mod:`server.api.release_routes`: release engineers and suppliers
  (images, uploads, targets metadata, deltas);
* :mod:`server.api.account_routes`: admins (operator tokens) and auditors;
* :mod:`server.api.campaign_routes`: releases, campaigns, vehicle attributes;
* :mod:`server.dashboard.routes`: the web dashboard's pages and actions, with
  the same access checks (a session cookie stands in for the token there).

:data:`ROUTES` is the one list: :func:`build_app` registers it, the access
middleware (:mod:`server.api.access`) enforces each route's access, the
tests walk it, and the OpenAPI document is made from it (:mod:`server.api.openapi`,
served at ``/api/v1/openapi.json``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy.engine import Engine

from server.api import (
    account_routes,
    campaign_routes,
    fleet_routes,
    inventory_routes,
    observability,
    release_routes,
    vehicle_routes,
)
from server.api.access import (
    ALLOWED_IDENTITIES,
    FIRST_SEEN_ISSUERS,
    IDENTITY_CACHE_SECONDS,
    ROUTE_TABLE,
    VEHICLE_ACCESS,
    AllowedIdentities,
    Audience,
    FirstSeenIssuers,
    Route,
    access_middleware,
    route_table,
)
from server.api.boundary import errors_middleware
from server.api.context import (
    CONFIG,
    DELTAS,
    DIRECTOR,
    ENGINE,
    IMAGE_REPO,
    ISSUER,
    LOGINS,
    PASSWORD_HASHING,
    REJECTIONS,
    TIMEOUTS,
    TIMESTAMP_VERSIONS,
    VEHICLE_THREADS,
    BodyTimeouts,
    CertificateIssuer,
)
from server.api.openapi import OPENAPI_DOCUMENT, openapi_document, serve_openapi
from server.api.release_routes import MAX_UPLOAD_BYTES
from server.certificates import CertificateAuthority
from server.config import OPERATOR_THREADS, ServerConfig
from server.dashboard import routes as dashboard_routes
from server.dashboard.queries import AuditVerificationCache, FleetSummaryCache
from server.deltas import DeltaPublisher
from server.director import DirectorRepository
from server.fleet import RejectionLimiter
from server.image_repository import ImageRepository
from server.metrics import observe_engine
from server.operator_passwords import LoginLimiter, PasswordHashing
from server.timestamp_versions import TimestampVersions

log = logging.getLogger("server.api")

ROUTES: list[Route] = [
    *observability.ROUTES,
    *vehicle_routes.ROUTES,
    *fleet_routes.ROUTES,
    *inventory_routes.ROUTES,
    *release_routes.ROUTES,
    *account_routes.ROUTES,
    *dashboard_routes.ROUTES,
    *campaign_routes.ROUTES,
    Route("GET", "/api/v1/openapi.json", serve_openapi, Audience.PUBLIC,
          "This API's OpenAPI 3.1 document, made from the route table"),
]  # fmt: skip


async def _refresh_online_metadata(app: web.Application) -> None:
    """Keep timestamps/snapshots fresh even when nothing is published (:mod:`server.lifetimes`)."""
    repo = app[IMAGE_REPO]
    while True:
        try:
            await asyncio.to_thread(repo.refresh_online_metadata)
        except Exception:
            log.exception("could not refresh image repository online metadata")
        await asyncio.sleep(repo.lifetimes.upkeep_interval())


async def _background(app: web.Application) -> Any:
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(OPERATOR_THREADS, thread_name_prefix="uptake-worker")
    )
    tasks = [
        asyncio.create_task(_refresh_online_metadata(app)),
        asyncio.create_task(app[DELTAS].run()),
        asyncio.create_task(campaign_routes.sweep_campaigns(app)),
    ]
    yield
    for task in tasks:
        task.cancel()
    app[PASSWORD_HASHING].close()
    # lets a manifest in its transaction finish, without holding up the event loop meanwhile
    await asyncio.to_thread(app[VEHICLE_THREADS].shutdown)
    if (versions := app[TIMESTAMP_VERSIONS]) is not None:
        await versions.close()


def build_app(
    config: ServerConfig,
    engine: Engine,
    image_repo: ImageRepository,
    director: DirectorRepository,
    device_ca: CertificateAuthority | None,
) -> web.Application:
    app = web.Application(
        middlewares=[
            observability.observe_middleware,
            errors_middleware,
            dashboard_routes.pages_middleware,
            access_middleware,
        ],
        client_max_size=MAX_UPLOAD_BYTES,
    )
    observe_engine(engine)
    app[ENGINE], app[IMAGE_REPO], app[DIRECTOR] = engine, image_repo, director
    app[DELTAS] = DeltaPublisher(
        image_repo,
        engine,
        config.data_dir / "delta-work",
        max_recompress_mib=config.delta_max_recompress_mib,
    )
    app[TIMESTAMP_VERSIONS] = TimestampVersions.for_engine(engine)
    app[REJECTIONS] = RejectionLimiter()
    app[TIMEOUTS] = BodyTimeouts(config.body_timeout, config.upload_idle_timeout)
    app[VEHICLE_THREADS] = ThreadPoolExecutor(
        config.vehicle_db_threads, thread_name_prefix="uptake-vehicle"
    )
    app[ISSUER] = CertificateIssuer(device_ca, timedelta(days=config.vehicle_certificate_days))
    app[VEHICLE_ACCESS] = config.vehicle_access()
    app[CONFIG], app[LOGINS], app[PASSWORD_HASHING] = config, LoginLimiter(), PasswordHashing()
    app[dashboard_routes.FLEET_SUMMARY] = FleetSummaryCache()
    app[dashboard_routes.AUDIT_VERIFICATION] = AuditVerificationCache()
    app[ROUTE_TABLE] = route_table(ROUTES)
    app[OPENAPI_DOCUMENT] = json.dumps(openapi_document(ROUTES)).encode()
    app[ALLOWED_IDENTITIES] = AllowedIdentities(IDENTITY_CACHE_SECONDS)
    app[FIRST_SEEN_ISSUERS] = FirstSeenIssuers.of(config)
    for route in ROUTES:
        if route.method == "GET":  # and HEAD, with the same access (access.py's _route_of)
            app.router.add_get(route.path, route.handler, allow_head=True)
        else:
            app.router.add_route(route.method, route.path, route.handler)
    app.cleanup_ctx.append(_background)
    return app


__all__ = ["ROUTES", "build_app"]
