"""Throughput without a limit: one and four 500 MB downloads from 127.0.0.1.

Clients, in the same run and on the same file (served from the page cache
with ``sendfile``): ``curl -o`` as the ceiling, the yt-dlp command line, and
``vodq serve``. The rate is taken at the server, from the first to the last
byte of the download GETs, leaving out the command line's probe GET. The
end-to-end time, from process start or ``POST /admin/vods`` to a complete
file, is reported beside it. vodq also runs with larger read blocks patched in
(``variant_vodq.py``), to tell what the fixed 128 KiB READ_BLOCK_BYTES costs.

    python bench/bench_throughput.py            # 3 rounds
    python bench/bench_throughput.py --quick    # 1 round, 200 MB
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchserver import BLOCK_BYTES, BenchServer, generated_block, serving
from common import (
    YT_DLP,
    LoadWatch,
    M,
    api,
    free_port,
    median,
    print_table,
    vodq_env,
    vodq_process,
    wait_until,
    workdir,
    write_result,
)

FILE_NAME = "big.mp4"
DONE_TIMEOUT_S = 300.0
VODQ_VARIANTS = {
    "vodq": None,
    "vodq block=1M": "block=1048576",
    "vodq yt-dlp buffer": "ytdlp-buffer",
    "vodq progress_delta=1": "progress-delta=1",
    "vodq block=1M+progress_delta=1": "block=1048576,progress-delta=1",
    "vodq yt-dlp buffer+progress_delta=1": "ytdlp-buffer,progress-delta=1",
}
TARGET_ONE = 0.95
TARGET_FOUR = 0.90


def make_file(folder: Path, size: int) -> Path:
    path = folder / FILE_NAME
    block = generated_block()
    with path.open("wb") as out:
        for _ in range(size // BLOCK_BYTES):
            out.write(block)
    return path


def server_rate(server: BenchServer, aliases: list[str]) -> tuple[float, int]:
    """Return (bytes per second, bytes) of the largest GET of each alias."""
    requests = [r for r in server.requests() if r.method == "GET"]
    keys = []
    for alias in aliases:
        mine = [r for r in requests if f"/{alias}/" in r.path]
        if mine:
            keys.append(max(mine, key=lambda r: r.bytes_sent).key)
    entries = [(t, n) for t, n, key in list(server.log.entries) if key in keys]
    if len(entries) < 2:
        return 0.0, 0
    entries.sort()
    first = entries[0][0]
    last = entries[-1][0]
    total = sum(n for _, n in entries)
    # The first write's bytes left at once, so they are not part of the span.
    return (total - entries[0][1]) / max(1e-9, last - first), total


def child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_commands(
    server: BenchServer, work: Path, tool: str, count: int, tag: str
) -> dict[str, Any]:
    aliases = [f"{tag}-{i}" for i in range(count)]
    urls = [server.disk_url(alias, FILE_NAME) for alias in aliases]
    cpu_before = child_cpu_s()
    started = time.monotonic()
    procs = []
    for alias, url in zip(aliases, urls, strict=True):
        out = work / f"{alias}.mp4"
        if tool == "curl":
            args = ["curl", "-s", "-o", str(out), url]
        else:
            args = [YT_DLP, "-q", "--no-progress", "-o", str(out), url]
        procs.append(subprocess.Popen(args, cwd=work))
    for proc in procs:
        proc.wait(DONE_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} exited with {proc.returncode}")
    wall = time.monotonic() - started
    rate, total = server_rate(server, aliases)
    for alias in aliases:
        (work / f"{alias}.mp4").unlink(missing_ok=True)
    return {
        "rate_mb_s": rate / 1e6,
        "end_to_end_s": wall,
        "cpu_s": child_cpu_s() - cpu_before,
        "bytes": total,
    }


def run_vodq(
    server: BenchServer, work: Path, variant: str | None, count: int, tag: str
) -> dict[str, Any]:
    aliases = [f"{tag}-{i}" for i in range(count)]
    data = work / f"data-{tag}"
    env = vodq_env(data, MAX_CONCURRENT_DOWNLOADS=str(count))
    with vodq_process(
        "serve", env, work / f"{tag}.log", port=free_port(), variant=variant
    ) as proc:
        assert proc.base_url is not None
        base = proc.base_url
        cpu_before = proc.cpu_s()
        started = time.monotonic()
        for alias in aliases:
            api(
                base,
                "POST",
                "/admin/vods",
                {"vod_id": alias, "url": server.disk_url(alias, FILE_NAME)},
            )

        def all_done() -> bool:
            states = [api(base, "GET", f"/vods/{alias}")["state"] for alias in aliases]
            if "failed" in states:
                raise RuntimeError(f"a vodq download failed; see {proc.log_path}")
            return all(state == "done" for state in states)

        if not wait_until(all_done, DONE_TIMEOUT_S, interval_s=0.02):
            raise RuntimeError("vodq downloads did not finish")
        wall = time.monotonic() - started
        cpu = proc.cpu_s() - cpu_before
    rate, total = server_rate(server, aliases)
    import shutil

    shutil.rmtree(data, ignore_errors=True)
    return {"rate_mb_s": rate / 1e6, "end_to_end_s": wall, "cpu_s": cpu, "bytes": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 200 MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=500)
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    size = (200 if args.quick else args.size_mb) * M
    clients = ["curl", "yt-dlp", *VODQ_VARIANTS]
    runs: list[dict[str, Any]] = []
    with workdir("throughput") as work:
        make_file(work, size)
        with serving(folder=work) as server:
            for round_index in range(rounds):
                for count in (1, 4):
                    # Rotate the order, so no client always runs first.
                    shift = round_index % len(clients)
                    for client in clients[shift:] + clients[:shift]:
                        watch = LoadWatch()
                        tag = f"t{round_index}{count}{len(runs)}"
                        if client in ("curl", "yt-dlp"):
                            result = run_commands(server, work, client, count, tag)
                        else:
                            result = run_vodq(
                                server, work, VODQ_VARIANTS[client], count, tag
                            )
                        result.update(
                            client=client,
                            downloads=count,
                            round=round_index,
                            **watch.stop(),
                        )
                        runs.append(result)
                        print(
                            f"  round {round_index} x{count} {client:20} "
                            f"{result['rate_mb_s']:7.0f} MB/s at the server, "
                            f"{result['end_to_end_s']:5.2f} s end to end, "
                            f"{result['cpu_s']:5.2f} CPU s, load {watch.after}",
                            flush=True,
                        )
                        server.reset()
    table = []
    for count in (1, 4):
        ytdlp_rates = {
            r["round"]: r["rate_mb_s"]
            for r in runs
            if r["client"] == "yt-dlp" and r["downloads"] == count
        }
        for client in clients:
            mine = [
                r for r in runs if r["client"] == client and r["downloads"] == count
            ]
            ratios = [
                r["rate_mb_s"] / ytdlp_rates[r["round"]]
                for r in mine
                if ytdlp_rates.get(r["round"])
            ]
            line = {
                "downloads": count,
                "client": client,
                "MB/s (median)": round(median([r["rate_mb_s"] for r in mine])),
                "vs yt-dlp (median of same-round ratios)": round(median(ratios), 3),
                "end to end s": round(median([r["end_to_end_s"] for r in mine]), 2),
                "CPU s per GB": round(
                    median(
                        [r["cpu_s"] / (r["bytes"] / 1e9) for r in mine if r["bytes"]]
                    ),
                    2,
                ),
            }
            if client == "vodq":
                target = TARGET_ONE if count == 1 else TARGET_FOUR
                line["target"] = (
                    f">= {target:.0%}: {'yes' if median(ratios) >= target else 'NO'}"
                )
            table.append(line)
    print_table(
        f"throughput, {size // M} MiB file from 127.0.0.1 ({rounds} rounds)", table
    )
    write_result(
        "throughput",
        {"args": vars(args), "file_bytes": size, "summary": table, "runs": runs},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
