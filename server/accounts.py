"""Operator accounts: named API tokens with a role, shown once, kept only as a hash.

A token is ``uptake_`` and 43 URL-safe characters of randomness (256
bits). The server keeps its SHA-256 and nothing else: a random secret of
that length needs no slow password hash, and a leaked database reveals no
usable token. :func:`authenticate` looks the digest up (an indexed equality
lookup, so there is no timing to learn from) and refuses a token that is
unknown, expired or revoked with one and the same answer.

``uptake server init`` creates the first token, ``admin`` with the admin
role, and writes it to ``DATA/admin-token`` (0600) for the operator's
commands; the running server never reads that file. Further tokens come
from ``uptake admin token create`` (role, supplier hardware ids, expiry),
and ``uptake admin token revoke`` ends one at once. Every change is in the
audit log (:mod:`server.audit`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from server import audit
from server.db import OperatorToken, as_utc, utcnow
from server.roles import Operator, Role
from signing.exceptions import UptakeError
from signing.names import InvalidNameError, check_name

TOKEN_PREFIX = "uptake_"
#: The name of the first token, made by ``uptake server init``.
BOOTSTRAP_ADMIN = "admin"
_MAX_HARDWARE_IDS = 64


class AccountError(UptakeError):
    """A token request was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """What the server shows of a token (never the token itself)."""

    name: str
    role: Role
    hardware_ids: tuple[str, ...]
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "hardware_ids": list(self.hardware_ids),
            "created_at": as_utc(self.created_at).isoformat(),
            "created_by": self.created_by,
            "expires_at": as_utc(self.expires_at).isoformat() if self.expires_at else None,
            "revoked_at": as_utc(self.revoked_at).isoformat() if self.revoked_at else None,
        }


def _info(row: OperatorToken) -> TokenInfo:
    return TokenInfo(
        row.name,
        Role(row.role),
        tuple(json.loads(row.hardware_ids)),
        row.created_at,
        row.created_by,
        row.expires_at,
        row.revoked_at,
    )


def create_token(
    session: Session,
    name: str,
    role: Role,
    *,
    created_by: str,
    hardware_ids: tuple[str, ...] = (),
    expires_at: datetime | None = None,
) -> tuple[str, TokenInfo]:
    """A new token (returned once, in clear) and what the server keeps of it."""
    try:
        check_name(name, "token name")
        for hw in hardware_ids:
            check_name(hw, "hardware id")
    except InvalidNameError as exc:
        raise AccountError(400, str(exc)) from exc
    if role is Role.SUPPLIER and not hardware_ids:
        raise AccountError(400, "a supplier token needs the hardware ids it may publish for")
    if role is not Role.SUPPLIER and hardware_ids:
        raise AccountError(400, "only supplier tokens are limited to hardware ids")
    if len(hardware_ids) > _MAX_HARDWARE_IDS:
        raise AccountError(400, f"at most {_MAX_HARDWARE_IDS} hardware ids")
    if expires_at is not None and as_utc(expires_at) <= utcnow():
        raise AccountError(400, "the expiry is in the past")
    if session.exec(select(OperatorToken).where(OperatorToken.name == name)).first():
        raise AccountError(409, f"a token named {name!r} exists (revoked ones keep their name)")
    token = new_token()
    row = OperatorToken(
        name=name,
        role=role.value,
        hardware_ids=json.dumps(sorted(set(hardware_ids))),
        token_sha256=token_digest(token),
        created_by=created_by,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    audit.append(
        session, created_by, "token.create", name, role=role.value,
        hardware_ids=sorted(set(hardware_ids)),
        expires_at=as_utc(expires_at).isoformat() if expires_at else None,
    )  # fmt: skip
    return token, _info(row)


def revoke_token(session: Session, name: str, *, revoked_by: str) -> TokenInfo:
    row = session.exec(select(OperatorToken).where(OperatorToken.name == name)).first()
    if row is None:
        raise AccountError(404, f"no token named {name!r}")
    if row.revoked_at is None:
        row.revoked_at, row.revoked_by = utcnow(), revoked_by
        session.add(row)
        audit.append(session, revoked_by, "token.revoke", name)
    return _info(row)


def list_tokens(session: Session) -> list[TokenInfo]:
    rows = session.exec(select(OperatorToken).order_by(col(OperatorToken.name))).all()
    return [_info(r) for r in rows]


def authenticate(session: Session, token: str) -> Operator | None:
    """The operator holding ``token``, or None (unknown, expired or revoked)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = session.exec(
        select(OperatorToken).where(OperatorToken.token_sha256 == token_digest(token))
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
        return None
    return Operator(row.name, Role(row.role), tuple(json.loads(row.hardware_ids)))


def bootstrap_admin(session: Session) -> str:
    """The first admin token of a new deployment (``uptake server init``)."""
    token, _ = create_token(session, BOOTSTRAP_ADMIN, Role.ADMIN, created_by="server init")
    return token
