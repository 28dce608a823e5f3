"""Wake-up latency: from an API call to the first request at the media server.

Two events, each with a free download slot:

* ``add``: ``POST /admin/vods`` of a new VOD;
* ``bump``: ``POST /admin/vod/priority`` of a VOD that was inserted with SQL
  a moment before (so nothing woke the scheduler for it yet). Without a
  wake-up it would start at the next poll, up to 1 s later. A trial where
  the poll happened to start the VOD before the bump is counted apart.

On SQLite one ``vodq serve`` does everything; on PostgreSQL one ``vodq api``
takes the calls and two ``vodq worker`` processes, woken by LISTEN/NOTIFY,
download. Latency is measured in this process on one monotonic clock: from
just before the request is sent to the arrival of the GET at the server.

    python bench/bench_wakeup.py             # 100 trials of each
    python bench/bench_wakeup.py --quick     # 20 trials of each
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from benchserver import BenchServer, serving
from common import (
    K,
    LoadWatch,
    api,
    database,
    free_port,
    percentile,
    print_table,
    sqlalchemy_dsn,
    vodq_env,
    vodq_process,
    wait_until,
    workdir,
    write_result,
)

FILE_BYTES = 64 * K
WARMUP_TRIALS = 4
TARGET_P50_MS = 100.0
TARGET_P99_MS = 300.0
REQUEST_TIMEOUT_S = 5.0
DONE_TIMEOUT_S = 15.0


# The fix proposed for the start-up cost of each download (see
# docs/benchmarks.md), measured with --with-fix through variant_vodq.py.
PROPOSED_FIX = "no-extractors,shared-ssl"


@contextmanager
def cluster(
    backend: str, work: Path, variant: str | None = None
) -> Iterator[tuple[str, str]]:
    """Start vodq for ``backend``; yield (API base URL, DB_DSN)."""
    with ExitStack() as stack:
        dsn = stack.enter_context(database(backend, work))
        port = free_port()
        if backend == "sqlite":
            env = vodq_env(work, DB_DSN=dsn, MAX_CONCURRENT_DOWNLOADS="1")
            proc = stack.enter_context(
                vodq_process(
                    "serve", env, work / "serve.log", port=port, variant=variant
                )
            )
        else:
            env = vodq_env(
                work,
                DB_DSN=dsn,
                MAX_CONCURRENT_DOWNLOADS="2",
                MAX_DOWNLOADS_PER_WORKER="1",
            )
            proc = stack.enter_context(
                vodq_process("api", env, work / "api.log", port=port, variant=variant)
            )
            for index in range(2):
                worker_env = {**env, "WORKER_ID": f"bench-worker-{index}"}
                stack.enter_context(
                    vodq_process(
                        "worker",
                        worker_env,
                        work / f"worker{index}.log",
                        variant=variant,
                    )
                )
        assert proc.base_url is not None
        yield proc.base_url, dsn


def wait_done(base_url: str, vod_id: str) -> str:
    state = ""

    def done() -> bool:
        nonlocal state
        state = api(base_url, "GET", f"/vods/{vod_id}")["state"]
        return state in ("done", "failed")

    wait_until(done, DONE_TIMEOUT_S, interval_s=0.05)
    return state


def warm_up(server: BenchServer, base_url: str, backend: str, tag: str) -> None:
    """Pay each process's first yt-dlp start-up before measuring."""
    if backend == "postgres":
        # Two slow downloads at once, so each worker takes one.
        names = [f"{tag}-both{i}" for i in range(2)]
        for name in names:
            url = server.gen_url(name, 512 * K, rate=512 * K)
            api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        for name in names:
            wait_done(base_url, name)
    for index in range(WARMUP_TRIALS):
        name = f"{tag}-warm{index}"
        api(
            base_url,
            "POST",
            "/admin/vods",
            {"vod_id": name, "url": server.gen_url(name, FILE_BYTES)},
        )
        wait_done(base_url, name)


def trial_add(server: BenchServer, base_url: str, name: str) -> dict[str, Any]:
    url = server.gen_url(name, FILE_BYTES)
    with httpx.Client(timeout=10) as client:
        sent = time.monotonic()
        response = client.post(
            base_url + "/admin/vods", json={"vod_id": name, "url": url}
        )
        answered = time.monotonic()
    response.raise_for_status()
    request = server.wait_request(f"/{name}.mp4", REQUEST_TIMEOUT_S)
    return {
        "latency_ms": None if request is None else (request.arrived - sent) * 1000,
        "api_ms": (answered - sent) * 1000,
        "state": wait_done(base_url, name),
    }


