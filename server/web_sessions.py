"""Dashboard sessions: a cookie for a logged-in browser, and its CSRF token.

Logging in to the dashboard (with an operator token or an account's
password, :mod:`server.operator_passwords`) creates one
:class:`~server.dashboard_tables.DashboardSession`: the browser gets a random
256-bit cookie value (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the
request came over TLS, ``Path=/dashboard/``), the server keeps only its
SHA-256, the account's name, and a random CSRF token that every form of the
dashboard carries and every POST must send back (:func:`csrf_matches`).

A session ends at logout, :data:`SESSION_LIFETIME` after login, after
:data:`SESSION_IDLE` without a request, when its account's password is set
again, and, since the account is looked up on every request
(:func:`operator_of_session`), when its token is revoked or expires.
A role change takes effect on the next request for the same reason.

Cookies are accepted on ``/dashboard/`` routes only: the API (``/api/v1``)
takes bearer tokens alone, so no cross-site form can act on it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import Session, col, delete

from server.dashboard_tables import DashboardSession
from server.db import as_utc, utcnow
from server.operator_passwords import active_operator
from server.roles import Operator

SESSION_COOKIE = "uptake_session"
SESSION_LIFETIME = timedelta(hours=8)
SESSION_IDLE = timedelta(hours=1)
#: ``last_seen_at`` is written at most this often (not one write per page view).
_TOUCH_EVERY = timedelta(minutes=1)
#: The path every dashboard route lives under (and the cookie's Path).
DASHBOARD_PREFIX = "/dashboard/"


@dataclass(frozen=True)
class WebSession:
    """A logged-in browser: who, and the CSRF token its forms carry."""

    operator: Operator
    csrf_token: str


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("utf-8", "replace")).hexdigest()


def start_session(session: Session, operator: Operator, method: str, address: str) -> str:
    """A new session of ``operator``; returns the cookie value (shown to the browser only)."""
    cookie = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        DashboardSession(
            id_sha256=_digest(cookie),
            operator=operator.name,
            csrf_token=secrets.token_urlsafe(32),
            method=method,
            address=(address or "")[:64],
            created_at=now,
            last_seen_at=now,
            expires_at=now + SESSION_LIFETIME,
        )
    )
    # expired sessions go when anyone logs in: the table stays as small as its live sessions
    session.exec(delete(DashboardSession).where(col(DashboardSession.expires_at) <= now))
    return cookie


def operator_of_session(session: Session, cookie: str) -> WebSession | None:
    """The live session whose cookie this is, or None (unknown, expired, idle, token revoked)."""
    if not cookie or len(cookie) > 100:
        return None
    row = session.get(DashboardSession, _digest(cookie))
    if row is None:
        return None
    now = utcnow()
    if as_utc(row.expires_at) <= now or as_utc(row.last_seen_at) + SESSION_IDLE <= now:
        session.delete(row)
        session.commit()
        return None
    operator = active_operator(session, row.operator)
    if operator is None:
        return None
    if as_utc(row.last_seen_at) + _TOUCH_EVERY <= now:
        row.last_seen_at = now
        session.add(row)
        session.commit()
    return WebSession(operator, row.csrf_token)


def end_session(session: Session, cookie: str) -> None:
    row = session.get(DashboardSession, _digest(cookie)) if cookie else None
    if row is not None:
        session.delete(row)


def csrf_matches(expected: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(expected.encode(), (presented or "").encode())
