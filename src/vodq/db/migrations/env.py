"""Alembic environment: runs on the connection that vodq hands over."""

from __future__ import annotations

from alembic import context

from vodq.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with 'vodq migrate', which passes the connection"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
