"""The operator's guide as an acceptance test, against a real ``vodq serve``.

Each command from the operator's guide (the download scheduler usage
examples) runs in bash exactly as printed there, with two substitutions:
``localhost:8080`` becomes the port of the service started here, and
``psql -U vod -d vod`` (also behind ``docker compose exec postgres``) becomes
``psql`` on the test database. The guide's ``watch`` loop is replaced by a
bounded poll of the command it watches.

The main service runs on PostgreSQL with three download slots. Three slow
"blocker" downloads hold the slots, so every VOD the guide names stays queued
while its commands run. The emergency test frees one slot on purpose. The
services for authentication and for the ``.env`` examples use SQLite.

Tests that share the main service may change priorities, so each one sets
up what it checks. The emergency test, which lets downloads finish, comes
after the others that use the main service.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from dotenv import dotenv_values
from prometheus_client.parser import text_string_to_metric_families

from conftest import _create_postgres_database, _drop_postgres_database
from mediaserver import MediaServer
from vodq.config import KNOWN_VARIABLES

ROOT = Path(__file__).resolve().parents[2]
GUIDE_NAME = "DOWNLOAD_SCHEDULER_USAGE.md"
GUIDE_AUTHORITY = "localhost:8080"
KIB = 1024
MIB = 1024 * KIB

# Bounds of every wait, in seconds.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
COMMAND_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.25

# Exit statuses accepted after SIGTERM: a clean shutdown exits 0.
CLEAN_EXIT_STATUSES = {0}

PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "no_proxy"}

# -- the guide's commands, as printed -------------------------------------

STATUS_ALL = "curl http://localhost:8080/status | jq '.'"

CONCURRENCY_CHECK = """curl http://localhost:8080/status | jq '{
  active: .active_downloads,
  max: .max_concurrent_downloads,
  queue: .pending
}'"""

QUEUE_BY_PRIORITY = "curl http://localhost:8080/status | jq '.queue_by_priority'"

RETRY_CONFIG = "curl http://localhost:8080/status | jq '.retry_config'"

BATCH_LOOP = r"""for vod_id in 123456789 987654321 111222333; do
  curl -X POST http://localhost:8080/admin/vod/priority \
    -H "Content-Type: application/json" \
    -d "{\"vod_id\":\"${vod_id}\",\"priority\":100}" \
    -s | jq .
done"""

DATE_RANGE_SQL = """psql -U vod -d vod -c "
  UPDATE vods
  SET priority = 50
  WHERE date >= '2024-10-01'
    AND date < '2024-11-01'
    AND processed = false
\""""

EMERGENCY_CHECK = "curl http://localhost:8080/status | jq '{pending, active_downloads}'"

WATCH_PROCESSED = (
    "watch -n 5 'curl -s http://localhost:8080/vods/EMERGENCY_VOD_ID | jq .processed'"
)

THROUGHPUT_CHECK = """curl http://localhost:8080/status | jq '{
  active: .active_downloads,
  max: .max_concurrent_downloads,
  pending: .pending,
  avg_download_ms: .avg_download_ms
}'"""

STALLED_CHECK = """curl http://localhost:8080/status | jq '{
  active_downloads,
  max_concurrent_downloads,
  circuit_state,
  circuit_failures,
  last_process_run
}'"""

BREAKER_RESET_SQL = """docker compose exec postgres psql -U vod -d vod -c "
  UPDATE kv SET value='closed' WHERE key='circuit_state';
  UPDATE kv SET value='0' WHERE key='circuit_failures';
  DELETE FROM kv WHERE key='circuit_open_until';
\""""

CLEAR_PRIORITIES_SQL = """docker compose exec postgres psql -U vod -d vod -c "
  UPDATE vods SET priority=0 WHERE priority != 0;
\""""

METRICS_GREP = "curl http://localhost:8080/metrics | grep vod_"

BASIC_AUTH_BUMP = (
    "curl -u admin:secret123 -X POST http://localhost:8080/admin/vod/priority \\\n"
    '  -H "Content-Type: application/json" \\\n'
    '  -d \'{"vod_id":"123456789","priority":100}\''
)

TOKEN_AUTH_BUMP = """curl -H "X-Admin-Token: your-secret-token" \\
  -X POST http://localhost:8080/admin/vod/priority \\
  -H "Content-Type: application/json" \\
  -d '{"vod_id":"123456789","priority":100}'"""

GUIDE_SUCCESS_RATE = (
    "rate(vod_downloads_succeeded_total[5m]) / rate(vod_downloads_started_total[5m])"
)
GUIDE_AVERAGE_DURATION = (
    "rate(vod_download_duration_seconds_sum[5m]) / "
    "rate(vod_download_duration_seconds_count[5m])"
)

