"""Wake-ups across processes: PostgreSQL LISTEN/NOTIFY on one channel.

Whatever may let a VOD start (one added or bumped, a slot freed on any
worker) sends a notification; every worker listening wakes its scheduler at
once instead of waiting for its next poll. A runtime configuration change
sends ``CONFIG_CHANGED`` as the payload, so that workers re-read the settings
and apply new rates at once instead of at their next refresh. On SQLite
there is nothing to listen on, and other processes see changes at their next
poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "vodq_wake"
# The payload of a wake-up sent after a runtime configuration change.
CONFIG_CHANGED = "config"
# The payload of a wake-up sent when a download starts under the bandwidth
# pool, so that every worker splits the pool anew at once.
RATES_CHANGED = "rates"
# Longest the listener blocks before checking whether it should stop, in seconds.
LISTEN_TIMEOUT_S = 1.0
# Wait before reconnecting after the listening connection failed, in seconds.
RECONNECT_DELAY_S = 2.0


class Wakeups:
    """Send and receive wake-ups; both are no-ops on SQLite."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enabled = engine.dialect.name == "postgresql"
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self, payload: str = "") -> None:
        """Tell every listening worker to look for work now, and why if ``payload``."""
        if not self.enabled:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": CHANNEL, "payload": payload},
                )
        except Exception as exc:
            log.warning(
                "could not send a wake-up; workers will see the change at "
                "their next poll: %s",
                exc,
                extra={"action": "notify"},
            )

    def listen(self, on_wake: Callable[[str], None]) -> None:
        """Call ``on_wake`` with the payload of every notification, on a thread
        of its own."""
        if not self.enabled:
            return
        self._thread = threading.Thread(
            target=self._listen, args=(on_wake,), name="vodq-listen", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(LISTEN_TIMEOUT_S * 3)

    def _listen(self, on_wake: Callable[[str], None]) -> None:
        url = make_url(self.engine.url).set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # A notification, a configuration change included, may
                    # have been missed while reconnecting.
                    on_wake(CONFIG_CHANGED)
                    while not self._stopping.is_set():
                        for notification in conn.notifies(timeout=LISTEN_TIMEOUT_S):
                            on_wake(notification.payload)
            except psycopg.Error as exc:
                log.warning(
                    "wake-up listener lost its connection, reconnecting in %.0fs: %s",
                    RECONNECT_DELAY_S,
                    exc,
                    extra={"action": "listen"},
                )
                self._stopping.wait(RECONNECT_DELAY_S)
