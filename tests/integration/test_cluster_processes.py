"""Real ``vodq api`` and ``vodq worker`` processes on one PostgreSQL database.

The workers are killed with SIGKILL, their database connections are cut, and
the database stops taking connections for a while. Each test then checks
that every VOD still ends ``done`` with the exact bytes of its source, and
that the cluster-wide download limit held throughout.

The processes run in a folder of ``tmp_path``, so they read no ``.env`` file
from the tree. Every vodq and proxy variable is removed from the environment
they inherit, so they reach only the media server and the database that the
fixtures start on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_ADMIN_DSN
from mediaserver import MediaServer, RequestRecord
from vodq.config import KNOWN_VARIABLES

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KIB = 1024
LIMIT = 4
# A process that has not exited this long after SIGTERM gets SIGKILL.
STOP_TIMEOUT_S = 15.0
# Maximum time a process may take to start (imports, on a busy machine).
START_TIMEOUT_S = 60.0
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
# 128 to 256 KiB at 192 KiB/s: each download takes about 0.7 to 1.4 s. vodq
# has yt-dlp write 128 KiB blocks, so for part of that time a .part file exists.
MIN_KIB = 128
MAX_KIB = 256
RATE = 192 * KIB


# -- processes -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_client(base_url: str, timeout_s: float = 10.0) -> httpx.Client:
    # trust_env=False, so that no proxy from the environment gets this traffic.
    return httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False)


@dataclass
class Cluster:
    """The vodq processes of one test, their environment and their logs."""

    dsn: str
    data_dir: Path
    log_dir: Path
    env: dict[str, str]
    api_url: str = ""
    # Every process started, for the teardown.
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # The current process of each worker id.
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # When each worker id's current process was started, so that its claims
    # can be distinguished from those of an earlier process with the same id.
    spawned_at: dict[str, datetime] = field(default_factory=dict)

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{len(self.processes) + 1:02d}-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vodq", *args],
                env=env,
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def migrate(self) -> None:
        log_path = self.log_dir / "00-migrate.log"
        with log_path.open("wb") as log:
            result = subprocess.run(
                [sys.executable, "-m", "vodq", "migrate"],
                env=self.env,
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=START_TIMEOUT_S,
                check=False,
            )
        assert result.returncode == 0, log_path.read_text()

    def start(self, worker_ids: list[str]) -> str:
        """Migrate, start the API and the workers together, wait for all of them."""
        self.migrate()
        port = free_port()
        api_args = ["api", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"]
        api = self._spawn("api", api_args, self.env)
        self.api_url = f"http://127.0.0.1:{port}"
        for worker_id in worker_ids:
            self.start_worker(worker_id)
        deadline = time.monotonic() + START_TIMEOUT_S
        assert wait_until(
            lambda: api.poll() is None and self._api_healthy(), deadline=deadline
        ), f"the API did not start; see {self.log_dir}"
        assert wait_until(
            lambda: self._registered() >= set(worker_ids), deadline=deadline
        ), f"the workers did not start; see {self.log_dir}"
        return self.api_url

    def _api_healthy(self) -> bool:
        try:
            with http_client(self.api_url, timeout_s=2) as client:
                return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def _registered(self) -> set[str]:
        return {row[0] for row in query(self.dsn, "SELECT worker_id FROM workers")}

    def start_worker(self, worker_id: str) -> None:
        self.spawned_at[worker_id] = datetime.now(UTC)
        self.workers[worker_id] = self._spawn(
            worker_id,
            ["worker", "--no-migrate"],
            {**self.env, "WORKER_ID": worker_id},
        )

    def kill(self, worker_id: str) -> None:
        process = self.workers[worker_id]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)

    def stop_all(self) -> None:
        """SIGTERM every process still running, then SIGKILL the stragglers."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def cluster(
    tmp_path: Path, postgres_dsn: str, media_server: MediaServer
) -> Iterator[Cluster]:
    """The environment of a cluster; every process it starts is stopped after."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key not in KNOWN_VARIABLES and key.lower() not in PROXY_VARIABLES
    }
    env = {
        **inherited,
        "DB_DSN": postgres_dsn,
        "DATA_DIR": str(tmp_path / "data"),
        # Unused (the API gets --host and --port), but never the default.
        "HTTP_ADDR": "127.0.0.1:1",
        "VOD_URL_TEMPLATE": media_server.base_url + "/files/{id}.mp4",
        "MAX_CONCURRENT_DOWNLOADS": str(LIMIT),
        "LEASE_DURATION": "3s",
        "DOWNLOAD_BACKOFF_BASE": "0.2s",
        "PROCESSING_RETRY_COOLDOWN": "0s",
        "DOWNLOAD_SOCKET_TIMEOUT": "5s",
        "LOG_LEVEL": "INFO",
        "NO_PROXY": "127.0.0.1",
    }
    result = Cluster(
        dsn=postgres_dsn, data_dir=tmp_path / "data", log_dir=log_dir, env=env
    )
    try:
        yield result
    finally:
        result.stop_all()
        print(f"process logs: {log_dir}")


# -- the database, seen from the test ----------------------------------------


def query(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(statement.encode(), params).fetchall()


def database_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def terminate_backends(name: str) -> int:
    """End every connection to database ``name``; return how many were ended."""
    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return sum(1 for (ended,) in rows if ended)


def allow_connections(name: str, allowed: bool) -> None:
    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allowed else "false")
            )
        )


def count_in_state(dsn: str, state: str) -> int:
    rows = query(dsn, "SELECT count(*) FROM vods WHERE state = %s", (state,))
    return int(rows[0][0])


def wait_until(
    condition: Callable[[], bool], *, deadline: float, interval_s: float = 0.25
) -> bool:
    """Poll ``condition`` until it returns True or ``deadline`` (monotonic) passes."""
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


# -- VODs ------------------------------------------------------------------


def add_vods(
    media_server: MediaServer,
    api_url: str,
    rng: random.Random,
    count: int,
    *,
    prefix: str,
    kib: tuple[int, int] = (MIN_KIB, MAX_KIB),
    rate: float = RATE,
    priority: int = 0,
) -> dict[str, bytes]:
    """Serve ``count`` files of random bytes and queue each through the API."""
    sources: dict[str, bytes] = {}
    with http_client(api_url) as client:
        for index in range(count):
            vod_id = f"{prefix}{index:02d}"
            data = rng.randbytes(rng.randint(*kib) * KIB)
            url = media_server.add_file(f"{vod_id}.mp4", data, rate=rate)
            body = {"vod_id": vod_id, "url": url, "priority": priority}
            response = client.post("/admin/vods", json=body)
            assert response.status_code == 201, response.text
            sources[vod_id] = data
    return sources


def fetch_vods(api_url: str, vod_ids: list[str]) -> dict[str, dict[str, Any]]:
    with http_client(api_url) as client:
        return {vod_id: client.get(f"/vods/{vod_id}").json() for vod_id in vod_ids}


def not_done(vods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        vod_id: (vod.get("state"), vod.get("last_error"))
        for vod_id, vod in vods.items()
        if vod.get("state") != "done"
    }


def wrong_files(
    vods: dict[str, dict[str, Any]], sources: dict[str, bytes]
) -> dict[str, int | None]:
    """Return the VODs whose final file is missing or differs from the source,
    with the size of the file found."""
    wrong: dict[str, int | None] = {}
    for vod_id, data in sources.items():
        path = vods[vod_id].get("file_path")
        if not path or not Path(path).is_file():
            wrong[vod_id] = None
        elif Path(path).read_bytes() != data:
            wrong[vod_id] = Path(path).stat().st_size
    return wrong


def range_start(record: RequestRecord) -> int:
    """Return the first byte a GET asked for: 0 without a Range header."""
    header = record.range_header
    if header is None:
        return 0
    first = header.strip().removeprefix("bytes=").split("-", 1)[0].strip()
    return int(first) if first.isdigit() else 0


def complete_fetches(records: list[RequestRecord], size: int) -> int:
    """Count the GETs that sent the whole body, starting at byte 0."""
    return sum(
        1
        for record in records
        if record.method == "GET"
        and record.status in (200, 206)
        and range_start(record) == 0
        and record.bytes_sent == size
    )


# -- 1. SIGKILL chaos ----------------------------------------------------------

SEED = 20241015
CHAOS_VODS = 60
# Kills happen in this window after the VODs are queued, at most
# CHAOS_MAX_KILLS of them. The cluster must then finish by CHAOS_TOTAL_S
# after the start of the test.
CHAOS_WINDOW_S = 20.0
CHAOS_MAX_KILLS = 12
CHAOS_TOTAL_S = 120.0


@dataclass
class Kill:
    """One SIGKILL: which worker was killed, and the VODs it had leased."""

    worker_id: str
    leased: list[str]
    # Size of each leased VOD's .part file right after the kill.
    partial_bytes: dict[str, int]


def leased_by(cluster: Cluster, worker_id: str) -> list[str]:
    """Return the VODs leased by the current process of ``worker_id``.

    started_at separates its claims from those of the process before it with
    the same WORKER_ID, whose leases may not have expired yet.
    """
    rows = query(
        cluster.dsn,
        "SELECT vod_id FROM vods WHERE lease_owner = %s "
        "AND state = 'downloading' AND started_at >= %s ORDER BY vod_id",
        (worker_id, cluster.spawned_at[worker_id]),
    )
    return [row[0] for row in rows]


def partial_sizes(partial_dir: Path, vod_ids: list[str]) -> dict[str, int]:
    """Return the size of each of these VODs' .part files that exists."""
    sizes = {}
    for vod_id in vod_ids:
        try:
            sizes[vod_id] = (partial_dir / f"{vod_id}.mp4.part").stat().st_size
        except FileNotFoundError:
            continue
    return sizes


