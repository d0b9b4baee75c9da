"""Fixtures for the blob tests: a fetcher over in-memory transfers, started and stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from houndd.blobs.cache import BlobCache
from houndd.blobs.fetcher import Fetcher
from houndd.blobs.memory import MemoryTransfers
from houndd.blobs.source import BlobContext, BlobWant
from tests.blobs.net import BlobNet
from tests.fixtures.services import Registry

ME = "00000000000000aa"
IMAGE = "sha256:" + "9" * 64


@dataclass
class FetcherRig:
    fetcher: Fetcher
    transfers: MemoryTransfers
    cache: BlobCache
    down: set[str]

    def want(
        self,
        digest: str,
        size: int,
        nodes: tuple[str, ...] = (ME,),
        plan: str = "plan-1",
        chain: tuple[str, ...] = (),
    ) -> BlobWant:
        ctx = BlobContext(plan, "127.0.0.1:5000/app/x", IMAGE, nodes)
        return BlobWant(ctx, digest, size, chain)

    async def read(self, want: BlobWant, offset: int = 0) -> bytes:
        return b"".join([c async for c in self.fetcher.open(want, offset)])


RigFactory = Callable[..., contextlib.AbstractAsyncContextManager[FetcherRig]]


@pytest.fixture
def rig(tmp_path: Path) -> RigFactory:
    """`async with rig(**options) as r`: a running fetcher for node ME."""

    @contextlib.asynccontextmanager
    async def make(
        *, cap: int = 64 << 20, stall_s: float = 5.0, fanout: int = 2, chunk: int = 1 << 14
    ) -> AsyncIterator[FetcherRig]:
        cache = BlobCache(tmp_path / f"cache-{id(make)}", cap_bytes=cap)
        cache.open()
        transfers = MemoryTransfers(chunk_bytes=chunk)
        down: set[str] = set()
        fetcher = Fetcher(
            cache,
            transfers,
            node_id=ME,
            fanout=fanout,
            stall_timeout_s=stall_s,
            usable=lambda n: n not in down,
        )
        task = asyncio.create_task(fetcher.run())
        await asyncio.sleep(0)
        try:
            yield FetcherRig(fetcher, transfers, cache, down)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return make


@pytest.fixture
async def net(tmp_path: Path, registry: Registry) -> AsyncIterator[BlobNet]:
    """In-process blob nodes on loopback over the session's docker-registry."""
    blob_net = BlobNet(tmp_path, insecure=(registry.address,), stall_s=2.0)
    try:
        yield blob_net
    finally:
        await blob_net.close()
