"""A JSON request body may name each key only once.

Python's JSON parser keeps the last of two equal keys, so a body such as
``{"priority": 1, "priority": 9}`` would apply one value and drop the other
without a word. The dependency below rejects such a body before any route
uses it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from vodq.errors import InvalidInput

# Methods whose requests carry a body that a route reads.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen[key] = value
    return seen


async def reject_repeated_keys(request: Request) -> None:
    """Raise InvalidInput when the JSON body names a key twice in one object.

    A body that is not JSON is left to the route, which reports it.
    """
    if request.method not in _BODY_METHODS:
        return
    body = await request.body()
    if not body:
        return
    try:
        json.loads(body, object_pairs_hook=_unique)
    except _RepeatedKey as exc:
        raise InvalidInput(
            f"invalid request body: the key {exc.key!r} appears twice in one "
            "object; send each key once"
        ) from None
    except ValueError:
        return
