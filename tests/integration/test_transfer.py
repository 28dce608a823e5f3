"""copy_queue between real databases: SQLite files and the local PostgreSQL."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.exc import OperationalError

from vodq import transfer
from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.db.schema import kv, vods
from vodq.errors import InvalidInput, StorageUnavailable
from vodq.models import Progress, Vod, VodState
from vodq.queue import VodQueue
from vodq.transfer import CopyReport, copy_queue
from vodq.upload.store import UploadStore

LEASE_S = 30.0
PRIORITY_MAX = 2**63 - 1
PRIORITY_MIN = -(2**63)
DATED = datetime(2024, 10, 1, 18, 30, 5, 654321, tzinfo=UTC)


class Clock:
    """A settable clock with microseconds, so every timestamp is exact."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 1.5) -> None:
        self.now += timedelta(seconds=seconds)


@dataclasses.dataclass
class Databases:
    source: str
    target: str


QueueFactory = Callable[..., VodQueue]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_queue(clock: Clock) -> Iterator[QueueFactory]:
    """Open VodQueues on DSNs, migrating first unless ``migrate`` is false.

    The engines are disposed of when the test ends.
    """
    engines: list[Engine] = []

    def factory(dsn: str, *, migrate: bool = True) -> VodQueue:
        engine = make_engine(dsn)
        if migrate:
            upgrade(engine)
        engines.append(engine)
        return VodQueue(engine, clock=clock)

    yield factory
    for engine in engines:
        engine.dispose()


def _dsn(kind: str, name: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / name}.db"
    dsn: str = request.getfixturevalue("postgres_dsn")
    return dsn


@pytest.fixture(
    params=[
        pytest.param(
            ("sqlite", "postgres"),
            id="sqlite-to-postgres",
            marks=[pytest.mark.postgres],
        ),
        pytest.param(
            ("postgres", "sqlite"),
            id="postgres-to-sqlite",
            marks=[pytest.mark.postgres],
        ),
        pytest.param(("sqlite", "sqlite"), id="sqlite-to-sqlite"),
    ]
)
def dbs(request: pytest.FixtureRequest, tmp_path: Path) -> Databases:
    source_kind, target_kind = request.param
    return Databases(
        source=_dsn(source_kind, "source", request, tmp_path),
        target=_dsn(target_kind, "target", request, tmp_path),
    )


@pytest.fixture
def sqlite_to_postgres(tmp_path: Path, postgres_dsn: str) -> Databases:
    return Databases(source=f"sqlite:///{tmp_path / 'source'}.db", target=postgres_dsn)


@pytest.fixture
def sqlite_pair(tmp_path: Path) -> Databases:
    return Databases(
        source=f"sqlite:///{tmp_path / 'source'}.db",
        target=f"sqlite:///{tmp_path / 'target'}.db",
    )


def add(queue: VodQueue, vod_id: str, **fields: Any) -> Vod:
    vod, _ = queue.add(
        vod_id=vod_id, source_url=f"http://127.0.0.1:1/{vod_id}.mp4", **fields
    )
    return vod


def claim_one(queue: VodQueue, vod_id: str) -> Vod:
    (vod,) = queue.claim("worker-1", wanted=1, limit=10, lease_s=LEASE_S)
    assert vod.vod_id == vod_id, "the setup claimed another VOD than it meant to"
    return vod


