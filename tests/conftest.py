"""Shared fixtures: the media server, databases on both backends, running services.

PostgreSQL tests use the server named by VODQ_TEST_POSTGRES (default: the
local server on 127.0.0.1:5432 as user postgres). Each test gets a database
of its own, created and dropped around it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from mediaserver import MediaServer
from vodq.config import Settings, load_settings
from vodq.models import Vod, VodState
from vodq.service import Service

POSTGRES_ADMIN_DSN = os.environ.get(
    "VODQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def media_server() -> Iterator[MediaServer]:
    with MediaServer() as server:
        yield server


def _create_postgres_database() -> tuple[str, str]:
    name = f"vodq_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def _drop_postgres_database(name: str) -> None:
    with psycopg.connect(
        POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5
    ) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    name, dsn = _create_postgres_database()
    try:
        yield dsn
    finally:
        _drop_postgres_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database DSN, once for each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vodq.db'}"
        return
    name, dsn = _create_postgres_database()
    try:
        yield dsn
    finally:
        _drop_postgres_database(name)


ServiceFactory = Callable[..., Service]


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Build and start services from environment-style overrides; stop them after."""
    started: list[Service] = []

    def factory(*, run_worker: bool = True, **env: str) -> Service:
        environ = {
            "DATA_DIR": str(tmp_path / "data"),
            "DOWNLOAD_BACKOFF_BASE": "0.2s",
            "PROCESSING_RETRY_COOLDOWN": "0s",
            "DOWNLOAD_SOCKET_TIMEOUT": "5s",
            # Tests must not depend on how full this machine's disk is.
            "MIN_FREE_DISK": "0",
            "WORKER_ID": f"test-{uuid.uuid4().hex[:6]}",
        }
        environ.update(env)
        service = Service(
            load_settings(environ, env_file=None),
            run_worker=run_worker,
            environment=environ,
        )
        service.start()
        started.append(service)
        return service

    yield factory
    for service in reversed(started):
        service.stop()


def settings_for(tmp_path: Path, **env: str) -> Settings:
    environ = {"DATA_DIR": str(tmp_path / "data")}
    environ.update(env)
    return load_settings(environ, env_file=None)


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float = 20.0, interval_s: float = 0.02
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s: {condition}")


def one_held_back(
    limits: Sequence[float | None], *, count: int, below: float, above: float
) -> bool:
    """Return whether ``count`` pooled downloads run, the one with the lowest
    limit (bytes/s) at most ``below`` and every other above ``above``."""
    if len(limits) < count:
        # Not all of them have started yet.
        return False
    lowest, *others = sorted(limit or 0.0 for limit in limits)
    return lowest <= below and all(limit > above for limit in others)


def wait_for_state(
    service: Service, vod_id: str, states: set[VodState], timeout_s: float = 20.0
) -> Vod:
    """Wait until ``vod_id`` reaches one of ``states`` and return it."""
    wait_for(lambda: service.queue.get(vod_id).state in states, timeout_s=timeout_s)
    return service.queue.get(vod_id)


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path``; always unmount it afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("mount is not installed")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
