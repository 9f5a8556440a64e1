"""The newest director timestamp version of a vehicle, read on the event loop (PostgreSQL).

An idle vehicle polls its director ``timestamp.json`` over and over, and the
answer is almost always the bytes the process already holds. With replicas on
PostgreSQL another process may have signed a newer version since, and serving
the older one would look like a rollback to a vehicle that polls both, so each
poll asks the database for the newest version
(:meth:`server.director.DirectorRepository.cached_timestamp_at`). Through the
ORM that read cost a thread hop, a pool checkout with its ping, a query and a
commit: most of an idle poll's time.

:class:`TimestampVersions` asks the same question as one prepared, index-only
query on a few autocommit ``psycopg`` connections of its own, awaited on the
event loop: no thread, no transaction, one round trip. It answers nothing it
is not sure of: a connection that fails is dropped, and the caller takes the
ORM path (:class:`TimestampVersionsUnavailable`), which has the pool's
reconnection handling; so does a poll the probe cannot answer within
:data:`ANSWER_WITHIN` (a database that went silent), and every poll for a few
seconds after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from sqlalchemy.engine import Engine

from server.db import DirectorMetadata

#: Connections of the probe (each carries one query at a time).
CONNECTIONS = 4
#: Seconds a poll waits for the probe (a slot and the query) before taking the ORM path.
ANSWER_WITHIN = 1.0
#: Seconds the probe stays out of the way after a failure.
REST_AFTER_FAILURE = 5.0
#: Polls that may wait for the probe at once; more take the ORM path at once.
MAX_WAITING = 256
_QUERY = (
    f"SELECT version FROM {DirectorMetadata.__tablename__} "
    "WHERE vin = %s AND role = 'timestamp' ORDER BY version DESC LIMIT 1"
)


class TimestampVersionsUnavailable(Exception):
    """The probe cannot answer now; ask through the ORM instead."""


class TimestampVersions:
    """The newest director timestamp version per VIN, one round trip on the event loop."""

    def __init__(
        self, conninfo: str, connections: int = CONNECTIONS, timeout: float = ANSWER_WITHIN
    ) -> None:
        self._conninfo = conninfo
        self._idle: list[Any] = []
        self._slots = asyncio.Semaphore(connections)
        self._timeout = timeout
        self._resting_until = 0.0  # after a failure, polls go through the ORM for a while
        self._closing: set[asyncio.Task[None]] = set()
        self._asking: set[asyncio.Task[int | None]] = set()
        self._closed = False

    @classmethod
    def for_engine(cls, engine: Engine) -> TimestampVersions | None:
        """A probe for ``engine``'s database if it is PostgreSQL through psycopg, else None."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        url = engine.url.set(drivername="postgresql")
        return cls(url.render_as_string(hide_password=False))

    async def latest(self, vin: str) -> int | None:
        """The newest timestamp version of ``vin`` (None: it has none).

        Raises :class:`TimestampVersionsUnavailable` when it cannot answer within
        :data:`ANSWER_WITHIN` (a database that went silent holds no poll longer than
        that), when its connection fails, when :data:`MAX_WAITING` polls already wait
        for it, and for :data:`REST_AFTER_FAILURE` after a failure, so that an outage
        costs no connection attempt per poll. A query that does not answer in time is
        left to finish on its own, never cancelled: cancelling a psycopg query sends a
        cancel request synchronously, which would stall the event loop on a silent
        database.
        """
        if self._closed or time.monotonic() < self._resting_until:
            raise TimestampVersionsUnavailable("resting after a failure")
        if len(self._asking) >= MAX_WAITING:
            raise TimestampVersionsUnavailable("too many polls waiting for the probe")
        task = asyncio.get_running_loop().create_task(self._ask(vin))
        self._asking.add(task)
        task.add_done_callback(self._asked)
        done, _ = await asyncio.wait({task}, timeout=self._timeout)
        if not done:
            self._resting_until = time.monotonic() + REST_AFTER_FAILURE
            raise TimestampVersionsUnavailable(f"no answer within {self._timeout:g} s")
        return task.result()

    def _asked(self, task: asyncio.Task[int | None]) -> None:
        self._asking.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: one nobody waited for any more is not logged

    async def _ask(self, vin: str) -> int | None:
        import psycopg  # the postgres extra; for_engine made this probe only with it

        async with self._slots:
            connection = self._idle.pop() if self._idle else None
            try:
                if connection is None:
                    connection = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=5
                    )
                cursor = await connection.execute(_QUERY, (vin,), prepare=True)
                row = await cursor.fetchone()
            except BaseException as exc:  # cancelled mid-query too (at shutdown)
                if connection is not None:
                    self._discard(connection)  # never reused
                if isinstance(exc, psycopg.Error):
                    self._resting_until = time.monotonic() + REST_AFTER_FAILURE
                    raise TimestampVersionsUnavailable(str(exc)) from exc
                raise
            if self._closed:
                self._discard(connection)
            else:
                self._idle.append(connection)
        return None if row is None else int(row[0])

    def _discard(self, connection: Any) -> None:
        """Close ``connection`` in the background (a stalled one may take its time)."""

        async def close() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await connection.close()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._discard(connection)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
