"""Every timer runs on the monotonic clock: a wall-clock step of hours, in either direction,
in the middle of a plan triggers no election and times no item out.

Three nodes run in this process with their real shells (bus, membership, the coordinator
runtime, submission, the puller's executor on the fake engine) over the memory network, all
sharing one wall clock that the test steps (as NTP would, on every host at once).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from houndd.coordinator.results import ItemState
from tests.coordinator.inprocess import cluster, coordinator_of, until

HOUR = 3600.0


class SteppedWallClock:
    """time.time() plus an offset the test moves by hours."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_wall_clock_steps_mid_plan_neither_elect_nor_time_out(tmp_path: Path) -> None:
    wall = SteppedWallClock()
    async with cluster(tmp_path, wall=wall) as nodes:
        await coordinator_of(nodes)
        coordinator, term = nodes[0].service.coordinator()
        body = {
            "name": "steps",
            "targets": [{"images": ["registry.local/a:1", "registry.local/b:1"], "all": True}],
            "policy": {"timeout": "30m", "per_node_parallelism": 2},
        }
        # Bounded: this await once hung until pytest's 300 s timeout (twice in many runs, cause
        # not found); a timeout here fails fast, and its traceback shows where it waited.
        async with asyncio.timeout(60):
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
