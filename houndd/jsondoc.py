"""JSON documents decoded strictly: a key twice in one object is refused, not silently merged.

Python's json keeps the last of two equal keys; whoever sent both meant one of them, and which
one is a guess. Used for plan documents and the API's JSON bodies.
"""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """A JSON object (or YAML mapping) names `key` twice."""

    def __init__(self, key: object) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for `json.loads`: the object, or DuplicateKey."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out