# The retry settings /status shows by default, as the guide prints them.
GUIDE_RETRY_CONFIG = {
    "download_max_attempts": 5,
    "download_backoff_base": "2s",
    "upload_max_attempts": 5,
    "upload_backoff_base": "2s",
    "processing_retry_cooldown": "600s",
}

# The keys the guide names in /status.
GUIDE_STATUS_KEYS = (
    "pending",
    "queue_by_priority",
    "active_downloads",
    "max_concurrent_downloads",
    "retry_config",
    "download_rate_limit",
    "circuit_state",
    "circuit_failures",
    "last_process_run",
    "avg_download_ms",
)

# The metrics the guide lists under "Key metrics".
GUIDE_KEY_METRICS = (
    "vod_downloads_started_total",
    "vod_downloads_succeeded_total",
    "vod_downloads_failed_total",
    "vod_queue_depth",
    "vod_download_duration_seconds",
)

# The guide's two configuration examples, with its values and layout. The
# trailing comments are worded anew, and python-dotenv must strip them.
BASIC_ENV_FILE = """\
# three downloads at a time, each held to 2 MiB/s
MAX_CONCURRENT_DOWNLOADS=3

DOWNLOAD_RATE_LIMIT=2M
"""
ADVANCED_ENV_FILE = """\
# a larger box on a flaky network
MAX_CONCURRENT_DOWNLOADS=5          # slots
DOWNLOAD_RATE_LIMIT=1.5M            # per download, binary megabytes
DOWNLOAD_MAX_ATTEMPTS=10            # attempts before giving up
DOWNLOAD_BACKOFF_BASE=5s            # first retry wait
PROCESSING_RETRY_COOLDOWN=300s      # wait after a non-network error
"""


def bump_command(vod_id: str, priority: int) -> str:
    """The guide's priority request with the body spread over four lines."""
    return (
        "curl -X POST http://localhost:8080/admin/vod/priority \\\n"
        '  -H "Content-Type: application/json" \\\n'
        "  -d '{\n"
        f'    "vod_id": "{vod_id}",\n'
        f'    "priority": {priority}\n'
        "  }'"
    )


def compact_bump_command(vod_id: str, priority: int) -> str:
    """The guide's priority request with the body on one line."""
    return (
        "curl -X POST http://localhost:8080/admin/vod/priority \\\n"
        '  -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"vod_id":"{vod_id}","priority":{priority}}}\''
    )


# (vod_id, priority) of each priority request in the guide.
SPREAD_BUMPS = (
    ("123456789", 100),
    ("987654321", 50),
    ("111222333", 0),
    ("444555666", -10),
)
TIER_BUMPS = (
    ("LIVE_ARCHIVE_ID", 100),
    ("SCHEDULED_ID", 50),
    ("OPTIONAL_ID", -10),
)
EMERGENCY_ID = "EMERGENCY_VOD_ID"
EMERGENCY_BUMP = compact_bump_command(EMERGENCY_ID, 1000)

GUIDE_COMMANDS = {
    "status": STATUS_ALL,
    "concurrency": CONCURRENCY_CHECK,
    "queue-by-priority": QUEUE_BY_PRIORITY,
    "retry-config": RETRY_CONFIG,
    "batch-loop": BATCH_LOOP,
    "date-range-sql": DATE_RANGE_SQL,
    "emergency-check": EMERGENCY_CHECK,
    "emergency-bump": EMERGENCY_BUMP,
    "watch-processed": WATCH_PROCESSED,
    "throughput": THROUGHPUT_CHECK,
    "stalled": STALLED_CHECK,
    "breaker-reset-sql": BREAKER_RESET_SQL,
    "clear-priorities-sql": CLEAR_PRIORITIES_SQL,
    "metrics-grep": METRICS_GREP,
    "basic-auth": BASIC_AUTH_BUMP,
    "token-auth": TOKEN_AUTH_BUMP,
    "success-rate-query": GUIDE_SUCCESS_RATE,
    "average-duration-query": GUIDE_AVERAGE_DURATION,
    **{f"bump-{v}-{p}": bump_command(v, p) for v, p in SPREAD_BUMPS},
    **{f"tier-{v}-{p}": compact_bump_command(v, p) for v, p in TIER_BUMPS},
}

