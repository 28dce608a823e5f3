"""The upload stage's storage contract (UploadStore), run on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from test_queue_contract import LEASE_S, Clock, add

from vodq.db.engine import make_engine
from vodq.db.migrate import upgrade
from vodq.errors import InvalidTransition
from vodq.models import Vod, VodState
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


def downloaded(queue: VodQueue, vod_id: str, priority: int = 0) -> None:
    """Add ``vod_id`` and finish its download, leaving it ``downloaded``."""
    add(queue, vod_id, priority=priority)
    claimed = queue.claim("dl", wanted=1, limit=10, lease_s=LEASE_S)
    vod = next(vod for vod in claimed if vod.vod_id == vod_id)
    assert queue.finish(
        vod.id, "dl", file_path=f"/x/{vod_id}.mp4", size=1, download_ms=1
    )


def claim_one(store: UploadStore, owner: str = "w1", limit: int = 10) -> Vod:
    (vod,) = store.claim(owner, wanted=1, limit=limit, lease_s=LEASE_S)
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
    assert second.upload_attempts == 0
    assert not finish(store, first, "w1")
    assert queue.get("a").lease_owner == "w2"


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
    assert store.release_leases(["dead-1"]) == ["a"]
    assert queue.get("a").state is VodState.DOWNLOADED
