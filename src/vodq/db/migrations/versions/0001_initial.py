"""Create the vods and kv tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from vodq.db.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = "'queued', 'downloading', 'done', 'failed', 'cancelled'"


def upgrade() -> None:
    op.create_table(
        "vods",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vod_id", sa.Text, nullable=False, unique=True),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("title", sa.Text),
        sa.Column("date", UTCDateTime),
        sa.Column("channel", sa.Text),
        sa.Column(
            "priority", sa.BigInteger, nullable=False, server_default=sa.text("0")
        ),
        sa.Column("state", sa.Text, nullable=False, server_default=sa.text("'queued'")),
        sa.Column(
            "processed", sa.Boolean, sa.Computed("state = 'done'", persisted=True)
        ),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", UTCDateTime),
        sa.Column("last_error", sa.Text),
        sa.Column("error_class", sa.Text),
        sa.Column(
            "bytes_done", sa.BigInteger, nullable=False, server_default=sa.text("0")
        ),
        sa.Column("bytes_total", sa.BigInteger),
        sa.Column("speed_bps", sa.BigInteger),
        sa.Column("file_path", sa.Text),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", UTCDateTime),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("download_ms", sa.BigInteger),
        sa.CheckConstraint(f"state IN ({STATES})", name="ck_vods_state"),
        sa.CheckConstraint("attempts >= 0", name="ck_vods_attempts"),
    )
    queued = sa.text("state = 'queued'")
    downloading = sa.text("state = 'downloading'")
    op.create_index(
        "ix_vods_claim",
        "vods",
        [
            sa.text("priority DESC"),
            sa.text("(date IS NULL)"),
            sa.text("date ASC"),
            sa.text("id ASC"),
        ],
        sqlite_where=queued,
        postgresql_where=queued,
    )
    op.create_index(
        "ix_vods_running",
        "vods",
        ["lease_expires_at"],
        sqlite_where=downloading,
        postgresql_where=downloading,
    )
    op.create_index("ix_vods_state", "vods", ["state", "priority"])
    op.create_table(
        "kv",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("kv")
    op.drop_index("ix_vods_state", table_name="vods")
    op.drop_index("ix_vods_running", table_name="vods")
    op.drop_index("ix_vods_claim", table_name="vods")
    op.drop_table("vods")
