"""Cut one download from 10M to a low rate; measure what reaches the client.

``bench_rates.py`` measures at the server, which is exact only while the
server's send buffer is small (8 KiB there). A real server lets the kernel
grow its send buffer, and then writes megabytes ahead of the wire. This
benchmark keeps that default and reads instead the bytes each client
socket has received (``bytes_received`` from ``ss -tin``), every 0.5 s,
summed over every connection to the server, fragment connections included.

One ``vodq serve`` downloads a plain file or HLS (2 MiB segments, four
fragments at once unless ``--fragments`` sets another count) at
``DOWNLOAD_RATE_LIMIT=--from`` (10M unless told; "none" for no limit);
4 s after the start a PATCH sets ``--to``. It prints the rate
in each second from 1 s after the PATCH and the deviation of the 5 s windows
that start 2, 5, 8 and 11 s after it.

    python bench/cut_wire.py --to 64K --mss 1460 --kind http --runs 2
    python bench/cut_wire.py --from none --to 100K --kind hls --runs 2
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import time
from typing import Any

from bench_rates import HLS_FRAGMENTS, parse_size, transfer_start, vodq_layout
from benchserver import BenchServer, serving
from common import M, api, workdir, write_result

# Seconds from the PATCH to the start of each 5 s window.
WINDOW_STARTS = (2.0, 5.0, 8.0, 11.0)
WINDOW_S = 5.0
WATCH_S = 17.0
SAMPLE_S = 0.5
# One client socket of ``ss -tin``: its local port, then its counters.
_SOCKET = re.compile(
    r"127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:\d+.*?\n(.*?)(?=\n\S|\Z)", re.S
)
_RECEIVED = re.compile(r"bytes_received:(\d+)")


def received_by_port(server_port: str) -> dict[str, int]:
    """Return the bytes each open client socket to ``server_port`` received."""
    out = subprocess.run(
        ["ss", "-tin", "dst", f"127.0.0.1:{server_port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts = {}
    for port, info in _SOCKET.findall(out):
        found = _RECEIVED.search(info)
        if found:
            counts[port] = int(found.group(1))
    return counts


def cut_run(
    server: BenchServer,
    name: str,
    kind: str,
    start: str,
    to: str,
    fragments: int = HLS_FRAGMENTS,
) -> dict[str, Any]:
    server_port = server.base_url.rsplit(":", 1)[1]
    target = parse_size(to)
    limit = {} if start == "none" else {"DOWNLOAD_RATE_LIMIT": start}
    with (
        workdir("cut-wire") as work,
        vodq_layout(
            "serve",
            work,
            MAX_CONCURRENT_DOWNLOADS="1",
            HLS_CONCURRENT_FRAGMENTS=str(fragments),
            **limit,
        ) as base_url,
    ):
        # Without a limit 127.0.0.1 carries hundreds of MB/s, so the source
        # must outlast 4 s of that.
        if kind == "hls":
            url = server.hls_url(name, 2 * M, 400 if limit else 4000)
        else:
            url = server.gen_url(name, (2 if limit else 16) * 1024 * M)
        api(base_url, "POST", "/admin/vods", {"vod_id": name, "url": url})
        t0 = transfer_start(server, [name], kind)
        time.sleep(max(0.0, t0 + 4.0 - time.monotonic()))
        changed = time.monotonic()
        api(base_url, "PATCH", "/admin/config", {"DOWNLOAD_RATE_LIMIT": to})

        # A closed fragment connection leaves ss, so each socket's last count
        # is kept.
        seen: dict[str, int] = {}
        totals: list[tuple[float, int]] = []
        while time.monotonic() - changed < WATCH_S:
            seen.update(received_by_port(server_port))
            totals.append((time.monotonic() - changed, sum(seen.values())))
            time.sleep(SAMPLE_S)

    def received_at(second: float) -> float:
        # Linear between the samples around ``second``.
        for (ta, a), (tb, b) in itertools.pairwise(totals):
            if ta <= second <= tb:
                return a + (b - a) * (second - ta) / (tb - ta)
        raise ValueError(
            f"no ss sample around {second} s after the PATCH; raise WATCH_S"
        )

    per_second = [
        round((received_at(s + 1) - received_at(s)) / 1024)
        for s in range(1, int(WATCH_S) - 1)
    ]
    windows = [
        round(
            ((received_at(s + WINDOW_S) - received_at(s)) / WINDOW_S - target)
            / target
            * 100,
            1,
        )
        for s in WINDOW_STARTS
    ]
    return {
        "kind": kind,
        "from": start,
        "to": to,
        "kib_per_s": per_second,
        "window_dev_pct": windows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="start", default="10M", help='the rate at start; "none"'
    )
    parser.add_argument("--to", default="64K", help="the rate the PATCH sets")
    parser.add_argument("--kind", default="http", help="http or hls")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--fragments", type=int, default=HLS_FRAGMENTS, help="HLS fragments at once"
    )
    parser.add_argument(
        "--mss", default="1460", help="the server's TCP_MAXSEG; 0: loopback's"
    )
    parser.add_argument("--name", default="cut_wire", help="results file name")
    parser.add_argument("--quick", action="store_true", help="one run")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1

    runs = []
    with serving(write_bytes=4096, mss=parse_size(args.mss) or None) as server:
        for index in range(args.runs):
            name = f"wire{index}-{args.kind}"
            run = cut_run(server, name, args.kind, args.start, args.to, args.fragments)
            runs.append(run)
            print(
                f"  {args.kind} {args.start} -> {args.to}: KiB/s per second "
                "after the PATCH "
                f"{run['kib_per_s']}, windows from {list(WINDOW_STARTS)} s "
                f"{run['window_dev_pct']}",
                flush=True,
            )
            server.reset()
    write_result(args.name, {"args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
