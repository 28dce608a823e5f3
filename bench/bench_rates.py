"""Rate limits measured at the server: vodq against the yt-dlp command line.

The cases are each configured rate (500K, 2M, 10M), each source (a plain
HTTP file and an HLS stream) and each mode: one download under
DOWNLOAD_RATE_LIMIT ("per"), three sharing DOWNLOAD_TOTAL_RATE_LIMIT
("pool"), and, over HTTP, three sharing it while the first one's source
sends only a tenth of its equal part ("slow"), or sends as fast as its
share allows and drops to a tenth of it after 5 s ("drop", back at full
speed after ``--drop-seconds``), or sends ``--slow-share`` of its part and
turns as fast as the server sends after 7 s ("rise"; "per-rise" for one
download under DOWNLOAD_RATE_LIMIT). "per-slow" is one download under it
whose source sends ``--slow-share`` of the limit, in bursts with
``--burst``. In each case one ``vodq serve`` downloads, the pooled modes
also run on a cluster of one ``vodq api`` and two ``vodq worker`` on
PostgreSQL ("vodq cluster"), and then the yt-dlp command line downloads
the same files with ``--limit-rate``. The command line has no pooled
limit, so the pooled modes run three processes at a third of the rate
each. HLS is fetched four fragments at once by both. The benchmark server
logs every body write. The rate is the bytes it sent, for all streams
together, in each 5-second window after the first 2 seconds of the
transfer.

A second part runs one pooled download, adds three at once and later
cancels one, and measures the 5-second windows that start at those moments.
A third part changes DOWNLOAD_TOTAL_RATE_LIMIT with ``PATCH /admin/config``
while three downloads run and measures how long the server-side rate takes
to settle at the new value: in one ``vodq serve`` on SQLite, and in a
cluster of one ``vodq api`` and two ``vodq worker`` on PostgreSQL. With
``--cut``, a fourth part lowers the limit of running downloads (HTTP, and
HLS with 2 and 8 MiB segments) from 10M to 500K and measures the 5-second
windows that start at and after the PATCH. With ``--pause``, a fifth part
stops every source for 3 s (``--pause-seconds``) while downloads run, one
under DOWNLOAD_RATE_LIMIT or three pooled, and measures the 5-second windows
that slide from the resume, for vodq and the command line.

    python bench/bench_rates.py            # every case, then the PATCH test
    python bench/bench_rates.py --quick    # 2M only, one window, one change
    python bench/bench_rates.py --only-cut --patch-repeat 2 --name rates_cut
    python bench/bench_rates.py --only-pause --repeat 2 --name rates_pause
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchserver import BenchServer, serving, window_rates
from common import (
    YT_DLP,
    K,
    LoadWatch,
    M,
    api,
    free_port,
    median,
    postgres_database,
    print_table,
    stop_process,
    vodq_env,
    vodq_process,
    workdir,
    write_result,
)

RATES = {"500K": 500 * K, "2M": 2 * M, "10M": 10 * M}
SKIP_S = 2.0
WINDOW_S = 5.0
# Step, in seconds, between the starts of sliding windows: those measured
# from a resume, and those whose extremes every rate case reports.
SLIDE_S = 0.05
POOL_DOWNLOADS = 3
# In the "slow" mode, the first pooled download's source sends this share of
# its equal part of the pool, so the pool must move the rest to the others.
SLOW_SHARE = 0.1
# In the "drop" mode, the first pooled download's source drops to SLOW_SHARE
# of its equal part this many seconds after its request: 3 s into the first
# window, so that the second window starts 2 s after the drop.
DROP_AFTER_S = 5.0
# In the "rise" modes, the first download's source turns as fast as the
# server sends this many seconds after its request: the second window
# starts then and contains the first 5 s at the new speed.
RISE_AFTER_S = 7.0
# Modes of one download under DOWNLOAD_RATE_LIMIT; the others share the pool.
SINGLE_MODES = frozenset({"per", "per-rise", "per-slow"})
# Modes whose first source changes its speed, run over HTTP only.
SOURCE_MODES = frozenset({"slow", "drop", "rise", "per-rise", "per-slow"})
# HLS fragments fetched at once, by vodq and by the command line alike.
HLS_FRAGMENTS = 4
# HLS segments are 2 MiB by default, 2 s of an 8 Mbit/s stream, so that each
# fragment connection lasts seconds. With --segment auto they are at most 1.25%
# of a window's bytes at the target rate (16 KiB at 500K, 128 KiB at 2M,
# 512 KiB at 10M), which hides the burst of every new fragment connection.
MAX_SEGMENT_BYTES = 1 * M
SEGMENT_SHARE = 0.0125
DEFAULT_SEGMENT = "2M"
# The server's socket send buffer by default: 8 KiB, which the kernel doubles.
# The server logs a write when the data enters that buffer, so the log runs
# ahead of the wire by up to 16 KiB per connection. With 64 KiB it ran 128 KiB
# ahead, a quarter of a second of 500K for each of four fragment connections.
DEFAULT_SNDBUF = "8K"


class Options:
    """Settings of the whole run that the command line may change."""

    # --segment: one HLS segment size for every rate, in bytes, or None.
    segment_bytes: int | None = None
    # --sndbuf: the server's socket send buffer, in bytes.
    server_sndbuf: int = 8 * K
    # --write: bytes per logged server write, the measurement's resolution.
    # At 16 KiB, four HLS fragment connections at 500K could each put up to
    # 16 KiB on either side of a window's edge: sliding windows strayed to
    # -5.9% where 4 KiB writes of the same downloads showed -4.2% at worst.
    write_bytes: int = 4 * K
    # --mss: the largest TCP segment the server announces, in bytes, or None.
    mss: int | None = None
    # --cut-to: the rate the cut sets, as vodq reads it.
    cut_to: str = "500K"
    # --fragments: HLS fragments each download fetches at once.
    fragments: int = HLS_FRAGMENTS
    # --pool-downloads: downloads that share a pool in the rate cases.
    pool_downloads: int = POOL_DOWNLOADS
    # --slow-sources: how many of them, from the first, send a tenth of their
    # share in the "slow" mode.
    slow_sources: int = 1
    # --slow-share: the share of its equal part that a slow source sends.
    slow_share: float = SLOW_SHARE
    # --burst: seconds between a slow source's bursts, or None for an even
    # rate.
    burst_s: float | None = None
    # --per-worker: download slots of each worker on the cluster.
    per_worker: int = 2
    # --pause-seconds: how long every source pauses in the pause cases.
    pause_s: float = 3.0
    # --drop-seconds: how long the drop of the "drop" mode lasts before the
    # source sends at full speed again, or None for the rest of the run.
    drop_s: float | None = None


# Files are this many times longer than the measurement needs at the
# configured rate, so even a client that overshoots its limit is still
# downloading when the last window closes. Bytes are generated on the fly
# and the clients are stopped after the last window, so size costs nothing.
SIZE_FACTOR = 6
TARGET_PCT = 5.0
START_TIMEOUT_S = 30.0


# -- measuring ------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Read a size such as 8K or 1.5M (binary multiples) as bytes."""
    units = {"K": K, "M": M}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def transfer_start(server: BenchServer, names: list[str], kind: str) -> float:
    """Return when every stream is transferring, which is the latest stream start.

    A stream starts with its download GET. For a file that is the GET that
    has sent the most, because the command line first probes with a GET that
    it aborts. For HLS it is the first segment.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        requests = [r for r in server.requests() if r.method == "GET"]
        starts = []
        for name in names:
            mine = [
                r
                for r in requests
                if f"/{name}" in r.path and not r.path.endswith(".m3u8")
            ]
            if mine:
                starts.append(mine)
        if len(starts) == len(names):
            # Give a probe time to end, so the download GET is among them.
            first = max(min(r.arrived for r in mine) for mine in starts)
            if time.monotonic() - first >= 1.5:
                picks = []
                for mine in starts:
                    if kind == "http":
                        picks.append(max(mine, key=lambda r: r.bytes_sent).arrived)
                    else:
                        picks.append(min(r.arrived for r in mine))
                return max(picks)
        time.sleep(0.05)
    raise RuntimeError(f"downloads {names} did not start within {START_TIMEOUT_S}s")


def stream_samples(
    server: BenchServer, names: list[str], since: float
) -> list[tuple[float, int]]:
    return [
        (t, n)
        for t, n, stream in list(server.log.entries)
        if t >= since and any(f"/{name}" in stream for name in names)
    ]


def window_stats(
    samples: list[tuple[float, int]], t0: float, windows: int, target: float
) -> dict[str, Any]:
    start = t0 + SKIP_S
    end = start + windows * WINDOW_S
    last = max((t for t, _ in samples), default=t0)
    # Still sending within the last second of the plan: every window is whole
    # (a slow stream can leave a gap of a few tenths between two writes).
    if last >= end - 1.0:
        full_end = end
    else:
        full_end = min(end, start + ((last - start) // WINDOW_S) * WINDOW_S)
    rates = [rate for _, rate in window_rates(samples, start, WINDOW_S, full_end)]
    deviations = [(rate - target) / target * 100 for rate in rates]
    startup = sum(n for t, n in samples if t0 <= t < start) / SKIP_S
    result: dict[str, Any] = {
        "target_bps": target,
        "window_bps": [round(r) for r in rates],
        "window_dev_pct": [round(d, 2) for d in deviations],
        "first_2s_dev_pct": round((startup - target) / target * 100, 2),
    }
    sliding = [
        (rate - target) / target * 100
        for rate in sliding_rates(samples, start, full_end)
    ]
    if sliding:
        result["sliding_max_pct"] = round(max(sliding), 2)
        result["sliding_min_pct"] = round(min(sliding), 2)
    if deviations:
        result["mean_dev_pct"] = round(sum(deviations) / len(deviations), 2)
        result["worst_dev_pct"] = round(max(deviations, key=abs), 2)
    else:
        # Finished before one whole window: report the transfer's mean rate.
        span = max(1e-9, last - t0)
        mean = sum(n for _, n in samples) / span
        result["mean_dev_pct"] = round((mean - target) / target * 100, 2)
        result["worst_dev_pct"] = result["mean_dev_pct"]
        result["note"] = f"finished {span:.1f}s after the start, before one window"
    return result


def sliding_rates(
    samples: list[tuple[float, int]], start: float, end: float
) -> list[float]:
    """Return the bytes per second of every WINDOW_S window in [start, end)
    that starts a multiple of SLIDE_S after ``start``."""
    count = int((end - start - WINDOW_S) / SLIDE_S + 1e-9) + 1
    totals = [0] * max(0, count)
    for t, n in samples:
        # The windows [start + i * SLIDE_S, ... + WINDOW_S) that contain t.
        last = min(count - 1, int((t - start) / SLIDE_S))
        first = max(0, math.ceil((t - start - WINDOW_S) / SLIDE_S + 1e-9))
        for index in range(first, last + 1):
            totals[index] += n
    return [total / WINDOW_S for total in totals]


def run_plan(
    server: BenchServer, names: list[str], kind: str, windows: int, target: float
) -> dict[str, Any]:
    """Wait for the transfer and its windows; return the window statistics."""
    t0 = transfer_start(server, names, kind)
    deadline = t0 + SKIP_S + windows * WINDOW_S + 1.0
    time.sleep(max(0.0, deadline - time.monotonic()))
    return window_stats(stream_samples(server, names, t0 - 5), t0, windows, target)


def urls_for(
    server: BenchServer,
    names: list[str],
    kind: str,
    per_stream_bps: float,
    windows: int,
    mode: str = "pool",
) -> list[str]:
    seconds = SKIP_S + windows * WINDOW_S + 5
    size = int(per_stream_bps * seconds * SIZE_FACTOR)
    if kind == "http":
        urls = [server.gen_url(name, size) for name in names]
        if mode in ("rise", "per-rise"):
            # As fast as the server sends after the rise.
            change = (RISE_AFTER_S, 1e12)
            slow_rate = per_stream_bps * Options.slow_share
            urls[0] = server.gen_url(names[0], size, rate=slow_rate, change=change)
        if mode in ("slow", "per-slow"):
            slow_rate = per_stream_bps * Options.slow_share
            for index in range(min(Options.slow_sources, len(names))):
                urls[index] = server.gen_url(
                    names[index], size, rate=slow_rate, burst=Options.burst_s
                )
        if mode == "drop":
            change = (DROP_AFTER_S, per_stream_bps * SLOW_SHARE)
            urls[0] = server.gen_url(names[0], size, change=change, back=Options.drop_s)
        return urls
    segment = segment_bytes(per_stream_bps * len(names))
    segments = max(4, -(-size // segment))
    return [server.hls_url(name, segment, segments) for name in names]


def segment_bytes(total_bps: float) -> int:
    """Return the HLS segment size: --segment, or the largest power of two
    within SEGMENT_SHARE of a window."""
    if Options.segment_bytes is not None:
        return Options.segment_bytes
    limit = total_bps * WINDOW_S * SEGMENT_SHARE
    size = 16 * K
    while size * 2 <= min(limit, MAX_SEGMENT_BYTES):
        size *= 2
    return size


# -- the two clients --------------------------------------------------------------


def run_vodq(
    server: BenchServer,
    tag: str,
    rate: int,
    kind: str,
    mode: str,
    windows: int,
    variant: str | None = None,
    layout: str = "serve",
) -> dict[str, Any]:
    count = 1 if mode in SINGLE_MODES else Options.pool_downloads
    names = [f"{tag}-{i}" for i in range(count)]
    urls = urls_for(server, names, kind, rate / count, windows, mode)
    limit = (
        {"DOWNLOAD_RATE_LIMIT": str(rate)}
        if mode in SINGLE_MODES
        else {"DOWNLOAD_TOTAL_RATE_LIMIT": str(rate)}
    )
    with (
        workdir("rates") as work,
        vodq_layout(
            layout,
            work,
            variant,
            MAX_CONCURRENT_DOWNLOADS=str(count),
            HLS_CONCURRENT_FRAGMENTS=str(Options.fragments),
            **limit,
        ) as base_url,
    ):
        for name, url in zip(names, urls, strict=True):
            api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        return run_plan(server, names, kind, windows, rate)


def bench_server() -> contextlib.AbstractContextManager[BenchServer]:
    """Return the benchmark server with the run's socket and logging options."""
    return serving(
        sndbuf=Options.server_sndbuf,
        write_bytes=Options.write_bytes,
        mss=Options.mss,
    )


