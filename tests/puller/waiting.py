"""Polling for state that offers no event to wait on (a proxy's byte counter, dockerd)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float = 5.0, interval_s: float = 0.005
) -> None:
    """Return once `predicate()` holds; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the watched state has no event to await
            await asyncio.sleep(interval_s)
