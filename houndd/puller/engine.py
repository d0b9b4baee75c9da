"""The container engine as the puller sees it: a small protocol, its value types and errors.

`DockerEngine` (docker.py) and `FakeEngine` (memory.py) implement `Engine`; one conformance
suite (tests/puller/test_conformance.py) runs against both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from houndd.image.credentials import RegistryAuth
from houndd.image.trust import RegistryTrust

__all__ = ["ByteSources", "Engine", "EngineInfo", "PruneReport", "PullProgress"]


@dataclass(frozen=True)
class EngineInfo:
    """What a node reports about its engine (the NIDB columns)."""

    server_version: str
    kernel: str
    os: str
    free_disk_bytes: int | None  # None when the engine's disk is not local to this process
    images: int
    # which registries the engine reaches over plain HTTP (or unverified TLS)
    registry_trust: RegistryTrust = field(default_factory=RegistryTrust)


@dataclass(frozen=True)
class ByteSources:
    """Where the bytes of one pull came from: the registry, peers (blob sharing), or this
    node's blob cache. Each blob counts once, by where this node got it."""

    registry: int = 0
    peers: int = 0
    cache: int = 0


@dataclass(frozen=True)
class PullProgress:
    """Progress of one image pull, aggregated over its layers.

    `bytes_total` grows as the engine learns layer sizes; it is 0 until the first is known.
    `sources` says where the bytes came from when a `PullRoute` carried them; None for a
    direct engine pull, whose every byte came from the registry. `fetching` names the layers
    the engine said it will download (it lacks them), by the short id Docker shows: the first
    12 hex digits of the blob's sha256; a route may fetch them ahead of the engine.
    """

    bytes_done: int
    bytes_total: int
    layers_done: int
    layers_total: int
    sources: ByteSources | None = None
    fetching: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PruneReport:
    """Result of pruning unused (dangling) images."""

    deleted: list[str]
    space_reclaimed_bytes: int


class Engine(Protocol):
    """A container engine on this node. Every failure is a `PullError` with a stable reason."""

    async def info(self) -> EngineInfo:
        """Versions, free disk and image count."""
        ...

    async def free_disk(self) -> int | None:
        """Free bytes on the engine's disk, as `info().free_disk_bytes` (None when that disk
        is not local to this process), but cheap: every plan's admission asks each target."""
        ...

    async def has_image(self, ref: str) -> str | None:
        """The digest of the local image `ref` (`repo:tag` or `repo@digest`) if present.

        The repository digest when the engine knows one for that repository, else the image
        id (both `sha256:...`); None when no such image is present.
        """
        ...

    async def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | None,
        progress: Callable[[PullProgress], None],
    ) -> None:
        """Pull `ref` from its registry, calling `progress` as layers advance."""
        ...

    async def tag(self, source: str, target: str) -> None:
        """Give the local image `source` the name `target` (`repo:tag`)."""
        ...

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """Remove the local name `ref` (and the image once nothing names it). Idempotent:
        removing an absent image succeeds."""
        ...

    async def prune(self) -> PruneReport:
        """Delete dangling (untagged, unused) images, like `docker image prune`."""
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...
