"""The plan model: a validated plan (`PlanSpec`), its targets and its policy.

A plan says which nodes need which images and how to pull them:

    name: warm-ml-stack
    action: pull                  # pull (default) | remove | prune
    targets:                      # any mix of the three forms
      - images: [registry.local:5000/pytorch:2.4]
        nodes: [node-1, node-3]
      - images: [nginx:1.27]
        selector: {gpu: "true"}   # every label must match
      - images: [busybox:1.36]
        all: true
    nodes:                        # the paper's form (Table 1): node -> its images
      node-2: [img-b, img-d]
    policy: {parallelism: 10, per_node_parallelism: 3, pull_policy: IfNotPresent,
             retries: 3, timeout: 30m, keep_present: false}
    auth:                         # optional registry credentials, never echoed back
      registry.local:5000: {username: ci, password: s3cret}

Images are stored in their normalized familiar form (`busybox` -> `busybox:latest`,
`docker.io/library/nginx:1.27` -> `nginx:1.27`), so two spellings of one image are one image.
Registry credentials live in `PlanSpec.credentials`, apart from the document: `to_document()`
and `repr()` never show them; the submission seals `credentials_document()` before storing it.
The field names and bounds below are also what the JSON Schema (`plan.schema`) is built from.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from houndd.coordinator.plan.checks import integer, kind_of
from houndd.coordinator.plan.durations import MAX_TIMEOUT_S, format_duration, parse_duration
from houndd.errors import PlanError
from houndd.image.credentials import RegistryCredential, auth_document

# Bounds. Each caps work or memory a hostile or broken body can force on the coordinator.
MAX_DOCUMENT_BYTES = 1 << 20  # same order as Config.max_http_body_bytes
MAX_TARGETS = 1000  # entries of `targets`
MAX_NODES_ENTRIES = 1000  # entries of the paper form `nodes`, and names in one target's `nodes`
MAX_IMAGES_PER_TARGET = 500  # images of one target or one paper-form node
# Image entries in the whole plan. The per-list bounds alone allow 1000 x 500 entries, which
# YAML aliases can produce from a few hundred bytes; resolution multiplies that by the members.
MAX_IMAGE_ENTRIES = 20_000
# Node names in the whole plan (target node lists and the paper form), for the same reason:
# one list of 1000 names aliased into 1000 targets would name a million.
MAX_NODE_ENTRIES = 20_000
MAX_NAME_CHARS = 200  # plan name
MAX_SELECTOR_LABELS = 64
MAX_LABEL_CHARS = 253
MAX_AUTH_ENTRIES = 100
MAX_DOCUMENT_DEPTH = 32  # a plan nests 4 levels; the rest could only be a parser attack
MAX_SECRET_CHARS = 16 * 1024  # registry tokens (JWTs) can be a few KiB
MAX_PARALLELISM = 1_000_000  # only keeps absurd integers out of arithmetic
MAX_RETRIES = 20
MAX_IMAGE_CHARS = 600  # longer input cannot be an image reference

PlanAction = Literal["pull", "remove", "prune"]
PullPolicy = Literal["IfNotPresent", "Always"]
ACTIONS: tuple[PlanAction, ...] = ("pull", "remove", "prune")
PULL_POLICIES: tuple[PullPolicy, ...] = ("IfNotPresent", "Always")

# The fields a document may have, per level; anything else is an error.
TOP_FIELDS = ("name", "action", "targets", "nodes", "policy", "auth")
TARGET_FIELDS = ("images", "nodes", "selector", "all")
SELECTION_FIELDS = ("nodes", "selector", "all")
POLICY_FIELDS = (
    "parallelism",
    "per_node_parallelism",
    "pull_policy",
    "retries",
    "timeout",
    "keep_present",
)
CREDENTIAL_FIELDS = ("username", "password", "token")


class TargetNode(NamedTuple):
    """A member as target resolution sees it: its name and labels."""

    name: str
    labels: Mapping[str, str]


__all__ = [
    "ACTIONS",
    "MAX_TIMEOUT_S",
    "PULL_POLICIES",
    "PlanAction",
    "PlanSpec",
    "Policy",
    "PullPolicy",
    "Target",
    "TargetNode",
]


@dataclass(frozen=True)
class Policy:
    """How a plan is carried out. Construction validates (PlanError with `policy.<field>`)."""

    parallelism: int = 10
    """Max nodes with work in flight across the cluster (the paper's `workers`)."""
    per_node_parallelism: int = 3
    """Max images in flight on one node."""
    pull_policy: PullPolicy = "IfNotPresent"
    """IfNotPresent: skip an image the node already has at the digest. Always: pull anyway."""
    retries: int = 3
    """Retries of transient failures (exponential backoff, full jitter)."""
    timeout_s: float = 1800.0
    """Per image per node; document field `timeout`."""
    keep_present: bool = False
    """True: nodes that join or lose an image later get it too."""

    def __post_init__(self) -> None:
        integer(self.parallelism, "policy.parallelism", 1, MAX_PARALLELISM)
        integer(self.per_node_parallelism, "policy.per_node_parallelism", 1, MAX_PARALLELISM)
        integer(self.retries, "policy.retries", 0, MAX_RETRIES)
        if self.pull_policy not in PULL_POLICIES:
            raise PlanError("policy.pull_policy", f"expected one of {', '.join(PULL_POLICIES)}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float):
            raise PlanError("policy.timeout", "expected a number of seconds")
        parse_duration(self.timeout_s, field="policy.timeout")
        if not isinstance(self.keep_present, bool):
            raise PlanError(
                "policy.keep_present", f"expected a boolean, got {kind_of(self.keep_present)}"
            )

    def to_document(self) -> dict[str, Any]:
        """The canonical `policy` mapping of a plan document."""
        return {
            "parallelism": self.parallelism,
            "per_node_parallelism": self.per_node_parallelism,
            "pull_policy": self.pull_policy,
            "retries": self.retries,
            "timeout": format_duration(self.timeout_s),
            "keep_present": self.keep_present,
        }


@dataclass(frozen=True)
class Target:
    """Images for a set of nodes chosen by exactly one of `nodes`, `selector` or `all`.

    `images` are normalized familiar references; empty only for `action: prune`.
    """

    images: tuple[str, ...]
    nodes: tuple[str, ...] | None = None
    selector: Mapping[str, str] | None = None
    all: bool = False

    @property
    def kind(self) -> Literal["nodes", "selector", "all"]:
        """Which selection form this target uses."""
        if self.nodes is not None:
            return "nodes"
        if self.selector is not None:
            return "selector"
        return "all"

    def matches(self, node: TargetNode) -> bool:
        """Whether `node` is selected by this target."""
        if self.nodes is not None:
            return node.name in self.nodes
        if self.selector is not None:
            return all(node.labels.get(k) == v for k, v in self.selector.items())
        return self.all

    def to_document(self) -> dict[str, Any]:
        """The canonical mapping of this target."""
        doc: dict[str, Any] = {}
        if self.images:
            doc["images"] = list(self.images)
        if self.nodes is not None:
            doc["nodes"] = list(self.nodes)
        elif self.selector is not None:
            doc["selector"] = dict(self.selector)
        else:
            doc["all"] = True
        return doc

    def _identity(self) -> tuple[Hashable, ...]:
        sel: Hashable
        if self.nodes is not None:
            sel = frozenset(self.nodes)
        elif self.selector is not None:
            sel = frozenset(self.selector.items())
        else:
            sel = True
        return (self.kind, sel, frozenset(self.images))


@dataclass(frozen=True)
class PlanSpec:
    """A validated plan. Build with `parse_plan()` (text) or `validate_plan()` (a mapping)."""

    name: str
    targets: tuple[Target, ...] = ()
    node_images: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The paper's form: node name -> its images, in document order."""
    policy: Policy = field(default_factory=Policy)
    action: PlanAction = "pull"
    credentials: Mapping[str, RegistryCredential] = field(
        default_factory=dict, repr=False, compare=True
    )
    """Registry host (normalized, `registry-1.docker.io` for the Hub) -> credential."""

    def __repr__(self) -> str:
        return (
            f"PlanSpec(name={self.name!r}, action={self.action!r}, targets={self.targets!r}, "
            f"node_images={dict(self.node_images)!r}, policy={self.policy!r}, "
            f"credentials=<{len(self.credentials)} registries>)"
        )

    def images(self) -> list[str]:
        """Every distinct image of the plan, in document order."""
        seen: dict[str, None] = {}
        for target in self.targets:
            seen.update(dict.fromkeys(target.images))
        for imgs in self.node_images.values():
            seen.update(dict.fromkeys(imgs))
        return list(seen)

    def to_document(self) -> dict[str, Any]:
        """The canonical, JSON-able document, WITHOUT credentials (see `credentials_document`).

        `validate_plan(spec.to_document())` equals `spec.without_credentials()`.
        """
        doc: dict[str, Any] = {"name": self.name, "action": self.action}
        doc["targets"] = [t.to_document() for t in self.targets]
        if self.node_images:
            doc["nodes"] = {node: list(imgs) for node, imgs in self.node_images.items()}
        doc["policy"] = self.policy.to_document()
        return doc

    def credentials_document(self) -> dict[str, dict[str, str]]:
        """The `auth` mapping, secrets in clear: seal it before it leaves memory."""
        return auth_document(self.credentials)

    def without_credentials(self) -> PlanSpec:
        """This plan with no registry credentials."""
        return PlanSpec(self.name, self.targets, self.node_images, self.policy, self.action, {})
