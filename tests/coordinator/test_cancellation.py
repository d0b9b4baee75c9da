"""The daemon's loops stop when cancelled, even at the moment they are woken.

On Python 3.11, `asyncio.wait_for(event.wait(), t)` returns normally instead of raising when
the task is cancelled in the same loop turn as the event is set (the awaited task finished
first, and wait_for hands back its result). A loop around it then never stops: the node's
task group waited for it for ever, which hung a test run at its teardown. The loops now wait
with `asyncio.timeout`, and ruff bans `asyncio.wait_for` in the daemon (TID251).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from houndd.membership.memory import MemoryNetwork
from houndd.wire import Keyring
from tests.coordinator.inprocess import build, until


async def test_the_dispatch_loop_and_keep_present_stop_when_cancelled_as_they_wake(
    tmp_path: Path,
) -> None:
    net = MemoryNetwork(random.Random(0), delay=(0.0005, 0.002))
    node = build(0, net, Keyring.generate().primary, tmp_path)
    runtime = node.service.runtime
    keep = node.service.keep_present
    parts = [asyncio.create_task(part.run()) for part in (node.bus, node.membership, node.executor)]
    loop_task = asyncio.create_task(runtime.run())
    keep_task = asyncio.create_task(keep.run())
    try:
        # both asleep: the dispatch loop until its next timer, keep_present for its interval
        await until(lambda: runtime._asleep_until > 0, 10, "the dispatch loop sleeps")
        await asyncio.sleep(0.5)
        # woken and cancelled in the same loop turn
        runtime.wake()
        loop_task.cancel()
        keep.kick()
        keep_task.cancel()
        _, running = await asyncio.wait([loop_task, keep_task], timeout=5)
        assert not running, f"still running after cancel: {running}"
        assert loop_task.cancelled() and keep_task.cancelled()
    finally:
        for t in [*parts, loop_task, keep_task]:
            t.cancel()
        await asyncio.wait([*parts, loop_task, keep_task], timeout=5)
        await node.service.close()
