"""Configuration changed while vodq runs, stored in ``kv`` for every worker.

A runtime value is kept under ``config:<VARIABLE>`` in the ``kv`` table and
wins over the environment, so it survives restarts and reaches every worker
that shares the database. Each process re-reads the overrides at most once
per ``REFRESH_S``. Values go through the same parser as at start-up, so an
invalid one is rejected with the same message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

from vodq.config import Settings, settings_from
from vodq.errors import ConfigError, InvalidInput
from vodq.queue import VodQueue

log = logging.getLogger(__name__)

# Variables that may change at runtime. The rest (addresses, the database,
# credentials, paths) would need a new process to take effect.
RUNTIME_VARIABLES = (
    "MAX_CONCURRENT_DOWNLOADS",
    "MAX_DOWNLOADS_PER_WORKER",
    "DOWNLOAD_RATE_LIMIT",
    "DOWNLOAD_TOTAL_RATE_LIMIT",
    "DOWNLOAD_MAX_ATTEMPTS",
    "DOWNLOAD_BACKOFF_BASE",
    "PROCESSING_RETRY_COOLDOWN",
    "UPLOAD_MAX_ATTEMPTS",
    "UPLOAD_BACKOFF_BASE",
    "MAX_CONCURRENT_UPLOADS",
)
KV_PREFIX = "config:"
# Longest a runtime change takes to reach another process, in seconds.
REFRESH_S = 1.0


class RuntimeConfig:
    """The settings in force: start-up values with the stored overrides on top."""

    def __init__(
        self, environment: Mapping[str, str], queue: VodQueue, initial: Settings
    ) -> None:
        self.environment = dict(environment)
        self.queue = queue
        self._initial = initial
        self._settings = initial
        # The overrides in force, and all that the kv table held at the last
        # read (invalid ones included), so that an unchanged table is not
        # parsed and logged again every REFRESH_S.
        self._overrides: dict[str, str] = {}
        self._stored: dict[str, str] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        # Off until the database is migrated, so that nothing reads kv first.
        self.enabled = False

    def settings(self) -> Settings:
        """Return the settings in force, re-reading overrides every ``REFRESH_S``."""
        if self.enabled and time.monotonic() - self._read_at >= REFRESH_S:
            self.refresh()
        return self._settings

    def refresh(self) -> None:
        """Read the overrides now. A value someone stored invalid is ignored, loudly."""
        keys = [KV_PREFIX + name for name in RUNTIME_VARIABLES]
        try:
            stored = self.queue.get_kv(keys)
        except Exception as exc:
            log.warning(
                "could not read runtime configuration: %s",
                exc,
                extra={"action": "config"},
            )
            self._read_at = time.monotonic()
            return
        overrides = {
            key.removeprefix(KV_PREFIX): value for key, value in stored.items()
        }
        with self._lock:
            self._read_at = time.monotonic()
            if overrides == self._stored:
                return
            self._stored = overrides
            valid = self._valid(overrides)
            settings = self._build(valid)
            changed = valid != self._overrides
            self._overrides = valid
            self._settings = settings
        if changed:
            log.info(
                "runtime configuration changed",
                extra={"action": "config", "overrides": valid},
            )

    def _valid(self, overrides: Mapping[str, str]) -> dict[str, str]:
        """Return the overrides that are valid, logging each one that is not.

        Only a value written with SQL, or by another version of vodq, can be
        invalid, and it must not keep the others from taking effect.
        """
        blank = {name for name, value in overrides.items() if not value.strip()}
        if not blank:
            try:
                self._build(overrides)
            except ConfigError:
                pass
            else:
                return dict(overrides)

        valid: dict[str, str] = {}
        for name, value in sorted(overrides.items()):
            try:
                if name in blank:
                    # Settings read an empty value as unset, which would drop
                    # the start-up value unannounced.
                    raise ConfigError(f"{name}={value!r} is empty")
                self._build({**valid, name: value})
            except ConfigError as exc:
                log.warning(
                    "ignoring the runtime value of %s stored in kv: %s; change it "
                    "with PATCH /admin/config or vodq config",
                    name,
                    str(exc).replace("invalid configuration:\n  ", ""),
                    extra={"action": "config", "variable": name},
                )
                continue
            valid[name] = value
        return valid

    def update(self, changes: Mapping[str, str | None]) -> Settings:
        """Validate and store ``changes``; a value of None returns to start-up.

        Raises InvalidInput naming an unknown variable or repeating the
        start-up message for an invalid value.
        """
        unknown = sorted(set(changes) - set(RUNTIME_VARIABLES))
        if unknown:
            raise InvalidInput(
                f"{', '.join(unknown)} cannot change at runtime; the variables "
                f"that can are {', '.join(RUNTIME_VARIABLES)}"
            )
        for name, value in sorted(changes.items()):
            if value is not None and not value.strip():
                # The environment reads an empty value as unset, so storing one
                # would drop the value the process started with, unannounced.
                hint = " or 'none' for no limit" if name.endswith("RATE_LIMIT") else ""
                raise InvalidInput(
                    f"{name}={value!r} is empty; send null to return to the value "
                    f"it started with{hint}"
                )
        self.refresh()
        overrides = dict(self._overrides)
        for name, value in changes.items():
            if value is None:
                overrides.pop(name, None)
            else:
                overrides[name] = value.strip()
        try:
            self._build(overrides)
        except ConfigError as exc:
            raise InvalidInput(
                str(exc).replace("invalid configuration:\n  ", "")
            ) from exc

        self.queue.set_kv(
            {
                KV_PREFIX + name: value.strip()
                for name, value in changes.items()
                if value is not None
            }
        )
        self.queue.delete_kv(
            [KV_PREFIX + name for name, v in changes.items() if v is None]
        )
        self.refresh()
        return self._settings

    def sources(self) -> dict[str, str]:
        """Tell where each runtime variable's value comes from."""
        sources = {}
        for name in RUNTIME_VARIABLES:
            if name in self._overrides:
                sources[name] = "runtime"
            elif self.environment.get(name, "").strip():
                sources[name] = "environment"
            else:
                sources[name] = "default"
        return sources

    def _build(self, overrides: Mapping[str, str]) -> Settings:
        merged = {**self.environment, **overrides}
        built = settings_from(merged)
        # Identity stays as the process started, whatever the overrides.
        return replace(built, worker_id=self._initial.worker_id)