def trial_bump(
    server: BenchServer, base_url: str, queue: Any, name: str
) -> dict[str, Any]:
    queue.add(vod_id=name, source_url=server.gen_url(name, FILE_BYTES), priority=0)
    with httpx.Client(timeout=10) as client:
        sent = time.monotonic()
        response = client.post(
            base_url + "/admin/vod/priority", json={"vod_id": name, "priority": 100}
        )
        answered = time.monotonic()
    response.raise_for_status()
    request = server.wait_request(f"/{name}.mp4", REQUEST_TIMEOUT_S)
    latency = None if request is None else (request.arrived - sent) * 1000
    return {
        "latency_ms": latency,
        "api_ms": (answered - sent) * 1000,
        "poll_first": latency is not None and latency < 0,
        "state": wait_done(base_url, name),
    }


def run_backend(
    server: BenchServer, backend: str, trials: int, seed: int, variant: str | None
) -> list[dict[str, Any]]:
    from vodq.db.engine import make_engine
    from vodq.queue import VodQueue

    rng = random.Random(seed)
    rows = []
    label = "proposed fix" if variant else "as is"
    with (
        workdir(f"wakeup-{backend}") as work,
        cluster(backend, work, variant) as (
            base,
            dsn,
        ),
    ):
        engine = make_engine(sqlalchemy_dsn(dsn))
        queue = VodQueue(engine)
        try:
            warm_up(server, base, backend, f"{backend[:2]}{seed}")
            for event in ("add", "bump"):
                watch = LoadWatch()
                results = []
                for index in range(trials):
                    # A random pause, so trials do not keep one phase of the
                    # scheduler's 1 s poll.
                    time.sleep(0.1 + rng.random() * 0.5)
                    name = f"{backend[:2]}{seed}-{event}-{index}"
                    if event == "add":
                        results.append(trial_add(server, base, name))
                    else:
                        results.append(trial_bump(server, base, queue, name))
                rows.append(summarise(backend, event, results, watch.stop()))
                rows[-1]["vodq"] = label
                print_row(rows[-1])
        finally:
            engine.dispose()
    return rows


def summarise(
    backend: str, event: str, results: list[dict[str, Any]], load: dict[str, Any]
) -> dict[str, Any]:
    measured = [
        r["latency_ms"]
        for r in results
        if r["latency_ms"] is not None and not r.get("poll_first")
    ]
    p50 = percentile(measured, 50)
    p99 = percentile(measured, 99)
    return {
        "backend": backend,
        "event": event,
        "trials": len(results),
        "measured": len(measured),
        "poll_first": sum(1 for r in results if r.get("poll_first")),
        "no_request": sum(1 for r in results if r["latency_ms"] is None),
        "not_done": sum(1 for r in results if r["state"] != "done"),
        "p50_ms": round(p50, 1),
        "p90_ms": round(percentile(measured, 90), 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(max(measured), 1) if measured else None,
        "api_p50_ms": round(percentile([r["api_ms"] for r in results], 50), 1),
        "target_met": "yes" if p50 < TARGET_P50_MS and p99 < TARGET_P99_MS else "NO",
        "latencies_ms": [round(x, 1) for x in measured],
        **load,
    }


def print_row(row: dict[str, Any]) -> None:
    print(
        f"  {row['backend']:8} {row['vodq']:12} {row['event']:4} "
        f"p50 {row['p50_ms']} ms "
        f"p99 {row['p99_ms']} ms max {row['max_ms']} ms "
        f"(n={row['measured']}, poll first {row['poll_first']}) "
        f"load {row['load_after']}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 trials of each")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument(
        "--backends", default="sqlite,postgres", help="comma-separated list"
    )
    parser.add_argument(
        "--with-fix",
        action="store_true",
        help=f"also run vodq with the proposed fix patched in ({PROPOSED_FIX})",
    )
    args = parser.parse_args()
    trials = 20 if args.quick else args.trials
    rows = []
    with serving() as server:
        variants = [None, PROPOSED_FIX] if args.with_fix else [None]
        for backend in args.backends.split(","):
            for variant in variants:
                rows += run_backend(server, backend, trials, len(rows), variant)
    table = [{k: v for k, v in row.items() if k != "latencies_ms"} for row in rows]
    print_table(
        "wake-up latency, API call to first request at the server (ms)",
        [
            {
                k: row[k]
                for k in (
                    "backend",
                    "vodq",
                    "event",
                    "measured",
                    "poll_first",
                    "p50_ms",
                    "p99_ms",
                    "max_ms",
                    "api_p50_ms",
                    "target_met",
                    "load_after",
                )
            }
            for row in table
        ],
    )
    write_result("wakeup", {"args": vars(args), "trials": trials, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
