"""Blob-sharing cohorts: which targets of a plan share one digest's distribution trees.

Every node that needs an image builds each of its blobs' trees from the nodes that need the
same digest (`houndd.blobs.tree`), so each dispatch names them. A dispatch cannot name ten
thousand nodes, so a very big group is split into cohorts of at most `size` nodes, ranked by
rendezvous hashing on the digest: every member of a cohort is given the same cohort, so its
trees agree, and the registry sends each blob about once per cohort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _weight(digest: str, node_id: str) -> bytes:
    return hashlib.blake2b(f"{digest}|{node_id}".encode(), digest_size=8).digest()


def peer_cohorts(digest: str, nodes: Iterable[str], size: int) -> list[tuple[str, ...]]:
    """`nodes` (distinct) split into cohorts of at most `size`, as even as possible; one
    cohort, in the given order, when they fit."""
    if size < 1:
        raise ValueError("a cohort has at least one node")
    members = list(dict.fromkeys(nodes))
    if len(members) <= size:
        return [tuple(members)]
    ranked = sorted(members, key=lambda n: _weight(digest, n))
    count = -(-len(ranked) // size)
    return [tuple(ranked[i::count]) for i in range(count)]
