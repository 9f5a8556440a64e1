"""Schema migrations: a database of the previous release, upgraded in place, keeps every row.

The fixtures in tests/data were made by the release before identity and
access (4b438cb) running its own server and agents
(tests/data/make_release_database.py): two vehicles, their ECUs, installed
and pending assignments, signed director metadata, a refused manifest.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from server.db import make_engine
from server.schema import SchemaOutdatedError, head
from tests.uptake_fixtures import ENV, ServerProcess, scratch_postgres_database

DATA = Path(__file__).parent / "data"
#: The previous release's tables and their rows, as the fixture holds them.
OLD_TABLES = (
    "vehicle",
    "ecu",
    "assignment",
    "securityevent",
    "directormetadata",
    "ecuencryptionkey",
    "vehicleencryption",
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
    else:
        with scratch_postgres_database("uptake_migrate") as url:
            yield url


def _load_release(url: str) -> None:
    """Restore the previous release's dump into the empty database ``url``."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.executescript((DATA / "release-4b438cb.sqlite.sql").read_text())
        return
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql((DATA / "release-4b438cb.postgresql.sql").read_text())
    engine.dispose()


def _rows(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of the previous release's tables, comparable across the migration."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {
                table: sorted(
                    (
                        {k: _plain(v) for k, v in row._mapping.items()}
                        for row in conn.execute(text(f"SELECT * FROM {table}"))
                    ),
                    key=repr,
                )
                for table in OLD_TABLES
            }
    finally:
        engine.dispose()


def _plain(value: Any) -> Any:
    if isinstance(value, memoryview):
        return bytes(value)
    if hasattr(value, "isoformat"):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    return value


def _uptake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uptake", *args],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_previous_release_database_is_migrated_and_keeps_all_its_data(
    tmp_path: Path, database: str
) -> None:
    _load_release(database)
    before = _rows(database)
    assert len(before["vehicle"]) == 2 and len(before["assignment"]) == 3
    assert len(before["directormetadata"]) >= 6 and before["securityevent"]

    run = _uptake("server", "migrate", "--database-url", database, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["before"] == "0001" and result["after"] == head(), result
    assert result["applied"][-1] == head()

    # every row of every table survived, value for value (new columns have their defaults)
    after = _rows(database)
    assert {
        table: [{k: row[k] for k in before[table][0]} for row in rows] if before[table] else rows
        for table, rows in after.items()
    } == before
    assert all(row["revoked_at"] is None for row in after["vehicle"])
    # and the schema is exactly the models' (nothing autogenerate would still add)
    engine = create_engine(database, poolclass=NullPool)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    engine.dispose()
    again = _uptake("server", "migrate", "--database-url", database, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["applied"] == []

    # a server of this version serves the old vehicles from it
    server = ServerProcess(tmp_path / "new", database_url=database)
    try:
        record = server.vehicle("OLDVIN0001")
        installed = {e["serial"]: e["installed"]["filepath"] for e in record["ecus"]}
        assert installed == {
            "GW-OLDVIN0001": "rpi-gateway/1.1.0/gateway.elf",
            "BMS-OLDVIN0001": "stm32f4-bms/1.1.0/bms.bin",
        }
        assert {a["status"] for a in record["assignments"]} == {"installed"}
        other = server.vehicle("OLDVIN0002")
        assert [a["status"] for a in other["assignments"]] == ["pending"]
        assert other["manifests_rejected"] == 1
        status, timestamp = server.admin.get(
            f"{server.url}/director/OLDVIN0001/metadata/timestamp.json", 100_000
        )
        assert status == 200 and b"OLDVIN0001" in timestamp
    finally:
        server.stop()


def test_server_run_refuses_a_database_behind_the_code(tmp_path: Path, database: str) -> None:
    _load_release(database)
    with pytest.raises(SchemaOutdatedError, match="uptake server migrate"):
        make_engine(database)
    server = ServerProcess(tmp_path)  # a deployment, pointed at the old database
    server.stop()
    run = _uptake("server", "run", "--data-dir", str(server.data_dir), "--database-url", database)
    assert run.returncode == 1
    assert "uptake server migrate" in run.stderr and "0001" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_revisions_from_nothing_build_exactly_the_models(database: str) -> None:
    """What 'server migrate' builds revision by revision is what a new database gets."""
    from alembic import command

    from server.schema import _config

    engine: Engine = create_engine(database, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), "head")
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_database_url_precedence_flag_then_environment_then_config(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    server.stop()
    from_env, from_flag = tmp_path / "env.db", tmp_path / "flag.db"

    def migrate(*extra: str, env: dict[str, str] | None = None) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "uptake", "server", "migrate", "--json",
             "--data-dir", str(server.data_dir), *extra],
            env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        return str(json.loads(run.stdout)["database"])

    configured = migrate()
    assert configured == server.config.database_url
    env = {"UPTAKE_DATABASE_URL": f"sqlite:///{from_env}"}
    assert migrate(env=env) == f"sqlite:///{from_env}"
    assert migrate("--database-url", f"sqlite:///{from_flag}", env=env) == f"sqlite:///{from_flag}"
    assert from_env.exists() and from_flag.exists()
    # a password is never shown
    run = _uptake(
        "server", "migrate", "--database-url", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"
    )
    assert run.returncode == 1 and "s3cret" not in run.stderr + run.stdout, run.stderr
