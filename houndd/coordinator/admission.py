"""Disk-aware admission (pure): which of a node's images fit on its disk.

The coordinator knows each image's size from resolving its tag (config plus layers, as the
registry lists them: compressed) and asks each target which of the plan's images it holds
already and how much disk is free. A node's need is the sum of the sizes of the distinct
digests it lacks: an image it holds needs nothing (`IfNotPresent` skips it; `Always` only
confirms the manifest), and two tags of one digest count once. When the need exceeds the free
disk, the node's digests are admitted largest first (the order the scheduler pulls them in),
each one only if it still fits beside those admitted before it; the rest are refused, and
their items fail as `no space` before any pull starts.

What the count leaves out, on purpose: layers shared between images (with each other or with
images the node holds) are counted once per image, so a node close to full may be refused an
image that would have fit; and layers take more room extracted than compressed, so an
admitted image can still fail with `no space` during its pull. A refusal is made only on
positive knowledge: a node that did not answer, or does not know its free disk (a remote
Docker engine), is admitted unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Wanted:
    """One image a node should hold, at its digest, with its (compressed) size."""

    image: str
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class Verdict:
    """What admission decided for one node.

    `checked`: both the node's holdings and its free disk were known; only then can anything
    be refused. `lacking`: the images it does not hold (all of them when it did not answer).
    """

    lacking: tuple[str, ...]
    present: tuple[str, ...]
    needed_bytes: int
    refused: tuple[str, ...]
    checked: bool


def admit(
    wanted: Sequence[Wanted], held: frozenset[str] | None, free_disk_bytes: int | None
) -> Verdict:
    """Admission for one node: `held` the images it holds at their digests (None: it did not
    answer), `free_disk_bytes` its free disk (None: unknown)."""
    lacking = [w for w in wanted if held is None or w.image not in held]
    present = tuple(w.image for w in wanted if held is not None and w.image in held)
    sizes: dict[str, int] = {}
    for w in lacking:
        sizes[w.digest] = max(sizes.get(w.digest, 0), w.size_bytes)
    needed = sum(sizes.values())
    checked = held is not None and free_disk_bytes is not None
    refused_digests: set[str] = set()
    if checked and free_disk_bytes is not None and needed > free_disk_bytes:
        room = free_disk_bytes
        for digest, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
            if size <= room:
                room -= size
            else:
                refused_digests.add(digest)
    return Verdict(
        lacking=tuple(w.image for w in lacking),
        present=present,
        needed_bytes=needed,
        refused=tuple(w.image for w in lacking if w.digest in refused_digests),
        checked=checked,
    )
