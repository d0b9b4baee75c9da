"""`LocalExecutor`: how the coordinator side reaches the puller of its own node.

The coordinator package owns this small protocol and never imports `houndd.puller`; the
daemon adapts the puller's `Executor` (and its engine) to it. Work goes in as `LocalWork`;
what the executor reports comes back through the dispatch runtime as an `ItemResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from houndd.coordinator.plan import PlanAction, PullPolicy
from houndd.image.credentials import RegistryAuth


@dataclass(frozen=True)
class LocalWork:
    """One dispatched item for this node's executor."""

    op: PlanAction
    image: str
    digest: str
    attempt: int
    timeout_s: float
    pull_policy: PullPolicy
    auth: RegistryAuth | None  # its repr hides the password
    peers: tuple[str, ...] = ()  # node ids needing the same digest in this plan (blob sharing)


class LocalExecutor(Protocol):
    """This node's executor and image store, as the coordinator side needs them."""

    def submit(
        self, plan_id: str, items: Sequence[LocalWork], *, per_node_parallelism: int
    ) -> None:
        """Run `items` of a plan (deduplicated by the executor); reports follow."""
        ...

    def abort(self, plan_id: str, images: Sequence[str] | None = None) -> None:
        """Stop `images` of a plan (None: all of it)."""
        ...

    def forget(self, plan_id: str) -> None:
        """Drop what is remembered about a finished plan."""
        ...

    async def has_image(self, ref: str) -> str | None:
        """The local digest of `ref` if the image is present."""
        ...

    async def free_disk_bytes(self) -> int | None:
        """Free space on the engine's disk now (None: unknown, e.g. a remote engine)."""
        ...