# Dates of four VODs the guide names (the others have none). The October
# dates are far from the month's ends, so psql's session time zone cannot
# move them across the range.
GUIDE_VOD_DATES = {
    "123456789": "2024-10-05T12:00:00+00:00",
    "987654321": "2024-10-20T12:00:00+00:00",
    "111222333": "2024-11-15T12:00:00+00:00",
    "444555666": "2024-09-15T12:00:00+00:00",
}
GUIDE_VOD_IDS = (
    *(vod_id for vod_id, _ in SPREAD_BUMPS),
    EMERGENCY_ID,
    *(vod_id for vod_id, _ in TIER_BUMPS),
)
OCTOBER_QUEUED = ("123456789", "987654321")
OUTSIDE_OCTOBER = ("111222333", "444555666")
# Downloaded before the guide runs: October, but processed.
ARCHIVED_ID = "archived-2024-10"
ARCHIVED_DATE = "2024-10-10T12:00:00+00:00"
# Fails for good (HTTP 404) before the guide runs, so a failure is counted.
GONE_ID = "gone-404"
BLOCKER_IDS = ("blocker-1", "blocker-2", "blocker-3")
SLOTS = 3

# Throttles. The blockers outlast the module many times over, a guide VOD
# that gets a slot keeps it for about a minute, and the emergency VOD is
# quick. vodq reads 128 KiB blocks and checks for a cancel between blocks, so
# at 64 KiB/s a download stops within about 2 s of SIGTERM.
BLOCKER_SIZE = 32 * MIB
BLOCKER_RATE = 64 * KIB
GUIDE_FILE_SIZE = 4 * MIB
GUIDE_FILE_RATE = 64 * KIB
QUICK_FILE_SIZE = 128 * KIB


# -- running vodq ----------------------------------------------------------


@dataclass
class Served:
    """A ``vodq serve`` subprocess on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    dsn: str | None = None
    auth: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, auth=self.auth, headers=self.headers, timeout=10
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """This process's environment without vodq's variables or proxy settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in KNOWN_VARIABLES and name.lower() not in PROXY_VARIABLES
    }


def launch_vodq(workdir: Path, **settings: str) -> Served:
    """Start ``vodq serve`` in ``workdir``, without waiting for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_environment()
    env.update({"DATA_DIR": str(workdir / "data"), "WORKER_ID": f"guide-{port}"})
    env.update(settings)
    log_path = workdir / "vodq.log"
    command = [sys.executable, "-m", "vodq", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Served(process, port, log_path, dsn=settings.get("DB_DSN"))


@contextmanager
def served_vodqs(
    launches: dict[str, tuple[Path, dict[str, str]]],
) -> Iterator[dict[str, Served]]:
    """Run several ``vodq serve`` at once (they start faster side by side).

    At the end each gets SIGTERM and must exit cleanly within STOP_TIMEOUT_S.
    """
    running: dict[str, Served] = {}
    try:
        for name, (workdir, settings) in launches.items():
            running[name] = launch_vodq(workdir, **settings)
        for served in running.values():
            wait_healthy(served)
        yield running
    finally:
        statuses = stop_all(list(running.values()))
    for name, served in running.items():
        assert statuses[served.port] in CLEAN_EXIT_STATUSES, (
            f"vodq serve ({name}) exited with {statuses[served.port]} (None: still "
            f"running {STOP_TIMEOUT_S:g} s after SIGTERM); log:\n{served.log_tail()}"
        )


def wait_healthy(served: Served) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"vodq serve exited early:\n{served.log_tail()}")
        try:
            response = httpx.get(served.base_url + "/healthz", timeout=2)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            return
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(
        f"/healthz did not return 200 within {START_TIMEOUT_S:g} s:\n"
        f"{served.log_tail()}"
    )


def stop(served: Served, *, send: bool = True) -> int | None:
    """Send SIGTERM and return the exit status, or None if it did not exit.

    Only one signal is sent: a second one makes vodq exit at once.
    """
    process = served.process
    if send and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
        return None


def stop_all(services: list[Served]) -> dict[int, int | None]:
    """Send SIGTERM to every service at once and return each exit status by port."""
    for served in services:
        if served.process.poll() is None:
            served.process.send_signal(signal.SIGTERM)
    return {served.port: stop(served, send=False) for served in services}


def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = SETTLE_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"{what} within {timeout_s:g} s")


# -- running the guide's commands ------------------------------------------


def for_served(command: str, served: Served) -> str:
    """The guide's command aimed at ``served`` (and its database, for psql)."""
    command = command.replace(GUIDE_AUTHORITY, f"127.0.0.1:{served.port}")
    if served.dsn is not None:
        psql = "psql " + shlex.quote(served.dsn.replace("+psycopg", ""))
        command = command.replace(
            "docker compose exec postgres psql -U vod -d vod", psql
        )
        command = command.replace("psql -U vod -d vod", psql)
    return command


def run_shell(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env=clean_environment(),
        check=False,
    )


def run_guide(command: str, served: Served) -> subprocess.CompletedProcess[str]:
    return run_shell(for_served(command, served))