def cli_command(name: str, url: str, limit: int, kind: str, work: Path) -> list[str]:
    """Return the yt-dlp command line that downloads ``url`` at ``limit`` bytes/s."""
    args = [YT_DLP, "-q", "--no-progress", "--limit-rate", str(limit)]
    if kind == "hls":
        args += ["--concurrent-fragments", str(Options.fragments)]
    # One output name per process: every playlist's id is "index".
    return [*args, "-o", str(work / f"{name}.%(ext)s"), url]


def run_cli(
    server: BenchServer, tag: str, rate: int, kind: str, mode: str, windows: int
) -> dict[str, Any]:
    count = 1 if mode in SINGLE_MODES else Options.pool_downloads
    names = [f"{tag}-{i}" for i in range(count)]
    per_process = rate // count
    urls = urls_for(server, names, kind, per_process, windows, mode)
    with workdir("rates-cli") as work:
        procs = []
        log = (work / "yt-dlp.log").open("ab")
        try:
            for name, url in zip(names, urls, strict=True):
                args = cli_command(name, url, per_process, kind, work)
                procs.append(
                    subprocess.Popen(
                        args, cwd=work, stdout=log, stderr=subprocess.STDOUT
                    )
                )
            result = run_plan(server, names, kind, windows, rate)
        finally:
            for proc in procs:
                stop_process(proc, timeout_s=5)
            log.close()
    result["cli_limit_rate_per_process"] = per_process
    return result


