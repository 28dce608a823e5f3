"""The Prometheus registry and its instruments.

Each event is counted once, at the one place that decides it. An attempt is
counted in ``vod_downloads_started_total`` (``vod_uploads_started_total``
for uploads) when it ends, at the same moment
as its outcome (succeeded, failed or cancelled), so the success rate
``rate(succeeded) / rate(started)`` stays between 0 and 1 in every window.
Queue depth is read from the database at scrape time, so SQL changes made
behind the service's back are counted too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vodq.breaker import BreakerSnapshot, BreakerState
from vodq.queue import QueueCounts

# Buckets of the download duration histogram, in seconds: VODs take from
# seconds (short clips on a fast link) to many hours.
DURATION_BUCKETS_S = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)

# Error classes the downloader reports (vodq.download.classify and the yt-dlp
# wrapper) and reasons a download is stopped (scheduler.CancelReason). They
# are exported at 0 from the start, so that rate() and sum() in alerts see a
# series before the first failure instead of no data.
ERROR_CLASSES = (
    "gone",
    "needs_auth",
    "rate_limited",
    "range_rejected",
    "transient",
    "http_error",
    "unsupported",
    "disk_full",
    "incomplete",
    "error",
)
CANCEL_REASONS = ("cancel", "pause", "shutdown", "lease_lost")


class _QueueCollector(Collector):
    def __init__(
        self,
        read_counts: Callable[[], QueueCounts],
        read_breaker: Callable[[], BreakerSnapshot],
    ) -> None:
        self.read_counts = read_counts
        self.read_breaker = read_breaker

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Describing must not touch the database: the registry calls this at
        # registration, before migrations have run.
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.read_counts()
        circuit = self.read_breaker()
        depth, by_state, breaker_state, failures = self._families()
        depth.add_metric([], counts.by_state.get("queued", 0))
        for state, count in sorted(counts.by_state.items()):
            by_state.add_metric([state], count)
        for state in BreakerState:
            breaker_state.add_metric([state.value], 1 if circuit.state is state else 0)
        failures.add_metric([], circuit.failures)
        yield depth
        yield by_state
        yield breaker_state
        yield failures

    def _families(
        self,
    ) -> tuple[
        GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily
    ]:
        depth = GaugeMetricFamily(
            "vod_queue_depth", "VODs waiting to be downloaded (state queued)."
        )
        by_state = GaugeMetricFamily(
            "vod_queue_vods", "VODs in the database by state.", labels=["state"]
        )
        breaker_state = GaugeMetricFamily(
            "vod_circuit_state",
            "1 for the circuit breaker's current state, 0 for the others.",
            labels=["state"],
        )
        failures = GaugeMetricFamily(
            "vod_circuit_failures", "Consecutive systemic failures the breaker counts."
        )
        return depth, by_state, breaker_state, failures


class Metrics:
    """Every instrument vodq exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.downloads_started = Counter(
            "vod_downloads_started",
            "Download attempts, counted when they end (running ones are "
            "vod_active_downloads).",
            registry=self.registry,
        )
        self.downloads_succeeded = Counter(
            "vod_downloads_succeeded",
            "Download attempts that ended with a complete file.",
            registry=self.registry,
        )
        self.downloads_failed = Counter(
            "vod_downloads_failed",
            "Download attempts that failed, by error class.",
            ["error_class"],
            registry=self.registry,
        )
        self.downloads_cancelled = Counter(
            "vod_downloads_cancelled",
            "Download attempts stopped by cancel, shutdown or a lost lease.",
            ["reason"],
            registry=self.registry,
        )
        for error_class in ERROR_CLASSES:
            self.downloads_failed.labels(error_class=error_class)
        for reason in CANCEL_REASONS:
            self.downloads_cancelled.labels(reason=reason)
        self.retries_scheduled = Counter(
            "vod_download_retries",
            "Failed attempts that were queued for another attempt.",
            registry=self.registry,
        )
        self.bytes_downloaded = Counter(
            "vod_downloaded_bytes",
            "Bytes written by downloads, counted as they arrive.",
            registry=self.registry,
        )
        self.download_duration = Histogram(
            "vod_download_duration_seconds",
            "Duration of successful download attempts.",
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.breaker_transitions = Counter(
            "vod_circuit_transitions",
            "Circuit breaker state changes, by the state entered.",
            ["to"],
            registry=self.registry,
        )
        self.active_downloads = Gauge(
            "vod_active_downloads",
            "Downloads running in this process.",
            registry=self.registry,
        )
        self.uploads_started = Counter(
            "vod_uploads_started",
            "Upload attempts, counted when they end (running ones are "
            "vod_active_uploads).",
            registry=self.registry,
        )
        self.uploads_succeeded = Counter(
            "vod_uploads_succeeded",
            "Upload attempts whose result was recorded and the VOD marked done.",
            registry=self.registry,
        )
        self.uploads_failed = Counter(
            "vod_uploads_failed",
            "Upload attempts that failed; the file is kept for the next attempt.",
            registry=self.registry,
        )
        self.upload_duration = Histogram(
            "vod_upload_duration_seconds",
            "Duration of successful upload attempts.",
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.active_uploads = Gauge(
            "vod_active_uploads",
            "Uploads running in this process.",
            registry=self.registry,
        )

    def watch_queue(
        self,
        read_counts: Callable[[], QueueCounts],
        read_breaker: Callable[[], BreakerSnapshot],
    ) -> None:
        """Export queue and breaker gauges, read from the database at every scrape."""
        self.registry.register(_QueueCollector(read_counts, read_breaker))

    def record_breaker_transition(self, transition: str) -> None:
        self.breaker_transitions.labels(to=transition).inc()
