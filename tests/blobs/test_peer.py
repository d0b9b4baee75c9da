"""The peer blob endpoint over real HTTP: only members get bytes, replays are refused, the
upload limit holds, and a peer that lies or dies costs time, never the blob."""

from __future__ import annotations

import asyncio
import os
import uuid

import aiohttp
import pytest

from houndd.blobs.memory import digest_of as blob_digest
from houndd.blobs.peer import PeerClient, UploadLimiter
from houndd.blobs.protocol import BlobRequest
from houndd.blobs.source import BlobContext, BlobWant
from houndd.blobs.tree import Source, rank
from houndd.wire import Keyring, MsgType, NodeIdentity, Wire, schema
from tests.blobs.net import BlobNet, BlobNode
from tests.fixtures.images import push_blob
from tests.fixtures.services import Registry
from tests.puller.waiting import eventually

pytestmark = pytest.mark.docker

IMAGE = "sha256:" + "6" * 64
SIZE = 1_500_000


@pytest.fixture
def repo() -> str:
    return f"peer/{uuid.uuid4().hex[:10]}"


def ctx_for(registry: Registry, repo: str, nodes: tuple[str, ...], plan: str = "p1") -> BlobContext:
    return BlobContext(plan, f"{registry.address}/{repo}", IMAGE, nodes)


def sealed_request(wire: Wire, want: BlobWant, *, through: bool = False) -> bytes:
    req = PeerClient(wire, lambda _: None, connect_timeout_s=1).request_for(
        Source("x", through=through), want, 0, os.urandom(32)
    )
    return wire.seal(MsgType.BLOB_GET, schema.encode(req), __import__("time").time())