def populate(queue: VodQueue, clock: Clock) -> None:
    """Fill a queue with a VOD in every state and the kv rows that go with them.

    Each VOD that changes state is added and claimed while it is the only
    eligible one, so that claim picks it.
    """
    add(queue, "done", priority=3)
    vod = claim_one(queue, "done")
    clock.advance()
    queue.renew("worker-1", {vod.id: Progress(500, 1000, 250)}, lease_s=LEASE_S)
    clock.advance()
    queue.finish(
        vod.id, "worker-1", file_path="/data/vods/done.mp4", size=1000, download_ms=4321
    )
    clock.advance()
    uploads = UploadStore(queue)
    (vod,) = uploads.claim("worker-1", wanted=1, limit=1, lease_s=LEASE_S)
    uploads.finish(
        vod.id,
        "worker-1",
        vod.upload_started_at,
        uploader="command",
        remote_id="remote-done",
        remote_url="https://videos.invalid/done",
        file_path="/data/vods/done.mp4",
        upload_ms=1234,
    )
    clock.advance()

    add(queue, "retry-later")
    vod = claim_one(queue, "retry-later")
    clock.advance()
    queue.fail(
        vod.id,
        "worker-1",
        error="HTTP 503",
        error_class="transient",
        retry_at=clock.now + timedelta(hours=1),
    )
    clock.advance()

    add(queue, "failed")
    vod = claim_one(queue, "failed")
    clock.advance()
    queue.fail(
        vod.id,
        "worker-1",
        error="video is gone",
        error_class="not_found",
        retry_at=None,
    )
    clock.advance()

    add(queue, "downloading", priority=7)
    vod = claim_one(queue, "downloading")
    clock.advance()
    queue.renew("worker-1", {vod.id: Progress(2048, 8192, 1024)}, lease_s=LEASE_S)
    clock.advance()

    add(queue, "cancelled")
    queue.cancel("cancelled")
    clock.advance()
    add(queue, "skip-upload")
    queue.set_skip_upload("skip-upload", True)
    clock.advance()
    add(
        queue,
        "dated",
        title="Übertragung — Teil 2",
        date=DATED,
        channel="chan",
        priority=10,
    )
    clock.advance()
    add(queue, "undated", priority=10)
    clock.advance()
    add(queue, "older", date=DATED - timedelta(days=3), priority=10)
    clock.advance()
    add(queue, "max-priority", priority=PRIORITY_MAX)
    clock.advance()
    add(queue, "min-priority", priority=PRIORITY_MIN)
    clock.advance()
    queue.set_kv({"circuit_state": "closed", "operator_note": "moved to postgres"})
    queue.set_paused(False)
    clock.advance()


def all_vods(queue: VodQueue) -> list[Vod]:
    return queue.list_vods(limit=100_000)


def kv_rows(queue: VodQueue) -> list[tuple[str, str, datetime]]:
    with queue.engine.connect() as conn:
        rows = conn.execute(
            select(kv.c.key, kv.c.value, kv.c.updated_at).order_by(kv.c.key)
        )
        return [(row.key, row.value, row.updated_at) for row in rows]


def differences(expected: Vod, actual: Vod) -> list[tuple[str, str, Any, Any]]:
    return [
        (
            expected.vod_id,
            field.name,
            getattr(expected, field.name),
            getattr(actual, field.name),
        )
        for field in dataclasses.fields(Vod)
        if getattr(expected, field.name) != getattr(actual, field.name)
    ]


def claim_ids(queue: VodQueue, count: int = 1000) -> list[str]:
    claimed = queue.claim("after-copy", wanted=count, limit=count, lease_s=LEASE_S)
    return [vod.vod_id for vod in claimed]


@dataclasses.dataclass
class Copied:
    source: VodQueue
    target: VodQueue
    report: CopyReport
    # The source's VODs as they were before the copy.
    before: dict[str, Vod]
    # The real time just before the copy, which releases leases at real time.
    started: datetime


@pytest.fixture
def copied(dbs: Databases, open_queue: QueueFactory, clock: Clock) -> Copied:
    source = open_queue(dbs.source)
    populate(source, clock)
    before = {vod.vod_id: vod for vod in all_vods(source)}
    started = datetime.now(UTC)
    report = copy_queue(dbs.source, dbs.target)
    target = open_queue(dbs.target, migrate=False)
    return Copied(source, target, report, before, started)


# -- a copy into an empty target ------------------------------------------


def test_copy_rows_match_source(copied: Copied) -> None:
    target_vods = all_vods(copied.target)
    mismatches = [
        mismatch
        for vod_id, vod in copied.before.items()
        if vod_id != "downloading"
        for mismatch in differences(vod, copied.target.get(vod_id))
    ]
    assert copied.report.vods_copied == len(copied.before)
    assert copied.report.vods_skipped == 0
    assert len(target_vods) == len(copied.before)
    assert {vod.vod_id: vod.id for vod in target_vods} == {
        vod.vod_id: vod.id for vod in copied.before.values()
    }
    assert mismatches == []


def test_copy_target_counts_by_state(copied: Copied) -> None:
    # The target's triggers fill vod_counts from the copied rows.
    expected = Counter(vod.state.value for vod in copied.before.values())
    expected[VodState.DOWNLOADING.value] -= 1
    expected[VodState.QUEUED.value] += 1
    assert copied.target.counts().by_state == dict(+expected)


