"""The dashboard's routes: pages, their live JSON, login and logout, operators' actions.

Every route is a :class:`~server.api.access.Route` in the server's one route
table, so the access middleware checks it like any API route: pages need
the permission of what they show (the fleet: ``read-fleet``; releases:
``read-releases``), actions the permission of the action
(``manage-campaigns``), and a browser's POST passes the CSRF check first.
A viewer's pages render no action buttons, and an action it posts anyway
is refused with 403 by the same check.

:func:`pages_middleware` turns refusals of page requests into pages: no
session → the login page (303), anything else → an error page with the
status and the reason. The ``…/live`` routes answer JSON like the API.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from sqlmodel import Session

from server import audit
from server.accounts import AccountError, authenticate
from server.api.access import (
    VEHICLE_ACCESS,
    Audience,
    Route,
    actor_of,
    check_csrf,
    form_of,
    operator_from_request,
    session_of_cookie,
)
from server.api.boundary import ApiError, in_session, query_number, url_name, url_vin
from server.api.context import (
    CONFIG,
    DIRECTOR,
    ENGINE,
    IMAGE_REPO,
    LOGINS,
    PASSWORD_HASHING,
)
from server.campaign_states import CampaignAction, CampaignState, allowed_actions
from server.campaigns import act, attributes_of, campaign_record, campaigns_page, releases_page
from server.dashboard import queries
from server.dashboard.charts import outcome_chart
from server.dashboard.render import live as live_response
from server.dashboard.render import page, render_text, with_headers
from server.fleet import FleetError, vehicle_record
from server.image_repository import ImageRepositoryError
from server.key_status import key_status
from server.operator_passwords import LoginRefusedError, login_with_password
from server.roles import Operator, Permission
from server.web_sessions import DASHBOARD_PREFIX, SESSION_COOKIE, end_session, start_session
from signing.metadata import image_custom
from signing.names import InvalidNameError, check_name

_STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_LOGIN_CSRF_COOKIE = "uptake_login_csrf"
_D = DASHBOARD_PREFIX.rstrip("/")
#: Moves only the campaign engine makes: no button, and refused from a form.
_ENGINE_ACTIONS = frozenset({CampaignAction.COMPLETE, CampaignAction.ABORT})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- errors as pages --------------------------------------------------------------------


def _is_page(request: web.Request) -> bool:
    return request.path.startswith(DASHBOARD_PREFIX) and not request.path.endswith("/live")


@web.middleware
async def pages_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals of dashboard pages as pages (see module docstring)."""
    if not _is_page(request):
        return await handler(request)
    try:
        return await handler(request)
    except (ApiError, FleetError, AccountError) as exc:
        status, message = exc.status, str(exc)
    except InvalidNameError as exc:
        status, message = 400, str(exc)
    # a browser (no Authorization header) is sent to log in; a script with a bad token gets 401
    if (
        status == 401
        and request.method in ("GET", "HEAD")
        and "Authorization" not in request.headers
    ):
        raise web.HTTPSeeOther(f"{_D}/login?{urlencode({'next': request.path_qs})}")
    return page(request, "error.html", status=status, status_code=status, message=message)


# -- login and logout ---------------------------------------------------------------------


def _client_address(request: web.Request) -> str:
    """Who is logging in, for the guessing limits: behind a trusted proxy, the address the proxy
    saw (the last ``X-Forwarded-For`` entry, which it appended), else the connection's."""
    remote = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For", "")
    if forwarded and request.app[VEHICLE_ACCESS].from_trusted_proxy(remote):
        return forwarded.rsplit(",", 1)[-1].strip()[:64] or remote
    return remote


def _secure(request: web.Request) -> bool:
    """Did the browser reach us over TLS (ours, or a trusted proxy's)?"""
    if request.secure:
        return True
    access = request.app[VEHICLE_ACCESS]
    return access.from_trusted_proxy(request.remote) and (
        request.headers.get("X-Forwarded-Proto", "") == "https"
    )


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str,
                max_age: int | None = None) -> None:  # fmt: skip
    response.set_cookie(
        name, value, path=DASHBOARD_PREFIX, httponly=True, secure=_secure(request),
        samesite="Strict", max_age=max_age,
    )  # fmt: skip


def _safe_next(target: str | None) -> str:
    """Where to go after login: a dashboard path of this server, never another site."""
    if (
        target
        and target.startswith(DASHBOARD_PREFIX)
        and "//" not in target
        and "\\" not in target
        and target.isprintable()
        and len(target) < 1000
    ):
        return target
    return DASHBOARD_PREFIX


def _home(operator: Operator) -> str:
    return f"{_D}/fleet" if operator.may(Permission.READ_FLEET) else f"{_D}/releases"