def rate_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    rates = ["2M"] if args.quick else args.rates.split(",")
    clients = ["vodq"] if args.no_cli else ["vodq", "yt-dlp"]
    if args.variant:
        clients.insert(1, "vodq variant")
    if not args.no_cluster:
        clients.insert(1, "vodq cluster")
    with bench_server() as server:
        index = 0
        for _repeat in range(args.repeat):
            for label in rates:
                for kind in args.kinds.split(","):
                    for mode in args.modes.split(","):
                        if mode in SOURCE_MODES and kind != "http":
                            continue
                        for client in clients:
                            if client == "vodq cluster" and mode in SINGLE_MODES:
                                # One download has no pool to share.
                                continue
                            index += 1
                            watch = LoadWatch()
                            case = (server, f"r{index}", parse_size(label), kind, mode)
                            if client == "yt-dlp":
                                result = run_cli(*case, args.windows)
                            elif client == "vodq cluster":
                                result = run_vodq(*case, args.windows, layout="cluster")
                            else:
                                variant = args.variant if client != "vodq" else None
                                result = run_vodq(*case, args.windows, variant)
                            result.update(
                                rate=label,
                                kind=kind,
                                mode=mode,
                                client=client,
                                **watch.stop(),
                            )
                            if kind == "hls":
                                result["hls_segment_bytes"] = segment_bytes(
                                    parse_size(label)
                                )
                            rows.append(result)
                            print(
                                f"  {label:>4} {kind:4} {mode:4} {client:6} "
                                f"mean {result['mean_dev_pct']:+6.2f}% "
                                f"worst {result['worst_dev_pct']:+6.2f}% "
                                f"windows {result['window_dev_pct']} "
                                f"sliding {result.get('sliding_min_pct')}% to "
                                f"{result.get('sliding_max_pct')}% "
                                f"load {watch.after}",
                                flush=True,
                            )
                            server.reset()
    return rows


