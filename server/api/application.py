"""The aiohttp application: every route in one table, with who may call it.

The routes, grouped by who calls them:

* :mod:`server.api.vehicle_routes`: vehicles and CDNs (repository metadata,
  images, director metadata, manifests, certificate renewal);
* :mod:`server.api.fleet_routes`: fleet operators (vehicles, assignments,
  events, identities);
* :mod:`server.api.release_routes`: release engineers and suppliers
  (images, uploads, targets metadata, deltas);
* :mod:`server.api.account_routes`: admins (operator tokens) and auditors.

:data:`ROUTES` is the one list: :func:`build_app` registers it, the access
middleware (:mod:`server.api.access`) enforces each route's access, the
tests walk it, and the OpenAPI document is made from it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from aiohttp import web
from sqlalchemy.engine import Engine

from server.api import account_routes, fleet_routes, release_routes, vehicle_routes
from server.api.access import (
    ROUTE_TABLE,
    VEHICLE_ACCESS,
    Route,
    access_middleware,
    route_table,
)
from server.api.boundary import errors_middleware
from server.api.context import (
    DELTAS,
    DIRECTOR,
    ENGINE,
    IMAGE_REPO,
    ISSUER,
    REJECTIONS,
    TIMEOUTS,
    BodyTimeouts,
    CertificateIssuer,
)
from server.api.release_routes import MAX_UPLOAD_BYTES
from server.certificates import CertificateAuthority
from server.config import ServerConfig
from server.deltas import DeltaPublisher
from server.director import DirectorRepository
from server.fleet import RejectionLimiter
from server.image_repository import ImageRepository

log = logging.getLogger("server.api")

ROUTES: list[Route] = [
    *vehicle_routes.ROUTES,
    *fleet_routes.ROUTES,
    *release_routes.ROUTES,
    *account_routes.ROUTES,
]


async def _refresh_online_metadata(app: web.Application) -> None:
    """Keep timestamps/snapshots fresh even when nothing is published."""
    while True:
        try:
            await asyncio.to_thread(app[IMAGE_REPO].refresh_online_metadata)
        except Exception:
            log.exception("could not refresh image repository online metadata")
        await asyncio.sleep(600)


async def _background(app: web.Application) -> Any:
    tasks = [
        asyncio.create_task(_refresh_online_metadata(app)),
        asyncio.create_task(app[DELTAS].run()),
    ]
    yield
    for task in tasks:
        task.cancel()


def build_app(
    config: ServerConfig,
    engine: Engine,
    image_repo: ImageRepository,
    director: DirectorRepository,
    device_ca: CertificateAuthority | None,
) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, access_middleware], client_max_size=MAX_UPLOAD_BYTES
    )
    app[ENGINE], app[IMAGE_REPO], app[DIRECTOR] = engine, image_repo, director
    app[DELTAS] = DeltaPublisher(image_repo, engine, config.data_dir / "delta-work")
    app[REJECTIONS] = RejectionLimiter()
    app[TIMEOUTS] = BodyTimeouts(config.body_timeout, config.upload_idle_timeout)
    app[ISSUER] = CertificateIssuer(device_ca, timedelta(days=config.vehicle_certificate_days))
    app[VEHICLE_ACCESS] = config.vehicle_access()
    app[ROUTE_TABLE] = route_table(ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.cleanup_ctx.append(_background)
    return app


__all__ = ["ROUTES", "build_app"]