def poll_output(command: str, expected: str) -> str:
    """Run ``command`` until it prints ``expected`` or time runs out.

    Returns the last output.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    output = run_shell(command).stdout.strip()
    while output != expected and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        output = run_shell(command).stdout.strip()
    return output


# -- authentication, .env files and shutdown: SQLite services, started together

BASIC_CREDENTIALS = ("admin", "secret123")
TOKEN_HEADERS = {"X-Admin-Token": "your-secret-token"}
# Each side service: its settings from the environment, and its ./.env file.
SIDE_SERVICES: dict[str, tuple[dict[str, str], str | None]] = {
    "basic-auth": ({"ADMIN_USERNAME": "admin", "ADMIN_PASSWORD": "secret123"}, None),
    "token-auth": ({"ADMIN_TOKEN": "your-secret-token"}, None),
    "advanced-env": ({}, ADVANCED_ENV_FILE),
    "basic-env": ({}, BASIC_ENV_FILE),
}


@pytest.fixture(scope="module")
def side_services(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Served]]:
    launches = {}
    for name, (settings, env_file) in SIDE_SERVICES.items():
        workdir = tmp_path_factory.mktemp(name)
        if env_file is not None:
            (workdir / ".env").write_text(env_file)
        launches[name] = (workdir, settings)
    with served_vodqs(launches) as running:
        running["basic-auth"].auth = BASIC_CREDENTIALS
        running["token-auth"].headers = dict(TOKEN_HEADERS)
        yield running


def queue_for_auth(served: Served, url: str) -> Served:
    """Pause the queue (nothing downloads), then queue the guide's VOD."""
    post_json(served, "/admin/queue/pause", {})
    post_json(served, "/admin/vods", {"vod_id": "123456789", "url": url})
    return served


@pytest.fixture(scope="module")
def basic_auth_service(
    side_services: dict[str, Served], guide_media: GuideMedia
) -> Served:
    return queue_for_auth(side_services["basic-auth"], guide_media.urls["123456789"])


@pytest.fixture(scope="module")
def token_auth_service(
    side_services: dict[str, Served], guide_media: GuideMedia
) -> Served:
    return queue_for_auth(side_services["token-auth"], guide_media.urls["123456789"])


GUIDE_AUTH_ANSWER = {"status": "ok", "vod_id": "123456789", "priority": 100}
STATUS_CODE_ONLY = " -s -o /dev/null -w '%{http_code}'"


def test_basic_auth_guide_command_succeeds(basic_auth_service: Served) -> None:
    assert run_json(BASIC_AUTH_BUMP, basic_auth_service) == GUIDE_AUTH_ANSWER


def test_basic_auth_without_credentials_gets_401(basic_auth_service: Served) -> None:
    anonymous = BASIC_AUTH_BUMP.replace("-u admin:secret123 ", "")
    assert anonymous != BASIC_AUTH_BUMP
    result = run_guide(anonymous + STATUS_CODE_ONLY, basic_auth_service)
    assert result.stdout == "401"


def test_token_auth_guide_command_succeeds(token_auth_service: Served) -> None:
    assert run_json(TOKEN_AUTH_BUMP, token_auth_service) == GUIDE_AUTH_ANSWER


def test_token_auth_without_token_gets_401(token_auth_service: Served) -> None:
    anonymous = TOKEN_AUTH_BUMP.replace(
        '-H "X-Admin-Token: your-secret-token" \\\n', ""
    )
    assert anonymous != TOKEN_AUTH_BUMP
    result = run_guide(anonymous + STATUS_CODE_ONLY, token_auth_service)
    assert result.stdout == "401"


@pytest.fixture(scope="module")
def advanced_config_status(side_services: dict[str, Served]) -> dict[str, Any]:
    return dict(get_json(side_services["advanced-env"], "/status"))


@pytest.fixture(scope="module")
def basic_config_status(side_services: dict[str, Served]) -> dict[str, Any]:
    return dict(get_json(side_services["basic-env"], "/status"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("max_concurrent_downloads",), 5),
        (("download_rate_limit",), "1.5M"),
        (("retry_config", "download_max_attempts"), 10),
        (("retry_config", "download_backoff_base"), "5s"),
        (("retry_config", "processing_retry_cooldown"), "300s"),
    ],
    ids=lambda value: ".".join(value) if isinstance(value, tuple) else None,
)
def test_advanced_env_file_shows_in_status(
    advanced_config_status: dict[str, Any], path: tuple[str, ...], expected: object
) -> None:
    value: Any = advanced_config_status
    for key in path:
        value = value[key]
    assert value == expected


def test_basic_env_file_sets_concurrency(basic_config_status: dict[str, Any]) -> None:
    assert basic_config_status["max_concurrent_downloads"] == 3


