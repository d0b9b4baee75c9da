"""The fetcher over in-memory transfers: one download per blob, sources in tree order,
resumption after a failing peer, wrong bytes detected and never handed out as complete."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from houndd.blobs.cache import Partial
from houndd.blobs.fetcher import Restarted, SourceTally
from houndd.blobs.memory import digest_of
from houndd.blobs.source import SourceError
from houndd.blobs.tree import REGISTRY, Source, rank
from houndd.errors import MANIFEST_UNKNOWN, NO_SPACE, UNAUTHORIZED, PullError, pull_error
from tests.blobs.conftest import ME, RigFactory
from tests.puller.waiting import eventually

SIZE = 200_000


def peers_where(digest: str, *, me_rank: int, n: int = 4) -> tuple[str, ...]:
    """Node ids such that ME has rank `me_rank` in the blob's tree."""
    i = 0
    while True:
        nodes = (*(f"{i * 10 + k:016x}" for k in range(1, n)), ME)
        if rank(digest, nodes).index(ME) == me_rank:
            return nodes
        i += 1


async def test_root_fetches_from_the_registry_once_for_all_readers(rig: RigFactory) -> None:
    async with rig() as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        r.transfers.delay_s = 0.001
        want = r.want(digest, SIZE)
        results = await asyncio.gather(*(r.read(want) for _ in range(5)))
        assert all(x == data for x in results)
        assert r.transfers.sent[""] == SIZE  # one download for five readers
        await eventually(lambda: digest in r.cache)  # stored once its fsync is done
        assert await r.read(want, 1000) == data[1000:]  # then from the cache
        assert r.transfers.sent[""] == SIZE
        assert r.fetcher.stats.cache_hits == 1


async def test_a_leaf_pulls_through_its_parent_not_the_registry(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=2)
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        parent = rank(digest, nodes)[1]
        assert r.transfers.sent == {parent: SIZE}
        first, _, offset = r.transfers.requests[0]
        assert first.node_id == parent and first.through and offset == 0


async def test_a_peer_dying_mid_blob_resumes_elsewhere_from_the_same_offset(
    rig: RigFactory,
) -> None:
    async with rig(fanout=1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=2)
        parent, grand = rank(digest, nodes)[1], rank(digest, nodes)[0]
        r.transfers.fault(parent, "die", after_bytes=70_000)
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        assert r.transfers.sent[parent] == 70_000
        assert r.transfers.sent[grand] == SIZE - 70_000  # only the rest, via Range
        # the broken connection is tried once more (it made progress), then the grandparent
        asked = [(s.node_id, offset) for s, _, offset in r.transfers.requests]
        assert asked == [(parent, 0), (parent, 70_000), (grand, 70_000)]
        assert r.transfers.sent[""] == 0
        assert r.fetcher.stats.source_failures["unreachable"] == 2