async def index(request: web.Request) -> web.StreamResponse:
    web_session = await session_of_cookie(request)
    if web_session is None:
        raise web.HTTPSeeOther(f"{_D}/login")
    raise web.HTTPSeeOther(_home(web_session.operator))


def _login_page(request: web.Request, *, status: int = 200, message: str = "",
                name: str = "") -> web.Response:  # fmt: skip
    token = request.cookies.get(_LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = page(
        request, "login.html", status=status, login_csrf=token, message=message, name=name,
        next=_safe_next(request.query.get("next")),
    )  # fmt: skip
    _set_cookie(response, request, _LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(request)


async def login(request: web.Request) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if (fetch_site not in (None, "same-origin")) or (
        origin is not None and origin.partition("://")[2] != request.host
    ):
        raise ApiError(403, "CSRF check failed: log in from this server's login page")
    form = await form_of(request)
    expected = request.cookies.get(_LOGIN_CSRF_COOKIE, "")
    presented = form.get("login_csrf")
    if (
        not expected
        or not isinstance(presented, str)
        or not secrets.compare_digest(expected, presented)
    ):
        return _login_page(request, status=403, message="The login form expired: please try again.")
    method = form.get("method")
    address = _client_address(request)
    name = str(form.get("name", ""))[:128]
    try:
        if method == "token":
            token = str(form.get("token", "")).strip()

            # a random 256-bit secret names no account: only the address's limit applies
            attempt = request.app[LOGINS].attempt(None, address)
            found = await in_session(request, lambda s: authenticate(s, token))
            if found is None:
                raise LoginRefusedError(401, "unknown, expired or revoked token")
            request.app[LOGINS].succeeded(None, address, attempt)
            operator = found
        elif method == "password":
            password = str(form.get("password", ""))
            operator = await login_with_password(
                lambda fn: in_session(request, fn), request.app[LOGINS],
                request.app[PASSWORD_HASHING], name, password, address,
            )  # fmt: skip
        else:
            raise LoginRefusedError(400, "choose to log in with a password or a token")
    except LoginRefusedError as exc:
        response = _login_page(request, status=exc.status, message=str(exc), name=name)
        if exc.retry_after:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return response

    def begin(session: Session) -> str:
        cookie = start_session(session, operator, str(method), address)
        audit.append(session, f"operator:{operator.name}", "dashboard.login", operator.name,
                     method=str(method), address=address)  # fmt: skip
        return cookie

    cookie = await in_session(request, begin)
    target = _safe_next(str(form.get("next", "")))
    response = _see_other(target if target != DASHBOARD_PREFIX else _home(operator))
    _set_cookie(response, request, SESSION_COOKIE, cookie)
    response.del_cookie(_LOGIN_CSRF_COOKIE, path=DASHBOARD_PREFIX)
    with_headers(response)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """End this browser's session (public: whoever holds a live session may end it, CSRF-checked)."""
    cookie = request.cookies.get(SESSION_COOKIE, "")
    web_session = await session_of_cookie(request)
    if web_session is not None:
        await check_csrf(request, web_session)
        await in_session(request, lambda s: end_session(s, cookie))
    response = _see_other(f"{_D}/login")
    response.del_cookie(SESSION_COOKIE, path=DASHBOARD_PREFIX)
    return response


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = _STATIC / name
    if (
        "/" in name
        or name.startswith(".")
        or path.suffix not in _STATIC_TYPES
        or not path.is_file()
    ):
        raise ApiError(404, f"no static file {name!r}")
    response = web.Response(
        body=await asyncio.to_thread(path.read_bytes), content_type=_STATIC_TYPES[path.suffix]
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# -- the fleet ------------------------------------------------------------------------------


#: The fleet overview's counts, shared by every request of this process for a few seconds.
FLEET_SUMMARY: web.AppKey[queries.FleetSummaryCache] = web.AppKey(
    "fleet_summary", queries.FleetSummaryCache
)


def fleet_view(summary: queries.FleetSummary) -> dict[str, Any]:
    return {"overview": summary.overview, "models": summary.models, "releases": summary.releases}


#: The audit log's verification, shared by every request of this process for a minute.
AUDIT_VERIFICATION: web.AppKey[queries.AuditVerificationCache] = web.AppKey(
    "audit_verification", queries.AuditVerificationCache
)


async def _fleet_summary(request: web.Request) -> queries.FleetSummary:
    return await asyncio.to_thread(request.app[FLEET_SUMMARY].get, request.app[ENGINE])


async def fleet(request: web.Request) -> web.StreamResponse:
    return page(request, "fleet.html", **fleet_view(await _fleet_summary(request)))


async def fleet_live(request: web.Request) -> web.StreamResponse:
    overview = (await _fleet_summary(request)).overview
    return live_response(
        request,
        {"fleet-counts": render_text(request, "fleet_counts.html", overview=overview)},
        **overview.live(),
    )


async def vehicles(request: web.Request) -> web.StreamResponse:
    show = request.query.get("show", queries.VehicleFilter.ALL)
    if show not in queries.VehicleFilter.CHOICES:
        raise ApiError(400, f"show must be one of {', '.join(queries.VehicleFilter.CHOICES)}")
    after = request.query.get("after")
    image = request.query.get("image")
    if after is not None:
        check_name(after, "query after")
    if image is not None and (len(image) > 512 or not image.isprintable()):
        raise ApiError(400, "query image must be an image path")
    rows, last = await in_session(
        request, lambda s: queries.vehicles_page(s, show=show, image=image, after=after)
    )
    more = None
    if last is not None:
        params = {"show": show, "after": last, **({"image": image} if image else {})}
        more = f"{_D}/vehicles?{urlencode(params)}"
    return page(request, "vehicles.html", rows=rows, show=show, image=image, more=more,
                choices=queries.VehicleFilter.CHOICES)  # fmt: skip


def vehicle_view(session: Session, vin: str) -> dict[str, Any]:
    return {
        "v": vehicle_record(session, vin),
        "attributes": attributes_of(session, vin),
        "parts": queries.parts_of_vehicle(session, vin),
        "ledger": queries.ledger_latest(session, vin),
        "manifest": queries.last_manifest(session, vin),
    }


async def vehicle(request: web.Request) -> web.StreamResponse:
    vin = url_vin(request)
    return page(
        request, "vehicle.html", **await in_session(request, lambda s: vehicle_view(s, vin))
    )


async def vehicle_live(request: web.Request) -> web.StreamResponse:
    vin = url_vin(request)
    view = await in_session(request, lambda s: vehicle_view(s, vin))
    return live_response(
        request, {"vehicle-state": render_text(request, "vehicle_state.html", **view)}
    )


# -- releases ---------------------------------------------------------------------------------


def _releases_view(request: web.Request) -> dict[str, Any]:
    repo = request.app[IMAGE_REPO]
    by_hardware: dict[str, list[dict[str, Any]]] = {}
    for path, target in repo.targets.signed.targets.items():
        custom = image_custom(target)
        for hw in custom.hardware_ids:
            by_hardware.setdefault(hw, []).append({
                "filepath": path, "version": custom.version,
                "release_counter": custom.release_counter, "length": target.length,
                "sha256": target.hashes.get("sha256", ""),
            })  # fmt: skip
    for images in by_hardware.values():
        images.sort(key=lambda i: (-i["release_counter"], i["filepath"]))
    try:
        staged: dict[str, Any] | None = repo.staged_status().to_dict()
    except ImageRepositoryError:
        staged = None
    return {
        "by_hardware": dict(sorted(by_hardware.items())),
        "targets_version": repo.targets.signed.version,
        "staged": staged,
        "roles": key_status(request.app[CONFIG]),
    }


async def releases(request: web.Request) -> web.StreamResponse:
    view = await asyncio.to_thread(_releases_view, request)
    image_repo = request.app[IMAGE_REPO]
    named, _ = await in_session(
        request, lambda s: releases_page(s, image_repo, after=None, limit=queries.PAGE_SIZE)
    )
    return page(request, "releases.html", named=named, **view)


# -- campaigns -----------------------------------------------------------------------------------


async def campaigns(request: web.Request) -> web.StreamResponse:
    after = query_number(request, "after", "a campaign number")
    rows, last = await in_session(
        request, lambda s: campaigns_page(s, state=None, after=after, limit=queries.PAGE_SIZE)
    )
    more = f"{_D}/campaigns?after={last}" if last is not None else None
    return page(request, "campaigns.html", campaigns=rows, more=more)


def campaign_view(session: Session, name: str, operator: Operator | None) -> dict[str, Any]:
    record = campaign_record(session, name)
    campaign_id = queries.campaign_id_of(session, name)
    assert campaign_id is not None
    started = record["started_at"]
    points = (
        queries.campaign_outcomes(session, campaign_id, datetime.fromisoformat(started))
        if started
        else []
    )
    actions: list[str] = []
    if operator is not None and operator.may(Permission.MANAGE_CAMPAIGNS):
        actions = [
            str(a)
            for a in allowed_actions(CampaignState(record["state"]))
            if a not in _ENGINE_ACTIONS
        ]
    return {
        "c": record,
        "chart": outcome_chart(points) if points else None,
        "failed": queries.failed_parts(session, campaign_id),
        "actions": actions,
    }


async def campaign(request: web.Request) -> web.StreamResponse:
    name, operator = url_name(request, "name"), operator_from_request(request)
    view = await in_session(request, lambda s: campaign_view(s, name, operator))
    return page(request, "campaign.html", **view)


async def campaign_live(request: web.Request) -> web.StreamResponse:
    name, operator = url_name(request, "name"), operator_from_request(request)
    view = await in_session(request, lambda s: campaign_view(s, name, operator))
    return live_response(
        request,
        {
            "campaign-actions": render_text(request, "campaign_actions.html", **view),
            "campaign-progress": render_text(request, "campaign_progress.html", **view),
        },
        state=view["c"]["state"],
        totals=view["c"]["totals"],
    )


def _campaign_action(action: CampaignAction) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        """An operator's action from the campaign page (the API's action, the same checks)."""
        name = url_name(request, "name")
        form = await form_of(request)
        reason = str(form.get("reason", ""))[:1000]
        director, actor = request.app[DIRECTOR], actor_of(request)
        result = await in_session(request, lambda s: act(s, director, name, action, actor, reason))
        for vin in result.changed_vins:
            director.invalidate(vin)
        return _see_other(f"{_D}/campaigns/{name}")

    handler.__name__ = f"dashboard_campaign_{action}"
    return handler


#: The operators' actions, one route each (the engine's complete and abort have none).
_ACTIONS = [a for a in CampaignAction if a not in _ENGINE_ACTIONS]


# -- the audit log -------------------------------------------------------------------------------


async def audit_log(request: web.Request) -> web.StreamResponse:
    before = query_number(request, "before", "an audit sequence number")

    rows, last = await in_session(request, lambda s: queries.audit_page(s, before=before))
    verifier = request.app[AUDIT_VERIFICATION]
    verification = await asyncio.to_thread(verifier.get, request.app[ENGINE])
    more = f"{_D}/audit?before={last}" if last is not None else None
    return page(request, "audit.html", rows=rows, more=more, verification=verification,
                verified_at=verifier.computed_at)  # fmt: skip


ROUTES: list[Route] = [
    Route("GET", _D, index, Audience.PUBLIC, "Dashboard: to the first page, or to log in"),
    Route("GET", _D + "/", index, Audience.PUBLIC, "Dashboard: to the first page, or to log in"),
    Route("GET", _D + "/login", login_form, Audience.PUBLIC, "Dashboard: the login page"),
    Route("POST", _D + "/login", login, Audience.PUBLIC,
          "Dashboard: log in with a token or a password (form; rate-limited)"),
    Route("POST", _D + "/logout", logout, Audience.PUBLIC, "Dashboard: log out (form)"),
    Route("GET", _D + "/static/{name}", static, Audience.PUBLIC,
          "Dashboard: its stylesheet and script"),
    Route("GET", _D + "/fleet", fleet, Permission.READ_FLEET, "Dashboard: fleet overview"),
    Route("GET", _D + "/fleet/live", fleet_live, Permission.READ_FLEET,
          "Dashboard: fleet overview counters (JSON, polled)"),
    Route("GET", _D + "/vehicles", vehicles, Permission.READ_FLEET,
          "Dashboard: vehicles (paged, filtered)"),
    Route("GET", _D + "/vehicles/{vin}", vehicle, Permission.READ_FLEET, "Dashboard: a vehicle"),
    Route("GET", _D + "/vehicles/{vin}/live", vehicle_live, Permission.READ_FLEET,
          "Dashboard: a vehicle's state (JSON, polled)"),
    Route("GET", _D + "/releases", releases, Permission.READ_RELEASES,
          "Dashboard: images, staged signatures, role expiries"),
    Route("GET", _D + "/campaigns", campaigns, Permission.READ_FLEET, "Dashboard: campaigns"),
    Route("GET", _D + "/campaigns/{name}", campaign, Permission.READ_FLEET,
          "Dashboard: a campaign's phases, outcomes over time, failed vehicles"),
    Route("GET", _D + "/campaigns/{name}/live", campaign_live, Permission.READ_FLEET,
          "Dashboard: a campaign's progress (JSON, polled)"),
    *(
        Route("POST", f"{_D}/campaigns/{{name}}/{action}", _campaign_action(action),
              Permission.MANAGE_CAMPAIGNS, f"Dashboard: {action} a campaign (form)")
        for action in _ACTIONS
    ),
    Route("GET", _D + "/audit", audit_log, Permission.READ_FLEET,
          "Dashboard: the audit log and its verification"),
]  # fmt: skip

__all__ = ["AUDIT_VERIFICATION", "FLEET_SUMMARY", "ROUTES", "pages_middleware"]
