"""Plan reads and event streams on nodes with their real shells (issue #9 item 7, #12).

A reader that falls behind is dropped with a `dropped` event while the others go on, a node
serves at most `max_event_streams` streams, every reader of a plan gets the same encoded
events (rendered once), and a node that does not hold a plan fetches it from a holder to
serve it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from houndd.coordinator.views import TooManyStreams
from tests.coordinator.inprocess import Node, cluster, coordinator_of, until

IMAGES = [f"registry.local/many:{i}" for i in range(12)]


def events_of(chunks: list[bytes]) -> list[str]:
    """The event names in encoded SSE chunks, in order."""
    return [
        line.removeprefix(b"event: ").decode()
        for chunk in chunks
        for line in chunk.split(b"\n")
        if line.startswith(b"event: ")
    ]


async def submit(node: Node, images: list[str], **policy: object) -> str:
    body = {"name": "streams", "targets": [{"images": images, "all": True}], "policy": policy}
    accepted = await node.service.submit(json.dumps(body).encode(), "application/json")
    return accepted.plan_id


async def read_all(events: AsyncGenerator[bytes, None], into: list[bytes]) -> None:
    async for chunk in events:
        into.append(chunk)


async def test_a_slow_reader_is_dropped_the_others_keep_streaming(tmp_path: Path) -> None:
    async with cluster(
        tmp_path,
        1,
        pull_s=2.0,
        progress_s=0.02,
        progress_steps=100,
        stream_queue_events=4,
        max_event_streams=3,
    ) as nodes:
        (node,) = nodes
        await coordinator_of(nodes)
        plan_id = await submit(node, IMAGES, per_node_parallelism=12)
        views = node.service.views
        slow = views.events(plan_id)
        first = await anext(slow)  # the snapshot; then it reads nothing for a while
        assert events_of([first]) == ["snapshot"]
        stream = views._streams[plan_id]
        (slow_sub,) = stream._subs
        fast: list[bytes] = []
        fast_task = asyncio.create_task(read_all(views.events(plan_id), fast))
        most_queued = 0

        def dropped() -> bool:
            nonlocal most_queued
            most_queued = max(most_queued, slow_sub._queue.qsize())
            return slow_sub.ended

        # Progress of twelve pulls changes the plan about every 20 ms: the slow reader's
        # queue fills, and it is dropped; the fast one stays subscribed.
        await until(dropped, 10, "the slow reader dropped")
        assert most_queued <= 4  # bounded: never more batches than stream_queue_events
        assert slow_sub not in stream._subs and len(stream._subs) == 1
        rest = [chunk async for chunk in slow]
        assert events_of(rest) == ["dropped"]
        assert b"fell behind" in rest[0]
        await asyncio.wait_for(fast_task, 20)
        names = events_of(fast)
        assert names[0] == "snapshot" and names[-1] == "final" and "item" in names
        assert "dropped" not in names
        assert views.subscribers == 0


async def test_every_reader_gets_the_same_bytes_and_the_stream_cap_holds(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 1, pull_s=0.3, max_event_streams=3) as nodes:
        (node,) = nodes
        await coordinator_of(nodes)
        plan_id = await submit(node, IMAGES[:3])
        views = node.service.views
        readers: list[list[bytes]] = [[], [], []]
        gens = [views.events(plan_id) for _ in readers]
        firsts = [await anext(g) for g in gens]
        assert firsts[0] is firsts[1] is firsts[2]  # one snapshot, encoded once
        with pytest.raises(TooManyStreams):
            await anext(views.events(plan_id))
        tasks = [
            asyncio.create_task(read_all(g, into)) for g, into in zip(gens, readers, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert readers[0] == readers[1] == readers[2]
        assert all(a is b for a, b in zip(readers[0], readers[1], strict=True))  # shared
        assert events_of(readers[0])[-1] == "final"
        assert views.subscribers == 0


async def test_a_node_that_does_not_hold_a_plan_fetches_it_to_serve_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4, pull_s=0.3, plan_replicas=2) as nodes:
        coordinator = await coordinator_of(nodes)
        plan_id = await submit(coordinator, IMAGES[:2])
        runtime = {n.name: n.service.runtime for n in nodes}
        holders = [n for n in nodes if runtime[n.name].core.replica.plan(plan_id) is not None]
        assert len(holders) == 2  # the coordinator and one replica: nobody else
        reader = next(n for n in nodes if n not in holders)
        assert reader.service.views.view(plan_id) is None
        assert runtime[reader.name].core.replica.part(plan_id) is not None  # a target
        view = await reader.service.views.plan(plan_id)
        assert view is not None and {i["image"] for i in view["items"]} == set(IMAGES[:2])
        assert runtime[reader.name].core.replica.plan(plan_id) is not None  # holds it now

        def done_everywhere() -> bool:
            for n in (coordinator, reader):
                v = n.service.views.view(plan_id)
                if v is None or v["state"] != "done":
                    return False
            return True

        await until(done_everywhere, 20, "the reader's copy finished too")
        plans = await reader.service.views.plans()
        assert [p["id"] for p in plans] == [plan_id]
        assert await reader.service.views.plan("no-such-plan") is None


async def test_a_node_that_holds_no_plan_lists_the_coordinators(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4, pull_s=0.3, plan_replicas=2) as nodes:
        coordinator = await coordinator_of(nodes)
        plan_id = await submit(coordinator, IMAGES[:2])
        runtime = {n.name: n.service.runtime for n in nodes}
        reader = next(n for n in nodes if runtime[n.name].core.replica.plan(plan_id) is None)
        assert reader.service.views.local_plans() == []
        plans = await reader.service.views.plans()  # PLAN_LIST to the coordinator
        assert [p["id"] for p in plans] == [plan_id]
        assert plans[0]["name"] == "streams" and plans[0]["summary"]["total"] == 8
        assert runtime[reader.name].core.replica.plan(plan_id) is None  # listed, not fetched


def test_a_stream_with_more_readers_batches_longer() -> None:
    from houndd.coordinator.views import (
        MAX_RENDER_INTERVAL_S,
        READERS_PER_INTERVAL,
        RENDER_INTERVAL_S,
        PlanStream,
    )

    stream = PlanStream.__new__(PlanStream)  # only its reader set matters here
    stream._subs = set()
    assert stream.interval_s() == RENDER_INTERVAL_S
    stream._subs = {object() for _ in range(READERS_PER_INTERVAL * 5)}
    assert stream.interval_s() == RENDER_INTERVAL_S * 5
    stream._subs = {object() for _ in range(100_000)}
    assert stream.interval_s() == MAX_RENDER_INTERVAL_S
