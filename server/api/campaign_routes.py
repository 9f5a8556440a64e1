"""Routes of campaigns, the releases they roll out, and the vehicle attributes they select by.

Who may call them: reading campaigns needs ``read-fleet``, acting on them
(create, approve, start, pause, resume, cancel) and naming releases
``manage-campaigns``; releases are read with ``read-releases``; vehicle
attributes are set with ``manage-fleet``. Suppliers reach none of the
campaign routes. The engine behind them is :mod:`server.campaigns`; the
background sweep (:func:`sweep_campaigns`) runs in the server process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from server import audit
from server.api.access import Route, actor_of
from server.api.boundary import (
    ApiError,
    id_cursor,
    in_session,
    json_body,
    key_cursor,
    next_cursor,
    page_query,
    url_name,
    url_vin,
)
from server.api.context import DIRECTOR, ENGINE, IMAGE_REPO
from server.api.schemas import (
    CampaignActionRequest,
    CampaignRequest,
    ReleaseRequest,
    VehicleAttributes,
)
from server.campaign_states import CampaignAction, CampaignState, PartState
from server.campaigns import (
    MaintenanceWindow,
    PhaseSpec,
    Selection,
    act,
    attributes_of,
    campaign_record,
    campaigns_page,
    create_campaign,
    create_release,
    get_release,
    parse_window,
    parts_page,
    releases_page,
    set_attributes,
    sweep_once,
)
from server.db import Vehicle
from server.roles import Permission

log = logging.getLogger("server.api")

#: Seconds between sweeps when there is nothing left to do (at once while there is).
SWEEP_IDLE_SECONDS = 1.0
#: The sweep rests this many times as long as its last step took (its share of the CPU).
SWEEP_REST = 2.0
#: A sweep step slower than this is logged (it holds the database's write lock meanwhile).
SLOW_SWEEP_SECONDS = 2.0
#: Tries of an operator's action that met a deadlock with the engine before 503.
_ACTION_ATTEMPTS = 3


def store_attributes(session: Session, vin: str, body: VehicleAttributes) -> dict[str, Any]:
    """Set ``vin``'s attributes from a request body (registration, or the attributes route)."""
    return set_attributes(
        session, vin, model=body.model or "", year=body.year, region=body.region or "",
        tags=body.tags,
    )  # fmt: skip


async def put_attributes(request: web.Request) -> web.Response:
    vin = url_vin(request)
    body = await json_body(request, VehicleAttributes)
    actor = actor_of(request)

    def run(session: Session) -> dict[str, Any]:
        before = attributes_of(session, vin)
        result = store_attributes(session, vin, body)
        audit.append(session, actor, "vehicle.attributes", vin, before=before, after=result)
        return result

    return web.json_response(await in_session(request, run))


async def get_attributes(request: web.Request) -> web.Response:
    vin = url_vin(request)

    def run(session: Session) -> dict[str, Any]:
        if session.get(Vehicle, vin) is None:
            raise ApiError(404, f"unknown vehicle {vin}")
        return attributes_of(session, vin)

    return web.json_response(await in_session(request, run))


async def add_release(request: web.Request) -> web.Response:
    body = await json_body(request, ReleaseRequest)
    image_repo, actor = request.app[IMAGE_REPO], actor_of(request)
    result = await in_session(
        request,
        lambda s: create_release(s, image_repo, body.name, body.images, body.description, actor),
    )
    return web.json_response(result, status=201)


async def list_releases(request: web.Request) -> web.Response:
    limit, position = page_query(request)
    after = key_cursor(position)
    image_repo = request.app[IMAGE_REPO]
    rows, last = await in_session(
        request, lambda s: releases_page(s, image_repo, after=after, limit=limit)
    )
    return web.json_response({"releases": rows, "next": next_cursor(last)})


async def show_release(request: web.Request) -> web.Response:
    name, image_repo = url_name(request, "name"), request.app[IMAGE_REPO]
    return web.json_response(await in_session(request, lambda s: get_release(s, image_repo, name)))


async def add_campaign(request: web.Request) -> web.Response:
    body = await json_body(request, CampaignRequest)
    actor = actor_of(request)
    windows: list[MaintenanceWindow] = [
        parse_window(w.start, w.end, f"maintenance_windows[{i}]")
        for i, w in enumerate(body.maintenance_windows)
    ]
    sel = body.selection
    selection = Selection(
        tuple(sel.models), tuple(sel.regions), tuple(sel.tags), sel.year_min, sel.year_max,
        dict(sel.installed),
    )  # fmt: skip
    phases = [
        PhaseSpec(p.percent, p.success_threshold, p.failure_threshold, p.on_failure, p.min_finished)
        for p in body.phases
    ]
    result = await in_session(
        request,
        lambda s: create_campaign(
            s, name=body.name, release=body.release, phases=phases, selection=selection,
            windows=windows, install_on_consent=body.install_on_consent,
            description=body.description, actor=actor,
        ),
    )  # fmt: skip
    return web.json_response(result, status=201)


