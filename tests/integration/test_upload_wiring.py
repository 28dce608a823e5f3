"""Migration 0005 on both backends, and UPLOADER=youtube wired into the stage."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import uvicorn
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from conftest import ServiceFactory, wait_for, wait_for_state
from mediaserver import MediaServer
from vodq.api.app import create_app
from vodq.db.engine import make_engine
from vodq.db.migrate import MIGRATIONS_DIR, upgrade
from vodq.errors import ConfigError
from vodq.models import VodState
from vodq.service import NewVod

STATES_BEFORE = ("queued", "downloading", "done", "failed", "cancelled")


def counts(conn: object) -> dict[tuple[str, int], int]:
    rows = conn.execute(  # type: ignore[attr-defined]
        text("SELECT state, priority, count FROM vod_counts WHERE count > 0")
    )
    return {(state, priority): count for state, priority, count in rows}


def downgrade(engine: Engine, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_migration_0005_keeps_rows_and_counts(db_dsn: str) -> None:
    engine = make_engine(db_dsn)
    try:
        upgrade(engine, "0004")
        with engine.begin() as conn:
            for n, state in enumerate(STATES_BEFORE):
                conn.execute(
                    text(
                        "INSERT INTO vods (vod_id, source_url, state, priority, "
                        "created_at, updated_at) VALUES (:id, 'u', :state, :p, "
                        "'2024-01-01', '2024-01-01')"
                    ),
                    {"id": f"v{n}", "state": state, "p": n % 2},
                )
        upgrade(engine)

        with engine.begin() as conn:
            rows = conn.execute(
                text("SELECT vod_id, state, processed, upload_attempts FROM vods")
            ).all()
            assert sorted(row[1] for row in rows) == sorted(STATES_BEFORE)
            assert {row[0]: bool(row[2]) for row in rows}["v2"] is True
            assert {row[3] for row in rows} == {0}
            assert counts(conn) == {
                (state, n % 2): 1 for n, state in enumerate(STATES_BEFORE)
            }
            conn.execute(
                text("UPDATE vods SET state = 'downloaded' WHERE vod_id = 'v0'")
            )
            assert counts(conn)[("downloaded", 0)] == 1
            assert ("queued", 0) not in counts(conn)
            processed = conn.execute(
                text("SELECT processed FROM vods WHERE vod_id = 'v0'")
            ).scalar_one()
            assert bool(processed) is False
            # The guide's operator SQL still works on the new schema.
            conn.execute(
                text(
                    "UPDATE vods SET priority = 50 "
                    "WHERE vod_id = 'v0' AND processed = false"
                )
            )
    finally:
        engine.dispose()


def test_migration_0005_rejects_unknown_state(db_dsn: str) -> None:
    engine = make_engine(db_dsn)
    try:
        upgrade(engine)
        with (
            pytest.raises(IntegrityError, match=r"ck_vods_state|CHECK constraint"),
            engine.begin() as conn,
        ):
            conn.execute(
                text(
                    "INSERT INTO vods (vod_id, source_url, state, created_at, "
                    "updated_at) VALUES ('x', 'u', 'lost', '2024-01-01', "
                    "'2024-01-01')"
                )
            )
    finally:
        engine.dispose()


def test_migration_0005_downgrade_keeps_files_done(db_dsn: str) -> None:
    engine = make_engine(db_dsn)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO vods (vod_id, source_url, state, created_at, "
                    "updated_at) VALUES ('w', 'u', 'downloaded', '2024-01-01', "
                    "'2024-01-01')"
                )
            )
        downgrade(engine, "0004")
        with engine.begin() as conn:
            state = conn.execute(text("SELECT state FROM vods")).scalar_one()
            assert state == "done"
            assert counts(conn) == {("done", 0): 1}
    finally:
        engine.dispose()


# -- UPLOADER=youtube -----------------------------------------------------------

youtube_server = pytest.importorskip("youtube_server")


def test_youtube_uploader_wired_into_stage(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    data = random.Random(40).randbytes(300 * 1024)
    url = media_server.add_file("yt.mp4", data)
    with youtube_server.YouTubeServer() as youtube:
        service = make_service(
            UPLOADER="youtube",
            YOUTUBE_CREDENTIALS_FILE=str(
                youtube.write_credentials(tmp_path / "youtube.json")
            ),
            YOUTUBE_API_URL=youtube.url,
            YOUTUBE_CHUNK_SIZE="256K",
        )
        service.add_vod(NewVod(vod_id="yt", url=url, title="On air"))
        vod = wait_for_state(service, "yt", {VodState.DONE, VodState.FAILED})
        videos = youtube.videos
        service.stop()

    assert vod.state is VodState.DONE, vod.last_error
    assert [video.data for video in videos] == [data]
    assert vod.remote_id == videos[0].id
    assert vod.uploader == "youtube"


def test_youtube_bad_credentials_stop_start_up(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    credentials = tmp_path / "youtube.json"
    credentials.write_text("not json")
    with pytest.raises(ConfigError, match="YOUTUBE_CREDENTIALS_FILE="):
        make_service(UPLOADER="youtube", YOUTUBE_CREDENTIALS_FILE=str(credentials))


# -- the command line -------------------------------------------------------------


def run_vodq(
    tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.isupper() or name in ("PATH", "HOME", "LANG", "PYTHONPATH")
    }
    environment.update({"DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run(
        [sys.executable, "-m", "vodq", *args],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_bad_youtube_credentials_exit_2(tmp_path: Path) -> None:
    credentials = tmp_path / "youtube.json"
    credentials.write_text("not json")
    result = run_vodq(
        tmp_path,
        "worker",
        UPLOADER="youtube",
        YOUTUBE_CREDENTIALS_FILE=str(credentials),
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"vodq: YOUTUBE_CREDENTIALS_FILE={str(credentials)!r}"
    )


def test_cli_upload_needs_ids_or_all(tmp_path: Path) -> None:
    result = run_vodq(tmp_path, "upload")
    assert result.returncode == 2
    assert "name VOD ids or pass --all-not-uploaded" in result.stderr


def test_cli_upload_posts_to_service(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    service = make_service(run_worker=False, UPLOADER="command", UPLOAD_COMMAND="true")
    app = create_app(service, manage_lifecycle=False)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout_s=20)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        result = run_vodq(
            tmp_path,
            "upload",
            "--all-not-uploaded",
            "--server",
            f"http://127.0.0.1:{port}",
        )
    finally:
        server.should_exit = True
        thread.join(10)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "status": "ok",
        "queued": [],
        "missing_files": [],
    }
