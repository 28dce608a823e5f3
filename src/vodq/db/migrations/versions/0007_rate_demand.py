"""Add vods.rate_demand_bps, the bandwidth a running download can use.

Each worker writes, with every lease renewal, the rate in bytes per second
that each of its downloads can use from DOWNLOAD_TOTAL_RATE_LIMIT: NULL when
it takes as much as the pool gives, or a bound when its source sends less.
Every worker splits the pool max-min fairly over all these demands, so that
bandwidth one worker's slow source leaves unused goes to the downloads of
the others.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vods", sa.Column("rate_demand_bps", sa.BigInteger))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
        # No DROP COLUMN before SQLite 3.35: copy the table instead.
        with op.batch_alter_table("vods") as batch:
            batch.drop_column("rate_demand_bps")
        return
    # A plain DROP COLUMN, because a batch copy of vods on SQLite warns that
    # it cannot reflect its expression index ix_vods_upload_claim.
    op.drop_column("vods", "rate_demand_bps")