# -- changing the pooled limit while three downloads run ---------------------------


def settle_time(
    samples: list[tuple[float, int]],
    changed_at: float,
    phase_end: float,
    target: float,
    *,
    window_s: float = 2.0,
    step_s: float = 0.05,
    tolerance: float = TARGET_PCT / 100,
) -> float | None:
    """Return seconds from ``changed_at`` until every later 2 s window is on target.

    Windows slide in steps of ``step_s``; the answer is the start of the first
    window from which every window up to ``phase_end`` is within
    ``tolerance`` of ``target``. None when the rate never settles.
    """
    times = [t for t, _ in samples]
    totals = [0]
    for _, n in samples:
        totals.append(totals[-1] + n)

    def rate(a: float, b: float) -> float:
        i, j = bisect.bisect_left(times, a), bisect.bisect_left(times, b)
        return (totals[j] - totals[i]) / (b - a)

    starts = []
    s = changed_at
    while s + window_s <= phase_end:
        starts.append(s)
        s += step_s
    good = [abs(rate(s, s + window_s) - target) <= tolerance * target for s in starts]
    if not good or not good[-1]:
        return None
    first_good = len(good)
    while first_good > 0 and good[first_good - 1]:
        first_good -= 1
    return starts[first_good] - changed_at


def switch_delay(
    samples: list[tuple[float, int]], changed_at: float, phase_end: float
) -> float | None:
    """Return when the rate switched, from two straight lines of cumulative bytes.

    One line is fitted over the 3 s before ``changed_at`` and the other from
    2.5 s after it to ``phase_end``. They cross where the new rate took over,
    which gives the effective delay of the change with less noise than any
    window.
    """
    points = []
    total = 0
    for t, n in samples:
        total += n
        points.append((t, total))

    def fit(a: float, b: float) -> tuple[float, float] | None:
        xs = [(t, c) for t, c in points if a <= t < b]
        if len(xs) < 5:
            return None
        mx = sum(t for t, _ in xs) / len(xs)
        my = sum(c for _, c in xs) / len(xs)
        sxx = sum((t - mx) ** 2 for t, _ in xs)
        slope = sum((t - mx) * (c - my) for t, c in xs) / sxx
        return slope, my - slope * mx

    before = fit(changed_at - 3.0, changed_at)
    after = fit(changed_at + 2.5, phase_end)
    if before is None or after is None or before[0] == after[0]:
        return None
    return (after[1] - before[1]) / (before[0] - after[0]) - changed_at


def timeline(
    samples: list[tuple[float, int]], origin: float, end: float, step_s: float = 0.5
) -> list[float]:
    """Rates in MiB/s over consecutive ``step_s`` bins from ``origin``."""
    return [
        round(rate / M, 2) for _, rate in window_rates(samples, origin, step_s, end)
    ]


@contextlib.contextmanager
def vodq_layout(
    layout: str, work: Path, variant: str | None = None, **overrides: str
) -> Iterator[str]:
    """Start vodq as ``layout`` with ``overrides``; yield the API's base URL.

    "serve" is one ``vodq serve`` on SQLite. "cluster" is one ``vodq api`` and
    two ``vodq worker`` on PostgreSQL, two download slots each unless
    --per-worker says otherwise, so that three downloads run on both workers
    and share the pool through the database.
    """
    with contextlib.ExitStack() as stack:
        if layout == "serve":
            env = vodq_env(work, **overrides)
            proc = stack.enter_context(
                vodq_process(
                    "serve", env, work / "vodq.log", port=free_port(), variant=variant
                )
            )
        else:
            dsn = stack.enter_context(postgres_database())
            env = vodq_env(
                work,
                DB_DSN=dsn,
                MAX_DOWNLOADS_PER_WORKER=str(Options.per_worker),
                **overrides,
            )
            proc = stack.enter_context(
                vodq_process(
                    "api", env, work / "api.log", port=free_port(), variant=variant
                )
            )
            for index in range(2):
                stack.enter_context(
                    vodq_process(
                        "worker",
                        {**env, "WORKER_ID": f"bench-worker-{index}"},
                        work / f"worker{index}.log",
                        variant=variant,
                    )
                )
        assert proc.base_url is not None
        yield proc.base_url