def test_copy_values_survive(copied: Copied) -> None:
    dated = copied.target.get("dated")
    assert copied.target.get("done").processed is True
    assert copied.target.get("done").remote_id == "remote-done"
    assert dated.processed is False
    assert copied.target.get("max-priority").priority == PRIORITY_MAX
    assert copied.target.get("min-priority").priority == PRIORITY_MIN
    assert dated.date == DATED
    assert dated.date is not None
    assert dated.date.utcoffset() == timedelta(0)
    assert dated.created_at == copied.before["dated"].created_at
    assert dated.title == "Übertragung — Teil 2"
    assert copied.target.get("skip-upload").skip_upload is True


def test_copy_downloading_vod_requeued(copied: Copied) -> None:
    before = copied.before["downloading"]
    vod = copied.target.get("downloading")
    assert before.state is VodState.DOWNLOADING
    assert vod.state is VodState.QUEUED
    assert vod.lease_owner is None
    assert vod.lease_expires_at is None
    assert vod.speed_bps is None
    assert vod.bytes_done == before.bytes_done
    assert vod.started_at == before.started_at
    assert vod.updated_at >= copied.started
    assert copied.report.leases_released == 1
    # The source's lease is still valid on the test clock, but the target has
    # no lease left to wait for.
    assert "downloading" in claim_ids(copied.target)


def test_copy_kv_rows_survive(copied: Copied) -> None:
    source_rows = kv_rows(copied.source)
    breaker_values = copied.target.get_kv(["circuit_state", "circuit_failures"])
    assert kv_rows(copied.target) == source_rows
    assert copied.report.kv_copied == len(source_rows)
    assert breaker_values == {"circuit_state": "closed", "circuit_failures": "1"}


def test_copy_target_usable_afterwards(copied: Copied, clock: Clock) -> None:
    # Past every lease and retry time, so each queue can claim every VOD.
    clock.advance(7200)
    expected_order = claim_ids(copied.source)
    actual_order = claim_ids(copied.target)
    highest = max(vod.id for vod in copied.before.values())
    vod, created = copied.target.add(vod_id="new", source_url="http://127.0.0.1:1/n")
    assert actual_order == expected_order
    assert len(actual_order) == 8
    assert created
    assert vod.id == highest + 1


@pytest.mark.postgres
def test_copy_empty_source_copies_nothing(
    sqlite_to_postgres: Databases, open_queue: QueueFactory
) -> None:
    open_queue(sqlite_to_postgres.source)
    report = copy_queue(sqlite_to_postgres.source, sqlite_to_postgres.target)
    target = open_queue(sqlite_to_postgres.target, migrate=False)
    vod, created = target.add(vod_id="first", source_url="http://127.0.0.1:1/f")
    assert report.vods_copied == 0
    assert created
    assert vod.id == 1


def test_copy_replaces_kv_of_empty_target(
    sqlite_pair: Databases, open_queue: QueueFactory, clock: Clock
) -> None:
    populate(open_queue(sqlite_pair.source), clock)
    target = open_queue(sqlite_pair.target)
    target.set_kv({"queue_paused": "true", "last_process_run": "2026-01-01"})
    copy_queue(sqlite_pair.source, sqlite_pair.target)
    assert target.get_kv(["queue_paused"]) == {"queue_paused": "false"}
    assert target.get_kv(["last_process_run"]) == {"last_process_run": "2026-01-01"}