def has_partial(cluster: Cluster, partial_dir: Path, worker_id: str) -> bool:
    """Return whether a VOD leased by ``worker_id`` has a .part file."""
    return bool(partial_sizes(partial_dir, leased_by(cluster, worker_id)))


@pytest.mark.timeout(240)
def test_workers_sigkill_chaos(cluster: Cluster, media_server: MediaServer) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    worker_ids = ["chaos-w0", "chaos-w1", "chaos-w2"]
    api_url = cluster.start(worker_ids)
    sources = add_vods(media_server, api_url, rng, CHAOS_VODS, prefix="k")
    partial_dir = cluster.data_dir / "partial"

    kills: list[Kill] = []
    chaos_end = time.monotonic() + CHAOS_WINDOW_S
    for _ in range(CHAOS_MAX_KILLS):
        time.sleep(rng.uniform(2.0, 4.0))
        if time.monotonic() >= chaos_end:
            break
        if count_in_state(cluster.dsn, "done") == CHAOS_VODS:
            break
        # Killing an idle worker tests nothing, so the victim is a random
        # worker among those with downloads, if any has one.
        busy = [worker_id for worker_id in worker_ids if leased_by(cluster, worker_id)]
        victim = rng.choice(busy or worker_ids)
        if not any(kill.partial_bytes for kill in kills):
            # Until a kill has left a partial file, wait up to 1.5 s for the
            # victim to write one, so that every run tests resuming.
            wait_until(
                functools.partial(has_partial, cluster, partial_dir, victim),
                deadline=time.monotonic() + 1.5,
                interval_s=0.05,
            )
        cluster.kill(victim)
        # The process is gone, so its rows stay as they are until its leases
        # expire, about two seconds from now at the earliest: LEASE_DURATION
        # is 3 s and the heartbeat renewed them within the last second. What
        # it leases now is what it leased when it died.
        leased = leased_by(cluster, victim)
        kills.append(Kill(victim, leased, partial_sizes(partial_dir, leased)))
        time.sleep(rng.uniform(0.2, 1.0))
        cluster.start_worker(victim)

    wait_until(
        lambda: count_in_state(cluster.dsn, "done") == CHAOS_VODS,
        deadline=started + CHAOS_TOTAL_S,
    )
    media_server.wait_idle(timeout=10)
    vods = fetch_vods(api_url, list(sources))
    leftovers = {
        vod_id: (vod["state"], vod["lease_owner"])
        for vod_id, vod in vods.items()
        if vod["state"] == "downloading" or vod["lease_owner"] is not None
    }

    # Downloaded twice? A GET that sent the whole body from byte 0 is a
    # download from scratch, and the first attempt of every VOD is one.
    # Another one is allowed only for each kill of a worker that leased the
    # VOD. Resuming the shared partial file with a Range request (checked
    # below) sends only the rest. But a kill after the file was moved into the
    # archive and before the database recorded it leaves nothing to resume.
    # And when the partial file was already complete, the server answers the
    # Range request with 416, so yt-dlp requests the whole file again to read
    # its Content-Length (yt-dlp 2026.11, downloader/http.py) without reading
    # the body, which the server may still send in full into the socket
    # buffers. GETs cut short by a kill and resumed GETs do not count.
    kills_of: dict[str, int] = {}
    for kill in kills:
        for vod_id in kill.leased:
            kills_of[vod_id] = kills_of.get(vod_id, 0) + 1
    refetched = {}
    for vod_id, data in sources.items():
        fetches = complete_fetches(
            media_server.requests_for(f"/files/{vod_id}.mp4"), len(data)
        )
        if fetches > 1 + kills_of.get(vod_id, 0):
            refetched[vod_id] = (fetches, kills_of.get(vod_id, 0))

    # A VOD killed with N bytes in its .part file is resumed from byte N.
    not_resumed = []
    for kill in kills:
        for vod_id, size in kill.partial_bytes.items():
            requested_ranges = {
                record.range_header
                for record in media_server.requests_for(f"/files/{vod_id}.mp4")
            }
            if size > 0 and f"bytes={size}-" not in requested_ranges:
                not_resumed.append((vod_id, size, sorted(map(str, requested_ranges))))

    print(f"chaos took {time.monotonic() - started:.1f}s; kills: {kills}")
    assert kills, "no worker was killed"
    assert any(kill.leased for kill in kills), "no kill hit a running download"
    assert any(kill.partial_bytes for kill in kills), "no kill left a partial"
    assert not_done(vods) == {}
    assert wrong_files(vods, sources) == {}
    assert media_server.max_concurrent("/files/") <= LIMIT
    assert leftovers == {}
    assert refetched == {}
    assert not_resumed == []