def test_basic_env_file_sets_rate_limit(basic_config_status: dict[str, Any]) -> None:
    assert basic_config_status["download_rate_limit"] == "2M"


def test_serve_sigterm_exits_zero(
    side_services: dict[str, Served], basic_config_status: dict[str, Any]
) -> None:
    # Stops the basic-env service, whose /status the fixture has already read.
    assert basic_config_status
    assert stop(side_services["basic-env"]) == 0


# -- the commands above are the guide's --------------------------------------------


@pytest.mark.parametrize("command", GUIDE_COMMANDS.values(), ids=GUIDE_COMMANDS.keys())
def test_guide_contains_tested_command(guide_text: str, command: str) -> None:
    assert squeezed(command) in squeezed(guide_text)


def guide_env_block(guide_text: str, marker: str) -> str:
    for block in re.findall(r"```bash\n(.*?)```", guide_text, re.S):
        if marker in block:
            return str(block)
    raise AssertionError(f"no bash block with {marker!r} in the guide")


@pytest.mark.parametrize(
    ("ours", "marker"),
    [(ADVANCED_ENV_FILE, "DOWNLOAD_BACKOFF_BASE="), (BASIC_ENV_FILE, "=2M\n")],
    ids=["advanced", "basic"],
)
def test_guide_env_block_matches_tested_values(
    guide_text: str, ours: str, marker: str
) -> None:
    block = guide_env_block(guide_text, marker)
    assert dotenv_values(stream=StringIO(block)) == dotenv_values(stream=StringIO(ours))


def json_documents(text: str) -> list[Any]:
    """Every JSON document in ``text``, as jq prints them one after another."""
    decoder = json.JSONDecoder()
    documents = []
    index = 0
    text = text.strip()
    while index < len(text):
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
        while index < len(text) and text[index].isspace():
            index += 1
    return documents


def run_json(command: str, served: Served) -> Any:
    """Run a guide command that prints one JSON document and return it."""
    result = run_guide(command, served)
    documents = json_documents(result.stdout)
    assert len(documents) == 1, (
        f"expected one JSON document from {command!r}, got stdout "
        f"{result.stdout!r} and stderr {result.stderr[-500:]!r}"
    )
    return documents[0]


def run_psql(command: str, served: Served) -> list[str]:
    """Run a guide psql command and return its output split into words."""
    result = run_guide(command, served)
    assert result.returncode == 0, f"psql failed: {result.stderr}"
    return result.stdout.split()


def get_json(served: Served, path: str) -> Any:
    with served.client() as client:
        response = client.get(path)
    response.raise_for_status()
    return response.json()


def post_json(served: Served, path: str, body: object) -> Any:
    with served.client() as client:
        response = client.post(path, json=body)
    assert response.is_success, f"POST {path} {body!r}: {response.text}"
    return response.json()


# -- PromQL and the exposition format -------------------------------------

_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_PROMQL_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Names of the series that a PromQL expression selects."""
    text = _PROMQL_STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _PROMQL_GROUPING.sub(" ", text)
    names = set()
    for match in _PROMQL_IDENTIFIER.finditer(text):
        name = match.group(0)
        after = text[match.end() :].lstrip()
        before = text[: match.start()]
        if after.startswith("(") or name.lower() in _PROMQL_KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue
        names.add(name)
    return names


def brackets_balance(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _PROMQL_STRING.sub('""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def exported_series(exposition: str) -> set[str]:
    """Series names a Prometheus server can query from this scrape."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + part for part in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def promtool() -> str:
    path = shutil.which("promtool")
    assert path is not None, (
        "promtool is missing; install it with "
        "'apt-get install -y --no-install-recommends prometheus'"
    )
    return path


# -- the guide's text -------------------------------------------------------


def find_guide() -> Path | None:
    candidates = [ROOT.parent / "shared" / "seed" / GUIDE_NAME]
    if os.environ.get("VODQ_GUIDE"):
        candidates.insert(0, Path(os.environ["VODQ_GUIDE"]))
    return next((path for path in candidates if path.is_file()), None)


