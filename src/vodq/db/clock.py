"""The database server's clock, for lease times shared by several machines.

Workers on different machines compare one another's lease expiry times, so
they must agree on the time. On PostgreSQL the clock is the server's: its
offset from the local clock is measured at start and every
``RESYNC_INTERVAL_S``, and local time plus that offset is used in between,
which costs no round trip per query. SQLite is local, so the local clock is
the shared one.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

# How often the offset to the database clock is measured again, in seconds.
RESYNC_INTERVAL_S = 60.0


class DatabaseClock:
    """A callable that returns the database server's current UTC time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._offset = timedelta(0)
        self._measured_at: float | None = None

    def __call__(self) -> datetime:
        if self._measured_at is None or (
            time.monotonic() - self._measured_at > RESYNC_INTERVAL_S
        ):
            self._measure()
        return datetime.now(UTC) + self._offset

    def _measure(self) -> None:
        with self._lock:
            try:
                before = datetime.now(UTC)
                with self.engine.connect() as conn:
                    server = conn.execute(text("SELECT now()")).scalar_one()
                after = datetime.now(UTC)
            except SQLAlchemyError as exc:
                # Keep the last offset; the next call measures again.
                log.warning(
                    "could not read the database clock: %s",
                    exc,
                    extra={"action": "clock"},
                )
                self._measured_at = time.monotonic() - RESYNC_INTERVAL_S + 5
                return
            # The server read its clock about halfway through the round trip.
            local = before + (after - before) / 2
            self._offset = server.astimezone(UTC) - local
            self._measured_at = time.monotonic()
