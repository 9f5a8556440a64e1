"""Dashboard passwords of operator accounts: scrypt hashes, and a limit on guessing.

An operator account is a named token with a role (:mod:`server.accounts`).
An admin may give the account a password (``uptake admin token password
NAME``, which calls ``POST /api/v1/tokens/{name}/password``) so that its
holder logs in to the dashboard with the name and password rather than by
pasting the token. The server keeps ``scrypt$N$r$p$salt$hash``
(:func:`hash_password`, ``hashlib.scrypt`` with N=2^15, r=8, p=1 and a 16-byte
random salt), never the password. Setting a password ends the account's open
dashboard sessions. A password belongs to the token: a revoked or expired
token logs in no more, with a password or without.

Guessing is bounded by :class:`LoginLimiter`: after
:data:`MAX_FAILURES_PER_ACCOUNT` failed logins to one account, or
:data:`MAX_FAILURES_PER_ADDRESS` from one address, within
:data:`FAILURE_WINDOW` seconds, further attempts are refused (429 with
``Retry-After``) without checking the password, until the window has passed.
Unknown accounts cost the same scrypt computation as known ones and get
the same answer, so the login form does not tell which names exist.

An attempt counts as a failure from the moment it is admitted, before its
password is hashed (:meth:`LoginLimiter.attempt`), and is taken back only
when it succeeds: so concurrent guesses cannot all pass the check while the
first ones are still hashing.

Hashing a password (32 MB of scrypt, about 0.2 s of CPU) runs on its own
:data:`HASHING_THREADS` threads (:class:`PasswordHashing`), never in the pool
that serves the API's database work, and at most :data:`MAX_LOGINS_IN_PROGRESS`
logins are hashing or waiting to at once: beyond, 429 at once. A flood of
logins from many addresses so slows other logins only, not operators' API
requests or vehicles.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol, TypeVar

from sqlmodel import Session, col, delete, select

from server import audit
from server.accounts import AccountError
from server.dashboard_tables import DashboardSession, OperatorPassword
from server.db import OperatorToken, as_utc, utcnow
from server.roles import Operator, Role

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20
#: Seconds a failed login counts against its account and address.
FAILURE_WINDOW = 900.0
#: Accounts and addresses remembered at most (oldest forgotten first): bounded memory.
_MAX_TRACKED = 10_000
#: Threads that hash passwords (each scrypt takes 32 MB and one core for ~0.2 s).
HASHING_THREADS = 2
#: Logins hashing or waiting to, at most, across all accounts and addresses (429 beyond).
MAX_LOGINS_IN_PROGRESS = 16
#: Seconds a client refused for too many logins in progress is asked to wait.
_BUSY_RETRY = 2.0

_T = TypeVar("_T")


class SessionRunner(Protocol):
    """Runs ``fn`` with a database session off the event loop (``in_session``)."""

    def __call__(self, fn: Callable[[Session], _T], /) -> Awaitable[_T]: ...


class LoginRefusedError(AccountError):
    """Wrong name or password (401), or too many failures (429 with ``retry_after``)."""

    def __init__(self, status: int, message: str, retry_after: float = 0.0) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32
    )
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
            maxmem=_MAXMEM, dklen=len(expected) // 2,
        )  # fmt: skip
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), expected)


#: Checked when the account has no password, so that an unknown name costs the same time.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise AccountError(
            400,
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
        )
    if not password.isprintable():
        raise AccountError(400, "a password is printable text (no control characters)")


def set_password(session: Session, name: str, password_hash: str, *, set_by: str) -> None:
    """Give account ``name`` the password of ``password_hash`` (:meth:`PasswordHashing.hash`
    of a password that passed :func:`check_password_rules`); ends its dashboard sessions."""
    token = session.exec(select(OperatorToken).where(OperatorToken.name == name)).first()
    if token is None:
        raise AccountError(404, f"no token named {name!r}")
    if token.revoked_at is not None:
        raise AccountError(409, f"token {name!r} is revoked")
    row = session.get(OperatorPassword, name) or OperatorPassword(name=name, password_hash="")
    row.password_hash, row.updated_at, row.updated_by = password_hash, utcnow(), set_by
    session.add(row)
    session.exec(delete(DashboardSession).where(col(DashboardSession.operator) == name))
    audit.append(session, set_by, "token.password.set", name)


def active_operator(session: Session, name: str) -> Operator | None:
    """The operator of account ``name`` if its token is neither revoked nor expired."""
    row = session.exec(select(OperatorToken).where(OperatorToken.name == name)).first()
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
        return None
    return Operator(row.name, Role(row.role), tuple(json.loads(row.hardware_ids)))


class LoginLimiter:
    """Failed logins per account and per address within a sliding window (see module docstring)."""

    def __init__(
        self,
        per_account: int = MAX_FAILURES_PER_ACCOUNT,
        per_address: int = MAX_FAILURES_PER_ADDRESS,
        window: float = FAILURE_WINDOW,
    ) -> None:
        self._limits = {"account": per_account, "address": per_address}
        self._window = window
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self._window:
            times.popleft()
        return times

    def attempt(self, account: str | None, address: str) -> float:
        """Admit an attempt to ``account`` (None: a token login) from ``address``, counted as
        failed until :meth:`succeeded` takes it back; or refuse it (429) over the limit."""
        now = time.monotonic()
        keys = self._keys(account, address)
        with self._lock:
            for kind, value in keys:
                times = self._recent((kind, value), now)
                if len(times) >= self._limits[kind]:
                    retry = times[0] + self._window - now
                    raise LoginRefusedError(
                        429,
                        f"too many failed logins to this {kind}; try again in "
                        f"{max(1, round(retry))} s",
                        retry_after=retry,
                    )
            for key in keys:
                times = self._recent(key, now)
                times.append(now)
                self._failures.pop(key, None)
                self._failures[key] = times  # most recent last: the oldest is forgotten first
            while len(self._failures) > _MAX_TRACKED:
                self._failures.pop(next(iter(self._failures)))
        return now

    @staticmethod
    def _keys(account: str | None, address: str) -> list[tuple[str, str]]:
        keys = [("address", address)]
        return keys if account is None else [("account", account), *keys]

    def succeeded(self, account: str | None, address: str, attempt: float) -> None:
        """The attempt admitted at ``attempt`` succeeded: it is no failure, and the account's
        earlier failures are forgiven."""
        with self._lock:
            if account is not None:
                self._failures.pop(("account", account), None)
            times = self._failures.get(("address", address))
            if times is not None and attempt in times:
                times.remove(attempt)


class PasswordHashing:
    """Password checks on their own threads, with at most ``in_progress`` at once (see module
    docstring). Used from the event loop only."""

    def __init__(
        self, threads: int = HASHING_THREADS, in_progress: int = MAX_LOGINS_IN_PROGRESS
    ) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="password-hashing")
        self._limit = in_progress
        self._in_progress = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the login slots for a whole login, or refuse it (429) when none is free."""
        if self._in_progress >= self._limit:
            raise LoginRefusedError(
                429, "too many logins in progress; try again in a few seconds", _BUSY_RETRY
            )
        self._in_progress += 1
        try:
            yield
        finally:
            self._in_progress -= 1

    async def hash(self, password: str) -> str:
        """:func:`hash_password` on the hashing threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, hash_password, password)

    async def matches(self, password: str, stored: str) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, password_matches, password, stored)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _stored_hash(session: Session, name: str) -> str | None:
    row = session.get(OperatorPassword, name) if len(name) <= 128 else None
    return None if row is None else row.password_hash


async def login_with_password(
    run: SessionRunner,
    limiter: LoginLimiter,
    hashing: PasswordHashing,
    name: str,
    password: str,
    address: str,
) -> Operator:
    """The operator whose name and password these are; refused the same way whatever is wrong."""
    with hashing.slot():
        attempt = limiter.attempt(name, address)
        stored = await run(lambda s: _stored_hash(s, name))
        matches = await hashing.matches(password[:MAX_PASSWORD_LENGTH], stored or _DUMMY_HASH)
        operator = await run(lambda s: active_operator(s, name)) if stored and matches else None
    if operator is None:
        raise LoginRefusedError(401, "unknown name, wrong password, or a revoked or expired token")
    limiter.succeeded(name, address, attempt)
    return operator
