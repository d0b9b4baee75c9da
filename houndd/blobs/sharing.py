"""`BlobSharing`: the blob layer of one node, assembled (cache, fetcher, loopback registry,
peer endpoint and client, the executor's pull route)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from houndd.blobs.cache import BlobCache
from houndd.blobs.fetcher import BlobStats, Fetcher
from houndd.blobs.loopback import LoopbackRegistry
from houndd.blobs.peer import Address, PeerBlobServer, PeerClient, UploadLimiter
from houndd.blobs.route import LoopbackRoute
from houndd.blobs.source import NetworkTransfers
from houndd.config import Config
from houndd.image.registry import RegistryClient
from houndd.puller.engine import Engine
from houndd.wire import Wire

__all__ = ["BlobSharing"]

log = logging.getLogger("houndd.blobs")


class BlobSharing:
    """Constructor does no IO; `start()` opens the cache and binds the loopback registry,
    `run()` runs downloads until cancelled, `close()` stops serving (idempotent)."""

    def __init__(
        self,
        config: Config,
        *,
        wire: Wire,
        engine: Engine,
        registry: RegistryClient,
        address_of: Callable[[str], Address | None],
        usable: Callable[[str], bool],
        on_pull: Callable[[], None] | None = None,
    ) -> None:
        self.stats = BlobStats()
        self.cache = BlobCache(
            Path(config.state_dir) / "blobs",
            cap_bytes=config.blob_cache_bytes,
            disk_reserve_bytes=config.blob_disk_reserve_bytes,
        )
        self.peers = PeerClient(
            wire,
            address_of,
            connect_timeout_s=config.peer_request_timeout_s,
            scheme="https" if config.tls_cert_file else "http",
        )
        self.fetcher = Fetcher(
            self.cache,
            NetworkTransfers(registry, self.peers),
            node_id=wire.node_id,
            fanout=config.blob_fanout,
            stall_timeout_s=config.blob_stall_timeout_s,
            usable=usable,
            stats=self.stats,
        )
        self.limiter = UploadLimiter(
            config.blob_max_uploads, config.blob_upload_limit_mbit * 1e6 / 8
        )
        self.server = PeerBlobServer(
            self.fetcher, wire, self.limiter, max_request_bytes=config.max_http_body_bytes
        )
        self.loopback = LoopbackRegistry(
            self.fetcher, registry, self.cache, port=config.blob_loopback_port
        )
        self.route = LoopbackRoute(engine, self.loopback, on_pull=on_pull)

    async def start(self) -> None:
        await asyncio.to_thread(self.cache.open)
        await self.loopback.start()

    async def run(self) -> None:
        await self.fetcher.run()

    async def handle_peer(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/peer/blob`."""
        return await self.server.handle(request)

    async def close(self) -> None:
        await self.loopback.close()
        await self.peers.close()