async def test_a_tally_counts_each_blob_once_by_where_this_node_got_it(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        data, other, third = os.urandom(SIZE), os.urandom(SIZE), os.urandom(SIZE // 2)
        digest, d_other, d_third = (r.transfers.publish(x) for x in (data, other, third))
        nodes = peers_where(digest, me_rank=2)
        parent = rank(digest, nodes)[1]
        r.transfers.fault(parent, "die", after_bytes=70_000)  # the rest from the grandparent
        tally = SourceTally()
        want = r.want(digest, SIZE, nodes)
        got = b"".join([c async for c in r.fetcher.open(want, tally=tally)])
        assert got == data
        assert tally.totals() == {"peer": SIZE}
        # read again (dockerd resuming a layer): the blob is not counted twice
        await eventually(lambda: digest in r.cache)
        assert b"".join([c async for c in r.fetcher.open(want, 5, tally=tally)]) == data[5:]
        assert tally.totals() == {"peer": SIZE}

        # a blob fetched ahead of its reader counts where the prefetch got it, not as cache
        r.fetcher.prefetch(r.want(d_other, SIZE), tally=tally)
        await eventually(lambda: d_other in r.cache)
        assert await r.read(r.want(d_other, SIZE)) == other
        assert tally.totals() == {"peer": SIZE, "registry": SIZE}

        # a pull of the same plan that finds them in the cache counts where they came from
        # (this node fetched them for the plan: for a peer, or for another image's pull)
        same_plan = SourceTally()
        for d, n in ((digest, SIZE), (d_other, SIZE)):
            b"".join([c async for c in r.fetcher.open(r.want(d, n, nodes), tally=same_plan)])
        assert same_plan.totals() == {"peer": SIZE, "registry": SIZE}

        # a later plan finds both in the cache, and a third blob comes from the registry
        later = SourceTally()
        for d, n in ((digest, SIZE), (d_other, SIZE), (d_third, SIZE // 2)):
            want = r.want(d, n, plan="plan-2")
            b"".join([c async for c in r.fetcher.open(want, tally=later)])
        assert later.totals() == {"cache": 2 * SIZE, "registry": SIZE // 2}


async def test_a_stalled_peer_is_abandoned_after_the_stall_timeout(rig: RigFactory) -> None:
    async with rig(fanout=1, stall_s=0.2) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        parent = rank(digest, nodes)[0]
        r.transfers.fault(parent, "stall", after_bytes=50_000)
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        assert r.transfers.sent[parent] == 50_000
        assert r.fetcher.stats.source_failures["stalled"] == 1


async def test_wrong_bytes_are_never_served_complete_and_the_peer_is_avoided(
    rig: RigFactory,
) -> None:
    async with rig(fanout=1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        bad = rank(digest, nodes)[0]
        r.transfers.fault(bad, "corrupt", after_bytes=SIZE - 10)
        want = r.want(digest, SIZE, nodes)
        got = b""
        with pytest.raises(Restarted):
            async for chunk in r.fetcher.open(want):
                got += chunk
        assert len(got) < SIZE  # the reader never had a whole (wrong) blob
        # the download started over without the bad peer and finished from the registry
        assert await r.read(want) == data
        assert r.fetcher.avoided("plan-1") == {bad}
        assert r.fetcher.stats.verify_failures["peer"] == 1
        assert r.transfers.sent[""] == SIZE


async def test_an_avoided_peer_stays_avoided_for_the_plan(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        first, second = os.urandom(SIZE), os.urandom(SIZE)
        d1, d2 = r.transfers.publish(first), r.transfers.publish(second)
        nodes = peers_where(d1, me_rank=1)
        bad = rank(d1, nodes)[0]
        r.transfers.fault(bad, "corrupt")
        with pytest.raises(Restarted):
            await r.read(r.want(d1, SIZE, nodes))
        assert await r.read(r.want(d1, SIZE, nodes)) == first
        r.transfers.requests.clear()
        assert await r.read(r.want(d2, SIZE, nodes)) == second
        assert bad not in {s.node_id for s, _, _ in r.transfers.requests}


async def test_registry_failures_reach_the_readers_with_their_reason(rig: RigFactory) -> None:
    async with rig() as r:
        data = os.urandom(1000)
        digest = digest_of(data)  # never published
        with pytest.raises(PullError) as info:
            await r.read(r.want(digest, 1000))
        assert info.value.reason == MANIFEST_UNKNOWN
        assert digest not in r.cache and r.cache.used_bytes == 0

        digest = r.transfers.publish(data)
        r.transfers.fault("", "down")
        with pytest.raises(PullError) as info:
            await r.read(r.want(digest, 1000))
        assert info.value.reason == "registry unreachable" and info.value.transient


async def test_unauthorized_registry_is_not_retried_through_peers(rig: RigFactory) -> None:
    async with rig() as r:
        data = os.urandom(1000)
        digest = r.transfers.publish(data)
        r.transfers.give("0000000000000001", data)  # a holder exists, but asking is pointless
        original = r.transfers._lookup

        def lookup(source: Source, digest_: str) -> bytes:
            if source.is_registry:
                raise SourceError("upstream", "401", pull_error(UNAUTHORIZED, "HTTP 401"))
            return original(source, digest_)

        r.transfers._lookup = lookup  # type: ignore[method-assign]
        with pytest.raises(PullError) as info:
            await r.read(r.want(digest, 1000, peers_where(digest, me_rank=0)))
        assert info.value.reason == UNAUTHORIZED
        assert [s for s, _, _ in r.transfers.requests] == [REGISTRY]


async def test_no_space_is_raised_before_anything_is_fetched(rig: RigFactory) -> None:
    async with rig(cap=100_000) as r:
        digest = r.transfers.publish(os.urandom(SIZE))
        with pytest.raises(PullError) as info:
            r.fetcher.open(r.want(digest, SIZE))
        assert info.value.reason == NO_SPACE
        assert r.transfers.requests == []


async def test_a_request_that_would_loop_is_refused(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        r.transfers.delay_s = 0.01
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        parent = rank(digest, nodes)[0]
        reader = r.fetcher.open(r.want(digest, SIZE, nodes))
        await anext(reader)  # the download now reads from the parent
        assert r.fetcher.downloading(digest) is not None
        with pytest.raises(SourceError) as info:
            r.fetcher.open(r.want(digest, SIZE, nodes, chain=(parent,)))
        assert info.value.kind == "loop"
        rest = b"".join([c async for c in reader])
        assert len(rest) == SIZE - min(len(data), r.transfers.chunk_bytes)


async def test_dead_members_are_skipped_and_the_tree_rerooted(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        root = rank(digest, nodes)[0]
        r.down.add(root)  # membership says the root is dead: ME becomes the root
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        assert r.transfers.sent == {"": SIZE}


async def test_a_reader_joining_while_the_blob_is_renamed_into_place_gets_it(
    rig: RigFactory,
) -> None:
    async with rig() as r:
        data = os.urandom(500)
        digest = r.transfers.publish(data)
        renamed, release = threading.Event(), threading.Event()
        publish = r.cache._publish

        def slow_publish(partial: Partial) -> None:
            publish(partial)  # the partial file is gone from tmp/ now...
            renamed.set()
            release.wait(10)  # ...but the download has not said so yet

        r.cache._publish = slow_publish  # type: ignore[method-assign]
        want = r.want(digest, len(data))
        first = asyncio.create_task(r.read(want))
        await asyncio.to_thread(renamed.wait, 10)
        second = r.fetcher.open(want)  # joins the finishing download
        pending = asyncio.create_task(anext(second))
        await asyncio.sleep(0.05)
        assert not pending.done()  # waits for the download to say it is done
        release.set()
        got = await pending + b"".join([c async for c in second])
        assert got == data and await first == data


async def test_a_busy_parent_is_waited_for_not_replaced_by_the_registry(rig: RigFactory) -> None:
    async with rig(fanout=1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        parent = rank(digest, nodes)[0]
        r.transfers.fault(parent, "busy", times=3)
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        assert r.transfers.sent == {parent: SIZE}
        assert r.fetcher.stats.source_failures["busy"] == 3


async def test_a_parent_busy_for_too_long_is_passed_over(rig: RigFactory) -> None:
    async with rig(fanout=1, stall_s=0.1) as r:
        data = os.urandom(SIZE)
        digest = r.transfers.publish(data)
        nodes = peers_where(digest, me_rank=1)
        parent = rank(digest, nodes)[0]
        r.transfers.fault(parent, "busy")  # for good
        assert await r.read(r.want(digest, SIZE, nodes)) == data
        assert r.transfers.sent == {"": SIZE}


async def test_prefetch_fetches_once_and_readers_join_it(rig: RigFactory) -> None:
    async with rig() as r:
        r.transfers.delay_s = 0.002
        blobs = [os.urandom(50_000) for _ in range(12)]
        wants = [r.want(r.transfers.publish(b), len(b)) for b in blobs]
        for want in wants:
            r.fetcher.prefetch(want)
            r.fetcher.prefetch(want)  # twice: still one download
        assert await r.read(wants[-1]) == blobs[-1]  # joins or starts, never twice
        await eventually(lambda: all(w.digest in r.cache for w in wants), timeout_s=30)
        assert r.transfers.sent[""] == sum(len(b) for b in blobs)
        r.fetcher.prefetch(wants[0])  # cached: nothing to do
        assert r.transfers.sent[""] == sum(len(b) for b in blobs)


async def test_a_bug_in_a_source_fails_that_blob_not_the_fetcher(rig: RigFactory) -> None:
    async with rig() as r:
        broken, fine = os.urandom(1000), os.urandom(1000)
        d_broken, d_fine = r.transfers.publish(broken), r.transfers.publish(fine)
        original = r.transfers._lookup

        def lookup(source: Source, digest: str) -> bytes:
            if digest == d_broken:
                raise RuntimeError("a bug")
            return original(source, digest)

        r.transfers._lookup = lookup  # type: ignore[method-assign]
        with pytest.raises(PullError, match="internal error"):
            await r.read(r.want(d_broken, 1000))
        assert await r.read(r.want(d_fine, 1000)) == fine
