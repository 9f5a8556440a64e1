"""The idle poll's version probe against a real PostgreSQL, reached through a TCP proxy that can
go silent (a failover whose old address vanished): the probe answers, or gives up in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from server.timestamp_versions import TimestampVersions, TimestampVersionsUnavailable
from tests.uptake_fixtures import scratch_postgres_database

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.postgres


class SilentProxy:
    """Forwards TCP to PostgreSQL until :meth:`go_silent`; then forwards nothing, closes nothing."""

    def __init__(self) -> None:
        self.silent = False
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                while self.silent:  # hold everything, like a vanished peer
                    await asyncio.sleep(3600)
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def go_silent(self) -> None:
        self.silent = True


@pytest.fixture
def database() -> Iterator[str]:
    """A database of its own with the one table the probe reads."""
    with scratch_postgres_database("uptake_probe") as url:
        name = make_url(url).database
        with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={name}") as conn:
            conn.execute(
                "CREATE TABLE directormetadata "
                "(vin text, role text, version int, PRIMARY KEY (vin, role, version))"
            )
            conn.execute("INSERT INTO directormetadata VALUES ('VIN-PROBE', 'timestamp', 7)")
        assert name is not None
        yield name


def test_a_silent_database_holds_no_poll_longer_than_the_probe_allows(database: str) -> None:
    async def scenario() -> None:
        proxy = SilentProxy()
        port = await proxy.start()
        conninfo = f"postgresql://postgres@127.0.0.1:{port}/{database}"
        probe = TimestampVersions(conninfo, connections=2, timeout=1.0)
        try:
            assert await probe.latest("VIN-PROBE") == 7
            assert await probe.latest("VIN-NONE") is None
            proxy.go_silent()
            start = time.monotonic()
            outcomes = await asyncio.gather(
                *(probe.latest("VIN-PROBE") for _ in range(10)), return_exceptions=True
            )
            waited = time.monotonic() - start
            assert all(isinstance(o, TimestampVersionsUnavailable) for o in outcomes), outcomes
            assert waited < 3, waited  # every poll, not only the first four, gives up in time
            start = time.monotonic()
            with pytest.raises(TimestampVersionsUnavailable, match="resting"):
                await probe.latest("VIN-PROBE")  # no new connection per poll during an outage
            assert time.monotonic() - start < 0.1
        finally:
            await probe.close()
            assert proxy.server is not None
            proxy.server.close()

    asyncio.run(scenario())
