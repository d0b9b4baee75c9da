"""Target resolution: which members a plan selects, and which images each of them needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from houndd.coordinator.plan.model import PlanSpec, TargetNode


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


def resolve_targets(spec: PlanSpec, members: Sequence[TargetNode]) -> Resolution:
    """Expand the plan's targets against `members` (usually the alive members)."""
    by_name: dict[str, TargetNode] = {}
    for member in members:
        by_name.setdefault(member.name, member)
    requests: dict[str, dict[str, None]] = {}
    unknown: dict[str, None] = {}
    empty: list[dict[str, str]] = []

    def want(node: str, images: Sequence[str]) -> None:
        if node not in by_name:
            unknown[node] = None
            return
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
