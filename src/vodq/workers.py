"""The registry of worker processes, so ``/status`` can report the cluster.

Each worker upserts its row every ``WORKER_HEARTBEAT_S`` and deletes it on a
clean stop. A worker killed outright leaves its row behind; ``/status``
marks it gone once its heartbeat is older than ``WORKER_GONE_S``, and rows
older than ``WORKER_FORGET_S`` are pruned by the next worker to beat.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, insert, select, update

from vodq.db.schema import vods, workers
from vodq.queue import IS_DOWNLOADING, utcnow

# How often a worker writes its heartbeat row, in seconds.
WORKER_HEARTBEAT_S = 5.0
# A worker whose heartbeat is older than this is reported as gone, in seconds.
WORKER_GONE_S = 3 * WORKER_HEARTBEAT_S
# Rows of workers silent for this long are deleted, in seconds.
WORKER_FORGET_S = 600.0


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as ``/status`` shows it."""

    worker_id: str
    hostname: str
    pid: int
    started_at: datetime
    last_heartbeat: datetime
    slots: int
    alive: bool
    downloads: list[str]


class WorkerRegistry:
    """Reads and writes the ``workers`` table."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def beat(
        self, worker_id: str, *, pid: int, slots: int, started_at: datetime
    ) -> None:
        """Insert or refresh this worker's row and prune long-silent ones."""
        now = self.clock()
        with self.engine.begin() as conn:
            # A restart under the same WORKER_ID takes the row over.
            changed = conn.execute(
                update(workers)
                .where(workers.c.worker_id == worker_id)
                .values(
                    heartbeat_at=now,
                    slots=slots,
                    pid=pid,
                    hostname=socket.gethostname(),
                    started_at=started_at,
                )
            )
            if changed.rowcount == 0:
                conn.execute(
                    insert(workers).values(
                        worker_id=worker_id,
                        hostname=socket.gethostname(),
                        pid=pid,
                        started_at=started_at,
                        heartbeat_at=now,
                        slots=slots,
                    )
                )
            conn.execute(
                delete(workers).where(
                    workers.c.heartbeat_at < now - timedelta(seconds=WORKER_FORGET_S)
                )
            )

    def remove(self, worker_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(workers).where(workers.c.worker_id == worker_id))

    def list(self, conn: Connection | None = None) -> list[WorkerInfo]:
        """Return every registered worker with the VODs it holds leases on.

        Reads through ``conn`` when given, so that a caller can make several
        reads on one connection.
        """
        if conn is not None:
            return _read_workers(conn, self.clock())
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as own:
            return _read_workers(own, self.clock())


def _read_workers(conn: Connection, now: datetime) -> list[WorkerInfo]:
    rows = conn.execute(select(workers).order_by(workers.c.worker_id)).all()
    # With the literal state SQLite can use the partial index
    # ix_vods_running. Sorting here, not with ORDER BY vod_id, keeps it
    # from walking the whole vod_id index, as it did without ix_vods_state.
    held = conn.execute(
        select(vods.c.lease_owner, vods.c.vod_id).where(IS_DOWNLOADING)
    ).all()
    downloads: dict[str, list[str]] = {}
    for owner, vod_id in sorted(held, key=lambda pair: str(pair[1])):
        downloads.setdefault(str(owner), []).append(str(vod_id))
    return [
        WorkerInfo(
            worker_id=row.worker_id,
            hostname=row.hostname,
            pid=row.pid,
            started_at=row.started_at,
            last_heartbeat=row.heartbeat_at,
            slots=row.slots,
            alive=(now - row.heartbeat_at).total_seconds() <= WORKER_GONE_S,
            downloads=downloads.get(row.worker_id, []),
        )
        for row in rows
    ]
