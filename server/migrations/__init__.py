"""Alembic revisions of the fleet database schema (see :mod:`server.schema`).

``env.py`` runs them on the connection :mod:`server.schema` hands it; each
file in ``versions/`` is one revision. Add one with
``uptake server migrate --make-revision "what changed"`` (docs/operations.md).
"""
