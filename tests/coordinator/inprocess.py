"""Nodes with their real shells in this process (bus, membership, the coordinator runtime,
submission, the puller's executor on the fake engine) over the memory network.

Shared by the tests that need several nodes' state at once without processes: every part is
the real one but the transport (memory) and the engine (fake).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from houndd.config import local
from houndd.coordinator.dispatch import Clocks
from houndd.coordinator.memory import MemoryStore
from houndd.coordinator.service import CoordinatorService
from houndd.daemon import LocalPuller, report_result
from houndd.image.credentials import RegistryAuth
from houndd.image.registry import Resolved
from houndd.membership.bus import Bus
from houndd.membership.member import Member
from houndd.membership.memory import MemoryNetwork
from houndd.membership.service import Membership
from houndd.metrics import Metrics
from houndd.puller.executor import Executor, ItemReport
from houndd.puller.memory import FakeEngine
from houndd.wire import Keyring, NodeIdentity, Wire


class AnyTag:
    """A registry where every tag exists."""

    async def resolve(self, ref: str, auth: RegistryAuth | None = None) -> Resolved:
        return Resolved("sha256:" + "ab" * 32, 1000, "application/vnd.oci.image.manifest.v1+json")


@dataclass
class Node:
    name: str
    bus: Bus
    membership: Membership
    service: CoordinatorService
    executor: Executor
    address: tuple[str, int]

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for part in (self.bus, self.membership, self.executor, self.service):
                tg.create_task(part.run())


def build(
    i: int,
    net: MemoryNetwork,
    key: bytes,
    tmp: Path,
    *,
    wall: Callable[[], float] = time.time,
    pull_s: float = 1.5,
    progress_s: float = 0.1,
    progress_steps: int = 4,
    **config: Any,
) -> Node:
    """Node `i` (named n<i>, address 10.9.0.<i+1>:7480) with the `local` preset."""
    cfg = local(state_dir=str(tmp / f"n{i}"), node_name=f"n{i}", **{"plan_replicas": 2, **config})
    wire = Wire(
        cluster_id="test", keyring=Keyring(key), identity=NodeIdentity.generate(), boot_epoch=1
    )
    address = (f"10.9.0.{i + 1}", 7480)
    transport = net.transport(address)
    bus = Bus(cfg, wire, transport, clock=wall)
    me = Member(node_id=wire.node_id, name=f"n{i}", host=address[0], port=address[1])
    membership = Membership(cfg, bus, me, clock=wall, rng=random.Random(i))
    engine = FakeEngine(pull_duration_s=pull_s, any_image_size=1000, progress_steps=progress_steps)
    service: CoordinatorService | None = None

    def on_report(report: ItemReport) -> None:
        assert service is not None
        service.on_report(report.plan_id, report.image, report_result(report))

    executor = Executor(
        engine, node_id=wire.node_id, progress_interval_s=progress_s, on_report=on_report,
        clock=wall,
    )  # fmt: skip
    service = CoordinatorService(
        cfg,
        bus=bus,
        membership=membership,
        store=MemoryStore(),
        local=LocalPuller(executor, engine),
        registry=AnyTag(),
        metrics=Metrics(),
        keyring=Keyring(key),
        rng=random.Random(100 + i),
        clocks=Clocks(wall=wall, mono=time.monotonic),
    )
    service.start()
    service.discovery_round_done()  # no discovery here: the memory network is the world
    return Node(f"n{i}", bus, membership, service, executor, address)


TASK_DUMP_AFTER_S = 240.0
"""Before pytest's own timeout (300 s): a cluster still up this long prints every task's
stack, so a hang names the await it is stuck in."""


STOP_S = 30.0
"""How long the nodes of a cluster get to stop once cancelled."""


def dump_tasks(why: str) -> None:
    """Every asyncio task of the running loop with its stack, to stderr."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    sys.stderr.write(f"--- asyncio tasks: {why} ---\n{out.getvalue()}")


@contextlib.asynccontextmanager
async def cluster(tmp: Path, n: int = 3, **kw: Any) -> AsyncIterator[list[Node]]:
    """`n` nodes built with `kw`, running and joined to the first."""
    net = MemoryNetwork(random.Random(0), delay=(0.0005, 0.002))
    key = Keyring.generate().primary
    nodes = [build(i, net, key, tmp, **kw) for i in range(n)]
    tasks = [asyncio.create_task(node.run()) for node in nodes]
    watchdog = asyncio.get_running_loop().call_later(
        TASK_DUMP_AFTER_S, dump_tasks, f"the cluster is still up after {TASK_DUMP_AFTER_S:g} s"
    )
    try:
        for node in nodes[1:]:
            assert await node.membership.join([nodes[0].address]) == 1
        yield nodes
    finally:
        for t in tasks:
            t.cancel()
        # Bounded, and by asyncio.wait, which never swallows a cancellation of its own: a
        # node that does not stop fails the test with every task's stack.
        _, running = await asyncio.wait(tasks, timeout=STOP_S)
        if running:
            dump_tasks(f"nodes still running {STOP_S:g} s after they were cancelled")
        async with asyncio.timeout(STOP_S):
            for node in nodes:
                await node.service.close()  # the plan parser's child process
        watchdog.cancel()
        assert not running, f"{len(running)} of {n} nodes did not stop within {STOP_S:g} s"
        for t in tasks:
            error = None if t.cancelled() else t.exception()
            if error is not None:
                raise error


async def until(cond: Callable[[], object], within_s: float, what: str) -> None:
    """Poll `cond` (several nodes' state: there is no single event to wait on)."""
    async with asyncio.timeout(within_s):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert cond(), what


async def coordinator_of(nodes: list[Node], within_s: float = 15.0) -> Node:
    """The node every node agrees coordinates, once they do."""

    def agreed() -> str | None:
        seen = {n.service.coordinator() for n in nodes}
        only = seen.pop() if len(seen) == 1 else (None, 0)
        return only[0]

    await until(lambda: agreed() is not None, within_s, "one coordinator")
    coordinator = agreed()
    return next(n for n in nodes if n.bus.node_id == coordinator)
