from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.uptake_fixtures import CREATED_DATABASES, ServerProcess, Vehicle, drop_databases


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """With UPTAKE_DATABASE_URL on PostgreSQL: drop the databases this test's servers made."""
    before = len(CREATED_DATABASES)
    yield
    drop_databases(CREATED_DATABASES[before:])
    del CREATED_DATABASES[before:]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def vehicle(tmp_path: Path, server: ServerProcess) -> Vehicle:
    return Vehicle(tmp_path, server)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for a module's tests that only read or are refused (faster)."""
    srv = ServerProcess(tmp_path_factory.mktemp("shared"))
    yield srv
    srv.stop()
