"""Node classification: Algorithm 1's first half (the paper, section 3.1 and 3.3).

Nodes that request the same image form one group. The paper's Table 1 (node -> images) becomes
its Table 2 (image -> nodes). Groups keep the order in which images first appear and nodes keep
request order, so plan status and dispatch order are stable for one plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Group", "classify", "pieces", "workers"]


@dataclass(frozen=True, slots=True)
class Group:
    """The nodes that request `image` (a node group of the paper, labelled with the image)."""

    image: str
    nodes: tuple[str, ...]


def classify(requests: Mapping[str, Sequence[str]]) -> list[Group]:
    """Group nodes by requested image.

    `requests` maps node -> its images. A node listing an image twice appears once in that
    image's group. Groups are ordered by first appearance of the image (scanning nodes in
    mapping order, each node's images in order); nodes within a group in request order.
    """
    groups: dict[str, dict[str, None]] = {}
    for node, images in requests.items():
        for image in images:
            groups.setdefault(image, {})[node] = None
    return [Group(image, tuple(nodes)) for image, nodes in groups.items()]


def pieces(groups: Sequence[Group]) -> int:
    """Pull requests in all groups: one per (node, image) pair, the unit one worker serves."""
    return sum(len(g.nodes) for g in groups)


def workers(parallelism: int, pieces: int) -> int:
    """Algorithm 1 lines 11-14: never start more workers than there are pieces of work.

    `workers = min(parallelism, pieces)`; zero pieces need zero workers.
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, got {parallelism}")
    if pieces < 0:
        raise ValueError(f"pieces must be >= 0, got {pieces}")
    return min(parallelism, pieces)
