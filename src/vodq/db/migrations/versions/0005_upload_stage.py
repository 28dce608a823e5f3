"""Add the upload stage: its states, attempts, lease token and remote result.

Adds the states ``downloaded`` (file complete, waiting for an upload) and
``uploading`` to the state CHECK constraint, and the upload columns. SQLite
cannot change a CHECK constraint in place, so batch mode rebuilds the table
there. Rebuilding drops the table's triggers and indexes, so this migration
creates them again and recounts ``vod_counts`` from the rows, which keeps the
counts true across the rebuild. The generated ``processed`` column keeps its
definition (``state = 'done'``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

from vodq.db.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OLD_STATES = "'queued', 'downloading', 'done', 'failed', 'cancelled'"
NEW_STATES = (
    "'queued', 'downloading', 'downloaded', 'uploading', 'done', 'failed', 'cancelled'"
)

# The indexes of vods as migrations 0001 and 0005 define them: (name,
# columns, partial condition or None).
INDEXES = [
    (
        "ix_vods_claim",
        ["priority DESC", "(date IS NULL)", "date ASC", "id ASC"],
        "state = 'queued'",
    ),
    ("ix_vods_running", ["lease_expires_at"], "state = 'downloading'"),
    ("ix_vods_state", ["state", "priority"], None),
]
UPLOAD_CLAIM_INDEX = (
    "ix_vods_upload_claim",
    ["priority DESC", "(date IS NULL)", "date ASC", "id ASC"],
    "state = 'downloaded'",
)


def _upload_columns() -> list[sa.Column[object]]:
    return [
        sa.Column(
            "upload_attempts",
            sa.Integer,
            nullable=False,
            server_default=sa.text("0"),
        ),
        sa.Column("upload_next_at", UTCDateTime),
        sa.Column("upload_session", sa.Text),
        sa.Column("upload_started_at", UTCDateTime),
        sa.Column("remote_id", sa.Text),
        sa.Column("remote_url", sa.Text),
        sa.Column("uploaded_at", UTCDateTime),
        sa.Column("uploader", sa.Text),
        sa.Column("upload_ms", sa.BigInteger),
    ]


def _sqlite_triggers() -> list[str]:
    # The triggers as migration 0004 created them.
    counts = importlib.import_module("vodq.db.migrations.versions.0004_vod_counts")
    return list(counts.SQLITE_TRIGGERS)


def _create_index(name: str, columns: list[str], where: str | None) -> None:
    condition = sa.text(where) if where else None
    op.create_index(
        name,
        "vods",
        [sa.text(column) for column in columns],
        sqlite_where=condition,
        postgresql_where=condition,
    )


def _rebuild_sqlite(states: str, add: bool) -> None:
    """Rebuild vods with ``states`` allowed, adding or dropping upload columns."""
    for name, _columns, _where in INDEXES:
        op.drop_index(name, table_name="vods")
    if not add:
        op.drop_index(UPLOAD_CLAIM_INDEX[0], table_name="vods")
    with op.batch_alter_table("vods", recreate="always") as batch:
        # The batch copy would insert into the generated column, which SQLite
        # rejects, so the column is dropped and defined again with the same
        # expression.
        batch.drop_column("processed")
        batch.add_column(
            sa.Column(
                "processed", sa.Boolean, sa.Computed("state = 'done'", persisted=True)
            )
        )
        batch.drop_constraint("ck_vods_state", type_="check")
        batch.create_check_constraint("ck_vods_state", sa.text(f"state IN ({states})"))
        if add:
            for column in _upload_columns():
                batch.add_column(column)
            batch.create_check_constraint(
                "ck_vods_upload_attempts", sa.text("upload_attempts >= 0")
            )
        else:
            batch.drop_constraint("ck_vods_upload_attempts", type_="check")
            for column in _upload_columns():
                batch.drop_column(column.name)
    for name, columns, where in INDEXES:
        _create_index(name, columns, where)
    if add:
        _create_index(*UPLOAD_CLAIM_INDEX)
    for statement in _sqlite_triggers():
        op.execute(statement)
    op.execute("DELETE FROM vod_counts")
    op.execute(
        "INSERT INTO vod_counts (state, priority, count) "
        "SELECT state, priority, COUNT(*) FROM vods GROUP BY state, priority"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        _rebuild_sqlite(NEW_STATES, add=True)
        return
    op.drop_constraint("ck_vods_state", "vods", type_="check")
    op.create_check_constraint("ck_vods_state", "vods", f"state IN ({NEW_STATES})")
    for column in _upload_columns():
        op.add_column("vods", column)
    op.create_check_constraint(
        "ck_vods_upload_attempts", "vods", "upload_attempts >= 0"
    )
    _create_index(*UPLOAD_CLAIM_INDEX)


def downgrade() -> None:
    # VODs in the upload stage have complete files; done is the nearest old
    # state that keeps them.
    op.execute(
        "UPDATE vods SET state = 'done', lease_owner = NULL, "
        "lease_expires_at = NULL WHERE state IN ('downloaded', 'uploading')"
    )
    if op.get_bind().dialect.name != "postgresql":
        _rebuild_sqlite(OLD_STATES, add=False)
        return
    op.drop_index(UPLOAD_CLAIM_INDEX[0], table_name="vods")
    op.drop_constraint("ck_vods_upload_attempts", "vods", type_="check")
    for column in _upload_columns():
        op.drop_column("vods", column.name)
    op.drop_constraint("ck_vods_state", "vods", type_="check")
    op.create_check_constraint("ck_vods_state", "vods", f"state IN ({OLD_STATES})")