def patch_case(
    server: BenchServer, tag: str, steps: list[str], layout: str
) -> dict[str, Any]:
    names = [f"{tag}-{i}" for i in range(POOL_DOWNLOADS)]
    start_rate = 6 * M
    urls = [server.gen_url(name, 2 * 1024 * M) for name in names]
    phase_s = 7.0
    watch = LoadWatch()
    with (
        workdir("patch") as work,
        vodq_layout(
            layout,
            work,
            MAX_CONCURRENT_DOWNLOADS=str(POOL_DOWNLOADS),
            DOWNLOAD_TOTAL_RATE_LIMIT="6M",
        ) as base_url,
    ):
        for name, url in zip(names, urls, strict=True):
            api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        t0 = transfer_start(server, names, "http")
        time.sleep(max(0.0, t0 + 4.0 - time.monotonic()))
        changes = []
        for value in steps:
            sent = time.monotonic()
            api(
                base_url, "PATCH", "/admin/config", {"DOWNLOAD_TOTAL_RATE_LIMIT": value}
            )
            answered = time.monotonic()
            changes.append((value, sent, answered))
            time.sleep(max(0.0, sent + phase_s - time.monotonic()))
        end = time.monotonic()
    samples = stream_samples(server, names, t0 - 1)
    before = [r for _, r in window_rates(samples, t0 + 2, 1.0, changes[0][1])]
    results = []
    previous = start_rate
    for index, (value, sent, answered) in enumerate(changes):
        phase_end = changes[index + 1][1] if index + 1 < len(changes) else end
        target = RATES.get(value) or int(value.rstrip("M")) * M
        settled = settle_time(samples, sent, phase_end, target)
        delay = switch_delay(samples, sent, phase_end)
        results.append(
            {
                "from": previous,
                "to": target,
                "patch_response_ms": round((answered - sent) * 1000, 1),
                "settle_s": None if settled is None else round(settled, 2),
                "switch_delay_s": None if delay is None else round(delay, 2),
                "timeline_mib_s": timeline(samples, sent - 1.0, phase_end),
            }
        )
        previous = target
    return {
        "layout": layout,
        "before_change_bps": [round(r) for r in before],
        "changes": results,
        **watch.stop(),
    }


def patch_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    steps = ["3M"] if args.quick else ["3M", "9M"]
    runs = []
    with bench_server() as server:
        for layout in args.patch_layouts.split(","):
            for index in range(1 if args.quick else args.patch_repeat):
                run = patch_case(server, f"p{layout}{index}", steps, layout)
                runs.append(run)
                report_patch(run)
                server.reset()
    return runs


def report_patch(run: dict[str, Any]) -> None:
    for change in run["changes"]:
        print(
            f"  {run['layout']}: PATCH {change['from'] / M:.0f}M -> "
            f"{change['to'] / M:.0f}M: "
            f"settled in {change['settle_s']} s, switched after "
            f"{change['switch_delay_s']} s "
            f"(response {change['patch_response_ms']} ms) "
            f"load {run['load_after']}",
            flush=True,
        )


# -- downloads joining and leaving the pool ---------------------------------------


def join_case(server: BenchServer, tag: str, rate: int, layout: str) -> dict[str, Any]:
    """One pooled download runs; three join at once, and later one is cancelled.

    Windows start at the join and at the cancel, so the first of each
    contains the moment the pool is split anew. Others start SKIP_S after
    the join, when the joining downloads' first seconds are over, which
    every other case leaves out of its windows.
    """
    names = [f"{tag}-{i}" for i in range(4)]
    urls = [server.gen_url(name, 2 * 1024 * M) for name in names]
    watch = LoadWatch()
    with (
        workdir("join") as work,
        vodq_layout(
            layout,
            work,
            MAX_CONCURRENT_DOWNLOADS="4",
            DOWNLOAD_TOTAL_RATE_LIMIT=str(rate),
        ) as base_url,
    ):
        api(base_url, "POST", "/admin/vods", {"vod_id": names[0], "url": urls[0]})
        t0 = transfer_start(server, names[:1], "http")
        time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
        joined = time.monotonic()
        for name, url in zip(names[1:], urls[1:], strict=True):
            api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        time.sleep(3 * WINDOW_S)
        cancelled = time.monotonic()
        api(base_url, "POST", "/admin/vod/cancel", {"vod_id": names[0]})
        time.sleep(2 * WINDOW_S)
    samples = stream_samples(server, names, t0 - 1)
    join = [r for _, r in window_rates(samples, joined, WINDOW_S, cancelled)]
    # From the end of the joining downloads' first SKIP_S, as for any start.
    settled = [
        r for _, r in window_rates(samples, joined + SKIP_S, WINDOW_S, cancelled)
    ]
    end = [
        r
        for _, r in window_rates(samples, cancelled, WINDOW_S, cancelled + 2 * WINDOW_S)
    ]
    return {
        "layout": layout,
        "rate": rate,
        "join_dev_pct": [round((r - rate) / rate * 100, 2) for r in join],
        "join_after_start_dev_pct": [
            round((r - rate) / rate * 100, 2) for r in settled
        ],
        "cancel_dev_pct": [round((r - rate) / rate * 100, 2) for r in end],
        **watch.stop(),
    }


