"""Who fetches a blob from whom: a tree per blob that every node derives on its own (pure).

The nodes that need an image (a plan's targets for its digest) are ranked per blob by
rendezvous hashing: `blake2b(blob digest | node id)`, highest first. The first node is the
root and the only one that asks the registry; the node at rank i fetches from rank
`(i - 1) // fanout`, so no node serves more than `fanout` children per blob and the depth is
log_fanout(N). Every node computes the same ranking from the same inputs, so there is nothing
to coordinate, store, or hand over in a coordinator failover.

Nodes that are down, or that served this node wrong bytes, are left out before ranking, so
when a parent dies its children (and everyone else) derive the tree again without it and a
new root takes over: the registry still sends the blob about once.

Requests along the tree are *pull-through*: the parent answers a child even before it has
the blob, by fetching it (from its own parent, or the registry at the root) and streaming
bytes on as they arrive. Only requests towards the root pull through, so requests cannot
form a cycle; every other node is asked only for a blob it holds complete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

__all__ = ["REGISTRY", "Source", "choose_sources", "rank"]


@dataclass(frozen=True)
class Source:
    """One place to get a blob from.

    `node_id` empty means the upstream registry. `through` means the peer may fetch the blob
    for us (it is our ancestor in the tree); otherwise it serves only a blob it holds complete.
    """

    node_id: str = ""
    through: bool = False

    @property
    def is_registry(self) -> bool:
        return not self.node_id

    def __str__(self) -> str:
        if self.is_registry:
            return "registry"
        return f"{self.node_id}({'through' if self.through else 'complete'})"


REGISTRY = Source()


def _weight(digest: str, node_id: str) -> bytes:
    return hashlib.blake2b(f"{digest}|{node_id}".encode(), digest_size=8).digest()


def rank(digest: str, nodes: Iterable[str]) -> list[str]:
    """Nodes in rendezvous order for `digest` (first = root). Ties cannot reorder: node ids
    are distinct, and equal weights fall back to the id."""
    return sorted(set(nodes), key=lambda n: (_weight(digest, n), n), reverse=True)


def ancestors(index: int, fanout: int) -> list[int]:
    """Ranks of the parent, grandparent, ... of rank `index` up to the root."""
    out = []
    while index > 0:
        index = (index - 1) // fanout
        out.append(index)
    return out


def choose_sources(
    digest: str,
    nodes: Collection[str],
    me: str,
    *,
    fanout: int,
    usable: Callable[[str], bool],
    exclude: Collection[str] = (),
) -> list[Source]:
    """Where `me` should try to get `digest`, in order.

    `nodes` need the blob (they include `me`, or `me` is treated as a leaf after them);
    `usable(node)` is false for nodes that are down; `exclude` lists nodes to leave out (they
    served wrong bytes, failed this transfer, or asked us for this blob: asking them back
    would loop).

    The root tries the registry first, then peers that may hold the blob from earlier work.
    Everyone else tries its ancestors (pull-through, parent first), then the other nodes
    (complete copies only), then the registry.
    """
    if fanout < 1:
        raise ValueError("fanout must be >= 1")
    others = [n for n in nodes if n != me and n not in exclude and usable(n)]
    order = rank(digest, [*others, me]) if me in nodes else [*rank(digest, others), me]
    index = order.index(me)
    chain = [order[i] for i in ancestors(index, fanout)]
    holders = [n for n in order if n != me and n not in chain]
    if not chain:
        return [REGISTRY, *(Source(n) for n in holders)]
    return [
        *(Source(n, through=True) for n in chain),
        *(Source(n) for n in holders),
        REGISTRY,
    ]
