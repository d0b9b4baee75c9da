"""The per node x image result lattice.

Results are owned by the node that executes them, but copies travel through several nodes
(worker -> coordinator -> every replica, plus anti-entropy in both directions of a healed
partition). `merge` is therefore a join on a total order: the result with the larger sort key
wins. A join over a total order is commutative, associative and idempotent, so replicas converge
whatever order, duplication or grouping the copies arrive in.

Order, most significant first:

0. `done` is absorbing: a successful pull is a fact about the node's disk, so it outranks any
   report about another attempt (a new coordinator restored from a lagging replica may number
   a re-dispatch lower than a failure it has not heard of yet; the worker's "done" must still win,
   or a node could be asked to pull the image again).
1. `attempt`: a retry (attempt n+1) supersedes anything reported about attempt n.
2. state rank: pending < pulling < terminal (done, failed, cancelled).
3. among terminal states of one attempt: done > failed > cancelled. A pull that really finished
   outranks a cancel or a "node unavailable" verdict issued concurrently by a coordinator.
4. `transient=False` > `transient=True`: a coordinator's final verdict outranks the worker's
   "this attempt failed, may be retried" report of the same attempt.
5. progress (`bytes_done`, then the bytes by source, which only grow within an attempt), then
   every remaining field, only so that two different values never tie (a tie between different
   values would break commutativity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from houndd.wire import schema
from houndd.wire.fields import Counter, Digest, ShortText, Text, Timestamp


class ItemState(StrEnum):
    """Lifecycle of one image on one node within one plan."""

    PENDING = "pending"
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_RANK = {
    ItemState.PENDING: 0,
    ItemState.PULLING: 1,
    ItemState.CANCELLED: 2,
    ItemState.FAILED: 2,
    ItemState.DONE: 2,
}
_TERMINAL_ORDER = {
    ItemState.PENDING: 0,
    ItemState.PULLING: 0,
    ItemState.CANCELLED: 1,
    ItemState.FAILED: 2,
    ItemState.DONE: 3,
}


def _opt(x: float | None) -> tuple[int, float]:
    return (0, 0.0) if x is None else (1, x)


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What is known about one (plan, node, image).

    `transient` marks a failed attempt that the coordinator may still retry; an item is final
    once it is done, cancelled, or failed with `transient=False` (see `is_final`).
    """

    state: ItemState = ItemState.PENDING
    attempt: Counter = 0
    digest: Digest = ""
    bytes_done: Counter = 0
    bytes_total: Counter = 0
    reason: ShortText = ""
    detail: Text = ""
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    skipped: bool = False
    transient: bool = False
    # where the node got the bytes: the registry, peers, its blob cache (blob sharing)
    bytes_registry: Counter = 0
    bytes_peers: Counter = 0
    bytes_cache: Counter = 0

    def __post_init__(self) -> None:
        # NaN has no place in a total order; reject it rather than break the lattice.
        for value in (self.started_at, self.finished_at):
            if value is not None and math.isnan(value):
                raise ValueError("ItemResult timestamps must not be NaN")
        counters = (self.attempt, self.bytes_done, self.bytes_total, *self.bytes_by_source)
        if min(counters) < 0:
            raise ValueError("ItemResult counters must be >= 0")

    @property
    def bytes_by_source(self) -> tuple[int, int, int]:
        """(registry, peers, cache) bytes."""
        return self.bytes_registry, self.bytes_peers, self.bytes_cache

    @property
    def is_final(self) -> bool:
        """True when nothing more will happen to this item."""
        if self.state in (ItemState.DONE, ItemState.CANCELLED):
            return True
        return self.state is ItemState.FAILED and not self.transient

    def sort_key(self) -> tuple[Any, ...]:
        """The total order `merge` takes the maximum of (see the module docstring)."""
        return (
            self.state is ItemState.DONE,
            self.attempt,
            _RANK[self.state],
            _TERMINAL_ORDER[self.state],
            not self.transient,
            self.bytes_done,
            self.bytes_total,
            self.bytes_by_source,
            _opt(self.finished_at),
            _opt(self.started_at),
            self.skipped,
            self.digest,
            self.reason,
            self.detail,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the wire's map; the store and the API use it too)."""
        return schema.encode(self)

    @classmethod
    def from_dict(cls, d: object) -> ItemResult:
        """Inverse of `to_dict`, strict; `SchemaError` (a ValueError) on malformed input."""
        return schema.decode(cls, d)


UNKNOWN_RESULT = ItemResult()
"""The result of an item nothing is known of yet (pending). One shared, immutable instance:
plan views and the plan list read every item's result, and building a fresh one for each
pending item was a visible part of a coordinator's time under many readers."""


def merge(a: ItemResult, b: ItemResult) -> ItemResult:
    """Join of two results: commutative, associative, idempotent."""
    return a if a.sort_key() >= b.sort_key() else b
