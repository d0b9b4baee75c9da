"""Every timer runs on the monotonic clock: a wall-clock step of hours, in either direction,
in the middle of a plan triggers no election and times no item out.

Three nodes run in this process with their real shells (bus, membership, the coordinator
runtime, submission, the puller's executor on the fake engine) over the memory network, all
sharing one wall clock that the test steps (as NTP would, on every host at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from houndd.config import local
from houndd.coordinator.dispatch import Clocks
from houndd.coordinator.memory import MemoryStore
from houndd.coordinator.results import ItemState
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

HOUR = 3600.0


class SteppedWallClock:
    """time.time() plus an offset the test moves by hours."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


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


def build(i: int, net: MemoryNetwork, key: bytes, wall: SteppedWallClock, tmp: Path) -> Node:
    config = local(state_dir=str(tmp / f"n{i}"), node_name=f"n{i}", plan_replicas=2)
    wire = Wire(
        cluster_id="test", keyring=Keyring(key), identity=NodeIdentity.generate(), boot_epoch=1
    )
    address = (f"10.9.0.{i + 1}", 7480)
    transport = net.transport(address)
    bus = Bus(config, wire, transport, clock=wall)
    me = Member(node_id=wire.node_id, name=f"n{i}", host=address[0], port=address[1])
    membership = Membership(config, bus, me, clock=wall, rng=random.Random(i))
    engine = FakeEngine(pull_duration_s=1.5, any_image_size=1000)
    service: CoordinatorService | None = None

    def on_report(report: ItemReport) -> None:
        assert service is not None
        service.on_report(report.plan_id, report.image, report_result(report))

    executor = Executor(
        engine, node_id=wire.node_id, progress_interval_s=0.1, on_report=on_report, clock=wall
    )
    service = CoordinatorService(
        config,
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


@contextlib.asynccontextmanager
async def cluster(tmp: Path, wall: SteppedWallClock) -> AsyncIterator[list[Node]]:
    net = MemoryNetwork(random.Random(0), delay=(0.0005, 0.002))
    key = Keyring.generate().primary
    nodes = [build(i, net, key, wall, tmp) for i in range(3)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        for n in nodes[1:]:
            assert await n.membership.join([nodes[0].address]) == 1
        yield nodes
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def until(cond: object, within_s: float, what: str) -> None:
    assert callable(cond)
    async with asyncio.timeout(within_s):
        while not cond():  # noqa: ASYNC110 - several nodes' state, no single event
            await asyncio.sleep(0.02)
    assert cond(), what


async def test_wall_clock_steps_mid_plan_neither_elect_nor_time_out(tmp_path: Path) -> None:
    wall = SteppedWallClock()
    async with cluster(tmp_path, wall) as nodes:

        def agreed() -> str | None:
            seen = {n.service.coordinator() for n in nodes}
            only = seen.pop() if len(seen) == 1 else (None, 0)
            return only[0]

        await until(lambda: agreed() is not None, 15, "one coordinator")
        coordinator, term = nodes[0].service.coordinator()
        body = {
            "name": "steps",
            "targets": [{"images": ["registry.local/a:1", "registry.local/b:1"], "all": True}],
            "policy": {"timeout": "30m", "per_node_parallelism": 2},
        }
        accepted = await nodes[1].service.submit(json.dumps(body).encode(), "application/json")
        plan_id = accepted.plan_id
        views = nodes[1].service.views

        by_id = {n.bus.node_id: n for n in nodes}

        def pulling() -> bool:
            # Every item pulling and every dispatch answered: messages in flight across a
            # step carry timestamps outside the replay window and are refused like lost ones
            # (a lost dispatch reply is a retry, which is not what this test is about).
            view = views.view(plan_id)
            busy = view is not None and all(i["state"] == "pulling" for i in view["items"])
            return busy and by_id[coordinator].service.runtime.dispatches_in_flight() == 0

        await until(pulling, 10, "pulls running")
        wall.offset += 3 * HOUR  # forward: a wall-clock timer would see heartbeats 3 h late
        await asyncio.sleep(0.4)
        wall.offset -= 6 * HOUR  # and back, 3 h behind where it started
        await asyncio.sleep(0.4)

        def final() -> bool:
            view = views.view(plan_id)
            return view is not None and view["state"] in ("done", "failed", "cancelled")

        await until(final, 20, "the plan finished")
        view = views.view(plan_id)
        assert view is not None
        assert view["state"] == "done", view["items"]
        assert {i["attempt"] for i in view["items"]} == {1}  # no item timed out, none retried
        assert {n.service.coordinator() for n in nodes} == {(coordinator, term)}  # no election
        assert all(i["state"] == ItemState.DONE.value for i in view["items"])
        # Stamps that leave the process are wall-clock times: after the steps, 3 h behind.
        assert view["items"][0]["finished_at"] < time.time() - 2 * HOUR
