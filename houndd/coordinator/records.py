"""The replicated records of plan state: one type per concept, in memory, on the wire and in
the store.

A `PlanRecord` is an accepted plan: its immutable `PlanDocument` and its `PlanItem`s (one per
node x image, with the resolved digest), which travel and hash grouped per image
(`ItemGroup`: image, digest, size and the node ids), so a 10,000-node plan is one list of ids
rather than 10,000 items. Only the plan's holders keep a `PlanRecord` (its coordinator, its
replicas, and nodes that fetched it to serve a reader); a target that holds none keeps a
`PlanPart` instead: the `PlanWork` every dispatch carries (what it needs to run its own items)
and, as `ResultRecord`s, the results of its own items. A `CancelRecord` cancels a plan, an
`AbortRecord` tombstones a plan that was never acknowledged, and a `ResultRecord` is one entry
of the result lattice (`houndd.coordinator.results`). The same classes travel in PLAN_PUT,
DISPATCH, RESULTS, CANCEL and SYNC_ITEMS (`houndd.coordinator.messages`) and are written by
the `Store`; every field is bounded for the wire schema, and a document's plan is validated
whenever one is built.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from houndd.coordinator.plan import PlanSpec, validate_plan
from houndd.coordinator.plan.model import (
    MAX_IMAGE_ENTRIES,
    MAX_LABEL_CHARS,
    MAX_NODES_ENTRIES,
    MAX_PARALLELISM,
    MAX_SELECTOR_LABELS,
    MAX_TARGETS,
    PlanAction,
    PullPolicy,
)
from houndd.coordinator.results import ItemResult
from houndd.errors import PlanError
from houndd.wire import schema
from houndd.wire.fields import (
    MAX_ITEMS,
    MAX_NAME_CHARS,
    Counter,
    Digest,
    ImageName,
    Name,
    NodeId,
    PlanId,
    ShortText,
    Text,
    Timestamp,
    printable_problem,
)
from houndd.wire.schema import LOCAL, OMIT_NONE, Check, Range, Size, Validated

MAX_MEMBER_NAMES = 8192
"""Node id -> name entries one plan document records (the members at acceptance)."""
MAX_SEALED_AUTH_CHARS = 1 << 20
"""The sealed credentials of a plan (base64 of at most 100 registries' secrets)."""
MAX_HOLDERS = 64
"""Node ids a dispatch names as holders of the whole plan (its coordinator and replicas)."""

Via = Annotated[str, Size(0, MAX_NAME_CHARS), Check(printable_problem, "printable")]
SelectorKey = Annotated[str, Size(1, MAX_LABEL_CHARS)]
SelectorValue = Annotated[str, Size(0, MAX_LABEL_CHARS)]
Selector = Annotated[dict[SelectorKey, SelectorValue], Size(1, MAX_SELECTOR_LABELS)]


@dataclass(frozen=True)
class Group:
    """The nodes that need one image (the paper's classification), with its digest."""

    image: ImageName
    digest: Digest
    nodes: Annotated[tuple[Name, ...], Size(0, MAX_ITEMS)]


@dataclass(frozen=True)
class Unresolved:
    """Why an image could not be resolved at submission (no node pulls it)."""

    reason: ShortText
    detail: Text


@dataclass(frozen=True)
class NoSpace:
    """Images a node was refused at admission because its free disk cannot take them (no node
    pulls them; they are failed items `no space`). Sizes are the registry's (compressed)."""

    images: Annotated[dict[ImageName, Counter], Size(1, MAX_IMAGE_ENTRIES)]
    needed_bytes: Counter  # every image the node lacked in the plan
    free_bytes: Counter


@dataclass(frozen=True)
class PlanDocument:
    """The immutable document of an accepted plan.

    `spec` is the validated plan without credentials (`PlanSpec.to_document()`); registry
    credentials travel only sealed with the cluster key, in `sealed_auth`. `plan` is `spec`
    parsed, built (and so validated) whenever a document is.
    """

    spec: Annotated[dict[str, Any], Validated("PlanDocument.__post_init__: validate_plan")]
    groups: Annotated[tuple[Group, ...], Size(0, MAX_IMAGE_ENTRIES)] = ()
    names: Annotated[dict[NodeId, Name], Size(0, MAX_MEMBER_NAMES)] = field(default_factory=dict)
    unknown_nodes: Annotated[tuple[Name, ...], Size(0, MAX_NODES_ENTRIES)] = ()
    empty_selectors: Annotated[tuple[Selector, ...], Size(0, MAX_TARGETS)] = ()
    unresolved: Annotated[dict[ImageName, Unresolved], Size(0, MAX_IMAGE_ENTRIES)] = field(
        default_factory=dict
    )
    sealed_auth: Annotated[str, Size(1, MAX_SEALED_AUTH_CHARS)] | None = field(
        default=None, metadata=OMIT_NONE
    )
    via: Via = ""
    # node id -> what it was refused for lack of disk (disk-aware admission)
    no_space: Annotated[dict[NodeId, NoSpace], Size(0, MAX_MEMBER_NAMES)] | None = field(
        default=None, metadata=OMIT_NONE
    )
    plan: PlanSpec = field(init=False, repr=False, compare=False, metadata=LOCAL)

    def __post_init__(self) -> None:
        if "auth" in self.spec:
            raise PlanError("spec.auth", "credentials travel sealed, never in the plan")
        try:
            plan = validate_plan(self.spec)
        except PlanError as e:
            raise PlanError(f"spec.{e.field}", e.reason) from None
        object.__setattr__(self, "plan", plan)

    @classmethod
    def of(cls, spec: PlanSpec, **fields: Any) -> PlanDocument:
        """The document of `spec` (its credentials go in `sealed_auth`, sealed by the caller)."""
        return cls(spec=spec.to_document(), **fields)


@dataclass(frozen=True)
class PlanItem:
    """One (node, image) of a plan with its resolved digest and size."""

    node_id: NodeId
    image: ImageName
    digest: Digest
    size_bytes: Counter


@dataclass(frozen=True)
class ItemGroup:
    """The items of a plan that share one image (and its digest and size): the form plan
    items travel, hash and are stored in, one node id per target instead of one item."""

    image: ImageName
    digest: Digest
    size_bytes: Counter
    nodes: Annotated[tuple[NodeId, ...], Size(1, MAX_ITEMS)]


def group_items(items: Iterable[PlanItem]) -> tuple[ItemGroup, ...]:
    """Items grouped by (image, digest, size), groups and nodes in order of appearance."""
    groups: dict[tuple[str, str, int], list[str]] = {}
    for item in items:
        groups.setdefault((item.image, item.digest, item.size_bytes), []).append(item.node_id)
    return tuple(
        ItemGroup(img, dig, size, tuple(nodes)) for (img, dig, size), nodes in groups.items()
    )


@dataclass(frozen=True)
class PlanRecord:
    """An accepted plan. `document` never changes; `committed` turns on once acknowledged.

    Build one with `PlanRecord.of(plan_id, document, items, ...)`; `items` is derived from
    `item_groups` (group by group, in order), which is what travels and hashes.
    """

    plan_id: PlanId
    document: PlanDocument
    item_groups: Annotated[tuple[ItemGroup, ...], Size(0, MAX_ITEMS)]
    accepted_at: Timestamp
    committed: bool
    items: tuple[PlanItem, ...] = field(
        init=False, repr=False, compare=False, metadata=LOCAL, default=()
    )

    def __post_init__(self) -> None:
        items = tuple(
            PlanItem(node, g.image, g.digest, g.size_bytes)
            for g in self.item_groups
            for node in g.nodes
        )
        if len(items) > MAX_ITEMS:
            raise ValueError(f"a plan has at most {MAX_ITEMS} items, got {len(items)}")
        if len({(i.node_id, i.image) for i in items}) != len(items):
            raise ValueError("a plan names one (node, image) item twice")
        object.__setattr__(self, "items", items)

    @classmethod
    def of(
        cls,
        plan_id: str,
        document: PlanDocument,
        items: Iterable[PlanItem],
        accepted_at: float,
        committed: bool,
    ) -> PlanRecord:
        """The record of `items` (grouped per image)."""
        return cls(plan_id, document, group_items(items), accepted_at, committed)

    def content_hash(self) -> str:
        """Hash of the immutable part (document and items), the same on every node."""
        groups = [[g.image, g.digest, g.size_bytes, list(g.nodes)] for g in self.item_groups]
        blob = json.dumps(
            [schema.encode(self.document), groups], sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class PlanWork:
    """What a target needs to run its own items of a plan without holding the plan: every
    DISPATCH carries it, and a target keeps it as its `PlanPart`. `holders` are the nodes
    that hold the whole plan (its coordinator and replicas) at dispatch time."""

    name: Name
    action: PlanAction
    pull_policy: PullPolicy
    per_node_parallelism: Annotated[int, Range(1, MAX_PARALLELISM)]
    holders: Annotated[tuple[NodeId, ...], Size(0, MAX_HOLDERS)] = ()
    sealed_auth: Annotated[str, Size(1, MAX_SEALED_AUTH_CHARS)] | None = field(
        default=None, metadata=OMIT_NONE
    )

    @classmethod
    def of(cls, record: PlanRecord, holders: Iterable[str] = ()) -> PlanWork:
        """The work of `record`'s items."""
        plan = record.document.plan
        return cls(
            name=plan.name,
            action=plan.action,
            pull_policy=plan.policy.pull_policy,
            per_node_parallelism=plan.policy.per_node_parallelism,
            holders=tuple(holders)[:MAX_HOLDERS],
            sealed_auth=record.document.sealed_auth,
        )


@dataclass(frozen=True)
class PlanPart:
    """What a target keeps of a plan it does not hold: the work of its own items (their
    results are its `ResultRecord`s, keyed by its `node_id`)."""

    plan_id: PlanId
    node_id: NodeId
    work: PlanWork


@dataclass(frozen=True)
class CancelRecord:
    """The plan was cancelled at `cancelled_at` (first cancel wins)."""

    plan_id: PlanId
    cancelled_at: Timestamp


@dataclass(frozen=True)
class AbortRecord:
    """Tombstone: the tentative plan was never acknowledged and must not run."""

    plan_id: PlanId


@dataclass(frozen=True)
class ResultRecord:
    """One merged result of the lattice, keyed by (plan, node, image)."""

    plan_id: PlanId
    node_id: NodeId
    image: ImageName
    result: ItemResult


Record = PlanRecord | PlanPart | CancelRecord | AbortRecord | ResultRecord
