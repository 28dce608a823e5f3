"""The circuit breaker, kept in the ``kv`` table so every worker shares it.

``circuit_state`` is ``closed``, ``open`` or ``half-open``;
``circuit_failures`` counts consecutive systemic failures; while open,
``circuit_open_until`` holds the ISO 8601 time of the next trial. When the
cooldown has passed, exactly one trial download is admitted (half-open, its
row id in ``circuit_trial``): its success closes the breaker and clears the
count, its systemic failure opens it again.

Every function here runs inside the caller's transaction, and the claim
transaction is serialised (SQLite write lock, PostgreSQL advisory lock), so
two workers never both admit a trial. Operators reset a stuck breaker with
SQL (state ``closed``, failures ``0``, no ``circuit_open_until``); the next
claim, at most a poll interval later, reads that and admits work again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, delete, insert, select, update

from vodq.db.schema import kv, vods

log = logging.getLogger(__name__)

STATE_KEY = "circuit_state"
FAILURES_KEY = "circuit_failures"
OPEN_UNTIL_KEY = "circuit_open_until"
TRIAL_KEY = "circuit_trial"
KEYS = (STATE_KEY, FAILURES_KEY, OPEN_UNTIL_KEY, TRIAL_KEY)

# Failures that say something about the site or the network, not about one
# VOD. A missing video, a login wall, an unsupported URL or a full disk of
# ours must not stop every other download.
SYSTEMIC_CLASSES = frozenset({"transient", "rate_limited", "error", "range_rejected"})


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class BreakerPolicy:
    """``threshold`` consecutive systemic failures open it for ``cooldown_s`` s."""

    threshold: int
    cooldown_s: float


@dataclass(frozen=True)
class BreakerSnapshot:
    state: BreakerState
    failures: int
    open_until: datetime | None
    trial_row_id: int | None


def read(conn: Connection) -> BreakerSnapshot:
    """Read the breaker; missing or unreadable values read as closed and zero."""
    rows = dict(
        conn.execute(select(kv.c.key, kv.c.value).where(kv.c.key.in_(KEYS))).all()
    )
    return snapshot_from(rows)


def snapshot_from(rows: Mapping[str, str]) -> BreakerSnapshot:
    """Interpret raw ``kv`` values, tolerating what an operator may have typed."""
    try:
        state = BreakerState(str(rows.get(STATE_KEY, "closed")).strip().lower())
    except ValueError:
        state = BreakerState.CLOSED
    try:
        failures = max(0, int(rows.get(FAILURES_KEY, "0")))
    except ValueError:
        failures = 0
    try:
        raw_until = rows.get(OPEN_UNTIL_KEY)
        open_until = datetime.fromisoformat(raw_until) if raw_until else None
    except ValueError:
        open_until = None
    try:
        raw_trial = rows.get(TRIAL_KEY)
        trial = int(raw_trial) if raw_trial else None
    except ValueError:
        trial = None
    return BreakerSnapshot(state, failures, open_until, trial)


@dataclass(frozen=True)
class Admission:
    """How many downloads may start, whether the first is the trial, and any change."""

    count: int
    trial: bool = False
    transition: str | None = None


def admit(conn: Connection, now: datetime, wanted: int) -> Admission:
    """Decide how many of ``wanted`` downloads may start now.

    A caller admitted a trial must call ``claim_trial`` with the row id it
    claims, in the same transaction.
    """
    breaker = read(conn)
    if breaker.state is BreakerState.CLOSED:
        return Admission(wanted)
    if breaker.state is BreakerState.OPEN:
        if breaker.open_until is not None and now < breaker.open_until:
            return Admission(0)
        _write(conn, now, {STATE_KEY: BreakerState.HALF_OPEN.value})
        _delete(conn, [TRIAL_KEY])
        return Admission(min(wanted, 1), trial=True, transition="half-open")
    if breaker.trial_row_id is not None and _is_downloading(conn, breaker.trial_row_id):
        return Admission(0)
    # No trial runs: none was admitted yet, or its worker died, or it was
    # cancelled, so another one may start.
    return Admission(min(wanted, 1), trial=True)


def _is_downloading(conn: Connection, row_id: int) -> bool:
    state = conn.execute(select(vods.c.state).where(vods.c.id == row_id)).scalar()
    return bool(state == "downloading")


def claim_trial(conn: Connection, now: datetime, row_id: int) -> None:
    """Record which download is the half-open trial."""
    _write(conn, now, {TRIAL_KEY: str(row_id)})


def record_success(conn: Connection, now: datetime, row_id: int) -> str | None:
    """Clear the failure count; a successful trial (or any success) closes it."""
    breaker = read(conn)
    if breaker.state is BreakerState.CLOSED and breaker.failures == 0:
        return None
    _write(conn, now, {STATE_KEY: BreakerState.CLOSED.value, FAILURES_KEY: "0"})
    _delete(conn, [OPEN_UNTIL_KEY, TRIAL_KEY])
    return "closed" if breaker.state is not BreakerState.CLOSED else None


def record_failure(
    conn: Connection,
    now: datetime,
    row_id: int,
    error_class: str,
    policy: BreakerPolicy,
) -> str | None:
    """Count a failed attempt; return "open" when this failure opens the breaker."""
    breaker = read(conn)
    is_trial = breaker.trial_row_id == row_id
    if error_class not in SYSTEMIC_CLASSES:
        # The trial hit a VOD-specific error and proved nothing about the
        # site, so the next claim may run another trial.
        if is_trial:
            _delete(conn, [TRIAL_KEY])
        return None

    failures = breaker.failures + 1
    reopen = breaker.state is BreakerState.HALF_OPEN and is_trial
    if reopen or (
        breaker.state is BreakerState.CLOSED and failures >= policy.threshold
    ):
        until = now + timedelta(seconds=policy.cooldown_s)
        _write(
            conn,
            now,
            {
                STATE_KEY: BreakerState.OPEN.value,
                FAILURES_KEY: str(failures),
                OPEN_UNTIL_KEY: until.isoformat(),
            },
        )
        _delete(conn, [TRIAL_KEY])
        return "open"
    _write(conn, now, {FAILURES_KEY: str(failures)})
    return None


def record_release(conn: Connection, row_id: int) -> None:
    """Forget the trial when it ends without a verdict (cancel, shutdown)."""
    if read(conn).trial_row_id == row_id:
        _delete(conn, [TRIAL_KEY])


def _write(conn: Connection, now: datetime, values: Mapping[str, str]) -> None:
    for key, value in values.items():
        changed = conn.execute(
            update(kv).where(kv.c.key == key).values(value=value, updated_at=now)
        )
        if changed.rowcount == 0:
            conn.execute(insert(kv).values(key=key, value=value, updated_at=now))


def _delete(conn: Connection, keys: list[str]) -> None:
    conn.execute(delete(kv).where(kv.c.key.in_(keys)))
