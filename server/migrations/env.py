"""Alembic environment: migrate the connection :mod:`server.schema` passes, to SQLModel's tables.

Run only through :mod:`server.schema` (``uptake server migrate``), which puts
an open connection in ``config.attributes["connection"]``. SQLite cannot
alter most columns in place: ``render_as_batch`` makes Alembic copy the
table instead, so one revision works on SQLite and PostgreSQL.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import server.db  # noqa: F401 - registers every table on SQLModel.metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
