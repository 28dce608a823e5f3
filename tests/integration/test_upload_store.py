"""The upload stage's storage contract (UploadStore), run on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from test_queue_contract import LEASE_S, Clock, add

from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.errors import InvalidTransition
from vodq.models import Progress, Vod, VodState
from vodq.queue import VodQueue
from vodq.upload.store import UploadStore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(db_dsn: str, clock: Clock) -> Iterator[VodQueue]:
    engine = make_engine(db_dsn)
    upgrade(engine)
    yield VodQueue(engine, clock=clock)
    engine.dispose()


@pytest.fixture
def store(queue: VodQueue) -> UploadStore:
    return UploadStore(queue)


def downloaded(queue: VodQueue, vod_id: str, priority: int = 0, size: int = 1) -> None:
    """Add ``vod_id`` and finish its download, leaving it ``downloaded``."""
    add(queue, vod_id, priority=priority)
    claimed = queue.claim("dl", wanted=1, limit=10, lease_s=LEASE_S)
    vod = next(vod for vod in claimed if vod.vod_id == vod_id)
    assert queue.finish(
        vod.id, "dl", file_path=f"/x/{vod_id}.mp4", size=size, download_ms=1
    )


def claim_one(
    store: UploadStore,
    owner: str = "w1",
    limit: int = 10,
    max_attempts: int | None = None,
) -> Vod:
    (vod,) = store.claim(
        owner, wanted=1, limit=limit, lease_s=LEASE_S, max_attempts=max_attempts
    )
    return vod


def finish(store: UploadStore, vod: Vod, owner: str = "w1") -> bool:
    return store.finish(
        vod.id,
        owner,
        vod.upload_started_at,
        uploader="command",
        remote_id=f"remote-{vod.vod_id}",
        remote_url=None,
        file_path=vod.file_path or "",
        upload_ms=5,
    )


def test_upload_claim_in_priority_order(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "low", priority=1)
    downloaded(queue, "high", priority=9)
    claimed = store.claim("w1", wanted=2, limit=10, lease_s=LEASE_S)
    assert [vod.vod_id for vod in claimed] == ["high", "low"]
    assert {vod.state for vod in claimed} == {VodState.UPLOADING}


def test_upload_claim_respects_cluster_limit(
    queue: VodQueue, store: UploadStore
) -> None:
    for vod_id in ("a", "b", "c"):
        downloaded(queue, vod_id)
    assert len(store.claim("w1", wanted=5, limit=2, lease_s=LEASE_S)) == 2
    assert store.claim("w2", wanted=5, limit=2, lease_s=LEASE_S) == []
    assert store.count_active() == 2


def test_upload_claim_ignores_download_slots(
    queue: VodQueue, store: UploadStore
) -> None:
    downloaded(queue, "up")
    claim_one(store)
    add(queue, "next")
    assert [
        v.vod_id for v in queue.claim("dl", wanted=1, limit=1, lease_s=LEASE_S)
    ] == ["next"]


def test_upload_finish_records_remote_and_done(
    queue: VodQueue, store: UploadStore
) -> None:
    downloaded(queue, "a")
    assert finish(store, claim_one(store))
    vod = queue.get("a")
    assert vod.state is VodState.DONE
    assert vod.processed is True
    assert vod.remote_id == "remote-a"
    assert vod.upload_attempts == 1
    assert vod.lease_owner is None


def test_upload_lease_expiry_returns_to_downloaded(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    first = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    second = claim_one(store, "w2")
    assert second.vod_id == "a"
    assert not finish(store, first, "w1")
    assert queue.get("a").lease_owner == "w2"


def test_upload_expired_attempt_is_counted(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    second = claim_one(store, "w2", max_attempts=5)
    # The taken-over attempt is number 2, so the first one is counted.
    assert second.upload_attempts == 1
    assert second.last_error == (
        "upload attempt 1 ended without a result because its worker stopped "
        "renewing the lease"
    )
    assert second.error_class == "upload_failed"


def test_upload_expired_last_attempt_fails_vod(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    claim_one(store, "w1", max_attempts=2)
    clock.advance(LEASE_S + 1)
    claim_one(store, "w2", max_attempts=2)
    clock.advance(LEASE_S + 1)

    assert store.claim("w3", wanted=1, limit=10, lease_s=LEASE_S, max_attempts=2) == []
    vod = queue.get("a")
    assert vod.state is VodState.FAILED
    assert vod.upload_attempts == 2
    assert vod.last_error == (
        "upload attempt 2 ended without a result because its worker stopped "
        "renewing the lease. Not retried: all 2 upload attempts are used; "
        "reprocess the VOD to upload it again"
    )
    assert vod.file_path == "/x/a.mp4"


def test_upload_lapsed_finish_counts_attempt_once(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    assert store.claim("w2", wanted=1, limit=0, lease_s=LEASE_S) == []
    assert finish(store, vod, "w1")
    assert queue.get("a").upload_attempts == 1


def test_upload_lapsed_last_attempt_finish_kept(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1", max_attempts=1)
    clock.advance(LEASE_S + 1)
    # The release fails the VOD, but the upload did finish.
    store.claim("w2", wanted=1, limit=0, lease_s=LEASE_S, max_attempts=1)
    assert queue.get("a").state is VodState.FAILED
    assert finish(store, vod, "w1")
    done = queue.get("a")
    assert done.state is VodState.DONE
    assert done.remote_id == "remote-a"
    assert done.last_error is None
    assert done.upload_attempts == 1


def test_upload_finish_after_lapsed_lease_kept(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    # Another worker's claim releases the expired lease but has no room.
    assert store.claim("w2", wanted=1, limit=0, lease_s=LEASE_S) == []
    assert queue.get("a").state is VodState.DOWNLOADED
    assert finish(store, vod, "w1")
    assert queue.get("a").state is VodState.DONE


def test_upload_session_kept_for_next_claim(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1")
    assert store.save_session(vod.id, "w1", vod.upload_started_at, "https://s/1")
    clock.advance(LEASE_S + 1)
    assert claim_one(store, "w2").upload_session == "https://s/1"


def test_upload_session_rejected_after_lost_lease(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    claim_one(store, "w2")
    assert not store.save_session(vod.id, "w1", vod.upload_started_at, "late")


def test_upload_fail_retries_then_fails(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store)
    retry_at = clock() + timedelta(seconds=10)
    assert (
        store.fail(vod.id, "w1", vod.upload_started_at, error="e1", retry_at=retry_at)
        is VodState.DOWNLOADED
    )
    assert store.claim("w1", wanted=1, limit=10, lease_s=LEASE_S) == []
    clock.advance(11)
    vod = claim_one(store)
    assert vod.upload_attempts == 1
    state = store.fail(vod.id, "w1", vod.upload_started_at, error="e2", retry_at=None)
    stored = queue.get("a")
    assert state is VodState.FAILED
    assert stored.error_class == "upload_failed"
    assert stored.upload_attempts == 2
    assert stored.file_path == "/x/a.mp4"


def test_skip_upload_done_without_slot(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a")
    queue.set_skip_upload("a", True)
    assert store.claim("w1", wanted=1, limit=0, lease_s=LEASE_S) == []
    vod = queue.get("a")
    assert vod.state is VodState.DONE
    assert vod.remote_id is None


def test_requeue_done_clears_remote(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a")
    finish(store, claim_one(store))
    vod = store.requeue(queue.get("a"))
    assert vod.state is VodState.DOWNLOADED
    assert vod.remote_id is None
    assert vod.upload_attempts == 0


def test_requeue_queued_vod_conflicts(queue: VodQueue, store: UploadStore) -> None:
    add(queue, "a")
    with pytest.raises(InvalidTransition) as caught:
        store.requeue(queue.get("a"))
    assert str(caught.value) == (
        "VOD 'a' is queued; only failed, cancelled or done VODs can be reprocessed"
    )


def test_cancel_uploading_vod(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a")
    vod = claim_one(store)
    cancelled, previous = queue.cancel("a")
    assert previous is VodState.UPLOADING
    assert cancelled.state is VodState.CANCELLED
    assert store.renew("w1", {vod.id: vod.upload_started_at}, lease_s=LEASE_S) == set()


def test_release_dead_upload_leases(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a")
    claim_one(store, "dead-1")
    assert store.lease_owners() == ["dead-1"]
    assert store.release_leases(["dead-1"], max_attempts=5) == ["a"]
    vod = queue.get("a")
    assert vod.state is VodState.DOWNLOADED
    assert vod.upload_attempts == 1
    assert vod.last_error == (
        "upload attempt 1 ended without a result because its worker is no longer "
        "running"
    )


def test_release_dead_lease_last_attempt_fails(
    queue: VodQueue, store: UploadStore
) -> None:
    downloaded(queue, "a")
    claim_one(store, "dead-1")
    assert store.release_leases(["dead-1"], max_attempts=1) == ["a"]
    assert queue.get("a").state is VodState.FAILED


def test_upload_defer_keeps_attempts_and_session(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store)
    assert store.save_session(vod.id, "w1", vod.upload_started_at, "https://s/1")
    retry_at = clock() + timedelta(hours=9)
    assert store.defer(
        vod.id, "w1", vod.upload_started_at, error="quota used up", retry_at=retry_at
    )

    waiting = queue.get("a")
    assert waiting.state is VodState.DOWNLOADED
    assert waiting.upload_attempts == 0
    assert waiting.upload_next_at == retry_at
    assert waiting.error_class == "upload_quota"
    assert waiting.last_error == "quota used up"
    assert store.claim("w1", wanted=1, limit=10, lease_s=LEASE_S) == []
    clock.advance(9 * 3600 + 1)
    again = claim_one(store)
    assert again.upload_attempts == 0
    assert again.upload_session == "https://s/1"


def test_upload_defer_by_former_owner_rejected(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    claim_one(store, "w2")
    assert not store.defer(
        vod.id, "w1", vod.upload_started_at, error="late", retry_at=clock()
    )
    assert queue.get("a").lease_owner == "w2"


def quota_wait(queue: VodQueue, store: UploadStore, clock: Clock) -> Vod:
    """Leave ``a`` downloaded, waiting nine hours for the destination's quota."""
    downloaded(queue, "a")
    vod = claim_one(store)
    assert store.defer(
        vod.id,
        "w1",
        vod.upload_started_at,
        error="quota used up",
        retry_at=clock() + timedelta(hours=9),
    )
    return queue.get("a")


