"""One behaviour, two implementations: the same tests against `MemoryTransfers` and the real
`NetworkTransfers` (a docker-registry, and a peer blob endpoint over HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from houndd.blobs.memory import MemoryTransfers
from houndd.blobs.source import BlobContext, BlobWant, NetworkTransfers, SourceError, Transfers
from houndd.blobs.tree import REGISTRY, Source
from houndd.errors import MANIFEST_UNKNOWN
from tests.blobs.net import BlobNet
from tests.fixtures.images import push_blob
from tests.fixtures.services import Registry

IMAGE = "sha256:" + "5" * 64
SIZE = 300_000


@dataclass
class Backend:
    transfers: Transfers
    ctx: BlobContext
    peer: str  # a peer that answers requests
    gone: str  # a member that cannot be reached
    publish: Callable[[bytes], Awaitable[str]]  # into the registry
    give: Callable[[bytes], Awaitable[str]]  # a complete copy at `peer`

    def want(self, digest: str, size: int) -> BlobWant:
        return BlobWant(self.ctx, digest, size)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["memory", pytest.param("network", marks=pytest.mark.docker)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        fake = MemoryTransfers()

        async def publish_fake(data: bytes) -> str:
            return fake.publish(data)

        async def give_fake(data: bytes) -> str:
            return fake.give("00000000000000b1", data)

        fake.fault("00000000000000c1", "down")
        ctx = BlobContext("p", "registry.test:5000/app/x", IMAGE, ("00000000000000b1",))
        yield Backend(fake, ctx, "00000000000000b1", "00000000000000c1", publish_fake, give_fake)
        return
    registry: Registry = request.getfixturevalue("registry")
    net = BlobNet(tmp_path, insecure=(registry.address,))
    repo = f"conformance/{uuid.uuid4().hex[:10]}"
    try:
        asker = await net.add()
        peer = await net.add()
        gone = await net.add()
        await net.stop(gone)

        async def publish_real(data: bytes) -> str:
            return await asyncio.to_thread(push_blob, registry.url, repo, data)

        async def give_real(data: bytes) -> str:
            digest = _digest(data)
            await peer.give(data, digest)
            return digest

        transfers = NetworkTransfers(asker.registry, asker.client)
        ctx = BlobContext("p", f"{registry.address}/{repo}", IMAGE, (asker.node_id, peer.node_id))
        yield Backend(transfers, ctx, peer.node_id, gone.node_id, publish_real, give_real)
    finally:
        await net.close()


async def _read(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in stream])


async def test_registry_serves_from_any_offset(backend: Backend) -> None:
    data = os.urandom(SIZE)
    digest = await backend.publish(data)
    want = backend.want(digest, SIZE)
    assert await _read(backend.transfers.open(REGISTRY, want, 0)) == data
    assert await _read(backend.transfers.open(REGISTRY, want, 123_457)) == data[123_457:]


async def test_registry_unknown_blob_is_manifest_unknown(backend: Backend) -> None:
    await backend.publish(os.urandom(100))  # the repository exists
    data = os.urandom(100)
    with pytest.raises(SourceError) as info:
        await _read(backend.transfers.open(REGISTRY, backend.want(_digest(data), 100), 0))
    assert info.value.kind == "upstream"
    assert info.value.error is not None and info.value.error.reason == MANIFEST_UNKNOWN


async def test_peer_without_a_complete_copy_says_not_held(backend: Backend) -> None:
    data = os.urandom(1000)
    digest = await backend.publish(data)
    with pytest.raises(SourceError) as info:
        await _read(backend.transfers.open(Source(backend.peer), backend.want(digest, 1000), 0))
    assert info.value.kind == "not_held"


async def test_peer_serves_its_complete_copy_from_any_offset(backend: Backend) -> None:
    data = os.urandom(SIZE)
    digest = await backend.give(data)
    want = backend.want(digest, SIZE)
    assert await _read(backend.transfers.open(Source(backend.peer), want, 0)) == data
    assert await _read(backend.transfers.open(Source(backend.peer), want, SIZE - 1)) == data[-1:]


async def test_peer_pulls_through_what_it_does_not_hold(backend: Backend) -> None:
    data = os.urandom(SIZE)
    digest = await backend.publish(data)
    source = Source(backend.peer, through=True)
    assert (
        await _read(backend.transfers.open(source, backend.want(digest, SIZE), 1000)) == data[1000:]
    )


async def test_unreachable_peer_is_unreachable(backend: Backend) -> None:
    data = os.urandom(100)
    digest = await backend.publish(data)
    with pytest.raises(SourceError) as info:
        await _read(backend.transfers.open(Source(backend.gone), backend.want(digest, 100), 0))
    assert info.value.kind == "unreachable"
