"""The shell's write order: commits that must be durable are flushed off the event loop, and
nothing leaves the node before they are on disk.

`DispatchRuntime.apply` commits each `Persist` at once and runs the fsync on a thread of its
own. A message (Send, Request, Reply, AckClient) waits for every such flush started so far,
its own batch's or a concurrent one's: a vote or an acknowledgement is never sent before the
state it reports is durable. A local effect (Execute) waits only for its own batch's flush, so
a replica storing a plan still starts the pull of its own dispatch meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from houndd.coordinator.memory import MemoryStore
from houndd.coordinator.messages import (
    Action,
    DispatchReply,
    Execute,
    Heartbeat,
    Persist,
    Reply,
    Send,
)
from houndd.coordinator.records import PlanDocument, PlanItem, PlanRecord, PlanWork, ResultRecord
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.scheduler import DispatchItem
from houndd.membership.memory import MemoryNetwork
from houndd.wire import Keyring
from tests.coordinator.inprocess import build, until

WORK = PlanWork("w", "pull", "IfNotPresent", 1, ("0123456789abcdef",))


class GatedStore(MemoryStore):
    """A store whose flush holds until the test opens the gate, like a slow disk."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.flushing = threading.Event()

    def flush(self) -> None:
        self.flushing.set()
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")


def _plan(pid: str) -> PlanRecord:
    doc = PlanDocument({"name": pid, "nodes": {"a": ["x:1"]}}, via="n0")
    return PlanRecord.of(pid, doc, (PlanItem("a", "x:1", "sha256:1", 5),), 1.5, False)


def _execute(pid: str) -> Execute:
    return Execute(pid, (DispatchItem("x:1", "sha256:1", 1, 5.0),), WORK)


async def test_messages_wait_for_the_flush_and_other_batches_local_effects_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = build(0, MemoryNetwork(random.Random(0)), Keyring.generate().primary, tmp_path)
    runtime = node.service.runtime
    store = GatedStore()
    runtime.store = store
    sent: list[object] = []
    executed: list[str] = []

    async def send(target: object, payload: object) -> None:
        sent.append(payload)

    monkeypatch.setattr(runtime.bus, "send", send)
    monkeypatch.setattr(runtime, "_execute", lambda action: executed.append(action.plan_id))
    try:
        # A plan (must be durable), then a message and a local effect of the same batch.
        beat = Heartbeat(1, "n0")
        stored: list[Action] = [Persist((_plan("p"),)), Send("n1", beat), _execute("p")]
        first = asyncio.create_task(runtime.apply(stored))
        await until(store.flushing.is_set, 5, "the flush started")
        await asyncio.sleep(0.05)
        assert store.plans and not sent and not executed, "acted before the flush"
        # Progress needs no flush: another batch's Execute goes ahead, its Reply waits.
        pulling = ResultRecord("q", "n0", "x:1", ItemResult(ItemState.PULLING, 1))
        answer = Reply(DispatchReply("q", "n0", True, ""))
        accepted: list[Action] = [Persist((pulling,)), _execute("q"), answer]
        second = asyncio.create_task(runtime.apply(accepted))
        await until(lambda: executed == ["q"], 5, "the other batch's pull started")
        await asyncio.sleep(0.05)
        assert not second.done(), "a reply left before an earlier flush was done"
        assert not sent and not first.done()
        store.gate.set()
        assert await asyncio.wait_for(second, 5) is answer
        await asyncio.wait_for(first, 5)
        assert sent == [beat] and executed == ["q", "p"]
    finally:
        store.gate.set()
        await node.service.close()


async def test_a_failed_flush_sends_nothing_and_does_not_block_later_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = build(0, MemoryNetwork(random.Random(0)), Keyring.generate().primary, tmp_path)
    runtime = node.service.runtime

    class FailingStore(MemoryStore):
        fail = True

        def flush(self) -> None:
            if self.fail:
                raise OSError(5, "Input/output error")

    store = FailingStore()
    runtime.store = store
    sent: list[object] = []

    async def send(target: object, payload: object) -> None:
        sent.append(payload)

    monkeypatch.setattr(runtime.bus, "send", send)
    try:
        with pytest.raises(OSError, match="Input/output"):
            await runtime.apply([Persist((_plan("p"),)), Send("n1", Heartbeat(1, "n0"))])
        assert sent == []
        store.fail = False
        await runtime.apply([Send("n1", Heartbeat(2, "n0"))])
        assert sent == [Heartbeat(2, "n0")]
    finally:
        await node.service.close()
