"""In-process blob nodes on loopback: each with its own cache, fetcher and a real HTTP peer
blob endpoint, all on one cluster keyring, pulling from a real docker-registry.

Used by the conformance suite (the network side) and the peer endpoint tests. Plain asyncio;
`BlobNet.close()` stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from houndd import config as houndd_config
from houndd.blobs.cache import BlobCache
from houndd.blobs.fetcher import Fetcher
from houndd.blobs.loopback import LoopbackRegistry
from houndd.blobs.peer import PEER_BLOB_PATH, PeerBlobServer, PeerClient, UploadLimiter
from houndd.blobs.route import LoopbackRoute
from houndd.blobs.source import NetworkTransfers
from houndd.image.registry import RegistryClient
from houndd.puller.docker import DockerEngine
from houndd.wire import Keyring, NodeIdentity, Wire


@dataclass
class BlobNode:
    node_id: str
    wire: Wire
    cache: BlobCache
    fetcher: Fetcher
    client: PeerClient
    registry: RegistryClient
    limiter: UploadLimiter
    server: PeerBlobServer
    port: int = 0
    runner: web.AppRunner | None = None
    task: asyncio.Task[None] | None = None
    loopback: LoopbackRegistry | None = None
    engine: DockerEngine | None = None
    route: LoopbackRoute | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PEER_BLOB_PATH}"

    async def give(self, data: bytes, digest: str) -> None:
        """Put a complete blob in this node's cache."""
        partial = self.cache.begin(digest, len(data))
        partial.write(data)
        await partial.commit()


@dataclass
class BlobNet:
    root: Path
    insecure: tuple[str, ...] = ()
    keyring: Keyring = field(default_factory=Keyring.generate)
    nodes: dict[str, BlobNode] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    stall_s: float = 3.0
    max_uploads: int = 8
    upload_rate_bytes_per_s: float = 0.0

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        node = self.nodes.get(node_id)
        return ("127.0.0.1", node.port) if node is not None else None

    def usable(self, node_id: str) -> bool:
        return node_id in self.nodes and node_id not in self.down

    async def add(
        self,
        *,
        keyring: Keyring | None = None,
        fanout: int = 2,
        docker_host: str | None = None,
        cap_bytes: int = 256 << 20,
    ) -> BlobNode:
        """A node; with `docker_host`, also a loopback registry and a route for that dockerd."""
        wire = Wire(
            cluster_id="blob-test",
            keyring=keyring or self.keyring,
            identity=NodeIdentity.generate(),
            boot_epoch=1,
        )
        cache = BlobCache(self.root / wire.node_id, cap_bytes=cap_bytes)
        cache.open()
        registry = RegistryClient(aiohttp.ClientSession, insecure_registries=self.insecure)
        client = PeerClient(wire, self.address_of, connect_timeout_s=2.0)
        fetcher = Fetcher(
            cache,
            NetworkTransfers(registry, client),
            node_id=wire.node_id,
            fanout=fanout,
            stall_timeout_s=self.stall_s,
            usable=self.usable,
        )
        limiter = UploadLimiter(self.max_uploads, self.upload_rate_bytes_per_s)
        cfg = houndd_config.local()
        server = PeerBlobServer(fetcher, wire, limiter, max_request_bytes=cfg.max_http_body_bytes)
        node = BlobNode(wire.node_id, wire, cache, fetcher, client, registry, limiter, server)
        app = web.Application()
        app.router.add_post(PEER_BLOB_PATH, server.handle)
        node.runner = web.AppRunner(app, access_log=None)
        await node.runner.setup()
        site = web.TCPSite(node.runner, "127.0.0.1", 0)
        await site.start()
        node.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node.task = asyncio.create_task(fetcher.run())
        self.nodes[node.node_id] = node
        if docker_host is not None:
            node.loopback = LoopbackRegistry(fetcher, registry, cache)
            await node.loopback.start()
            node.engine = DockerEngine(docker_host)
            node.route = LoopbackRoute(node.engine, node.loopback)
        return node

    async def stop(self, node: BlobNode, *, abrupt: bool = False) -> None:
        """The node goes away (its server closes, its downloads stop). `abrupt`: as if
        killed, open connections are reset instead of finished."""
        if abrupt and node.runner is not None and node.runner.server is not None:
            for handler in list(node.runner.server.connections):
                if handler.transport is not None:
                    handler.transport.abort()
        if node.runner is not None:
            await node.runner.cleanup()
            node.runner = None
        if node.task is not None:
            node.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node.task
            node.task = None

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            await self.stop(node)
            if node.loopback is not None:
                await node.loopback.close()
            if node.engine is not None:
                await node.engine.close()
            await node.client.close()
            await node.registry.close()
