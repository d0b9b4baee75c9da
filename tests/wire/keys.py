"""Test helper: random cluster keys whose 1-byte key ids differ."""

from __future__ import annotations

import hashlib

from houndd.wire import generate_key
from houndd.wire.keyring import key_id


def distinct_keys(n: int) -> list[bytes]:
    """Random keys with distinct key ids (random ones collide with probability ~n*n/512)."""
    out: dict[int, bytes] = {}
    while len(out) < n:
        key = generate_key()
        out.setdefault(key_id(key), key)
    return list(out.values())


def colliding_keys() -> tuple[bytes, bytes]:
    """Two distinct keys with the same 1-byte key id (birthday bound: a few dozen tries)."""
    seen: dict[int, bytes] = {}
    for i in range(10_000):
        key = hashlib.sha256(i.to_bytes(4, "big")).digest()
        kid = key_id(key)
        if kid in seen:
            return seen[kid], key
        seen[kid] = key
    raise AssertionError("no collision found")
