"""Routes admins call: operator tokens, and the audit log."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlmodel import Session

from server import accounts, audit, operator_passwords
from server.api.access import Route, actor_of
from server.api.boundary import (
    id_cursor,
    in_session,
    json_body,
    next_cursor,
    page_query,
    query_params,
)
from server.api.context import PASSWORD_HASHING
from server.api.responses import AuditPage, AuditVerification
from server.api.schemas import AuditQuery, AuditVerifyQuery, PasswordRequest, TokenRequest
from server.roles import Permission
from signing.names import check_name


async def list_tokens(request: web.Request) -> web.Response:
    tokens = await in_session(request, accounts.list_tokens)
    return web.json_response({"tokens": [t.to_dict() for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    body = await json_body(request, TokenRequest)
    actor = actor_of(request)

    def run(session: Session) -> dict[str, Any]:
        token, info = accounts.create_token(
            session, body.name, body.role, created_by=actor,
            hardware_ids=tuple(body.hardware_ids), expires_at=body.expires_at,
        )  # fmt: skip
        return {**info.to_dict(), "token": token}

    return web.json_response(await in_session(request, run), status=201)


async def revoke_token(request: web.Request) -> web.Response:
    name = check_name(request.match_info["name"], "URL name")
    actor = actor_of(request)
    info = await in_session(request, lambda s: accounts.revoke_token(s, name, revoked_by=actor))
    return web.json_response(info.to_dict())


async def set_password(request: web.Request) -> web.Response:
    name = check_name(request.match_info["name"], "URL name")
    body = await json_body(request, PasswordRequest)
    actor = actor_of(request)
    operator_passwords.check_password_rules(body.password)
    hashed = await request.app[PASSWORD_HASHING].hash(body.password)
    await in_session(
        request, lambda s: operator_passwords.set_password(s, name, hashed, set_by=actor)
    )
    return web.json_response({"name": name, "password_set": True})


async def list_audit(request: web.Request) -> web.Response:
    q = query_params(request, AuditQuery)
    limit, position = page_query(request)
    after = id_cursor(position)
    records, last = await in_session(
        request,
        lambda s: audit.records_page(
            s, after=after, limit=limit, action=q.action, subject=q.subject
        ),
    )
    return web.json_response({"records": records, "next": next_cursor(last)})


async def verify_audit(request: web.Request) -> web.Response:
    expected = query_params(request, AuditVerifyQuery).expected_head
    result = await in_session(request, lambda s: audit.verify(s, expected_head=expected))
    return web.json_response(result.to_dict())


ROUTES = [
    Route("GET", "/api/v1/tokens", list_tokens, Permission.MANAGE_ACCOUNTS,
          "Operator tokens (never the tokens themselves)"),
    Route("POST", "/api/v1/tokens", create_token, Permission.MANAGE_ACCOUNTS,
          "Create an operator token: shown once in the answer", TokenRequest),
    Route("POST", "/api/v1/tokens/{name}/revoke", revoke_token, Permission.MANAGE_ACCOUNTS,
          "Revoke an operator token at once"),
    Route("POST", "/api/v1/tokens/{name}/password", set_password, Permission.MANAGE_ACCOUNTS,
          "Set the dashboard password of an operator account (ends its dashboard sessions)",
          PasswordRequest),
    Route("GET", "/api/v1/audit", list_audit, Permission.READ_FLEET,
          "The audit log, oldest first (paged; filter by action or subject)",
          query=AuditQuery, response=AuditPage),
    Route("GET", "/api/v1/audit/verify", verify_audit, Permission.READ_FLEET,
          "Check the audit log's hash chain", query=AuditVerifyQuery,
          response=AuditVerification),
]  # fmt: skip
