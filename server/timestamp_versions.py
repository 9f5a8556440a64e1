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
is not sure of: a connection that fails is dropped and the caller takes the
ORM path (:class:`TimestampVersionsUnavailable`), which has the pool's
reconnection handling.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy.engine import Engine

from server.db import DirectorMetadata

#: Connections of the probe (each carries one query at a time).
CONNECTIONS = 4
_QUERY = (
    f"SELECT version FROM {DirectorMetadata.__tablename__} "
    "WHERE vin = %s AND role = 'timestamp' ORDER BY version DESC LIMIT 1"
)


class TimestampVersionsUnavailable(Exception):
    """The probe cannot answer now; ask through the ORM instead."""


class TimestampVersions:
    """The newest director timestamp version per VIN, one round trip on the event loop."""

    def __init__(self, conninfo: str, connections: int = CONNECTIONS) -> None:
        self._conninfo = conninfo
        self._idle: list[Any] = []
        self._slots = asyncio.Semaphore(connections)

    @classmethod
    def for_engine(cls, engine: Engine) -> TimestampVersions | None:
        """A probe for ``engine``'s database if it is PostgreSQL through psycopg, else None."""
        if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
            return None
        url = engine.url.set(drivername="postgresql")
        return cls(url.render_as_string(hide_password=False))

    async def latest(self, vin: str) -> int | None:
        """The newest timestamp version of ``vin`` (None: it has none)."""
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
            except BaseException as exc:  # cancelled mid-query too: never reuse that connection
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(connection.close())
                if isinstance(exc, psycopg.Error):
                    raise TimestampVersionsUnavailable(str(exc)) from exc
                raise
            self._idle.append(connection)
        return None if row is None else int(row[0])

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close()
