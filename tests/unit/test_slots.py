"""FragmentSlots: how many fragments of a download are fetched at once."""

from __future__ import annotations

import threading
import time

import pytest

from fetching import while_fetching
from vodq.download.slots import FRAGMENT_MIN_RATE, OLDEST_WEIGHT, FragmentSlots
from vodq.errors import DownloadCancelled


class Rate:
    """A rate in force that a test changes, in bytes per second."""

    def __init__(self, value: float | None) -> None:
        self.value = value

    def __call__(self) -> float | None:
        return self.value


def start_fetch(
    slots: FragmentSlots,
    index: int,
    order: list[int],
    release: threading.Event,
    stopped: list[int] | None = None,
) -> threading.Thread:
    """Start a thread that takes a slot for ``index``, notes it in ``order``,
    and keeps it until ``release`` is set (10 s at most). A cancelled wait
    is noted in ``stopped``."""
    if stopped is None:
        stopped = []

    def fetch() -> None:
        try:
            with slots.fetching(index):
                order.append(index)
                release.wait(10)
        except DownloadCancelled:
            stopped.append(index)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread


def wait_count(order: list[int], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(order) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_slots_capacity_without_limit_is_configured() -> None:
    assert FragmentSlots(4, Rate(None)).capacity() == 4


def test_slots_capacity_one_per_min_rate() -> None:
    assert FragmentSlots(16, Rate(64 * 1024.0)).capacity() == 64 * 1024 // (
        FRAGMENT_MIN_RATE
    )


def test_slots_capacity_at_least_one() -> None:
    assert FragmentSlots(4, Rate(1024.0)).capacity() == 1


def test_slots_capacity_at_most_configured() -> None:
    assert FragmentSlots(4, Rate(10 * 1024 * 1024.0)).capacity() == 4


def test_slots_lowest_index_goes_first() -> None:
    slots = FragmentSlots(4, Rate(float(FRAGMENT_MIN_RATE)))
    order: list[int] = []
    first, later = threading.Event(), threading.Event()
    holder = start_fetch(slots, 0, order, first)
    wait_count(order, 1)
    waiters = [start_fetch(slots, index, order, later) for index in (3, 2, 1)]
    # Let the three reach their wait before the slot frees.
    time.sleep(0.3)
    later.set()
    first.set()
    for thread in [holder, *waiters]:
        thread.join(10)
    assert order == [0, 1, 2, 3]


def test_slots_raised_rate_lets_waiting_fetch() -> None:
    rate = Rate(float(FRAGMENT_MIN_RATE))
    slots = FragmentSlots(4, rate)
    order: list[int] = []
    release = threading.Event()
    threads = [start_fetch(slots, index, order, release) for index in range(3)]
    wait_count(order, 1)
    rate.value = 4.0 * FRAGMENT_MIN_RATE
    slots.wake()
    wait_count(order, 3)
    fetched_at_once = len(order)
    release.set()
    for thread in threads:
        thread.join(10)
    assert fetched_at_once == 3


def test_slots_cancelled_download_stops_waiting() -> None:
    cancelled = threading.Event()
    slots = FragmentSlots(4, Rate(1024.0), cancelled)
    order: list[int] = []
    stopped: list[int] = []
    release = threading.Event()
    threads = [start_fetch(slots, index, order, release, stopped) for index in range(2)]
    wait_count(order, 1)
    cancelled.set()
    wait_count(stopped, 1)
    release.set()
    for thread in threads:
        thread.join(10)
    assert stopped == [1]
    assert order == [0]


def held_weights(indices: list[int]) -> dict[int, float]:
    """Return the weight each of ``indices`` reads while all hold a slot."""
    slots = FragmentSlots(len(indices), Rate(None))
    return while_fetching(slots, indices, slots.weight)


def test_slots_weight_outside_fragment_is_one() -> None:
    assert FragmentSlots(4, Rate(None)).weight() == 1.0


def test_slots_weight_of_only_fragment_is_one() -> None:
    assert held_weights([7]) == {7: 1.0}


def test_slots_weight_oldest_reads_most() -> None:
    weights = held_weights([5, 6, 7, 8])
    assert max(weights, key=weights.__getitem__) == 5


def test_slots_weight_falls_with_age() -> None:
    weights = held_weights([5, 6, 7, 8])
    assert weights[5] > weights[6] > weights[7] > weights[8]


def test_slots_weight_oldest_over_newest() -> None:
    weights = held_weights([5, 6, 7, 8])
    assert weights[5] / weights[8] == pytest.approx(OLDEST_WEIGHT)


def test_slots_weights_keep_the_rate() -> None:
    weights = held_weights([2, 9, 11])
    assert sum(weights.values()) == pytest.approx(3.0)