def squeezed(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def guide_text() -> str:
    path = find_guide()
    if path is None:
        pytest.skip(f"{GUIDE_NAME} not found beside the repository (set VODQ_GUIDE)")
    return path.read_text()


# -- the main service --------------------------------------------------------


@dataclass
class GuideMedia:
    server: MediaServer
    urls: dict[str, str]


def media_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def guide_media() -> Iterator[GuideMedia]:
    with MediaServer() as server:
        urls = {
            ARCHIVED_ID: server.add_file(
                "archived.mp4", media_bytes(QUICK_FILE_SIZE, 1)
            ),
            GONE_ID: server.url("/files/never-served.mp4"),
            EMERGENCY_ID: server.add_file(
                "emergency.mp4", media_bytes(QUICK_FILE_SIZE, 2)
            ),
        }
        for index, vod_id in enumerate(BLOCKER_IDS):
            urls[vod_id] = server.add_file(
                f"{vod_id}.mp4",
                media_bytes(BLOCKER_SIZE, 10 + index),
                rate=BLOCKER_RATE,
            )
        for index, vod_id in enumerate(GUIDE_VOD_IDS):
            if vod_id not in urls:
                urls[vod_id] = server.add_file(
                    f"{vod_id}.mp4",
                    media_bytes(GUIDE_FILE_SIZE, 20 + index),
                    rate=GUIDE_FILE_RATE,
                )
        yield GuideMedia(server, urls)


@pytest.fixture(scope="module")
def guide_dsn() -> Iterator[str]:
    """Create a PostgreSQL database for the whole module, as postgres_dsn does."""
    name, dsn = _create_postgres_database()
    try:
        yield dsn
    finally:
        _drop_postgres_database(name)


def vod_state(served: Served, vod_id: str) -> str:
    return str(get_json(served, f"/vods/{vod_id}")["state"])


def queue_guide_vods(served: Served, media: GuideMedia) -> None:
    """Finish one VOD, fail one, fill the slots, then queue the guide's VODs."""
    post_json(
        served,
        "/admin/vods",
        {"vod_id": ARCHIVED_ID, "url": media.urls[ARCHIVED_ID], "date": ARCHIVED_DATE},
    )
    post_json(served, "/admin/vods", {"vod_id": GONE_ID, "url": media.urls[GONE_ID]})
    wait_until(
        lambda: (
            vod_state(served, ARCHIVED_ID) == "done"
            and vod_state(served, GONE_ID) == "failed"
        ),
        f"{ARCHIVED_ID} was not done and {GONE_ID} not failed",
    )
    for vod_id in BLOCKER_IDS:
        post_json(served, "/admin/vods", {"vod_id": vod_id, "url": media.urls[vod_id]})
    wait_until(
        lambda: get_json(served, "/status")["active_downloads"] == SLOTS,
        f"the {SLOTS} blockers were not all downloading",
    )
    for vod_id in GUIDE_VOD_IDS:
        body = {"vod_id": vod_id, "url": media.urls[vod_id]}
        if vod_id in GUIDE_VOD_DATES:
            body["date"] = GUIDE_VOD_DATES[vod_id]
        post_json(served, "/admin/vods", body)


@pytest.fixture(scope="module")
def guide_service(
    tmp_path_factory: pytest.TempPathFactory, guide_dsn: str, guide_media: GuideMedia
) -> Iterator[Served]:
    settings = {"DB_DSN": guide_dsn, "MAX_CONCURRENT_DOWNLOADS": str(SLOTS)}
    launches = {"guide": (tmp_path_factory.mktemp("guide"), settings)}
    with served_vodqs(launches) as running:
        queue_guide_vods(running["guide"], guide_media)
        yield running["guide"]


@pytest.fixture
def status_output(guide_service: Served) -> dict[str, Any]:
    document = run_json(STATUS_ALL, guide_service)
    assert isinstance(document, dict)
    return document


def priorities(served: Served) -> dict[str, int]:
    page = get_json(served, "/vods?limit=500")
    return {item["vod_id"]: item["priority"] for item in page["items"]}


UPSERT_KV = (
    "INSERT INTO kv (key, value, updated_at) VALUES (%(key)s, %(value)s, now()) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
)


def sql(served: Served, statement: str, **params: object) -> None:
    assert served.dsn is not None
    with psycopg.connect(served.dsn.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(statement, params)


# -- /status, as the guide shows it -----------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("key", GUIDE_STATUS_KEYS)
def test_status_document_has_guide_key(status_output: dict[str, Any], key: str) -> None:
    assert key in status_output


@pytest.mark.postgres
def test_status_max_concurrency_is_configured(status_output: dict[str, Any]) -> None:
    assert status_output["max_concurrent_downloads"] == SLOTS


@pytest.mark.postgres
def test_status_active_downloads_fill_slots(status_output: dict[str, Any]) -> None:
    assert status_output["active_downloads"] == SLOTS


@pytest.mark.postgres
def test_status_retry_config_matches_guide(status_output: dict[str, Any]) -> None:
    assert status_output["retry_config"] == GUIDE_RETRY_CONFIG


@pytest.mark.postgres
def test_status_queue_entries_have_priority_count(
    status_output: dict[str, Any],
) -> None:
    entries = status_output["queue_by_priority"]
    assert entries
    assert all(set(entry) == {"priority", "count"} for entry in entries)


@pytest.mark.postgres
def test_status_pending_sums_priority_counts(status_output: dict[str, Any]) -> None:
    counts = sum(entry["count"] for entry in status_output["queue_by_priority"])
    assert status_output["pending"] == counts


@pytest.mark.postgres
def test_status_rate_limit_unset_is_null(status_output: dict[str, Any]) -> None:
    assert status_output["download_rate_limit"] is None


@pytest.mark.postgres
def test_status_average_download_time_is_integer(
    status_output: dict[str, Any],
) -> None:
    assert isinstance(status_output["avg_download_ms"], int)


# -- priorities ----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(("vod_id", "priority"), SPREAD_BUMPS)
def test_priority_request_returns_ok(
    guide_service: Served, vod_id: str, priority: int
) -> None:
    response = run_json(bump_command(vod_id, priority), guide_service)
    assert response == {"status": "ok", "vod_id": vod_id, "priority": priority}
    assert priorities(guide_service)[vod_id] == priority


@pytest.mark.postgres
@pytest.mark.parametrize(("vod_id", "priority"), TIER_BUMPS)
def test_priority_tier_request_returns_ok(
    guide_service: Served, vod_id: str, priority: int
) -> None:
    response = run_json(compact_bump_command(vod_id, priority), guide_service)
    assert response == {"status": "ok", "vod_id": vod_id, "priority": priority}
    assert priorities(guide_service)[vod_id] == priority


@pytest.mark.postgres
def test_batch_loop_prints_each_result(guide_service: Served) -> None:
    result = run_guide(BATCH_LOOP, guide_service)
    expected = [
        {"status": "ok", "vod_id": vod_id, "priority": 100}
        for vod_id in ("123456789", "987654321", "111222333")
    ]
    assert json_documents(result.stdout) == expected


@pytest.mark.postgres
def test_queue_by_priority_lists_highest_first(guide_service: Served) -> None:
    post_json(
        guide_service, "/admin/vod/priority", {"vod_id": "SCHEDULED_ID", "priority": 50}
    )
    post_json(
        guide_service, "/admin/vod/priority", {"vod_id": "OPTIONAL_ID", "priority": -10}
    )
    entries = run_json(QUEUE_BY_PRIORITY, guide_service)
    levels = [entry["priority"] for entry in entries]
    assert levels == sorted(set(levels), reverse=True)
    assert {50, -10} <= set(levels)


# -- the monitoring filters ----------------------------------------------------


@pytest.mark.postgres
def test_concurrency_check_prints_guide_keys(guide_service: Served) -> None:
    output = run_json(CONCURRENCY_CHECK, guide_service)
    assert set(output) == {"active", "max", "queue"}
    assert output["active"] == SLOTS
    assert output["max"] == SLOTS
    assert output["queue"] > 0


@pytest.mark.postgres
def test_retry_config_command_matches_guide(guide_service: Served) -> None:
    assert run_json(RETRY_CONFIG, guide_service) == GUIDE_RETRY_CONFIG


@pytest.mark.postgres
def test_throughput_check_prints_guide_keys(guide_service: Served) -> None:
    output = run_json(THROUGHPUT_CHECK, guide_service)
    assert set(output) == {"active", "max", "pending", "avg_download_ms"}
    # One VOD was downloaded before the guide ran.
    assert output["avg_download_ms"] > 0


@pytest.mark.postgres
def test_stalled_check_prints_guide_keys(guide_service: Served) -> None:
    output = run_json(STALLED_CHECK, guide_service)
    assert set(output) == {
        "active_downloads",
        "max_concurrent_downloads",
        "circuit_state",
        "circuit_failures",
        "last_process_run",
    }
    assert datetime.fromisoformat(output["last_process_run"]).tzinfo is not None


@pytest.mark.postgres
def test_stalled_check_shows_closed_breaker(guide_service: Served) -> None:
    output = run_json(STALLED_CHECK, guide_service)
    assert (output["circuit_state"], output["circuit_failures"]) == ("closed", 0)


# -- SQL from the guide ------------------------------------------------------------


@pytest.mark.postgres
def test_date_range_sql_updates_october_queue(guide_service: Served) -> None:
    before = priorities(guide_service)
    output = run_psql(DATE_RANGE_SQL, guide_service)
    after = priorities(guide_service)
    assert output == ["UPDATE", str(len(OCTOBER_QUEUED))]
    assert all(after[vod_id] == 50 for vod_id in OCTOBER_QUEUED)
    unchanged = (*OUTSIDE_OCTOBER, ARCHIVED_ID)
    assert all(after[vod_id] == before[vod_id] for vod_id in unchanged)


@pytest.mark.postgres
def test_clear_priorities_sql_resets_every_vod(guide_service: Served) -> None:
    post_json(
        guide_service, "/admin/vod/priority", {"vod_id": "OPTIONAL_ID", "priority": -10}
    )
    output = run_psql(CLEAR_PRIORITIES_SQL, guide_service)
    assert output[0] == "UPDATE"
    assert int(output[1]) >= 1
    assert set(priorities(guide_service).values()) == {0}
    status = get_json(guide_service, "/status")
    assert [entry["priority"] for entry in status["queue_by_priority"]] == [0]


@pytest.mark.postgres
def test_breaker_reset_sql_closes_breaker(guide_service: Served) -> None:
    # What a breaker stuck open leaves in kv.
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for key, value in (
        ("circuit_state", "open"),
        ("circuit_failures", "7"),
        ("circuit_open_until", until),
    ):
        sql(guide_service, UPSERT_KV, key=key, value=value)
    assert get_json(guide_service, "/status")["circuit_state"] == "open"
    output = run_psql(BREAKER_RESET_SQL, guide_service)
    status = get_json(guide_service, "/status")
    assert output == ["UPDATE", "1", "UPDATE", "1", "DELETE", "1"]
    assert status["circuit_state"] == "closed"
    assert status["circuit_failures"] == 0
    assert status["circuit_open_until"] is None


# -- metrics ---------------------------------------------------------------------


@pytest.fixture
def metrics_output(guide_service: Served) -> str:
    return run_guide(METRICS_GREP, guide_service).stdout


@pytest.mark.postgres
@pytest.mark.parametrize("name", GUIDE_KEY_METRICS)
def test_metrics_grep_shows_key_metric(metrics_output: str, name: str) -> None:
    sample = re.compile(rf"^{name}(?:_bucket|_sum|_count)?(?:\{{[^}}]*\}})? ", re.M)
    assert sample.search(metrics_output)


@pytest.mark.postgres
def test_metrics_grep_prints_only_vod_lines(metrics_output: str) -> None:
    lines = metrics_output.splitlines()
    assert lines
    assert all("vod_" in line for line in lines)


@pytest.mark.postgres
def test_metrics_active_downloads_match_status(metrics_output: str) -> None:
    assert re.search(rf"^vod_active_downloads {SLOTS}\.0$", metrics_output, re.M)


@pytest.mark.postgres
def test_metrics_failure_counted_by_class(metrics_output: str) -> None:
    # The 404 before the guide ran.
    line = re.search(
        r'^vod_downloads_failed_total\{error_class="gone"\} (\S+)$',
        metrics_output,
        re.M,
    )
    assert line is not None
    assert float(line.group(1)) == 1.0


# -- the guide's PromQL ------------------------------------------------------------

GUIDE_QUERIES = {
    "success-rate": GUIDE_SUCCESS_RATE,
    "average-duration": GUIDE_AVERAGE_DURATION,
}


@pytest.mark.parametrize("query", GUIDE_QUERIES.values(), ids=GUIDE_QUERIES.keys())
def test_guide_query_brackets_balance(query: str) -> None:
    assert brackets_balance(query)


@pytest.mark.parametrize("query", GUIDE_QUERIES.values(), ids=GUIDE_QUERIES.keys())
def test_guide_query_passes_promtool_check(query: str, tmp_path: Path) -> None:
    rules = tmp_path / "guide.rules.yml"
    rule = {"record": "guide:query", "expr": query}
    rules.write_text(json.dumps({"groups": [{"name": "guide", "rules": [rule]}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("query", GUIDE_QUERIES.values(), ids=GUIDE_QUERIES.keys())
def test_guide_query_uses_exported_metrics(guide_service: Served, query: str) -> None:
    with guide_service.client() as client:
        exposition = client.get("/metrics").text
    names = promql_metric_names(query)
    assert names
    assert names <= exported_series(exposition)


# -- emergency processing (lets downloads finish, so it runs last) ------------


@pytest.mark.postgres
def test_emergency_vod_processed_after_bump(
    guide_service: Served, guide_media: GuideMedia
) -> None:
    before = run_json(EMERGENCY_CHECK, guide_service)
    assert set(before) == {"pending", "active_downloads"}
    assert before["pending"] > 0
    response = run_json(EMERGENCY_BUMP, guide_service)
    assert response == {"status": "ok", "vod_id": EMERGENCY_ID, "priority": 1000}
    # Let one blocker finish: the slot it frees must go to the emergency VOD.
    guide_media.server.set_rate(guide_media.urls[BLOCKER_IDS[0]], None)
    watched = for_served(shlex.split(WATCH_PROCESSED)[-1], guide_service)
    assert poll_output(watched, "true") == "true"
