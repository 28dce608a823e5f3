"""Helpers that every benchmark shares: the machine, results, processes, databases.

Benchmarks start their own servers and databases on 127.0.0.1 and stop
exactly the processes they started, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
VENV_BIN = Path(sys.executable).parent
VODQ = str(VENV_BIN / "vodq")
YT_DLP = str(VENV_BIN / "yt-dlp")
POSTGRES_ADMIN_DSN = os.environ.get(
    "VODQ_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Unwind, so that every benchmark stops the processes it started.
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_sigterm)

# Rates use the binary multiples of vodq's grammar and of yt-dlp --limit-rate.
K = 1024
M = 1024 * 1024


# -- the machine and its load ----------------------------------------------


def load() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
    }


class LoadWatch:
    """Load averages at the start and end of one measurement."""

    def __init__(self) -> None:
        self.before = load()
        self.after: list[float] | None = None

    def stop(self) -> dict[str, list[float]]:
        self.after = load()
        return {"load_before": self.before, "load_after": self.after}


# -- numbers and tables -------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Return the ``pct`` percentile by linear interpolation between ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Print ``rows`` as an aligned text table under ``title``."""
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    # Some rows lack a column, such as a case run without the cluster. Each
    # column goes after the one before it in the first row that has it.
    columns: list[str] = []
    for record in rows:
        for before, column in zip([None, *record], record, strict=False):
            if column in columns:
                continue
            at = 0 if before is None else columns.index(before) + 1
            columns.insert(at, column)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, list):
        return "/".join(_cell(v) for v in value)
    return "" if value is None else str(value)


def product_version() -> dict[str, Any]:
    """Return the commit measured and the files of src/ changed on top of it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=BENCH_DIR.parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    changed = git("status", "--porcelain", "--", "src").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_changes": changed}


def results_dir(quick: bool | None = None) -> Path:
    """Return where results go: bench/results, or bench/results/quick for --quick.

    Short runs write apart, so they never replace the figures of a full run.
    """
    if quick is None:
        quick = "--quick" in sys.argv
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    """Write ``data`` with the machine and the time to <results dir>/<name>.json."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    document = {
        "benchmark": name,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "product": product_version(),
        **data,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)}")
    return path


# -- processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    """Stop one child by its pid: SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"vodq-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def vodq_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """Build the environment of a vodq process from only what the benchmark sets."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "DATA_DIR": str(data_dir),
        "MIN_FREE_DISK": "0",
        "LOG_LEVEL": "WARNING",
        "DOWNLOAD_SOCKET_TIMEOUT": "10s",
        # Never a twitch.tv URL: every VOD a benchmark queues has a URL.
        "VOD_URL_TEMPLATE": "http://127.0.0.1:9/none/{id}",
    }
    env.update(overrides)
    return env


class VodqProcess:
    """One ``vodq serve``, ``api`` or ``worker`` subprocess on 127.0.0.1."""

    def __init__(
        self,
        command: str,
        env: Mapping[str, str],
        log_path: Path,
        port: int | None,
        variant: str | None = None,
    ) -> None:
        self.command = command
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}" if port else None
        args = [VODQ, command]
        if variant:
            # A proposed change patched in memory; see variant_vodq.py.
            args = [sys.executable, str(BENCH_DIR / "variant_vodq.py"), command]
            env = {**env, "VODQ_BENCH_VARIANT": variant}
        if port is not None:
            args += ["--host", "127.0.0.1", "--port", str(port)]
        self.log_path = log_path
        self._log = log_path.open("ab")
        cwd = Path(env.get("DATA_DIR", "/tmp"))
        cwd.mkdir(parents=True, exist_ok=True)
        # Run from the data folder so that no stray ./.env is read.
        self.proc = subprocess.Popen(
            args,
            env=dict(env),
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait for ``/healthz`` (API processes) or a short settle (workers)."""
        deadline = time.monotonic() + timeout_s
        if self.base_url is None:
            time.sleep(1.5)
            self._check_alive()
            return
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"vodq {self.command} did not become ready; see {self.log_path}"
        )

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"vodq {self.command} exited:\n{tail}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def cpu_s(self) -> float:
        """Return the CPU seconds (user + system) of the process and its tree.

        Downloads run in children of a fork server, which reaps them, so
        their time is in the fork server's own counters for reaped children
        (cutime, cstime) once they end, and in their own while they run.
        """
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for index, pid in enumerate(descendants(self.pid)):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                if index > 0:
                    total += int(fields[13]) + int(fields[14])
        return total / ticks

    def rss_kib(self) -> tuple[int, int]:
        """Return (VmRSS, VmHWM) of the process in KiB."""
        rss = hwm = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
        return rss, hwm

    def tree_kib(self) -> tuple[int, int, int]:
        """Return (processes, summed VmRSS, summed Pss) of the service's process tree.

        Downloads run in child processes forked from a fork server, so the
        service's memory is the whole tree. Pss divides each shared page
        between the processes that map it, so its sum counts every page once.
        The RSS sum counts shared pages once per process.
        """
        pids = descendants(self.pid)
        rss = pss = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        return len(pids), rss, pss


@contextlib.contextmanager
def vodq_process(
    command: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    ready_timeout_s: float = 60.0,
    variant: str | None = None,
) -> Iterator[VodqProcess]:
    process = VodqProcess(command, env, log_path, port, variant)
    try:
        process.wait_ready(ready_timeout_s)
        yield process
    finally:
        process.stop()


def api(base_url: str, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, base_url + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def wait_until(condition: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return False


# -- PostgreSQL -----------------------------------------------------------------


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """Create a database of our own on 127.0.0.1:5432; drop it afterwards."""
    import psycopg
    from psycopg import sql

    name = f"vodq_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(
            POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
        ) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


@contextlib.contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    """Yield a fresh DSN (as DB_DSN takes it) for ``backend``: sqlite or postgres."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'vodq.db'}"
    else:
        with postgres_database() as dsn:
            yield dsn


def sqlalchemy_dsn(dsn: str) -> str:
    if dsn.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + dsn.split("://", 1)[1]
    return dsn


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from each process's parent id."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found = [root]
    for pid in found:
        found.extend(children.get(pid, []))
    return found
