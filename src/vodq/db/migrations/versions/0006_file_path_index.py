"""Index the file paths of VODs, so that a path given to one VOD leaves the others.

When a finished download or an archive rename takes a path that another
VOD's record still names (its file was moved or deleted by the operator),
that other record forgets the path, so no two VODs ever claim one file.
The lookup runs on every finished download and needs this index to stay
cheap with millions of VODs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_vods_file_path",
        "vods",
        ["file_path"],
        sqlite_where=sa.text("file_path IS NOT NULL"),
        postgresql_where=sa.text("file_path IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_vods_file_path", table_name="vods")