def join_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    rates = ["2M"] if args.quick else args.rates.split(",")
    layouts = ["serve"] if args.no_cluster else ["serve", "cluster"]
    with bench_server() as server:
        for label in rates:
            for layout in layouts:
                run = join_case(server, f"j{layout}{label}", parse_size(label), layout)
                runs.append(run)
                print(
                    f"  {layout}: {label} join windows {run['join_dev_pct']}, "
                    f"from {SKIP_S:g} s {run['join_after_start_dev_pct']}, "
                    f"cancel windows {run['cancel_dev_pct']} load {run['load_after']}",
                    flush=True,
                )
                server.reset()
    return runs


# -- a large rate cut while downloads run ------------------------------------------

# Seconds from the PATCH to the start of each 5 s window measured after a cut.
CUT_WINDOW_STARTS = (0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0)


def cut_case(
    server: BenchServer, tag: str, variable: str, count: int, segment: int
) -> dict[str, Any]:
    """Downloads at 10M under ``variable``, cut to ``Options.cut_to`` by a PATCH.

    HLS with ``segment`` bytes per segment, or a plain file when it is 0.
    Windows start at and after the PATCH, so the page shows how long the
    bytes already in the connections' receive buffers keep the rate off its
    new value.
    """
    names = [f"{tag}-{i}" for i in range(count)]
    target = parse_size(Options.cut_to)
    with (
        workdir("cut") as work,
        vodq_layout(
            "serve",
            work,
            MAX_CONCURRENT_DOWNLOADS=str(count),
            HLS_CONCURRENT_FRAGMENTS=str(HLS_FRAGMENTS),
            **{variable: "10M"},
        ) as base_url,
    ):
        for name in names:
            if segment:
                url = server.hls_url(name, segment, 400)
            else:
                url = server.gen_url(name, 2 * 1024 * M)
            api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        t0 = transfer_start(server, names, "hls" if segment else "http")
        time.sleep(max(0.0, t0 + 6.0 - time.monotonic()))
        changed = time.monotonic()
        api(base_url, "PATCH", "/admin/config", {variable: Options.cut_to})
        time.sleep(max(CUT_WINDOW_STARTS) + WINDOW_S + 0.5)
    samples = stream_samples(server, names, t0 - 1)
    deviations = []
    for start in CUT_WINDOW_STARTS:
        begin = changed + start
        sent = sum(n for t, n in samples if begin <= t < begin + WINDOW_S)
        deviations.append(round((sent / WINDOW_S - target) / target * 100, 1))
    return {
        "variable": variable,
        "downloads": count,
        "segment_bytes": segment,
        "window_starts_s": list(CUT_WINDOW_STARTS),
        "window_dev_pct": deviations,
        "timeline_kib_s": [
            round(rate / K)
            for _, rate in window_rates(samples, changed - 1.0, 0.5, changed + 12.0)
        ],
    }


def cut_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    layouts = [("DOWNLOAD_RATE_LIMIT", 1)]
    # vodq refuses a pooled limit below 128K.
    if parse_size(Options.cut_to) >= 128 * K:
        layouts.append(("DOWNLOAD_TOTAL_RATE_LIMIT", POOL_DOWNLOADS))
    runs = []
    with bench_server() as server:
        for segment in (0, 2 * M, 8 * M):
            for variable, count in layouts:
                for index in range(args.patch_repeat):
                    tag = f"cut{count}{segment // M}m{index}"
                    run = cut_case(server, tag, variable, count, segment)
                    runs.append(run)
                    source = f"HLS {segment // M} MiB segments" if segment else "HTTP"
                    print(
                        f"  cut 10M -> {Options.cut_to}, {variable}, {count} x "
                        f"{source}: "
                        "windows from "
                        f"{list(CUT_WINDOW_STARTS)} s after the PATCH "
                        f"{run['window_dev_pct']}",
                        flush=True,
                    )
                    server.reset()
    return runs


# -- every source pausing at once -----------------------------------------------------

# Seconds from the transfer's start to the pause (which lasts
# Options.pause_s), and how long the transfer is followed after it.
PAUSE_AT_S = 9.0
AFTER_PAUSE_S = 10.5


