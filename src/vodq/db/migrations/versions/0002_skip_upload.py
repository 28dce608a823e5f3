"""Add vods.skip_upload, the operator's switch to skip the upload stage.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "vods",
        sa.Column(
            "skip_upload", sa.Boolean, nullable=False, server_default=sa.text("false")
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("vods") as batch:
        batch.drop_column("skip_upload")
