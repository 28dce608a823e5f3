"""Memory of ``vodq serve`` with 1M queued VODs and four downloads running.

The database is filled with SQL and paused, four VODs of high priority are
added and the queue resumed, so the four downloads (held at 2M each by
DOWNLOAD_RATE_LIMIT, from the benchmark server) run for the whole sample.
While they run, ``/status``, ``/metrics`` and a 500-VOD page of ``/vods``
are requested every second. RSS is read from /proc every 0.5 s; VmHWM is
the peak the kernel recorded. Downloads run in child processes, so the
whole process tree is read too: its summed Pss (shared pages counted once)
is the figure held against the target.

    python bench/bench_memory.py                  # SQLite, 1M VODs
    python bench/bench_memory.py --backends sqlite,postgres
    python bench/bench_memory.py --quick          # 100k VODs, 10 s
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
from benchserver import serving
from common import (
    LoadWatch,
    M,
    api,
    database,
    free_port,
    print_table,
    vodq_env,
    vodq_process,
    workdir,
    write_result,
)
from populate import populate, set_paused

DOWNLOADS = 4
TARGET_MIB = 200.0


def run(backend: str, count: int, sample_s: float) -> dict[str, Any]:
    with (
        serving() as server,
        workdir(f"memory-{backend}") as work,
        database(backend, work) as dsn,
    ):
        fill_s = populate(dsn, count)
        set_paused(dsn, True)
        env = vodq_env(
            work,
            DB_DSN=dsn,
            MAX_CONCURRENT_DOWNLOADS=str(DOWNLOADS),
            DOWNLOAD_RATE_LIMIT="2M",
        )
        watch = LoadWatch()
        with vodq_process("serve", env, work / "serve.log", port=free_port()) as proc:
            base = proc.base_url or ""
            with httpx.Client(base_url=base, timeout=30) as client:
                for _ in range(3):
                    client.get("/status").raise_for_status()
                idle_kib = proc.rss_kib()[0]
                names = [f"mem-{i}" for i in range(DOWNLOADS)]
                for name in names:
                    url = server.gen_url(name, int(2 * M * (sample_s + 60)))
                    api(
                        base,
                        "POST",
                        "/admin/vods",
                        {"vod_id": name, "url": url, "priority": 1000},
                    )
                api(base, "POST", "/admin/queue/resume")
                for name in names:
                    if server.wait_request(f"/{name}.mp4", 30) is None:
                        raise RuntimeError(
                            f"download {name} did not start; see {proc.log_path}"
                        )
                samples = []
                tree_samples: list[tuple[int, int, int]] = []
                deadline = time.monotonic() + sample_s
                next_call = 0.0
                while time.monotonic() < deadline:
                    if time.monotonic() >= next_call:
                        client.get("/status").raise_for_status()
                        client.get("/metrics").raise_for_status()
                        client.get("/vods", params={"limit": 500}).raise_for_status()
                        next_call = time.monotonic() + 1.0
                    samples.append(proc.rss_kib()[0])
                    tree_samples.append(proc.tree_kib())
                    time.sleep(0.5)
                running = api(base, "GET", "/status")["active_downloads"]
                _, hwm_kib = proc.rss_kib()
    row = {
        "backend": backend,
        "queued": count,
        "downloads_running": running,
        "idle_rss_mib": round(idle_kib / 1024, 1),
        "rss_median_mib": round(sorted(samples)[len(samples) // 2] / 1024, 1),
        "rss_max_mib": round(max(samples) / 1024, 1),
        "peak_hwm_mib": round(hwm_kib / 1024, 1),
        "processes": max(t[0] for t in tree_samples),
        "tree_rss_max_mib": round(max(t[1] for t in tree_samples) / 1024, 1),
        "tree_pss_max_mib": round(max(t[2] for t in tree_samples) / 1024, 1),
        "target_met": "yes"
        if max(t[2] for t in tree_samples) / 1024 < TARGET_MIB
        else "NO",
        "fill_s": round(fill_s, 1),
        **watch.stop(),
    }
    print(
        f"  {backend:8} {count} VODs, {running} downloads: "
        f"RSS idle {row['idle_rss_mib']} MiB, "
        f"max {row['rss_max_mib']} MiB, peak (VmHWM) {row['peak_hwm_mib']} MiB, "
        f"{row['processes']} processes: PSS max {row['tree_pss_max_mib']} MiB "
        f"(RSS sum {row['tree_rss_max_mib']} MiB), "
        f"load {row['load_after']}",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k VODs, 10 s")
    parser.add_argument("--backends", default="sqlite")
    parser.add_argument("--vods", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    count = 100_000 if args.quick else args.vods
    seconds = 10.0 if args.quick else args.seconds
    rows = [run(backend, count, seconds) for backend in args.backends.split(",")]
    print_table("RSS of vodq serve with four downloads running (MiB)", rows)
    write_result("memory", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
