"""The fleet database's schema version: Alembic revisions in ``server/migrations``.

Every database carries the revision it is at (Alembic's ``alembic_version``
table). The workflow:

* a **new, empty** database is created at the code's head revision by
  :func:`prepare` (``uptake server init``/``run``): tables from
  ``SQLModel.metadata``, stamped with the head, so the embedded SQLite
  default needs no step at all;
* a database **behind** the code's head (an older Uptake made it) is
  refused by :func:`prepare` with :class:`SchemaOutdatedError`, naming
  ``uptake server migrate``; :func:`upgrade` migrates it in place;
* a database made by an Uptake **before migrations** (tables, no
  ``alembic_version``) is recognised by its tables (:func:`_recognise`) and
  migrated from the revision that matches them;
* a database **ahead** of the code (a newer Uptake migrated it) is refused.

Developers add a revision after changing tables with
:func:`make_revision` (``uptake server migrate --make-revision MESSAGE``),
which autogenerates it from the difference between the models and a
database at head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from server.config import ConfigError
from server.db import shown_database_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: The revision whose tables match a database of the release before migrations (4b438cb).
RELEASE_BEFORE_IDENTITY = "0001"
#: The revision whose tables match a database of the identity release (148a20b .. 65878f7).
RELEASE_WITH_IDENTITY = "0002"


class SchemaOutdatedError(ConfigError):
    """The database's schema is older than this code's (run ``uptake server migrate``)."""


class SchemaUnknownError(ConfigError):
    """The database's schema revision is unknown to this code (a newer Uptake migrated it)."""


@dataclass(frozen=True)
class MigrationResult:
    database: str
    before: str | None  # None: the database was empty
    after: str
    applied: list[str]

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The code's newest revision."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def _between(start: str | None, end: str) -> list[str]:
    """Revisions from after ``start`` up to ``end``, oldest first."""
    script = ScriptDirectory.from_config(_config())
    revisions = [r.revision for r in script.iterate_revisions(end, start)]
    return list(reversed(revisions))


def _recognise(connection: Connection) -> str | None:
    """The revision of a database without ``alembic_version``: None if it has no tables."""
    tables = set(inspect(connection).get_table_names())
    if not tables:
        return None
    if "auditrecord" in tables:
        return RELEASE_WITH_IDENTITY
    if "vehicle" in tables:
        return RELEASE_BEFORE_IDENTITY
    raise SchemaUnknownError(
        "the database holds tables but none of Uptake's (tables: "
        + ", ".join(sorted(tables)[:10])
        + "): give an empty database or one Uptake made"
    )


def current(connection: Connection) -> str | None:
    """The database's revision (recognised from its tables if it predates migrations)."""
    revision = MigrationContext.configure(connection).get_current_revision()
    return revision if revision is not None else _recognise(connection)


def _known(revision: str) -> bool:
    script = ScriptDirectory.from_config(_config())
    try:
        return script.get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for unknown ids
        return False


def _describe(engine: Engine) -> str:
    return shown_database_url(engine.url.render_as_string(hide_password=False))


@contextmanager
def _connection(engine: Engine) -> Iterator[Connection]:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # one migrating (or creating) process at a time; released at commit
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7133)")
        yield connection


def prepare(engine: Engine) -> None:
    """Make an empty database at head; accept one at head; refuse any other (see module doc)."""
    with _connection(engine) as connection:
        revision = current(connection)
        code_head = head()
        if revision == code_head:
            return
        if revision is None:
            SQLModel.metadata.create_all(connection)
            command.stamp(_config(connection), code_head)
            return
        where = _describe(engine)
        if not _known(revision):
            raise SchemaUnknownError(
                f"database {where!r} is at schema revision {revision}, which this Uptake does "
                f"not know (its newest is {code_head}): a newer Uptake migrated it; run that one"
            )
        raise SchemaOutdatedError(
            f"database {where!r} is at schema revision {revision}, behind this Uptake's "
            f"{code_head}: stop every server on it, back it up, then run "
            f"'uptake server migrate --data-dir DATA' (or --database-url URL)"
        )


def upgrade(engine: Engine) -> MigrationResult:
    """Migrate the database in place to the code's head (an empty one is created at head)."""
    with _connection(engine) as connection:
        before = current(connection)
        code_head = head()
        if before is not None and not _known(before):
            raise SchemaUnknownError(
                f"database {_describe(engine)!r} is at schema revision {before}, which this "
                f"Uptake does not know (its newest is {code_head})"
            )
        if before is None:
            SQLModel.metadata.create_all(connection)
            command.stamp(_config(connection), code_head)
            return MigrationResult(_describe(engine), None, code_head, [])
        applied = _between(before, code_head)
        if applied:
            config = _config(connection)
            if MigrationContext.configure(connection).get_current_revision() is None:
                command.stamp(config, before)  # a database from before migrations
            command.upgrade(config, code_head)
        return MigrationResult(_describe(engine), before, code_head, applied)


def make_revision(engine: Engine, message: str, versions_dir: Path | None = None) -> Path:
    """Autogenerate a revision from the models' difference to ``engine``'s database at head.

    For developers: ``engine`` should be a scratch database (it is migrated to
    head first). Returns the new revision file; read it before committing.
    """
    with _connection(engine) as connection:
        # by the revisions (not create_all, which would already hold the new tables)
        command.upgrade(_config(connection), head())
    with engine.begin() as connection:
        config = _config(connection)
        if versions_dir is not None:
            config.set_main_option("version_locations", str(versions_dir))
        script = command.revision(
            config, message=message, autogenerate=True, rev_id=_next_id(), head=head()
        )
    assert script is not None and not isinstance(script, list)
    return Path(script.path)


def _next_id() -> str:
    numbers = [int(r) for r in _between(None, head()) if r.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"