def test_skip_upload_clears_quota_wait(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    quota_wait(queue, store, clock)
    queue.set_skip_upload("a", True)
    assert store.claim("w1", wanted=1, limit=10, lease_s=LEASE_S) == []

    skipped = queue.get("a")
    assert skipped.state is VodState.DONE
    assert skipped.error_class is None, "a skipped VOD kept its quota error_class"
    assert skipped.last_error is None, "a skipped VOD kept the quota message"
    assert skipped.upload_next_at is None


def test_skip_upload_clears_failed_attempt_error(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store)
    store.fail(
        vod.id,
        "w1",
        vod.upload_started_at,
        error="exit status 1",
        retry_at=clock() + timedelta(hours=1),
    )
    queue.set_skip_upload("a", True)
    store.claim("w1", wanted=1, limit=10, lease_s=LEASE_S)

    skipped = queue.get("a")
    assert skipped.state is VodState.DONE
    assert skipped.error_class is None
    assert skipped.last_error is None


def test_cancel_clears_quota_wait(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    quota_wait(queue, store, clock)

    cancelled, previous = queue.cancel("a")

    assert previous is VodState.DOWNLOADED
    assert cancelled.state is VodState.CANCELLED
    assert cancelled.error_class is None, "a cancel kept the quota error_class"
    assert cancelled.last_error is None, "a cancel kept the quota message"
    assert cancelled.upload_next_at is None, "a cancel kept the quota wait's end"
    assert queue.get("a").error_class is None


def test_cancel_keeps_failed_attempt_error(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a")
    vod = claim_one(store)
    store.fail(
        vod.id,
        "w1",
        vod.upload_started_at,
        error="exit status 1",
        retry_at=clock() + timedelta(hours=1),
    )

    cancelled, _ = queue.cancel("a")

    assert cancelled.error_class == "upload_failed"
    assert cancelled.last_error == "exit status 1"
    assert cancelled.upload_next_at is None


def test_upload_claim_skips_excluded_ids(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a", priority=10)
    downloaded(queue, "b", priority=0)
    first = queue.get("a")

    claimed = store.claim("w1", wanted=2, limit=10, lease_s=LEASE_S, exclude=[first.id])

    assert [vod.vod_id for vod in claimed] == ["b"]
    assert queue.get("a").state is VodState.DOWNLOADED


def test_upload_claim_resets_progress(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a", size=1000)
    vod = claim_one(store)
    assert vod.bytes_done == 0
    assert vod.bytes_total == 1000
    assert vod.speed_bps is None


def test_upload_renew_records_progress(queue: VodQueue, store: UploadStore) -> None:
    downloaded(queue, "a", size=1000)
    vod = claim_one(store)
    held = store.renew(
        "w1",
        {vod.id: vod.upload_started_at},
        lease_s=LEASE_S,
        progress={vod.id: Progress(400, 1000, 250)},
    )
    assert held == {vod.id}
    stored = queue.get("a")
    assert stored.bytes_done == 400
    assert stored.bytes_total == 1000
    assert stored.speed_bps == 250


def test_upload_renew_without_progress_keeps_it(
    queue: VodQueue, store: UploadStore
) -> None:
    downloaded(queue, "a", size=1000)
    vod = claim_one(store)
    started = {vod.id: vod.upload_started_at}
    store.renew(
        "w1", started, lease_s=LEASE_S, progress={vod.id: Progress(400, 1000, 9)}
    )
    store.renew("w1", started, lease_s=LEASE_S)
    assert queue.get("a").bytes_done == 400


def test_upload_renew_of_lost_claim_writes_no_progress(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a", size=1000)
    first = claim_one(store, "w1")
    clock.advance(LEASE_S + 1)
    claim_one(store, "w2")
    held = store.renew(
        "w1",
        {first.id: first.upload_started_at},
        lease_s=LEASE_S,
        progress={first.id: Progress(900, 1000, 5)},
    )
    assert held == set()
    assert queue.get("a").bytes_done == 0


@pytest.mark.parametrize("outcome", ["finish", "fail", "retry", "defer", "release"])
def test_upload_outcome_restores_file_size(
    queue: VodQueue, store: UploadStore, clock: Clock, outcome: str
) -> None:
    downloaded(queue, "a", size=1000)
    vod = claim_one(store)
    started = vod.upload_started_at
    store.renew(
        "w1",
        {vod.id: started},
        lease_s=LEASE_S,
        progress={vod.id: Progress(400, 1000, 9)},
    )
    later = clock() + timedelta(seconds=10)
    if outcome == "finish":
        assert finish(store, vod)
    elif outcome == "fail":
        assert store.fail(vod.id, "w1", started, error="e", retry_at=None)
    elif outcome == "retry":
        assert store.fail(vod.id, "w1", started, error="e", retry_at=later)
    elif outcome == "defer":
        assert store.defer(vod.id, "w1", started, error="e", retry_at=later)
    else:
        assert store.release(vod.id, "w1", started, VodState.DOWNLOADED)

    stored = queue.get("a")
    assert stored.bytes_done == 1000
    assert stored.speed_bps is None


def test_upload_expired_release_restores_file_size(
    queue: VodQueue, store: UploadStore, clock: Clock
) -> None:
    downloaded(queue, "a", size=1000)
    vod = claim_one(store, "w1")
    store.renew(
        "w1",
        {vod.id: vod.upload_started_at},
        lease_s=LEASE_S,
        progress={vod.id: Progress(400, 1000, 9)},
    )
    clock.advance(LEASE_S + 1)
    store.claim("w2", wanted=1, limit=0, lease_s=LEASE_S)
    stored = queue.get("a")
    assert stored.state is VodState.DOWNLOADED
    assert stored.bytes_done == 1000
    assert stored.speed_bps is None