def _state_query(request: web.Request, enum: type[CampaignState] | type[PartState]) -> Any:
    text = request.query.get("state")
    if text is None:
        return None
    try:
        return enum(text)
    except ValueError:
        raise ApiError(
            400, f"query state must be one of {', '.join(s.value for s in enum)}"
        ) from None


async def list_campaigns(request: web.Request) -> web.Response:
    limit, position = page_query(request)
    after = id_cursor(position)
    state = _state_query(request, CampaignState)
    rows, last = await in_session(
        request, lambda s: campaigns_page(s, state=state, after=after, limit=limit)
    )
    return web.json_response({"campaigns": rows, "next": next_cursor(last)})


async def show_campaign(request: web.Request) -> web.Response:
    name = url_name(request, "name")
    return web.json_response(await in_session(request, lambda s: campaign_record(s, name)))


async def list_campaign_vehicles(request: web.Request) -> web.Response:
    name = url_name(request, "name")
    limit, position = page_query(request)
    after = key_cursor(position)
    state = _state_query(request, PartState)
    rows, last = await in_session(
        request, lambda s: parts_page(s, name, state=state, after=after, limit=limit)
    )
    return web.json_response({"vehicles": rows, "next": next_cursor(last)})


def _action_handler(action: CampaignAction) -> Any:
    async def handler(request: web.Request) -> web.Response:
        name = url_name(request, "name")
        body = await json_body(request, CampaignActionRequest, optional=True)
        director, actor = request.app[DIRECTOR], actor_of(request)
        for attempt in range(_ACTION_ATTEMPTS):
            try:
                result = await in_session(
                    request, lambda s: act(s, director, name, action, actor, body.reason)
                )
                break
            except OperationalError as exc:  # a deadlock or lock timeout with the engine
                if attempt + 1 == _ACTION_ATTEMPTS:
                    raise ApiError(
                        503, f"campaign {name} is busy (the engine holds it); retry"
                    ) from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        for vin in result.changed_vins:
            director.invalidate(vin)
        return web.json_response(result.record)

    handler.__name__ = f"campaign_{action}"
    return handler


async def sweep_campaigns(app: web.Application) -> None:
    """The background sweep (:func:`server.campaigns.sweep_once`), forever."""
    engine, director = app[ENGINE], app[DIRECTOR]
    while True:
        more, took = False, 0.0
        try:
            began = time.monotonic()
            result = await asyncio.to_thread(sweep_once, engine, director)
            took = time.monotonic() - began
            if took > SLOW_SWEEP_SECONDS:
                log.warning("campaign sweep step took %.1f s", took)
            for vin in result.changed_vins:
                director.invalidate(vin)
            more = result.more
        except Exception:
            log.exception("campaign sweep failed; retrying")
            took = SWEEP_IDLE_SECONDS
        # about a third of the server's time at most: vehicles' polls come first
        await asyncio.sleep(max(0.01, SWEEP_REST * took) if more else SWEEP_IDLE_SECONDS)


_C = "/api/v1/campaigns"
_ACTIONS = {
    CampaignAction.APPROVE: "Approve a draft campaign (not by its creator)",
    CampaignAction.START: "Start an approved campaign: its first phase opens",
    CampaignAction.PAUSE: "Pause: no new offers or phase changes until resumed",
    CampaignAction.RESUME: "Resume a paused campaign where it was",
    CampaignAction.CANCEL: "Cancel: unfinished vehicles' assignments are withdrawn",
}
ROUTES = [
    Route("PUT", "/api/v1/vehicles/{vin}/attributes", put_attributes, Permission.MANAGE_FLEET,
          "Set the vehicle's model, year, region and tags (campaign selections)",
          VehicleAttributes),
    Route("GET", "/api/v1/vehicles/{vin}/attributes", get_attributes, Permission.READ_FLEET,
          "The vehicle's model, year, region and tags"),
    Route("POST", "/api/v1/releases", add_release, Permission.MANAGE_CAMPAIGNS,
          "Name a release: one published image per hardware id", ReleaseRequest),
    Route("GET", "/api/v1/releases", list_releases, Permission.READ_RELEASES,
          "Releases by name (paged)"),
    Route("GET", "/api/v1/releases/{name}", show_release, Permission.READ_RELEASES,
          "A release: its images, versions, release counters and requirements"),
    Route("POST", _C, add_campaign, Permission.MANAGE_CAMPAIGNS,
          "Create a draft campaign of a release over a selection, in phases", CampaignRequest),
    Route("GET", _C, list_campaigns, Permission.READ_FLEET,
          "Campaigns (paged; ?state= filters)"),
    Route("GET", _C + "/{name}", show_campaign, Permission.READ_FLEET,
          "A campaign with its per-phase progress"),
    Route("GET", _C + "/{name}/vehicles", list_campaign_vehicles, Permission.READ_FLEET,
          "The vehicles the campaign reached and their parts' states (paged; ?state=)"),
    *(
        Route("POST", f"{_C}/{{name}}/{action}", _action_handler(action),
              Permission.MANAGE_CAMPAIGNS, summary, CampaignActionRequest)
        for action, summary in _ACTIONS.items()
    ),
]  # fmt: skip