def test_copy_logs_report_line(
    sqlite_pair: Databases,
    open_queue: QueueFactory,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    populate(open_queue(sqlite_pair.source), clock)
    with caplog.at_level(logging.INFO, logger="vodq.transfer"):
        report = copy_queue(sqlite_pair.source, sqlite_pair.target)
    records = [
        record
        for record in caplog.records
        if record.levelno == logging.INFO
        and getattr(record, "action", None) == "copy_db"
    ]
    assert len(records) == 1
    assert records[0].__dict__["vods_copied"] == report.vods_copied
    assert records[0].__dict__["leases_released"] == 1


# -- a target that has VODs -----------------------------------------------


def test_copy_non_empty_target_rejected(
    sqlite_pair: Databases, open_queue: QueueFactory, clock: Clock, tmp_path: Path
) -> None:
    populate(open_queue(sqlite_pair.source), clock)
    add(open_queue(sqlite_pair.target), "target-only")
    with pytest.raises(InvalidInput) as excinfo:
        copy_queue(sqlite_pair.source, sqlite_pair.target)
    assert str(excinfo.value) == (
        f"target database sqlite:///{tmp_path}/target.db already contains 1 VOD; "
        "copy into an empty database, or pass --merge to add only the VODs whose "
        "vod_id it does not contain"
    )


def test_copy_non_empty_target_left_unchanged(
    dbs: Databases, open_queue: QueueFactory, clock: Clock
) -> None:
    populate(open_queue(dbs.source), clock)
    target = open_queue(dbs.target)
    add(target, "target-only")
    with pytest.raises(InvalidInput):
        copy_queue(dbs.source, dbs.target)
    assert [vod.vod_id for vod in all_vods(target)] == ["target-only"]


@pytest.mark.postgres
def test_copy_rejection_hides_password(
    sqlite_to_postgres: Databases, open_queue: QueueFactory, clock: Clock
) -> None:
    populate(open_queue(sqlite_to_postgres.source), clock)
    add(open_queue(sqlite_to_postgres.target), "target-only")
    # The local server trusts connections from 127.0.0.1 and ignores passwords.
    with_password = sqlite_to_postgres.target.replace(
        "postgres@", "postgres:s3cret-pw@"
    )
    with pytest.raises(InvalidInput) as excinfo:
        copy_queue(sqlite_to_postgres.source, with_password)
    assert "s3cret-pw" not in str(excinfo.value)
    assert "postgresql+psycopg://postgres:***@127.0.0.1" in str(excinfo.value)


@pytest.fixture
def merged(dbs: Databases, open_queue: QueueFactory, clock: Clock) -> Copied:
    """Merge the populated source into a target with its own "dated" VOD."""
    source = open_queue(dbs.source)
    populate(source, clock)
    target = open_queue(dbs.target)
    add(target, "target-only", priority=10)
    clock.advance()
    add(target, "dated")
    target.set_kv({"circuit_state": "open"})
    clock.advance()
    before = {vod.vod_id: vod for vod in all_vods(source)}
    started = datetime.now(UTC)
    report = copy_queue(dbs.source, dbs.target, merge=True)
    return Copied(source, target, report, before, started)


def test_merge_skips_existing_vods(merged: Copied) -> None:
    assert merged.report.vods_skipped == 1
    assert merged.report.vods_copied == len(merged.before) - 1
    assert merged.target.get("dated").title is None
    assert merged.target.get("target-only").priority == 10
    assert merged.target.get_kv(["circuit_state", "operator_note"]) == {
        "circuit_state": "open",
        "operator_note": "moved to postgres",
    }


def test_merge_appends_new_vods(merged: Copied) -> None:
    target_ids = {merged.target.get(vod_id).id for vod_id in ("target-only", "dated")}
    appended = [vod for vod in all_vods(merged.target) if vod.id not in target_ids]
    mismatches = [
        mismatch
        for vod in appended
        if vod.vod_id != "downloading"
        for mismatch in differences(
            dataclasses.replace(merged.before[vod.vod_id], id=vod.id), vod
        )
    ]
    new_vod, created = merged.target.add(vod_id="new", source_url="http://x.test/")
    assert min(vod.id for vod in appended) > max(target_ids)
    assert [vod.vod_id for vod in appended] == [
        vod_id for vod_id in merged.before if vod_id != "dated"
    ]
    assert mismatches == []
    assert created
    assert new_vod.id == max(vod.id for vod in appended) + 1


def test_merge_drops_source_trial_row_id(
    sqlite_pair: Databases, open_queue: QueueFactory
) -> None:
    source = open_queue(sqlite_pair.source)
    add(source, "a")
    source.set_kv({"circuit_trial": "1"})
    target = open_queue(sqlite_pair.target)
    add(target, "b")
    report = copy_queue(sqlite_pair.source, sqlite_pair.target, merge=True)
    assert target.get_kv(["circuit_trial"]) == {}
    assert report.kv_skipped == 1


@pytest.mark.postgres
def test_merge_into_empty_target_keeps_ids(
    sqlite_to_postgres: Databases, open_queue: QueueFactory, clock: Clock
) -> None:
    source = open_queue(sqlite_to_postgres.source)
    populate(source, clock)
    copy_queue(sqlite_to_postgres.source, sqlite_to_postgres.target, merge=True)
    target = open_queue(sqlite_to_postgres.target, migrate=False)
    expected = [(vod.id, vod.vod_id) for vod in all_vods(source)]
    assert [(vod.id, vod.vod_id) for vod in all_vods(target)] == expected


# -- rejected inputs ------------------------------------------------------


def test_copy_same_sqlite_file_rejected(
    sqlite_pair: Databases, open_queue: QueueFactory, tmp_path: Path
) -> None:
    add(open_queue(sqlite_pair.source), "a")
    (tmp_path / "sub").mkdir()
    other_spelling = f"sqlite:///{tmp_path / 'sub' / '..' / 'source.db'}"
    with pytest.raises(InvalidInput, match="are the same database"):
        copy_queue(sqlite_pair.source, other_spelling)


@pytest.mark.postgres
def test_copy_same_postgres_database_rejected(postgres_dsn: str) -> None:
    other_spelling = postgres_dsn.replace("postgresql://", "postgres://")
    with pytest.raises(InvalidInput, match="are the same database"):
        copy_queue(postgres_dsn, other_spelling)


def test_copy_missing_source_file_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    with pytest.raises(InvalidInput, match="was not found"):
        copy_queue(f"sqlite:///{missing}", f"sqlite:///{tmp_path / 'target.db'}")
    assert not missing.exists()


def test_copy_unsupported_dsn_rejected(sqlite_pair: Databases) -> None:
    with pytest.raises(InvalidInput, match="only postgres://") as excinfo:
        copy_queue(sqlite_pair.source, "mysql://vod:s3cret-pw@127.0.0.1/vod")
    assert "s3cret-pw" not in str(excinfo.value)


def test_copy_batch_size_zero_rejected(sqlite_pair: Databases) -> None:
    with pytest.raises(InvalidInput, match="batch size 0"):
        copy_queue(sqlite_pair.source, sqlite_pair.target, batch_size=0)


# -- failures and batches -------------------------------------------------


def test_copy_failure_leaves_target_empty(
    dbs: Databases,
    open_queue: QueueFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    populate(open_queue(dbs.source), clock)

    def fail(_self: object, _rows: object) -> None:
        raise OperationalError("INSERT INTO kv", {}, Exception("disk full"))

    # The VODs are written by then, so only a rollback can empty the target.
    monkeypatch.setattr(transfer._TargetWriter, "add_kv", fail)
    with pytest.raises(StorageUnavailable, match="disk full"):
        copy_queue(dbs.source, dbs.target)
    assert all_vods(open_queue(dbs.target, migrate=False)) == []


def insert_many(queue: VodQueue, count: int, clock: Clock) -> None:
    rows = [
        {
            "vod_id": f"bulk-{number:05d}",
            "source_url": f"http://127.0.0.1:1/{number}.mp4",
            "priority": number % 7,
            "date": DATED + timedelta(minutes=number % 11),
            "state": VodState.QUEUED.value,
            "created_at": clock.now,
            "updated_at": clock.now,
        }
        for number in range(count)
    ]
    with queue.engine.begin() as conn:
        conn.execute(insert(vods), rows)


@pytest.mark.postgres
def test_copy_5000_rows_in_batches_of_100(
    sqlite_to_postgres: Databases, open_queue: QueueFactory, clock: Clock
) -> None:
    source = open_queue(sqlite_to_postgres.source)
    insert_many(source, 5000, clock)
    source_pages: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM vods" in statement and "LIMIT" in statement:
            source_pages.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        report = copy_queue(
            sqlite_to_postgres.source, sqlite_to_postgres.target, batch_size=100
        )
    finally:
        event.remove(Engine, "before_cursor_execute", record)

    target = open_queue(sqlite_to_postgres.target, migrate=False)
    with target.engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(vods)).scalar_one()
    assert report.vods_copied == 5000
    assert count == 5000
    # 50 full pages and the empty one that ends the loop.
    assert len(source_pages) == 51
    assert claim_ids(target, count=50) == claim_ids(source, count=50)
