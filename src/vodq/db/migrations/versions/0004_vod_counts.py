"""Keep VOD counts by state and priority in vod_counts, maintained by triggers.

/status and /metrics read these few rows instead of counting the whole
vods table, so their cost does not grow with the archive. Triggers (not
application code) keep the counts, so they stay true when operators change
vods with SQL.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER vods_count_insert AFTER INSERT ON vods BEGIN
        INSERT INTO vod_counts (state, priority, count)
        VALUES (NEW.state, NEW.priority, 1)
        ON CONFLICT (state, priority) DO UPDATE SET count = count + 1;
    END
    """,
    """
    CREATE TRIGGER vods_count_delete AFTER DELETE ON vods BEGIN
        UPDATE vod_counts SET count = count - 1
        WHERE state = OLD.state AND priority = OLD.priority;
    END
    """,
    """
    CREATE TRIGGER vods_count_update AFTER UPDATE OF state, priority ON vods
    WHEN OLD.state IS NOT NEW.state OR OLD.priority IS NOT NEW.priority BEGIN
        UPDATE vod_counts SET count = count - 1
        WHERE state = OLD.state AND priority = OLD.priority;
        INSERT INTO vod_counts (state, priority, count)
        VALUES (NEW.state, NEW.priority, 1)
        ON CONFLICT (state, priority) DO UPDATE SET count = count + 1;
    END
    """,
]

POSTGRES_TRIGGERS = [
    """
    CREATE FUNCTION vodq_count_vods() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.state = NEW.state
                AND OLD.priority = NEW.priority THEN
            RETURN NULL;
        END IF;
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            UPDATE vod_counts SET count = count - 1
            WHERE state = OLD.state AND priority = OLD.priority;
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO vod_counts (state, priority, count)
            VALUES (NEW.state, NEW.priority, 1)
            ON CONFLICT (state, priority)
            DO UPDATE SET count = vod_counts.count + 1;
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER vods_count AFTER INSERT OR DELETE OR UPDATE OF state, priority
    ON vods FOR EACH ROW EXECUTE FUNCTION vodq_count_vods()
    """,
    """
    CREATE FUNCTION vodq_clear_vod_counts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM vod_counts;
        RETURN NULL;
    END $$
    """,
    # Row triggers do not see TRUNCATE, so it clears the counts itself.
    """
    CREATE TRIGGER vods_count_truncate AFTER TRUNCATE ON vods
    FOR EACH STATEMENT EXECUTE FUNCTION vodq_clear_vod_counts()
    """,
]


def upgrade() -> None:
    op.create_table(
        "vod_counts",
        sa.Column("state", sa.Text, primary_key=True),
        sa.Column("priority", sa.BigInteger, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # No VOD may change between the backfill and the triggers.
        op.execute("LOCK TABLE vods IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO vod_counts (state, priority, count) "
        "SELECT state, priority, COUNT(*) FROM vods GROUP BY state, priority"
    )
    for statement in POSTGRES_TRIGGERS if postgres else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER vods_count_truncate ON vods")
        op.execute("DROP TRIGGER vods_count ON vods")
        op.execute("DROP FUNCTION vodq_clear_vod_counts()")
        op.execute("DROP FUNCTION vodq_count_vods()")
    else:
        for name in ("vods_count_insert", "vods_count_delete", "vods_count_update"):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("vod_counts")
