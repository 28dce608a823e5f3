"""Fragment threads that hold their slots at once, for tests of their parts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from vodq.download.slots import FragmentSlots

T = TypeVar("T")


def while_fetching(
    slots: FragmentSlots, indices: list[int], probe: Callable[[], T]
) -> dict[int, T]:
    """Return what ``probe`` returns on the thread of each fragment of
    ``indices``, called while all of them hold a slot of ``slots``."""
    results: dict[int, T] = {}
    all_held = threading.Barrier(len(indices), timeout=5)
    probed = threading.Barrier(len(indices), timeout=5)

    def fetch(index: int) -> None:
        with slots.fetching(index):
            all_held.wait()
            results[index] = probe()
            # Hold the slot until every thread has probed.
            probed.wait()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results