# -- 2. connections cut ------------------------------------------------------

CUT_VODS = 16
CUT_TIMES = 3
CUT_TOTAL_S = 90.0


@pytest.mark.timeout(180)
def test_workers_connections_cut(cluster: Cluster, media_server: MediaServer) -> None:
    started = time.monotonic()
    rng = random.Random(SEED + 1)
    api_url = cluster.start(["cut-w0", "cut-w1"])
    sources = add_vods(media_server, api_url, rng, CUT_VODS, prefix="c")
    name = database_name(cluster.dsn)
    wait_until(
        lambda: count_in_state(cluster.dsn, "downloading") > 0,
        deadline=time.monotonic() + 30,
        interval_s=0.05,
    )

    ended = []
    for _ in range(CUT_TIMES):
        ended.append(terminate_backends(name))
        time.sleep(rng.uniform(1.0, 2.0))

    wait_until(
        lambda: count_in_state(cluster.dsn, "done") == CUT_VODS,
        deadline=started + CUT_TOTAL_S,
    )
    media_server.wait_idle(timeout=10)
    vods = fetch_vods(api_url, list(sources))
    print(f"the cuts ended {ended} backends; took {time.monotonic() - started:.1f}s")
    assert all(count > 0 for count in ended), ended
    assert not_done(vods) == {}
    assert wrong_files(vods, sources) == {}
    assert media_server.max_concurrent("/files/") <= LIMIT


