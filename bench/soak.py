"""Soak test: a real ``vodq serve`` killed every minute against a faulty server.

For ``--minutes`` (default 10) this runs the test media server on 127.0.0.1,
injecting faults chosen at random from ``--seed``, and a ``vodq serve``
subprocess on SQLite that is killed with SIGKILL and started again every
minute. About 100 small VODs are queued in waves over the run: most are
flaky but can succeed (5xx, 429 with Retry-After, truncated bodies,
resets, stalls, HLS fragment errors, sources whose bytes change), some fail
for good (404, 410, 403).

When the time is up the kills stop and the queue is given ``--settle-minutes``
to finish. Then these checks run. Every VOD that could succeed must be
``done`` with a file equal to its source (for a changed source, equal to its
new version, never a mix). Every other VOD must be ``failed`` after one
attempt, with the class its fault calls for. No VOD may count more attempts
than its faults can cause, and the requests the server received must stay
within what the retry policy allows. The bound is printed with its parts. A table
goes to stdout and the details to ``bench/results/soak.json``; the exit
status is 0 only when every check passed.

Run from the repository root:

    .venv/bin/python bench/soak.py --minutes 10 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mediaserver import Fault, MediaServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import descendants  # noqa: E402

KIB = 1024
VODQ = [sys.executable, "-m", "vodq"]

# The retry policy the service runs with; the request bound follows from it.
MAX_ATTEMPTS = 6
CONCURRENCY = 4
STALL_TIMEOUT_S = 2
SERVICE_ENV = {
    "DOWNLOAD_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "DOWNLOAD_BACKOFF_BASE": "0.5s",
    "PROCESSING_RETRY_COOLDOWN": "1s",
    "DOWNLOAD_STALL_TIMEOUT": f"{STALL_TIMEOUT_S}s",
    "DOWNLOAD_SOCKET_TIMEOUT": "5s",
    "MAX_CONCURRENT_DOWNLOADS": str(CONCURRENCY),
    "LEASE_DURATION": "10s",
    "CIRCUIT_FAILURE_THRESHOLD": "10",
    "CIRCUIT_OPEN_COOLDOWN": "5s",
    "MIN_FREE_DISK": "0",
    "LOG_LEVEL": "INFO",
}

# Most requests one attempt of a direct file makes: a HEAD before a resume,
# the GET, and after a 416 on a complete partial file yt-dlp's second ranged
# GET plus vodq's fresh one.
FILE_REQUESTS_PER_ATTEMPT = 4
# Playlist GETs of one HLS attempt.
HLS_PLAYLIST_READS = 2


@dataclass
class SoakVod:
    """One VOD of the soak: its source, its faults and what must become of it."""

    vod_id: str
    kind: str  # file, hls, changed, gone404, gone410, auth403
    url: str
    prefix: str  # the server paths that count as this VOD's requests
    faults: list[str] = field(default_factory=list)
    segments: int = 0
    wave: int = 0
    expect_state: str = "done"
    expect_class: str | None = None
    versions: list[str] = field(default_factory=list)  # sha256 of each version
    changed: bool = False  # its bytes were replaced while a partial file waited
    # Filled in at the end.
    state: str | None = None
    attempts: int | None = None
    error_class: str | None = None
    last_error: str | None = None
    requests: int = 0
    bound: int = 0
    ok: bool = False
    problem: str | None = None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_fault(rng: random.Random, size: int) -> tuple[Fault, str]:
    choice = rng.choice(["500", "503", "429", "truncate", "reset", "stall"])
    if choice in ("500", "503"):
        return Fault.status(int(choice)), choice
    if choice == "429":
        wait = rng.randint(1, 3)
        return Fault.too_many(wait), f"429+Retry-After:{wait}"
    if choice == "truncate":
        cut = rng.randint(size // 4, size - 1)
        return Fault.truncate(cut), f"truncate@{cut}"
    if choice == "reset":
        return Fault.reset(), "reset"
    after = rng.randint(size // 4, size - 1)
    return Fault.stall(10.0, after_bytes=after), f"stall@{after}"


def segment_fault(rng: random.Random, size: int) -> tuple[Fault, str]:
    choice = rng.choice(["500", "429", "reset", "truncate"])
    if choice == "500":
        return Fault.status(500), "500"
    if choice == "429":
        return Fault.too_many(1), "429+Retry-After:1"
    if choice == "reset":
        return Fault.reset(), "reset"
    cut = rng.randint(1, size - 1)
    return Fault.truncate(cut), f"truncate@{cut}"


def build_vods(
    server: MediaServer, rng: random.Random, count: int, waves: int, run_s: float
) -> tuple[list[SoakVod], dict[str, bytes]]:
    """Create every VOD's source on the server, with its scripted faults."""
    vods: list[SoakVod] = []
    replacements: dict[str, bytes] = {}
    kinds = (
        ["gone404"] * 6
        + ["gone410"] * 4
        + ["auth403"] * 6
        + ["hls"] * 14
        + ["changed"] * 6
        + ["file"] * 64
    )
    # The same mix for any count, in a seeded order.
    mix = [kinds[index * len(kinds) // count] for index in range(count)]
    rng.shuffle(mix)
    for index, kind in enumerate(mix):
        vod_id = f"soak{index:03d}"
        wave = rng.randrange(waves)
        if kind == "gone404":
            url = server.url(f"/files/{vod_id}-missing.mp4")
            vods.append(
                SoakVod(
                    vod_id,
                    kind,
                    url,
                    f"/files/{vod_id}-missing.mp4",
                    faults=["404 always"],
                    wave=wave,
                    expect_state="failed",
                    expect_class="gone",
                )
            )
            continue
        if kind == "hls":
            sizes = [rng.randint(48, 160) * KIB for _ in range(rng.randint(3, 6))]
            segments = [rng.randbytes(size) for size in sizes]
            url = server.add_hls(vod_id, segments, rate=rng.randint(96, 256) * KIB)
            vod = SoakVod(
                vod_id,
                kind,
                url,
                f"/hls/{vod_id}/",
                segments=len(segments),
                wave=wave,
                versions=[sha(b"".join(segments))],
            )
            for _ in range(rng.randint(0, 3)):
                which = rng.randrange(len(segments))
                fault, name = segment_fault(rng, sizes[which])
                server.script(f"/hls/{vod_id}/seg{which}.ts", [fault])
                vod.faults.append(f"seg{which}:{name}")
            vods.append(vod)
            continue

        size = rng.randint(256, 2048) * KIB
        data = rng.randbytes(size)
        name = f"{vod_id}.mp4"
        url = server.add_file(name, data, rate=rng.randint(96, 320) * KIB)
        vod = SoakVod(
            vod_id, kind, url, f"/files/{name}", wave=wave, versions=[sha(data)]
        )
        if kind == "gone410":
            server.script(url, [Fault.status(410)] * 50)
            vod.faults = ["410 always"]
            vod.expect_state, vod.expect_class = "failed", "gone"
        elif kind == "auth403":
            server.script(url, [Fault.status(403)] * 50)
            vod.faults = ["403 always"]
            vod.expect_state, vod.expect_class = "failed", "needs_auth"
        else:
            if kind == "changed":
                # The first GET is cut past the first 128 KiB read block, so a
                # partial file stays. The resume then gets a 429 that delays it
                # by 5 s, and the bytes are replaced meanwhile. The next attempt
                # must see the change and start over.
                cut = rng.randint(max(size // 4, 160 * KIB), size - 1)
                server.script(url, [Fault.truncate(cut), Fault.too_many(5)])
                vod.faults += [f"truncate@{cut}", "429+Retry-After:5"]
                new_size = rng.choice([size, rng.randint(256, 2048) * KIB])
                new = rng.randbytes(new_size)
                replacements[vod_id] = new
                vod.versions.append(sha(new))
                vod.faults.append("bytes replaced during the 429")
            for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
                fault, label = file_fault(rng, size)
                server.script(url, [fault])
                vod.faults.append(label)
        vods.append(vod)
    return vods, replacements


def answered_429(server: MediaServer, vod: SoakVod) -> bool:
    """Return whether the changed VOD's resume got its 429 (its first one)."""
    return any(r.status == 429 for r in server.requests_for(vod.prefix))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    """Return whether ``pid`` still runs; a zombie counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Serve:
    """The ``vodq serve`` subprocess: start, kill with SIGKILL, start again."""

    def __init__(self, work: Path, port: int) -> None:
        self.work = work
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        # Download processes still alive 5 s after their service was killed.
        self.orphans: list[int] = []
        self.log = (work / "serve.log").open("ab")

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("VODQ_", "DB_", "HTTP_", "ADMIN_", "DATA_"))
        }
        env.update(SERVICE_ENV)
        env.update(
            {
                "DATA_DIR": str(self.work / "data"),
                "DB_DSN": f"sqlite:///{self.work / 'vodq.db'}",
                "WORKER_ID": f"soak-{self.starts}",
                "PYTHONPATH": str(ROOT / "src"),
            }
        )
        return env

    def start(self) -> None:
        self.starts += 1
        self.process = subprocess.Popen(
            [*VODQ, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.work,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vodq serve exited with {self.process.returncode}; "
                    f"see {self.work / 'serve.log'}"
                )
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("vodq serve did not respond to /healthz within 60 s")

    def kill(self) -> None:
        """SIGKILL the service; its download processes must end with it."""
        if self.process is None:
            return
        tree = descendants(self.process.pid)[1:]
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1
        self.process = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.1)
        self.orphans.extend(pid for pid in tree if _alive(pid))

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        try:
            return httpx.request(
                method, self.base + path, json=body, timeout=10, trust_env=False
            )
        except httpx.HTTPError:
            return None


def add_vods(serve: Serve, vods: list[SoakVod]) -> list[SoakVod]:
    """Queue ``vods``; return those the service did not take (it may be down)."""
    left = []
    for vod in vods:
        response = serve.call(
            "POST", "/admin/vods", {"vod_id": vod.vod_id, "url": vod.url}
        )
        if response is None or response.status_code not in (200, 201):
            left.append(vod)
    return left


def vod_states(serve: Serve, vods: list[SoakVod]) -> dict[str, dict[str, Any]]:
    states = {}
    for vod in vods:
        response = serve.call("GET", f"/vods/{vod.vod_id}")
        if response is not None and response.status_code == 200:
            states[vod.vod_id] = response.json()
    return states


def request_bound(vod: SoakVod) -> int:
    """Most requests the retry policy lets this VOD cause, interruptions aside."""
    if vod.kind in ("gone404", "gone410", "auth403"):
        # Never retried: one GET (a HEAD only comes with a partial file).
        return 1
    if vod.kind == "hls":
        # Each attempt: the playlist twice (yt-dlp's generic extractor reads
        # it, then its HLS downloader), then at most every segment.
        return MAX_ATTEMPTS * (HLS_PLAYLIST_READS + vod.segments)
    return MAX_ATTEMPTS * FILE_REQUESTS_PER_ATTEMPT


def attempts_allowed(vod: SoakVod) -> int:
    """Most attempts this VOD may count: one per scripted fault, plus the last.

    A changed source may cost one more (a resume whose first response shows
    the new bytes fails as ``incomplete``). Attempts cut by a SIGKILL are
    never counted, so they do not appear here.
    """
    if vod.expect_state == "failed":
        return 1
    extra = 1 if vod.kind == "changed" else 0
    scripted = sum(1 for fault in vod.faults if not fault.startswith("bytes "))
    return min(MAX_ATTEMPTS, scripted + 1 + extra)


def check(vod: SoakVod, info: dict[str, Any] | None, requests: int) -> None:
    vod.requests = requests
    vod.bound = request_bound(vod)
    if info is None:
        vod.problem = "the API did not return the VOD"
        return
    vod.state = info["state"]
    vod.attempts = info["attempts"]
    vod.error_class = info["error_class"]
    vod.last_error = info["last_error"]
    if vod.state != vod.expect_state:
        vod.problem = f"state {vod.state}, expected {vod.expect_state}"
        return
    if vod.attempts is None or vod.attempts > attempts_allowed(vod):
        vod.problem = (
            f"{vod.attempts} attempts, more than the {attempts_allowed(vod)} "
            "its faults can cause"
        )
        return
    if vod.expect_state == "failed":
        if vod.error_class != vod.expect_class:
            vod.problem = f"error_class {vod.error_class}, expected {vod.expect_class}"
            return
        if vod.attempts != 1:
            vod.problem = f"{vod.attempts} attempts for an error never retried"
            return
    else:
        path = info.get("file_path")
        if not path or not Path(path).is_file():
            vod.problem = "done without a file"
            return
        digest = sha(Path(path).read_bytes())
        if digest not in vod.versions:
            vod.problem = "the file equals no version of its source"
            return
        if vod.changed and digest != vod.versions[-1]:
            vod.problem = "the file is the old version, though the source changed"
            return
    vod.ok = True


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    run_s = args.minutes * 60.0
    waves = max(1, int(args.minutes * 0.8))
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vodq-soak-"))
    started = time.monotonic()
    with MediaServer() as server:
        vods, replacements = build_vods(server, rng, args.vods, waves, run_s)
        serve = Serve(work, free_port())
        serve.start()
        pending = {wave: [v for v in vods if v.wave == wave] for wave in range(waves)}
        waiting: list[SoakVod] = []
        changes = [v for v in vods if v.kind == "changed"]
        next_kill = 60.0 + rng.uniform(-5, 5)
        print(f"soak: {len(vods)} VODs, {waves} waves, {args.minutes} min, work {work}")
        while (elapsed := time.monotonic() - started) < run_s:
            wave = int(elapsed / run_s * waves / 0.8) if waves else 0
            for number in [w for w in pending if w <= wave]:
                waiting += pending.pop(number)
            if waiting:
                waiting = add_vods(serve, waiting)
            for vod in [v for v in changes if answered_429(server, v)]:
                server.replace_file(f"{vod.vod_id}.mp4", replacements[vod.vod_id])
                vod.changed = True
                changes.remove(vod)
            if elapsed >= next_kill:
                serve.kill()
                serve.start()
                print(f"  {elapsed:6.0f}s  killed and restarted (kill {serve.kills})")
                next_kill += 60.0 + rng.uniform(-5, 5)
            time.sleep(0.5)
        # Whatever was not queued yet is queued now; the kills stop.
        for number in list(pending):
            waiting += pending.pop(number)
        while waiting and time.monotonic() - started < run_s + 60:
            waiting = add_vods(serve, waiting)
            time.sleep(0.5)

        settle_deadline = time.monotonic() + args.settle_minutes * 60
        while time.monotonic() < settle_deadline:
            states = vod_states(serve, vods)
            if len(states) == len(vods) and all(
                s["state"] in ("done", "failed", "cancelled") for s in states.values()
            ):
                break
            time.sleep(2)
        states = vod_states(serve, vods)
        status = serve.call("GET", "/status")
        breaker = status.json() if status is not None else {}
        serve.stop()
        server.wait_idle(10)
        records = server.requests
    duration = time.monotonic() - started

    for vod in vods:
        count = sum(1 for r in records if r.path.startswith(vod.prefix))
        check(vod, states.get(vod.vod_id), count)

    log_text = (work / "serve.log").read_text(errors="replace")
    events = {
        "resumed_with_range": sum(
            1 for r in records if r.method == "GET" and r.range_header
        ),
        "restarted_for_changed_source": log_text.count("not resuming its partial"),
        "changed_during_attempt": log_text.count("the source changed during"),
        "restarted_after_416": log_text.count("rejected resuming the partial"),
        "retries_scheduled": log_text.count("download failed, retrying"),
        "failed_for_good": log_text.count("download failed for good"),
    }

    interrupted_slack = (
        serve.kills
        * CONCURRENCY
        * max(
            FILE_REQUESTS_PER_ATTEMPT, *(HLS_PLAYLIST_READS + v.segments for v in vods)
        )
    )
    policy_bound = sum(v.bound for v in vods)
    total_bound = policy_bound + interrupted_slack
    total_requests = sum(v.requests for v in vods)
    over = [v for v in vods if v.requests > v.bound + interrupted_slack]

    categories: dict[str, dict[str, Any]] = {}
    for vod in vods:
        row = categories.setdefault(
            vod.kind,
            {"vods": 0, "done": 0, "failed": 0, "ok": 0, "requests": 0, "bound": 0},
        )
        row["vods"] += 1
        row["done"] += vod.state == "done"
        row["failed"] += vod.state == "failed"
        row["ok"] += vod.ok
        row["requests"] += vod.requests
        row["bound"] += vod.bound

    print()
    header = (
        f"{'kind':<9} {'vods':>5} {'done':>5} {'failed':>6} {'as expected':>11} "
        f"{'requests':>9} {'bound':>7}"
    )
    print(header)
    print("-" * len(header))
    for kind, row in sorted(categories.items()):
        print(
            f"{kind:<9} {row['vods']:>5} {row['done']:>5} {row['failed']:>6} "
            f"{row['ok']:>11} {row['requests']:>9} {row['bound']:>7}"
        )
    ok_count = sum(v.ok for v in vods)
    print("-" * len(header))
    print(
        f"{'total':<9} {len(vods):>5} {sum(v.state == 'done' for v in vods):>5} "
        f"{sum(v.state == 'failed' for v in vods):>6} {ok_count:>11} "
        f"{total_requests:>9} {policy_bound:>7}"
    )
    print()
    print(
        f"request bound: {policy_bound} (retry policy: {MAX_ATTEMPTS} attempts x "
        f"{FILE_REQUESTS_PER_ATTEMPT} requests per file attempt, "
        f"{HLS_PLAYLIST_READS} + segments per HLS attempt, "
        "1 request for a 404/410/403) + "
        f"{interrupted_slack} (attempts cut by {serve.kills} SIGKILLs: "
        f"{serve.kills} x {CONCURRENCY} slots x the largest attempt) = {total_bound}"
    )
    within = total_requests <= total_bound
    print(f"requests received: {total_requests}; within the bound: {within}")
    print(
        f"kills: {serve.kills}, starts: {serve.starts}, duration: {duration:.0f}s, "
        f"circuit_failures at the end: {breaker.get('circuit_failures')}"
    )
    print("events: " + ", ".join(f"{key} {value}" for key, value in events.items()))
    problems = [v for v in vods if not v.ok]
    for vod in problems:
        print(
            f"  PROBLEM {vod.vod_id} ({vod.kind}, faults {vod.faults}): {vod.problem}"
        )
    for vod in over:
        print(f"  OVER BOUND {vod.vod_id}: {vod.requests} > {vod.bound}")

    print(
        f"processes of a killed service alive 5 s after its kill: {len(serve.orphans)}"
    )
    passed = (
        not problems
        and not over
        and total_requests <= total_bound
        and not serve.orphans
    )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "minutes": args.minutes,
        "duration_s": round(duration, 1),
        "service_env": SERVICE_ENV,
        "kills": serve.kills,
        "orphan_processes": len(serve.orphans),
        "starts": serve.starts,
        "vods": len(vods),
        "as_expected": ok_count,
        "requests": total_requests,
        "request_bound": {
            "policy": policy_bound,
            "interrupted_attempts": interrupted_slack,
            "total": total_bound,
        },
        "circuit_failures_at_end": breaker.get("circuit_failures"),
        "events": events,
        "passed": passed,
        "categories": categories,
        "details": [asdict(v) for v in vods],
        "work_dir": str(work),
    }
    out = results_dir / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"passed: {passed}; details in {out.relative_to(ROOT)}")
    return 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--vods", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--settle-minutes",
        type=float,
        default=5.0,
        help="how long the queue may take to finish after the kills stop",
    )
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