async def post(node: BlobNode, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(node.url, data=body) as resp:
        return resp.status, await resp.read()


async def test_only_members_get_bytes_and_replays_are_refused(
    net: BlobNet, registry: Registry, repo: str
) -> None:
    server = await net.add()
    data = os.urandom(10_000)
    digest = await asyncio.to_thread(push_blob, registry.url, repo, data)
    await server.give(data, digest)
    member = Wire(
        cluster_id="blob-test", keyring=net.keyring, identity=NodeIdentity.generate(), boot_epoch=1
    )
    outsider = Wire(
        cluster_id="blob-test",
        keyring=Keyring.generate(),
        identity=NodeIdentity.generate(),
        boot_epoch=1,
    )
    want = BlobWant(ctx_for(registry, repo, (server.node_id,)), digest, len(data))

    status, body = await post(server, b"garbage" * 10)
    assert status == 403 and data not in body
    status, body = await post(server, sealed_request(outsider, want))
    assert status == 403 and b"unknown_key" in body
    ping = member.seal(MsgType.PING, {"x": 1}, __import__("time").time())
    status, _ = await post(server, ping)
    assert status == 400

    good = sealed_request(member, want)
    status, body = await post(server, good)
    assert status == 200 and len(body) > len(data)  # encrypted frames: never the plain blob
    assert data[:64] not in body
    status, body = await post(server, good)  # the same bytes again: a replay
    assert status == 401 and b"replay" in body
    assert server.wire.refused["replay_duplicate"] == 1


async def test_bad_fields_of_a_member_are_a_clear_400(
    net: BlobNet, registry: Registry, repo: str
) -> None:
    server = await net.add()
    member = Wire(
        cluster_id="blob-test", keyring=net.keyring, identity=NodeIdentity.generate(), boot_epoch=1
    )
    import time

    for payload in (
        {"digest": "sha256:" + "1" * 64},  # missing fields
        {**schema.encode(BlobRequest(
            digest="sha256:" + "1" * 64, size=10, offset=10, through=False, plan="p",
            name=f"{registry.address}/{repo}", image=IMAGE, nodes=(), chain=(), key=bytes(32),
        )), "offset": 11},  # offset past the end
    ):  # fmt: skip
        status, body = await post(server, member.seal(MsgType.BLOB_GET, payload, time.time()))
        assert status == 400, body
    # and the node still serves
    data = os.urandom(1000)
    digest = await asyncio.to_thread(push_blob, registry.url, repo, data)
    client = PeerClient(member, net.address_of, connect_timeout_s=1)
    try:
        want = BlobWant(ctx_for(registry, repo, (server.node_id,)), digest, len(data))
        got = b"".join([c async for c in client.stream(Source(server.node_id, True), want, 0)])
        assert got == data
    finally:
        await client.close()


async def test_uploads_beyond_the_limit_are_turned_away(
    net: BlobNet, registry: Registry, repo: str
) -> None:
    net.max_uploads = 1
    net.upload_rate_bytes_per_s = 2_000_000  # slow enough that the first upload is in flight
    server = await net.add()
    asker = await net.add()
    data = os.urandom(SIZE)
    digest = await asyncio.to_thread(push_blob, registry.url, repo, data)
    await server.give(data, digest)
    want = BlobWant(ctx_for(registry, repo, (server.node_id, asker.node_id)), digest, SIZE)
    first = asker.client.stream(Source(server.node_id), want, 0)
    got = await anext(first)
    assert server.limiter.active == 1
    status, body = await post(server, sealed_request(asker.wire, want))
    assert status == 503 and b"busy" in body
    got += b"".join([c async for c in first])
    assert got == data
    assert server.limiter.active == 0


async def test_a_lying_peer_is_caught_avoided_and_the_blob_fetched_elsewhere(
    net: BlobNet, registry: Registry, repo: str
) -> None:
    liar = await net.add(fanout=1)
    honest = await net.add(fanout=1)
    nodes = (liar.node_id, honest.node_id)
    data = os.urandom(SIZE)
    while rank(blob_digest(data), nodes)[0] != liar.node_id:  # the liar must be the root
        data = os.urandom(SIZE)
    digest = await asyncio.to_thread(push_blob, registry.url, repo, data)
    # The liar holds wrong bytes under the digest (as a buggy or hostile member would).
    (liar.cache.root / "sha256" / digest.split(":")[1]).write_bytes(os.urandom(SIZE))
    liar.cache.open()
    want = BlobWant(ctx_for(registry, repo, nodes), digest, SIZE)
    first = b""
    with pytest.raises(Exception):  # noqa: B017 - the reader sees the restart, any kind
        async for chunk in honest.fetcher.open(want):
            first += chunk
    assert len(first) < SIZE
    again = b"".join([c async for c in honest.fetcher.open(want)])
    assert again == data
    assert honest.fetcher.avoided("p1") == {liar.node_id}
    assert honest.fetcher.stats.verify_failures["peer"] == 1
    assert honest.fetcher.stats.fetched_bytes["registry"] == SIZE


async def test_a_peer_that_dies_mid_blob_costs_no_item(
    net: BlobNet, registry: Registry, repo: str
) -> None:
    net.upload_rate_bytes_per_s = 1_000_000
    parent = await net.add(fanout=1)
    child = await net.add(fanout=1)
    nodes = (parent.node_id, child.node_id)
    data = os.urandom(SIZE)
    while rank(blob_digest(data), nodes)[0] != parent.node_id:
        data = os.urandom(SIZE)
    digest = await asyncio.to_thread(push_blob, registry.url, repo, data)
    await parent.give(data, digest)
    want = BlobWant(ctx_for(registry, repo, nodes), digest, SIZE)
    reader = child.fetcher.open(want)
    got = await anext(reader)
    # 1 MB/s upload cap: a fifth of the blob takes about 0.2 s
    await eventually(lambda: child.fetcher.stats.fetched_bytes["peer"] >= 200_000, timeout_s=30)
    await net.stop(parent, abrupt=True)
    net.down.add(parent.node_id)
    got += b"".join([c async for c in reader])
    assert got == data
    fetched = child.fetcher.stats.fetched_bytes
    assert fetched["peer"] + fetched["registry"] == SIZE  # resumed, not restarted
    assert 0 < fetched["registry"] < SIZE


async def test_rate_cap_paces_uploads() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = UploadLimiter(4, 1_000_000, monotonic=lambda: now[0], sleep=fake_sleep)
    for _ in range(40):
        await limiter.pace(100_000)  # 4 MB at 1 MB/s
    assert 3.5 <= now[0] <= 4.0  # the first 1/4 s is burst
    assert limiter.try_acquire() and limiter.try_acquire()
    assert limiter.active == 2
    unlimited = UploadLimiter(1, 0, sleep=fake_sleep)
    before = len(slept)
    await unlimited.pace(10**9)
    assert len(slept) == before
