"""Validation of a decoded plan document into a `PlanSpec`.

Unknown fields are errors; sizes are bounded (the MAX_ constants of `plan.model`) so a hostile
body cannot make validation, resolution or scheduling blow up. Every error is a
`PlanError(field, reason)` with `field` a path like `targets[1].images[0]`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, cast

from houndd.coordinator.plan.checks import (
    MAX_NODE_NAME_CHARS,
    check_fields,
    expect_list,
    expect_mapping,
    integer,
    key_path,
    kind_of,
    node_name,
    text,
)
from houndd.coordinator.plan.durations import parse_duration
from houndd.coordinator.plan.model import (
    ACTIONS,
    MAX_AUTH_ENTRIES,
    MAX_IMAGE_ENTRIES,
    MAX_IMAGES_PER_TARGET,
    MAX_LABEL_CHARS,
    MAX_NAME_CHARS,
    MAX_NODE_ENTRIES,
    MAX_NODES_ENTRIES,
    MAX_PARALLELISM,
    MAX_RETRIES,
    MAX_SECRET_CHARS,
    MAX_SELECTOR_LABELS,
    MAX_TARGETS,
    POLICY_FIELDS,
    PULL_POLICIES,
    SELECTION_FIELDS,
    TARGET_FIELDS,
    TOP_FIELDS,
    PlanAction,
    PlanSpec,
    Policy,
    Target,
)
from houndd.errors import PlanError
from houndd.image.credentials import RegistryCredential
from houndd.image.reference import _DOMAIN_RE, normalize_registry, parse_reference


class _Budget:
    """Counts image and node entries across the whole plan (see MAX_IMAGE_ENTRIES and
    MAX_NODE_ENTRIES), before they are validated one by one."""

    def __init__(self) -> None:
        self.images = 0
        self.nodes = 0

    def spend(self, n: int, path: str) -> None:
        self.images += n
        if self.images > MAX_IMAGE_ENTRIES:
            raise PlanError(path, f"the plan has more than {MAX_IMAGE_ENTRIES} image entries")

    def spend_nodes(self, n: int, path: str) -> None:
        self.nodes += n
        if self.nodes > MAX_NODE_ENTRIES:
            raise PlanError(path, f"the plan names more than {MAX_NODE_ENTRIES} nodes in all")


def validate_plan(doc: Mapping[Any, Any]) -> PlanSpec:
    """The plan a decoded document describes (the inverse of `PlanSpec.to_document`, plus
    optional `auth`); `PlanError(field, reason)` naming the first problem."""
    doc = expect_mapping(doc, "document")
    check_fields(doc, TOP_FIELDS, "")

    if "name" not in doc:
        raise PlanError("name", "required")
    name = text(doc["name"], "name", limit=MAX_NAME_CHARS)
    if not name.strip():
        raise PlanError("name", "must not be empty")

    action_raw = doc.get("action", "pull")
    if action_raw not in ACTIONS:
        raise PlanError("action", f"expected one of {', '.join(ACTIONS)}")
    action = cast(PlanAction, action_raw)

    budget = _Budget()
    targets = _validate_targets(doc.get("targets", []), action, budget)
    node_images = _validate_paper_nodes(doc.get("nodes", {}), action, budget)
    if not targets and not node_images:
        raise PlanError("targets", "a plan needs at least one target (targets or nodes)")

    policy = _validate_policy(doc.get("policy", {}))
    credentials = validate_auth(doc.get("auth", {}))
    return PlanSpec(
        name=name,
        targets=targets,
        node_images=node_images,
        policy=policy,
        action=action,
        credentials=credentials,
    )


def _validate_images(
    value: object, path: str, action: PlanAction, budget: _Budget
) -> tuple[str, ...]:
    items = expect_list(value, path, MAX_IMAGES_PER_TARGET)
    if action == "prune":
        if items:
            raise PlanError(path, "prune takes no images")
        return ()
    if not items:
        raise PlanError(path, "empty image list")
    budget.spend(len(items), path)
    images: dict[str, int] = {}
    for i, raw in enumerate(items):
        item_path = f"{path}[{i}]"
        image = parse_reference(raw, field=item_path).name
        if image in images:
            raise PlanError(item_path, f"duplicate of {path}[{images[image]}] ({image})")
        images[image] = i
    return tuple(images)


def _validate_targets(value: object, action: PlanAction, budget: _Budget) -> tuple[Target, ...]:
    items = expect_list(value, "targets", MAX_TARGETS)
    targets: list[Target] = []
    seen: dict[tuple[Hashable, ...], int] = {}
    for i, raw in enumerate(items):
        path = f"targets[{i}]"
        doc = expect_mapping(raw, path)
        check_fields(doc, TARGET_FIELDS, path)
        forms = [f for f in SELECTION_FIELDS if f in doc]
        if len(forms) != 1:
            got = f"got {' and '.join(forms)}" if forms else "got none"
            raise PlanError(path, f"needs exactly one of nodes, selector, all ({got})")
        if "images" in doc:
            images = _validate_images(doc["images"], f"{path}.images", action, budget)
        elif action == "prune":
            images = ()
        else:
            raise PlanError(f"{path}.images", "required")
        form = forms[0]
        if form == "nodes":
            nodes = _validate_node_list(doc["nodes"], f"{path}.nodes", budget)
            target = Target(images, nodes=nodes)
        elif form == "selector":
            target = Target(images, selector=_validate_selector(doc["selector"], path))
        else:
            if doc["all"] is not True:
                raise PlanError(f"{path}.all", "expected true (leave it out to select no one)")
            target = Target(images, all=True)
        identity = target._identity()
        if identity in seen:
            raise PlanError(path, f"duplicate of targets[{seen[identity]}]")
        seen[identity] = i
        targets.append(target)
    return tuple(targets)


def _validate_node_list(value: object, path: str, budget: _Budget) -> tuple[str, ...]:
    items = expect_list(value, path, MAX_NODES_ENTRIES)
    if not items:
        raise PlanError(path, "empty node list")
    budget.spend_nodes(len(items), path)
    nodes: dict[str, int] = {}
    for i, raw in enumerate(items):
        node = node_name(raw, f"{path}[{i}]")
        if node in nodes:
            raise PlanError(f"{path}[{i}]", f"duplicate of {path}[{nodes[node]}]")
        nodes[node] = i
    return tuple(nodes)


def _validate_selector(value: object, target_path: str) -> dict[str, str]:
    path = f"{target_path}.selector"
    doc = expect_mapping(value, path)
    if not doc:
        raise PlanError(path, "empty selector (use all: true to select every node)")
    if len(doc) > MAX_SELECTOR_LABELS:
        raise PlanError(path, f"too many labels: {len(doc)} > {MAX_SELECTOR_LABELS}")
    selector: dict[str, str] = {}
    for key, val in doc.items():
        where = key_path(path, key)
        label = text(key, where, limit=MAX_LABEL_CHARS, what="a label name")
        if not label:
            raise PlanError(where, "empty label name")
        selector[label] = text(val, where, limit=MAX_LABEL_CHARS)
    return selector


def _validate_paper_nodes(
    value: object, action: PlanAction, budget: _Budget
) -> dict[str, tuple[str, ...]]:
    doc = expect_mapping(value, "nodes")
    if len(doc) > MAX_NODES_ENTRIES:
        raise PlanError("nodes", f"too many entries: {len(doc)} > {MAX_NODES_ENTRIES}")
    budget.spend_nodes(len(doc), "nodes")
    out: dict[str, tuple[str, ...]] = {}
    for key, images in doc.items():
        path = key_path("nodes", key)
        node = node_name(key, path)
        out[node] = _validate_images(images, path, action, budget)
    return out


def _validate_policy(value: object) -> Policy:
    doc = expect_mapping(value, "policy")
    check_fields(doc, POLICY_FIELDS, "policy")
    defaults = Policy()
    pull_policy = doc.get("pull_policy", defaults.pull_policy)
    if pull_policy not in PULL_POLICIES:
        raise PlanError("policy.pull_policy", f"expected one of {', '.join(PULL_POLICIES)}")
    return Policy(
        parallelism=integer(
            doc.get("parallelism", defaults.parallelism), "policy.parallelism", 1, MAX_PARALLELISM
        ),
        per_node_parallelism=integer(
            doc.get("per_node_parallelism", defaults.per_node_parallelism),
            "policy.per_node_parallelism",
            1,
            MAX_PARALLELISM,
        ),
        pull_policy=pull_policy,
        retries=integer(doc.get("retries", defaults.retries), "policy.retries", 0, MAX_RETRIES),
        timeout_s=parse_duration(doc.get("timeout", defaults.timeout_s), field="policy.timeout"),
        keep_present=_boolean(
            doc.get("keep_present", defaults.keep_present), "policy.keep_present"
        ),
    )


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(path, f"expected true or false, got {kind_of(value)}")
    return value


def _secret(value: object, path: str) -> str:
    # Never echo the value: it may be a password pasted into the wrong field.
    if not isinstance(value, str) or not value or len(value) > MAX_SECRET_CHARS:
        raise PlanError(path, f"expected a non-empty string of at most {MAX_SECRET_CHARS} chars")
    return value


def validate_auth(value: object) -> dict[str, RegistryCredential]:
    """Registry host (normalized) -> credential, from a plan's `auth` mapping."""
    doc = expect_mapping(value, "auth")
    if len(doc) > MAX_AUTH_ENTRIES:
        raise PlanError("auth", f"too many registries: {len(doc)} > {MAX_AUTH_ENTRIES}")
    out: dict[str, RegistryCredential] = {}
    for key, raw in doc.items():
        path = key_path("auth", key)
        if (
            not isinstance(key, str)
            or len(key) > MAX_NODE_NAME_CHARS
            or not _DOMAIN_RE.fullmatch(key)
        ):
            raise PlanError(path, "expected a registry host like registry.local:5000")
        host = normalize_registry(key)
        if host in out:
            raise PlanError(path, f"second entry for registry {host}")
        entry = expect_mapping(raw, path)
        for k in entry:
            if k not in ("username", "password", "token"):
                raise PlanError(
                    key_path(path, k), "unknown field (expected username and password, or token)"
                )
        if "token" in entry:
            if "username" in entry or "password" in entry:
                raise PlanError(path, "use either token or username and password")
            out[host] = RegistryCredential(token=_secret(entry["token"], f"{path}.token"))
        elif "username" in entry and "password" in entry:
            out[host] = RegistryCredential(
                username=_secret(entry["username"], f"{path}.username"),
                password=_secret(entry["password"], f"{path}.password"),
            )
        else:
            raise PlanError(path, "expected username and password, or token")
    return out
