"""vodq: archive video-on-demand recordings from a prioritized, persistent queue."""

__version__ = "0.1.0"
