"""Per-statement timing of ``VodQueue.claim``, to show where a claim's time goes.

A profiling aid for bench_claim.py, not a benchmark of its own: it replays
the statements that ``claim`` runs when the breaker is closed and no lease
has expired, in its order and in one transaction, against a database of
100k queued VODs, and prints the p50 of each. The pool checkout includes
its pre-ping on PostgreSQL. It imports the queue's statements and private
helpers, so it follows the current ``src/vodq/queue.py`` and may need
updating when that changes.

    python bench/claim_steps.py                     # PostgreSQL
    python bench/claim_steps.py --backend sqlite
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from common import LoadWatch, database, median, print_table, sqlalchemy_dsn, workdir
from populate import populate
from sqlalchemy import text, update

ROUNDS = 60
WARMUP = 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="postgres")
    parser.add_argument("--vods", type=int, default=100_000)
    args = parser.parse_args()

    from vodq.db.clock import DatabaseClock
    from vodq.db.engine import make_engine
    from vodq.db.schema import vods
    from vodq.models import VodState
    from vodq.queue import (
        CLAIM_LOCK_KEY,
        POSTGRES_CLAIM,
        SQLITE_CANDIDATES,
        VodQueue,
        _claim_flags,
        utcnow,
    )

    with workdir("claim-steps") as work, database(args.backend, work) as dsn:
        populate(dsn, args.vods)
        engine = make_engine(sqlalchemy_dsn(dsn))
        postgres = engine.dialect.name == "postgresql"
        clock = DatabaseClock(engine) if postgres else utcnow
        queue = VodQueue(engine, clock=clock)
        steps: dict[str, list[float]] = {}

        def timed(name: str, step: Callable[[], Any]) -> Any:
            started = time.perf_counter()
            result = step()
            steps.setdefault(name, []).append((time.perf_counter() - started) * 1000)
            return result

        watch = LoadWatch()
        for _ in range(WARMUP + ROUNDS):
            now = clock()
            lease_until = now + timedelta(seconds=30)
            started = time.perf_counter()
            with timed("pool checkout", engine.connect) as conn:
                transaction = conn.begin()
                if postgres:
                    # psycopg sends BEGIN before the first statement, so this
                    # step takes two round trips.
                    timed(
                        "BEGIN, advisory lock",
                        lambda c=conn: c.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": CLAIM_LOCK_KEY},
                        ),
                    )
                    rows = timed(
                        "claim statement",
                        lambda c=conn, n=now, u=lease_until: c.execute(
                            POSTGRES_CLAIM,
                            {
                                "now": n,
                                "lease_until": u,
                                "owner": "steps",
                                "wanted": 1,
                                "max_active": 10,
                            },
                        ).all(),
                    )
                else:
                    timed(
                        "BEGIN IMMEDIATE, flags",
                        lambda c=conn, n=now: c.execute(_claim_flags(n)).one(),
                    )
                    rows = timed(
                        "UPDATE ... RETURNING",
                        lambda c=conn, n=now, u=lease_until: c.execute(
                            update(vods)
                            .where(
                                vods.c.id.in_(
                                    SQLITE_CANDIDATES.bindparams(now=n, room=1).columns(
                                        vods.c.id
                                    )
                                )
                            )
                            .values(
                                state=VodState.DOWNLOADING.value,
                                lease_owner="steps",
                                lease_expires_at=u,
                                started_at=n,
                                updated_at=n,
                            )
                            .returning(vods)
                        ).all(),
                    )
                timed("COMMIT", transaction.commit)
            steps.setdefault("whole claim, with checkout and check-in", []).append(
                (time.perf_counter() - started) * 1000
            )
            queue.release(rows[0].id, "steps", state=VodState.QUEUED)
        engine.dispose()
        load = watch.stop()

    rows = [
        {"step": name, "p50 ms": round(median(values[WARMUP:]), 2)}
        for name, values in steps.items()
    ]
    print_table(
        f"claim statements on {args.backend}, {args.vods} queued VODs "
        f"(load {load['load_after']})",
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
