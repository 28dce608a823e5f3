"""API requests per second under wrk with 1M VODs: ``/status`` and ``/vods/{id}``.

The database is filled with SQL and the queue paused, so ``vodq serve``
only serves requests. ``wrk`` (``apt-get install -y wrk``) runs on the same
two cores as the server, with 2 threads and 16 connections; ``/vods/{id}``
asks for a random one of the million VODs on every request (a Lua script).

    python bench/bench_api.py                     # SQLite and PostgreSQL
    python bench/bench_api.py --quick             # 100k VODs, 5 s runs
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import (
    LoadWatch,
    database,
    free_port,
    median,
    print_table,
    vodq_env,
    vodq_process,
    workdir,
    write_result,
)
from populate import bulk_id, populate, set_paused

WRK_THREADS = 2
WRK_CONNECTIONS = 16
RANDOM_VOD_SCRIPT = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", string.format("/vods/b%%07d", math.random(0, %(last)d)))
end
"""


def wrk(url: str, seconds: int, script: Path | None) -> dict[str, Any]:
    args = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|90|99)%\s+([\d.]+\w+)", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": latency.get("50"),
        "p99": latency.get("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def run(backend: str, count: int, seconds: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with workdir(f"api-{backend}") as work, database(backend, work) as dsn:
        fill_s = populate(dsn, count)
        set_paused(dsn, True)
        script = work / "random_vod.lua"
        script.write_text(RANDOM_VOD_SCRIPT % {"seed": 7, "last": count - 1})
        env = vodq_env(work, DB_DSN=dsn)
        with vodq_process("serve", env, work / "serve.log", port=free_port()) as proc:
            base = proc.base_url or ""
            # A first request of each kind, so start-up costs are not measured.
            wrk(base + "/status", 1, None)
            wrk(base + f"/vods/{bulk_id(0)}", 1, None)
            for path, lua in (("/status", None), ("/vods/{id}", script)):
                watch = LoadWatch()
                url = base + ("/status" if lua is None else "/")
                results = [wrk(url, seconds, lua) for _ in range(repeats)]
                best = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
                row = {
                    "backend": backend,
                    "vods": count,
                    "path": path,
                    "req/s (median)": round(median([r["rps"] for r in results])),
                    "req/s (each run)": [round(r["rps"]) for r in results],
                    "p50": best["p50"],
                    "p99": best["p99"],
                    "non_2xx": sum(r["non_2xx"] for r in results),
                    "fill_s": round(fill_s, 1),
                    **watch.stop(),
                }
                rows.append(row)
                print(
                    f"  {backend:8} {path:12} {row['req/s (median)']} req/s "
                    f"(p50 {row['p50']}, p99 {row['p99']}) load {row['load_after']}",
                    flush=True,
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k VODs, 5 s runs")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--vods", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    count = 100_000 if args.quick else args.vods
    seconds = 5 if args.quick else args.seconds
    repeats = 1 if args.quick else args.repeat
    rows = []
    for backend in args.backends.split(","):
        rows += run(backend, count, seconds, repeats)
    print_table(
        f"requests per second under wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}", rows
    )
    write_result("api", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