# -- 3. the database away ------------------------------------------------------

AWAY_VODS = 10
AWAY_LONG_VODS = 2
# 2 MiB at 192 KiB/s: about 11 s, longer than the outage. A cancelled
# download stops at the end of its current 128 KiB block, within a second.
AWAY_LONG_KIB = 2048
AWAY_LONG_RATE = 192 * KIB
# Longer than LEASE_DURATION, so leases expire while no worker can renew them.
AWAY_S = 5.0
AWAY_TOTAL_S = 120.0
# A response slower than this counts as a hang.
ANSWER_WITHIN_S = 15.0


@dataclass
class Answer:
    """The response to one GET: status, decoded body and how long it took."""

    status: int
    body: Any
    seconds: float


def ask(api_url: str, path: str) -> Answer:
    """Send GET ``path``; status 0 means no response (the body is the error)."""
    began = time.monotonic()
    try:
        with http_client(api_url, timeout_s=ANSWER_WITHIN_S + 15) as client:
            response = client.get(path)
    except httpx.HTTPError as exc:
        return Answer(0, repr(exc), time.monotonic() - began)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return Answer(response.status_code, body, time.monotonic() - began)


def is_unavailable_error(answer: Answer) -> bool:
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    return str(error).startswith("the database is unavailable")


@pytest.mark.timeout(240)
def test_database_away_status_and_recovery(
    cluster: Cluster, media_server: MediaServer
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED + 2)
    api_url = cluster.start(["away-w0", "away-w1"])
    # The long VODs go first and are still downloading when the database
    # comes back, after their leases have expired.
    sources = add_vods(
        media_server,
        api_url,
        rng,
        AWAY_LONG_VODS,
        prefix="long",
        kib=(AWAY_LONG_KIB, AWAY_LONG_KIB),
        rate=AWAY_LONG_RATE,
        priority=10,
    )
    sources |= add_vods(media_server, api_url, rng, AWAY_VODS, prefix="a")
    name = database_name(cluster.dsn)
    wait_until(
        lambda: count_in_state(cluster.dsn, "downloading") >= AWAY_LONG_VODS,
        deadline=time.monotonic() + 30,
        interval_s=0.05,
    )

    allow_connections(name, False)
    try:
        away_since = time.monotonic()
        terminate_backends(name)
        status = ask(api_url, "/status")
        health = ask(api_url, "/healthz")
        time.sleep(max(0.0, AWAY_S - (time.monotonic() - away_since)))
    finally:
        allow_connections(name, True)

    recovered = wait_until(
        lambda: ask(api_url, "/status").status == 200,
        deadline=time.monotonic() + 30,
    )
    wait_until(
        lambda: count_in_state(cluster.dsn, "done") == len(sources),
        deadline=started + AWAY_TOTAL_S,
    )
    media_server.wait_idle(timeout=10)
    vods = fetch_vods(api_url, list(sources))
    fetches = {
        vod_id: complete_fetches(
            media_server.requests_for(f"/files/{vod_id}.mp4"), len(data)
        )
        for vod_id, data in sources.items()
    }
    print(f"during the outage /status gave {status} and /healthz {health}")
    print(f"took {time.monotonic() - started:.1f}s; whole-body GETs: {fetches}")
    assert status.seconds < ANSWER_WITHIN_S, status
    assert status.status == 503, status
    assert is_unavailable_error(status), status
    assert health.seconds < ANSWER_WITHIN_S, health
    assert health.status == 503, health
    assert is_unavailable_error(health), health
    assert recovered
    assert not_done(vods) == {}
    assert wrong_files(vods, sources) == {}
    assert media_server.max_concurrent("/files/") <= LIMIT
