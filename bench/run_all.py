"""Run every benchmark one after another, then print every target from the results.

    python bench/run_all.py             # the full suite (about an hour here)
    python bench/run_all.py --quick     # the short version of each
    python bench/run_all.py --only rates,claim

Each benchmark runs as its own process and writes bench/results/<name>.json
(bench/results/quick/ with --quick), and one that fails does not stop the
others. The exit status is 1 when any
benchmark failed to run (a missed target is a result, not a failure).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from common import BENCH_DIR, load, machine, print_table, results_dir

BENCHMARKS = {
    "rates": ["bench_rates.py"],
    "wakeup": ["bench_wakeup.py", "--with-fix"],
    "claim": ["bench_claim.py", "--with-fix"],
    "throughput": ["bench_throughput.py"],
    "memory": ["bench_memory.py"],
    "api": ["bench_api.py"],
}
# A benchmark still running after this long is stopped.
TIMEOUT_S = 3600


def targets(quick: bool) -> list[dict[str, Any]]:
    """Collect every target's verdict from the result files present."""
    rows: list[dict[str, Any]] = []

    def read(name: str) -> dict[str, Any] | None:
        path = results_dir(quick) / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    if rates := read("rates"):
        for line in rates.get("summary", []):
            rows.append(
                {
                    "benchmark": "rates",
                    "target": f"{line['rate']} {line['source']} {line['mode']}: every "
                    "5 s window within 5%",
                    "value": f"worst {line['vodq worst %']}%",
                    "met": line["vodq within 5%"],
                }
            )
        for line in rates.get("patch_summary", []):
            rows.append(
                {
                    "benchmark": "rates",
                    "target": f"PATCH {line['change']} settles within 2 s",
                    "value": f"{line['settle s (each run)']} s",
                    "met": line["within 2 s"],
                }
            )
    if wakeup := read("wakeup"):
        for line in wakeup["rows"]:
            rows.append(
                {
                    "benchmark": "wakeup",
                    "target": f"{line['backend']} {line['event']} "
                    f"({line.get('vodq', 'as is')}):"
                    " p50 < 100 ms, p99 < 300 ms",
                    "value": f"p50 {line['p50_ms']} / p99 {line['p99_ms']} ms",
                    "met": line["target_met"],
                }
            )
    if claim := read("claim"):
        for line in claim["targets"]:
            rows.append(
                {
                    "benchmark": "claim",
                    "target": f"{line['backend']} {line['target']}",
                    "value": line["value"],
                    "met": line["met"],
                }
            )
    if throughput := read("throughput"):
        for line in throughput["summary"]:
            if "target" in line:
                rows.append(
                    {
                        "benchmark": "throughput",
                        "target": f"x{line['downloads']} vodq vs yt-dlp "
                        + line["target"].split(":")[0],
                        "value": line["vs yt-dlp (median of same-round ratios)"],
                        "met": line["target"].split(": ")[1],
                    }
                )
    if memory := read("memory"):
        for line in memory["rows"]:
            rows.append(
                {
                    "benchmark": "memory",
                    "target": f"{line['backend']} {line['queued']} VODs, "
                    "4 downloads: < 200 MiB",
                    "value": f"{line['peak_hwm_mib']} MiB",
                    "met": line["target_met"],
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated: " + ",".join(BENCHMARKS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    print(f"machine: {machine()}")
    failed = []
    for name in names:
        command = [sys.executable, str(BENCH_DIR / BENCHMARKS[name][0])]
        command += BENCHMARKS[name][1:] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(command[1:])} (load {load()})", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, timeout=TIMEOUT_S, check=False).returncode
        except subprocess.TimeoutExpired:
            code = -1
        print(f"=== {name} finished in {time.monotonic() - started:.0f} s, exit {code}")
        if code != 0:
            failed.append(name)
    print_table("targets", targets(args.quick))
    if failed:
        print(f"\nbenchmarks that did not run to the end: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