def pause_case(
    server: BenchServer, tag: str, rate: int, kind: str, mode: str, client: str
) -> dict[str, Any]:
    """Downloads under ``rate`` whose sources all pause, then resume.

    The windows slide from the first byte after the resume over the next
    5 s, so the first contains whatever burst the resume brings: the tokens a
    client kept and the receive buffers it refills.
    """
    count = 1 if mode == "per" else Options.pool_downloads
    names = [f"{tag}-{i}" for i in range(count)]
    pause_s = Options.pause_s
    windows = int((PAUSE_AT_S + pause_s + AFTER_PAUSE_S) // WINDOW_S) + 1
    with contextlib.ExitStack() as stack:
        if client == "yt-dlp":
            per_process = rate // count
            urls = urls_for(server, names, kind, per_process, windows)
            work = stack.enter_context(workdir("pause-cli"))
            log = stack.enter_context((work / "yt-dlp.log").open("ab"))
            for name, url in zip(names, urls, strict=True):
                args = cli_command(name, url, per_process, kind, work)
                proc = subprocess.Popen(
                    args, cwd=work, stdout=log, stderr=subprocess.STDOUT
                )
                stack.callback(stop_process, proc, timeout_s=5)
        else:
            urls = urls_for(server, names, kind, rate / count, windows)
            limit = (
                "DOWNLOAD_RATE_LIMIT" if mode == "per" else "DOWNLOAD_TOTAL_RATE_LIMIT"
            )
            base_url = stack.enter_context(
                vodq_layout(
                    "serve",
                    stack.enter_context(workdir("pause")),
                    MAX_CONCURRENT_DOWNLOADS=str(count),
                    HLS_CONCURRENT_FRAGMENTS=str(Options.fragments),
                    **{limit: str(rate)},
                )
            )
            for name, url in zip(names, urls, strict=True):
                api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        t0 = transfer_start(server, names, kind)
        time.sleep(max(0.0, t0 + PAUSE_AT_S - time.monotonic()))
        paused = time.monotonic()
        server.pause(pause_s)
        time.sleep(AFTER_PAUSE_S)
    samples = stream_samples(server, names, t0 - 1)
    # The server stamps a write when it leaves the pause, which may come a
    # moment before pause() returns here.
    first = min(t for t, _ in samples if t > paused + pause_s / 2)
    starts = [first + index * SLIDE_S for index in range(int(WINDOW_S / SLIDE_S) + 1)]
    deviations = []
    for begin in starts:
        sent = sum(n for t, n in samples if begin <= t < begin + WINDOW_S)
        deviations.append((sent / WINDOW_S - rate) / rate * 100)
    before = [
        (r - rate) / rate * 100
        for _, r in window_rates(samples, t0 + SKIP_S, WINDOW_S, paused)
    ]
    return {
        "rate": rate,
        "kind": kind,
        "mode": mode,
        "client": client,
        "before_pause_dev_pct": [round(d, 2) for d in before],
        "from_resume_dev_pct": round(deviations[0], 2),
        "sliding_max_dev_pct": round(max(deviations), 2),
        "sliding_min_dev_pct": round(min(deviations), 2),
        "timeline_kib_s": [
            round(r / K)
            for _, r in window_rates(samples, first - 1.0, 0.25, first + 3.0)
        ],
    }


def pause_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    rate = parse_size(args.pause_rate)
    clients = ["vodq"] if args.no_cli else ["vodq", "yt-dlp"]
    with bench_server() as server:
        index = 0
        for _repeat in range(args.repeat):
            for kind in args.kinds.split(","):
                for mode in ("per", "pool"):
                    for client in clients:
                        index += 1
                        run = pause_case(server, f"p{index}", rate, kind, mode, client)
                        runs.append(run)
                        print(
                            f"  pause {Options.pause_s:g} s, {args.pause_rate} "
                            f"{kind:4} {mode:4} {client:6}: from the resume "
                            f"{run['from_resume_dev_pct']:+.1f}%, sliding "
                            f"{run['sliding_min_dev_pct']:+.1f}% to "
                            f"{run['sliding_max_dev_pct']:+.1f}%; before "
                            f"{run['before_pause_dev_pct']}",
                            flush=True,
                        )
                        server.reset()
    return runs


# -- report --------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Build one line per case: median mean deviation, worst window of all runs."""
    table = []
    keys = sorted(
        {(r["rate"], r["kind"], r["mode"]) for r in rows},
        key=lambda k: (parse_size(k[0]), k[1], k[2]),
    )
    for rate, kind, mode in keys:
        line: dict[str, Any] = {"rate": rate, "source": kind, "mode": mode}
        for client in ("vodq", "vodq cluster", "vodq variant", "yt-dlp"):
            mine = [
                r
                for r in rows
                if (r["rate"], r["kind"], r["mode"], r["client"])
                == (rate, kind, mode, client)
            ]
            if not mine:
                continue
            worst = max((r["worst_dev_pct"] for r in mine), key=abs)
            line[f"{client} mean %"] = round(
                median([r["mean_dev_pct"] for r in mine]), 2
            )
            line[f"{client} worst %"] = worst
            sliding = [
                r[key]
                for r in mine
                for key in ("sliding_min_pct", "sliding_max_pct")
                if key in r
            ]
            if sliding:
                line[f"{client} sliding worst %"] = max(sliding, key=abs)
        # The target applies to any 5 s window, so the sliding ones count too.
        own = [
            line[key]
            for client in ("vodq", "vodq cluster")
            for key in (f"{client} worst %", f"{client} sliding worst %")
            if key in line
        ]
        line["vodq within 5%"] = (
            "yes" if all(abs(worst) <= TARGET_PCT for worst in own) else "NO"
        )
        table.append(line)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2M only, one window")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every case")
    parser.add_argument("--windows", type=int, default=3, help="5 s windows per run")
    parser.add_argument("--patch-repeat", type=int, default=3)
    parser.add_argument("--no-cli", action="store_true", help="skip yt-dlp")
    parser.add_argument("--rates", default=",".join(RATES), help="e.g. 500K,2M")
    parser.add_argument("--kinds", default="http,hls", help="sources: http, hls")
    parser.add_argument(
        "--modes",
        default="per,pool,slow",
        help="modes: per, pool, slow, drop, rise, per-rise and per-slow (the "
        "last five HTTP only)",
    )
    parser.add_argument(
        "--variant",
        help="also run vodq with a change patched in (see variant_vodq.py), "
        "such as block=16384",
    )
    parser.add_argument(
        "--name", default="rates", help="results file name (bench/results/NAME.json)"
    )
    parser.add_argument("--no-patch", action="store_true", help="skip the PATCH test")
    parser.add_argument(
        "--segment",
        default=DEFAULT_SEGMENT,
        help="HLS segment size, such as 1M; auto: 1.25%% of a window's bytes",
    )
    parser.add_argument(
        "--sndbuf", default=DEFAULT_SNDBUF, help="the server's SO_SNDBUF, such as 64K"
    )
    parser.add_argument(
        "--mss", default="0", help="the server's TCP_MAXSEG, such as 1448; 0: none"
    )
    parser.add_argument(
        "--write", default="4K", help="bytes per logged server write, such as 2K"
    )
    parser.add_argument(
        "--fragments",
        type=int,
        default=HLS_FRAGMENTS,
        help="HLS fragments each download fetches at once, in the rate cases",
    )
    parser.add_argument(
        "--pool-downloads",
        type=int,
        default=POOL_DOWNLOADS,
        help="downloads sharing the pool in the rate cases",
    )
    parser.add_argument(
        "--slow-sources",
        type=int,
        default=1,
        help='sources that send a tenth of their share in the "slow" mode',
    )
    parser.add_argument(
        "--slow-share",
        type=float,
        default=SLOW_SHARE,
        help="the share of its equal part that a slow or rising source sends, "
        "such as 0.6",
    )
    parser.add_argument(
        "--burst",
        type=float,
        default=None,
        help="seconds between a slow source's bursts, such as 2 (default: even)",
    )
    parser.add_argument(
        "--drop-seconds",
        type=float,
        default=None,
        help='seconds until the source of the "drop" mode sends at full speed '
        "again, such as 3 (default: never)",
    )
    parser.add_argument(
        "--per-worker",
        type=int,
        default=Options.per_worker,
        help="download slots of each cluster worker. With 1 and two downloads, "
        "a slow source runs alone on its worker",
    )
    parser.add_argument(
        "--no-join",
        action="store_true",
        help="skip the test of downloads joining and leaving the pool",
    )
    parser.add_argument(
        "--no-cluster",
        action="store_true",
        help="skip the pooled cases on one vodq api and two workers (PostgreSQL)",
    )
    parser.add_argument(
        "--patch-layouts",
        default="serve,cluster",
        help="PATCH test layouts: serve (SQLite), cluster (api and 2 workers, "
        "PostgreSQL)",
    )
    parser.add_argument(
        "--only-patch", action="store_true", help="run only the PATCH test"
    )
    parser.add_argument(
        "--cut",
        action="store_true",
        help="also cut downloads from 10M to 500K (--patch-repeat runs each)",
    )
    parser.add_argument("--only-cut", action="store_true", help="run only the cuts")
    parser.add_argument(
        "--pause",
        action="store_true",
        help="also pause every source while downloads run (see --pause-seconds)",
    )
    parser.add_argument(
        "--pause-seconds",
        type=float,
        default=Options.pause_s,
        help="how long the sources pause in the pause cases",
    )
    parser.add_argument(
        "--only-pause", action="store_true", help="run only the pause cases"
    )
    parser.add_argument(
        "--pause-rate", default="1M", help="the limit in the pause cases"
    )
    parser.add_argument(
        "--cut-to", default="500K", help="the rate the cut sets, such as 64K"
    )
    args = parser.parse_args()
    if args.segment != "auto":
        Options.segment_bytes = parse_size(args.segment)
    Options.server_sndbuf = parse_size(args.sndbuf)
    Options.write_bytes = parse_size(args.write)
    Options.mss = parse_size(args.mss) or None
    Options.cut_to = args.cut_to
    Options.fragments = args.fragments
    Options.pool_downloads = args.pool_downloads
    Options.slow_sources = args.slow_sources
    Options.slow_share = args.slow_share
    Options.burst_s = args.burst
    Options.per_worker = args.per_worker
    Options.drop_s = args.drop_seconds
    Options.pause_s = args.pause_seconds
    if args.quick:
        args.windows = 1
        args.repeat = 1
    if args.only_cut:
        args.cut = args.only_patch = args.no_patch = True
    if args.only_pause:
        args.pause = args.only_patch = args.no_patch = args.no_join = True

    print("rate cases (deviation of each 5 s window from the target, at the server)")
    rows = [] if args.only_patch else rate_cases(args)
    table = summary(rows)
    if table:
        print_table("achieved rate vs configured (median mean / worst window)", table)
    joins = [] if args.no_join or args.only_patch else join_cases(args)
    runs = [] if args.no_patch else patch_cases(args)
    cuts = cut_cases(args) if args.cut else []
    pauses = pause_cases(args) if args.pause else []
    patch_rows = []
    for layout in args.patch_layouts.split(","):
        patch_rows += patch_summary(
            layout, [run for run in runs if run["layout"] == layout]
        )
    if patch_rows:
        print_table("PATCH /admin/config while three downloads run", patch_rows)
    write_result(
        args.name,
        {
            "args": vars(args),
            "summary": table,
            "runs": rows,
            "patch_summary": patch_rows,
            "patch_runs": runs,
            "join_runs": joins,
            "cut_runs": cuts,
            "pause_runs": pauses,
        },
    )
    return 0


def patch_summary(layout: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    patch_rows = []
    for step in range(len(runs[0]["changes"]) if runs else 0):
        settles = [run["changes"][step]["settle_s"] for run in runs]
        known = [s for s in settles if s is not None]
        change = runs[0]["changes"][step]
        patch_rows.append(
            {
                "layout": layout,
                "change": f"{change['from'] / M:.0f}M -> {change['to'] / M:.0f}M",
                "settle s (each run)": settles,
                "median s": round(median(known), 2) if known else None,
                "switch delay s (median)": round(
                    median(
                        [
                            run["changes"][step]["switch_delay_s"]
                            for run in runs
                            if run["changes"][step]["switch_delay_s"] is not None
                        ]
                    ),
                    2,
                ),
                "within 2 s": "yes"
                if known and len(known) == len(settles) and max(known) <= 2
                else "NO",
            }
        )
    return patch_rows


if __name__ == "__main__":
    sys.exit(main())
