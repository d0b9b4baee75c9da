"""What a blob transfer needs to know, and the `Transfers` protocol that moves its bytes.

`NetworkTransfers` (here) reaches the registry (`RegistryClient.stream_blob`) and peers
(`PeerClient`); `MemoryTransfers` (memory.py) is the in-memory fake with injectable faults.
One conformance suite (tests/blobs/test_transfers_conformance.py) runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from houndd.blobs.tree import Source
from houndd.errors import HounddError, PullError
from houndd.image.credentials import RegistryAuth

if TYPE_CHECKING:
    from houndd.blobs.peer import PeerClient
    from houndd.image.registry import RegistryClient

__all__ = ["BlobContext", "BlobWant", "NetworkTransfers", "SourceError", "Transfers"]

SourceFailure = Literal[
    "unreachable",  # could not connect, or the connection broke
    "stalled",  # no bytes for blob_stall_timeout_s
    "not_held",  # a peer asked for a complete copy has none
    "busy",  # a peer is at its upload limit
    "loop",  # a peer would have to ask us back
    "refused",  # a peer refused the request (authentication, bad request)
    "corrupt",  # bytes that cannot be right (too many, undecryptable)
    "upstream",  # the registry (or a peer's fetch from it) failed: `error` says how
]


@dataclass(frozen=True)
class BlobContext:
    """Why blobs are wanted: the image they belong to and the plan that needs it."""

    plan_id: str
    name: str  # the image's repository at its origin, `registry/repository`
    image: str  # the manifest (or index) digest being pulled
    nodes: tuple[str, ...]  # node ids that need the image: the members of each blob's tree
    auth: RegistryAuth | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BlobWant:
    """One blob of a context. `chain` lists nodes that wait on this transfer (a peer's
    pull-through request): they are never asked for it, or requests could go round."""

    ctx: BlobContext
    digest: str
    size: int
    chain: tuple[str, ...] = ()


class SourceError(HounddError):
    """A source could not deliver (part of) a blob; the fetcher moves on to the next one.
    `error` carries the registry's own failure (unauthorized, manifest unknown, ...)."""

    def __init__(self, kind: SourceFailure, detail: str, error: PullError | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.error = error


class Transfers(Protocol):
    """Opens a byte stream of one blob from one source, starting at `offset`.

    The stream yields the blob's bytes from `offset` on, possibly fewer than the rest (a
    stream that ends early is a failed transfer the caller resumes elsewhere). Failures are
    `SourceError`, raised when the stream is first read or at any later point.
    """

    def open(self, source: Source, want: BlobWant, offset: int) -> AsyncGenerator[bytes, None]: ...


class NetworkTransfers:
    """`Transfers` over the network: the registry with the context's credentials (or the
    node's Docker config), peers through the authenticated peer blob endpoint."""

    def __init__(self, registry: RegistryClient, peers: PeerClient) -> None:
        self._registry = registry
        self._peers = peers

    def open(self, source: Source, want: BlobWant, offset: int) -> AsyncGenerator[bytes, None]:
        if source.is_registry:
            return self._from_registry(want, offset)
        return self._peers.stream(source, want, offset)

    async def _from_registry(self, want: BlobWant, offset: int) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._registry.stream_blob(
                want.ctx.name, want.digest, auth=want.ctx.auth, offset=offset
            ):
                yield chunk
        except PullError as e:
            raise SourceError("upstream", str(e), e) from None
