"""Pages from Jinja2 templates (autoescaped), with the headers every dashboard answer carries."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from server.api.access import CSRF_FIELD, operator_from_request, web_session_of
from server.db import as_utc, utcnow
from server.roles import Permission

#: No inline script or style anywhere: the one script and stylesheet come from /dashboard/static/.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on forms
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def _when(value: datetime | str | None) -> str:
    """A time (or the ISO 8601 text the API's dicts carry) as people read it, in UTC."""
    when = value
    if isinstance(value, str) and value:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return value
    if not isinstance(when, datetime):
        return "never"
    return as_utc(when).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    seconds = int((utcnow() - as_utc(value)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{max(seconds, 0)} s ago"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "n/a"


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("server.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, ago=_ago)
    env.globals.update(percent=_percent, Permission=Permission, CSRF_FIELD=CSRF_FIELD)
    return env


def render_text(request: web.Request | None, template: str, **context: Any) -> str:
    """``template`` rendered for ``request``'s operator (None: nobody logged in, e.g. a bench)."""
    operator = operator_from_request(request) if request is not None else None
    web_session = web_session_of(request) if request is not None else None
    return (
        environment()
        .get_template(template)
        .render(
            operator=operator,
            may=(lambda p: operator is not None and operator.may(p)),
            csrf=web_session.csrf_token if web_session else "",
            path=request.path if request is not None else "",
            **context,
        )
    )


def with_headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(SECURITY_HEADERS)
    return response


def page(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    response = web.Response(
        text=render_text(request, template, **context),
        status=status,
        content_type="text/html",
        charset="utf-8",
    )
    with_headers(response)
    return response


def live(request: web.Request, regions: dict[str, str], **values: Any) -> web.Response:
    """The JSON a page polls: fresh HTML of its live regions, and plain values."""
    response = web.json_response({"regions": regions, "values": values})
    with_headers(response)
    return response
