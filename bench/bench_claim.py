"""Claim cost and status cost as the queue grows: 1k, 100k and 1M queued VODs.

For each backend and size, the database is filled with SQL (see
populate.py), then:

* ``VodQueue.claim`` of one VOD is timed in this process, each claim
  followed by an untimed ``release`` so the queue keeps its size;
* ``GET /status`` and ``GET /metrics`` are timed from here against a
  ``vodq serve`` on that database, with the queue paused so nothing
  downloads.

    python bench/bench_claim.py                 # both backends, 1k/100k/1M
    python bench/bench_claim.py --quick         # 1k and 100k only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from common import (
    LoadWatch,
    database,
    free_port,
    percentile,
    print_table,
    sqlalchemy_dsn,
    vodq_env,
    vodq_process,
    workdir,
    write_result,
)
from populate import populate, set_paused

SIZES = {"1k": 1_000, "100k": 100_000, "1M": 1_000_000}
CLAIMS = 300
WARMUP = 20
HTTP_REQUESTS = 200
CLAIM_P50_TARGET_MS = 5.0
CLAIM_GROWTH_TARGET = 3.0
STATUS_TARGETS_MS = {"100k": 20.0, "1M": 100.0}


def time_claims(dsn: str, count: int) -> dict[str, Any]:
    from vodq.db.clock import DatabaseClock
    from vodq.db.engine import make_engine
    from vodq.models import VodState
    from vodq.queue import VodQueue, utcnow

    # The endpoint test pauses the queue, and claims need it running.
    set_paused(dsn, False)
    engine = make_engine(sqlalchemy_dsn(dsn))
    postgres = engine.dialect.name == "postgresql"
    # The clock the service itself uses on each backend.
    queue = VodQueue(engine, clock=DatabaseClock(engine) if postgres else utcnow)
    samples = []
    try:
        for index in range(WARMUP + count):
            started = time.perf_counter()
            claimed = queue.claim("bench-claim", wanted=1, limit=10, lease_s=30)
            elapsed = time.perf_counter() - started
            if not claimed:
                raise RuntimeError("claim returned nothing from a full queue")
            queue.release(claimed[0].id, "bench-claim", state=VodState.QUEUED)
            if index >= WARMUP:
                samples.append(elapsed * 1000)
    finally:
        engine.dispose()
    return {
        "claim_p50_ms": round(percentile(samples, 50), 3),
        "claim_p95_ms": round(percentile(samples, 95), 3),
        "claim_max_ms": round(max(samples), 3),
    }


def time_endpoints(dsn: str, work: Path) -> dict[str, Any]:
    set_paused(dsn, True)
    env = vodq_env(work, DB_DSN=dsn)
    result: dict[str, Any] = {}
    with vodq_process("serve", env, work / "serve.log", port=free_port()) as proc:
        with httpx.Client(base_url=proc.base_url or "", timeout=30) as client:
            for path in ("/status", "/metrics"):
                samples = []
                for index in range(WARMUP + HTTP_REQUESTS):
                    started = time.perf_counter()
                    response = client.get(path)
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    if index >= WARMUP:
                        samples.append(elapsed * 1000)
                key = path.strip("/")
                result[f"{key}_p50_ms"] = round(percentile(samples, 50), 2)
                result[f"{key}_p95_ms"] = round(percentile(samples, 95), 2)
        result["serve_rss_mib"] = round(proc.rss_kib()[0] / 1024, 1)
    return result


def drop_state_index(dsn: str) -> None:
    """Drop ix_vods_state, to test whether SQLite plans better without it.

    Without it the claim uses the partial indexes, but ``WorkerRegistry.list``
    then walks the whole ``vod_id`` index, so the idea is rejected.
    """
    import sqlite3

    from sqlalchemy.engine import make_url

    conn = sqlite3.connect(make_url(dsn).database or "")
    try:
        conn.execute("DROP INDEX IF EXISTS ix_vods_state")
        conn.commit()
    finally:
        conn.close()


def run(backend: str, size: str, claims: int, with_fix: bool) -> list[dict[str, Any]]:
    rows = []
    with workdir(f"claim-{backend}") as work, database(backend, work) as dsn:
        fill_s = populate(dsn, SIZES[size])
        variants = ["as is"] + (
            ["no ix_vods_state"] if with_fix and backend == "sqlite" else []
        )
        for variant in variants:
            if variant != "as is":
                drop_state_index(dsn)
            watch = LoadWatch()
            row: dict[str, Any] = {
                "backend": backend,
                "queued": size,
                "schema": variant,
            }
            row.update(time_claims(dsn, claims))
            row.update(time_endpoints(dsn, work))
            row["fill_s"] = round(fill_s, 1)
            row.update(watch.stop())
            rows.append(row)
            _print(row)
    return rows


def _print(row: dict[str, Any]) -> None:
    print(
        f"  {row['backend']:8} {row['queued']:>4} {row['schema']}: "
        f"claim p50 {row['claim_p50_ms']} ms, /status p95 "
        f"{row['status_p95_ms']} ms, /metrics p95 {row['metrics_p95_ms']} ms "
        f"(filled in {row['fill_s']} s) load {row['load_after']}",
        flush=True,
    )


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check each target against the rows measured."""
    out = []
    for backend in sorted({r["backend"] for r in rows}):
        mine = {
            r["queued"]: r
            for r in rows
            if r["backend"] == backend and r["schema"] == "as is"
        }
        if "1M" in mine:
            p50 = mine["1M"]["claim_p50_ms"]
            out.append(
                _verdict(
                    backend, "claim p50 at 1M < 5 ms", p50, p50 < CLAIM_P50_TARGET_MS
                )
            )
        if "1M" in mine and "1k" in mine:
            growth = mine["1M"]["claim_p50_ms"] / mine["1k"]["claim_p50_ms"]
            out.append(
                _verdict(
                    backend,
                    "claim p50 1M / 1k <= 3",
                    round(growth, 2),
                    growth <= CLAIM_GROWTH_TARGET,
                )
            )
        for size, limit in STATUS_TARGETS_MS.items():
            if size not in mine or (size == "1M" and backend != "postgres"):
                continue
            for key in ("status", "metrics"):
                value = mine[size][f"{key}_p95_ms"]
                out.append(
                    _verdict(
                        backend,
                        f"/{key} p95 at {size} < {limit:.0f} ms",
                        value,
                        value < limit,
                    )
                )
    return out


def _verdict(backend: str, target: str, value: float, met: bool) -> dict[str, Any]:
    return {
        "backend": backend,
        "target": target,
        "value": value,
        "met": "yes" if met else "NO",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 100k only")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--sizes", default="1k,100k,1M")
    parser.add_argument("--claims", type=int, default=CLAIMS)
    parser.add_argument(
        "--with-fix",
        action="store_true",
        help="on SQLite, measure again without ix_vods_state",
    )
    args = parser.parse_args()
    sizes = ["1k", "100k"] if args.quick else args.sizes.split(",")
    rows = []
    for backend in args.backends.split(","):
        for size in sizes:
            rows += run(backend, size, args.claims, args.with_fix)
    print_table(
        "claim, /status and /metrics by queue size (ms)",
        [
            {
                k: row[k]
                for k in (
                    "backend",
                    "queued",
                    "schema",
                    "claim_p50_ms",
                    "claim_p95_ms",
                    "status_p50_ms",
                    "status_p95_ms",
                    "metrics_p95_ms",
                    "fill_s",
                    "load_after",
                )
            }
            for row in rows
        ],
    )
    checks = verdicts(rows)
    print_table("targets", checks)
    write_result("claim", {"args": vars(args), "rows": rows, "targets": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
