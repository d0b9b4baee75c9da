"""Target resolution: which members a plan selects, and which images each of them needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from houndd.coordinator.plan.model import PlanSpec, TargetNode
from houndd.errors import PlanError


@dataclass
class Resolution:
    """What a plan asks of the current members.

    `requests`: node -> images, nodes in order of first request, images de-duplicated in
    document order (for `prune`, matched nodes map to an empty list). Nodes named in the plan
    that are not members are left out of `requests` and listed in `unknown_nodes`; selectors
    that matched no member are listed in `empty_selectors`.
    """

    requests: dict[str, list[str]] = field(default_factory=dict)
    unknown_nodes: list[str] = field(default_factory=list)
    empty_selectors: list[dict[str, str]] = field(default_factory=list)


def resolve_targets(
    spec: PlanSpec, members: Sequence[TargetNode], *, max_items: int | None = None
) -> Resolution:
    """Expand the plan's targets against `members` (usually the alive members).

    `max_items`: a plan asking for more node x image items than this (counted as the targets
    name them, before duplicates merge) is refused with a `PlanError` before the rest is
    expanded: `all: true` with 20,000 images on a large cluster would otherwise cost millions
    of entries.
    """
    by_name: dict[str, TargetNode] = {}
    for member in members:
        by_name.setdefault(member.name, member)
    requests: dict[str, dict[str, None]] = {}
    unknown: dict[str, None] = {}
    empty: list[dict[str, str]] = []
    asked = 0

    def want(node: str, images: Sequence[str]) -> None:
        nonlocal asked
        if node not in by_name:
            unknown[node] = None
            return
        asked += max(1, len(images))
        if max_items is not None and asked > max_items:
            raise PlanError(
                "targets", f"the plan asks for more than {max_items} node x image items"
            )
        requests.setdefault(node, {}).update(dict.fromkeys(images))

    for target in spec.targets:
        if target.nodes is not None:
            for node in target.nodes:
                want(node, target.images)
            continue
        matched = [m.name for m in by_name.values() if target.matches(m)]
        if target.selector is not None and not matched:
            selector = dict(target.selector)
            if selector not in empty:
                empty.append(selector)
        for node in matched:
            want(node, target.images)
    for node, images in spec.node_images.items():
        want(node, images)
    return Resolution(
        requests={node: list(images) for node, images in requests.items()},
        unknown_nodes=list(unknown),
        empty_selectors=empty,
    )
