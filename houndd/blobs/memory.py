"""`MemoryTransfers`: an in-memory `Transfers` with a registry, peers and injectable faults.

For unit tests of the fetcher and for simulation. Semantics follow `NetworkTransfers`: the
registry serves what it holds (unknown: "manifest unknown"); a peer asked for a complete copy
serves only what it holds (else `not_held`); a peer asked to pull through serves what it
holds or, failing that, what the registry holds, as a real parent would after fetching it.
Faults per source: `corrupt` (flips bytes after an offset), `die` (the connection breaks
after some bytes), `stall` (stops sending after some bytes, until cancelled), `busy`, `down`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

from houndd.blobs.source import BlobWant, SourceError
from houndd.blobs.tree import Source
from houndd.errors import MANIFEST_UNKNOWN, pull_error

__all__ = ["Fault", "MemoryTransfers", "digest_of"]

FaultKind = Literal["corrupt", "die", "stall", "busy", "down"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    kind: FaultKind
    after_bytes: int = 0
    times: int | None = None  # None: every transfer from this source


@dataclass
class MemoryTransfers:
    """Blobs held by the registry (`registry`) and by peers (`peers[node_id]`)."""

    chunk_bytes: int = 1 << 14
    delay_s: float = 0.0  # per chunk: makes transfers overlap in tests
    registry: dict[str, bytes] = field(default_factory=dict)
    peers: dict[str, dict[str, bytes]] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)  # by node id; "" is the registry
    sent: Counter[str] = field(default_factory=Counter)  # bytes sent, by node id ("" registry)
    requests: list[tuple[Source, str, int]] = field(default_factory=list)

    def publish(self, data: bytes) -> str:
        """Put a blob in the registry; return its digest."""
        digest = digest_of(data)
        self.registry[digest] = data
        return digest

    def give(self, node_id: str, data: bytes) -> str:
        """A peer holds a complete copy."""
        digest = digest_of(data)
        self.peers.setdefault(node_id, {})[digest] = data
        return digest

    def fault(
        self, node_id: str, kind: FaultKind, after_bytes: int = 0, times: int | None = None
    ) -> None:
        self.faults[node_id] = Fault(kind, after_bytes, times)

    def open(self, source: Source, want: BlobWant, offset: int) -> AsyncGenerator[bytes, None]:
        self.requests.append((source, want.digest, offset))
        return self._stream(source, want, offset)

    def _take_fault(self, key: str) -> Fault | None:
        fault = self.faults.get(key)
        if fault is None:
            return None
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[key]
        return fault

    async def _stream(
        self, source: Source, want: BlobWant, offset: int
    ) -> AsyncGenerator[bytes, None]:
        key = source.node_id
        fault = self._take_fault(key)
        if fault is not None and fault.kind == "down":
            raise SourceError("unreachable", f"{key or 'registry'} is down")
        if fault is not None and fault.kind == "busy":
            raise SourceError("busy", f"{key} is at its upload limit")
        data = self._lookup(source, want.digest)
        pos = offset
        while pos < len(data):
            chunk = data[pos : pos + self.chunk_bytes]
            if fault is not None and pos + len(chunk) > fault.after_bytes:
                cut = max(0, fault.after_bytes - pos)
                if fault.kind == "corrupt":
                    chunk = chunk[:cut] + bytes(b ^ 0xFF for b in chunk[cut:])
                elif cut:
                    chunk = chunk[:cut]
                elif fault.kind == "die":
                    raise SourceError("unreachable", f"{key or 'registry'} died mid-transfer")
                else:  # stall: hold the connection open and send nothing more
                    await asyncio.Event().wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.sent[key] += len(chunk)
            pos += len(chunk)
            yield chunk

    def _lookup(self, source: Source, digest: str) -> bytes:
        if source.is_registry:
            if digest not in self.registry:
                error = pull_error(MANIFEST_UNKNOWN, f"blob {digest} unknown")
                raise SourceError("upstream", str(error), error)
            return self.registry[digest]
        held = self.peers.get(source.node_id, {}).get(digest)
        if held is not None:
            return held
        if source.through and digest in self.registry:
            return self.registry[digest]
        if source.through:
            raise SourceError("upstream", f"{source.node_id} could not fetch {digest}")
        raise SourceError("not_held", f"{source.node_id} holds no complete {digest}")
