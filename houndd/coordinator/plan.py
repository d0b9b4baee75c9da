"""Plan documents: parsing, validation and target resolution (DESIGN section 7).

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

Every error is a `PlanError(field, reason)` whose field is a path into the document
(`targets[1].images[0]`, `policy.timeout`, `nodes["node 2"][0]`). Unknown fields are errors, so a
typo (`parallelsim`) is not silently ignored. Sizes are bounded (see the MAX_ constants) so a
hostile body cannot make validation, resolution or scheduling blow up.

Images are stored in their normalized familiar form (`busybox` -> `busybox:latest`,
`docker.io/library/nginx:1.27` -> `nginx:1.27`), so two spellings of one image are one image.

Registry credentials live in `PlanSpec.credentials`, apart from the document: `to_document()`
and `repr()` never show them; the service seals `credentials_document()` before storing it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

import yaml

from houndd.errors import PlanError
from houndd.image.reference import (
    _DOMAIN_RE,
    ImageRef,
    normalize_registry,
    parse_reference,
)
from houndd.jsondoc import DuplicateKey, unique_pairs

__all__ = [
    "MAX_AUTH_ENTRIES",
    "MAX_DOCUMENT_BYTES",
    "MAX_IMAGES_PER_TARGET",
    "MAX_IMAGE_ENTRIES",
    "MAX_NAME_CHARS",
    "MAX_NODES_ENTRIES",
    "MAX_SELECTOR_LABELS",
    "MAX_TARGETS",
    "MAX_TIMEOUT_S",
    "PLAN_JSON_SCHEMA",
    "PlanAction",
    "PlanSpec",
    "Policy",
    "PullPolicy",
    "RegistryCredential",
    "Resolution",
    "Target",
    "TargetNode",
    "format_duration",
    "parse_duration",
    "parse_plan",
    "resolve_targets",
]

# Bounds. Each caps work or memory a hostile or broken body can force on the coordinator.
MAX_DOCUMENT_BYTES = 1 << 20  # same order as Config.max_http_body_bytes
MAX_TARGETS = 1000  # entries of `targets`
MAX_NODES_ENTRIES = 1000  # entries of the paper form `nodes`, and names in one target's `nodes`
MAX_IMAGES_PER_TARGET = 500  # images of one target or one paper-form node
# Image entries in the whole plan. The per-list bounds alone allow 1000 x 500 entries, which
# YAML aliases can produce from a few hundred bytes; resolution multiplies that by the members.
MAX_IMAGE_ENTRIES = 20_000
MAX_NAME_CHARS = 200  # plan name
MAX_NODE_NAME_CHARS = 253  # a DNS name's limit; node names default to hostnames
MAX_SELECTOR_LABELS = 64
MAX_LABEL_CHARS = 253
MAX_AUTH_ENTRIES = 100
MAX_DOCUMENT_DEPTH = 32  # a plan nests 4 levels; the rest could only be a parser attack
MAX_SECRET_CHARS = 16 * 1024  # registry tokens (JWTs) can be a few KiB
MAX_PARALLELISM = 1_000_000  # only keeps absurd integers out of arithmetic
MAX_RETRIES = 20
MAX_TIMEOUT_S = 7 * 24 * 3600.0

PlanAction = Literal["pull", "remove", "prune"]
PullPolicy = Literal["IfNotPresent", "Always"]
_ACTIONS: tuple[PlanAction, ...] = ("pull", "remove", "prune")
_PULL_POLICIES: tuple[PullPolicy, ...] = ("IfNotPresent", "Always")

_TOP_FIELDS = ("name", "action", "targets", "nodes", "policy", "auth")
_TARGET_FIELDS = ("images", "nodes", "selector", "all")
_SELECTION_FIELDS = ("nodes", "selector", "all")
_POLICY_FIELDS = (
    "parallelism",
    "per_node_parallelism",
    "pull_policy",
    "retries",
    "timeout",
    "keep_present",
)


# --- small validation helpers ----------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _key_path(parent: str, key: object) -> str:
    """`parent.key`, or `parent["odd key"]` when the key is not a plain identifier."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    text = str(key)
    if len(text) > 64:
        text = text[:61] + "..."
    return f"{parent}[{json.dumps(text)}]"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _expect_mapping(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(path or "document", f"expected a mapping, got {_kind(value)}")
    return value


def _expect_list(value: object, path: str, limit: int) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise PlanError(path, f"expected a list, got {_kind(value)}")
    if len(value) > limit:
        raise PlanError(path, f"too many entries: {len(value)} > {limit}")
    return value


def _check_fields(doc: Mapping[Any, Any], allowed: Sequence[str], path: str) -> None:
    for key in doc:
        if not isinstance(key, str) or key not in allowed:
            raise PlanError(
                _key_path(path, key), f"unknown field (expected one of {', '.join(allowed)})"
            )


def _text(value: object, path: str, *, limit: int, what: str = "a string") -> str:
    if not isinstance(value, str):
        hint = ' (quote it: "true")' if isinstance(value, bool) else ""
        raise PlanError(path, f"expected {what}, got {_kind(value)}{hint}")
    if len(value) > limit:
        raise PlanError(path, f"longer than {limit} characters")
    if not value.isprintable():
        raise PlanError(path, "contains control characters")
    return value


def _node_name(value: object, path: str) -> str:
    name = _text(value, path, limit=MAX_NODE_NAME_CHARS, what="a node name")
    if not name or name.strip() != name:
        raise PlanError(path, "node names are non-empty and have no surrounding spaces")
    return name


def _integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(path, f"expected an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise PlanError(path, f"expected {low}..{high}, got {value}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", re.ASCII)
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+", re.ASCII)
_NUMBER = re.compile(r"\d+(?:\.\d+)?", re.ASCII)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object, *, field: str = "duration") -> float:
    """Seconds from `30m`, `90s`, `1h30m`, `500ms`, `2d`, a number of seconds or "90".

    Must be positive and at most `MAX_TIMEOUT_S`; raises `PlanError(field, ...)`.
    """
    if isinstance(value, bool):
        raise PlanError(field, "expected a duration like 30m, 90s, 1h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise PlanError(field, f"invalid duration {value!r}: use e.g. 30m, 90s, 1h30m, 45")
    else:
        raise PlanError(field, "expected a duration like 30m, 90s, 1h or a number of seconds")
    if not math.isfinite(seconds) or seconds <= 0:
        raise PlanError(field, "duration must be positive")
    if seconds > MAX_TIMEOUT_S:
        raise PlanError(field, f"duration longer than {format_duration(MAX_TIMEOUT_S)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The canonical text of a duration: `30m`, `1h`, `90s`, `1.5s`."""
    if float(seconds).is_integer():
        whole = int(seconds)
        if whole % 3600 == 0:
            return f"{whole // 3600}h"
        if whole % 60 == 0:
            return f"{whole // 60}m"
        return f"{whole}s"
    return f"{seconds!r}s"


# --- the model -------------------------------------------------------------------------------


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
        _integer(self.parallelism, "policy.parallelism", 1, MAX_PARALLELISM)
        _integer(self.per_node_parallelism, "policy.per_node_parallelism", 1, MAX_PARALLELISM)
        _integer(self.retries, "policy.retries", 0, MAX_RETRIES)
        if self.pull_policy not in _PULL_POLICIES:
            raise PlanError("policy.pull_policy", f"expected one of {', '.join(_PULL_POLICIES)}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float):
            raise PlanError("policy.timeout", "expected a number of seconds")
        parse_duration(self.timeout_s, field="policy.timeout")
        if not isinstance(self.keep_present, bool):
            raise PlanError(
                "policy.keep_present", f"expected a boolean, got {_kind(self.keep_present)}"
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
class RegistryCredential:
    """Credentials for one registry: username + password, or a bearer token.

    Secrets never appear in `repr()` or `str()`, so a logged object leaks nothing.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        if self.token is not None:
            return "RegistryCredential(token=<hidden>)"
        return f"RegistryCredential(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def to_document(self) -> dict[str, str]:
        """The secret mapping (`{username, password}` or `{token}`); seal before storing."""
        if self.token is not None:
            return {"token": self.token}
        return {"username": self.username or "", "password": self.password or ""}


@dataclass(frozen=True)
class PlanSpec:
    """A validated plan. Build with `parse_plan()` or `PlanSpec.from_document()`."""

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

    def references(self) -> dict[str, ImageRef]:
        """Image (as in the plan) -> its parsed reference."""
        return {image: parse_reference(image) for image in self.images()}

    def credentials_for(self, image: str | ImageRef) -> RegistryCredential | None:
        """The plan's credential for the registry of `image`, if any."""
        ref = parse_reference(image) if isinstance(image, str) else image
        return self.credentials.get(ref.registry)

    def to_document(self) -> dict[str, Any]:
        """The canonical, JSON-able document, WITHOUT credentials (see `credentials_document`).

        `PlanSpec.from_document(spec.to_document())` equals `spec.without_credentials()`.
        """
        doc: dict[str, Any] = {"name": self.name, "action": self.action}
        doc["targets"] = [t.to_document() for t in self.targets]
        if self.node_images:
            doc["nodes"] = {node: list(imgs) for node, imgs in self.node_images.items()}
        doc["policy"] = self.policy.to_document()
        return doc

    def credentials_document(self) -> dict[str, dict[str, str]]:
        """The `auth` mapping, secrets in clear: seal it before it leaves memory."""
        return {host: cred.to_document() for host, cred in self.credentials.items()}

    def without_credentials(self) -> PlanSpec:
        """This plan with no registry credentials."""
        return PlanSpec(self.name, self.targets, self.node_images, self.policy, self.action, {})

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> PlanSpec:
        """Validate a decoded document (the inverse of `to_document`, plus optional `auth`)."""
        return _validate_plan(doc)


class TargetNode(NamedTuple):
    """A member as the resolver sees it: its name and labels."""

    name: str
    labels: Mapping[str, str]


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


# --- parsing ---------------------------------------------------------------------------------


class _TooDeep(Exception):
    pass


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one, and
    nesting deeper than a plan can use (deep recursion in PyYAML's composer takes seconds
    before it fails, which a hostile body could repeat)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DOCUMENT_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_strict_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=False)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable mapping key", key_node.start_mark
            ) from None
        if duplicate:
            raise DuplicateKey(key)
    return cast(dict[Any, Any], loader.construct_mapping(node, deep=False))


_StrictSafeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
)


def _json_constant(name: str) -> Any:
    raise PlanError("document", f"{name} is not valid JSON")


def _load_text(text: str, fmt: Literal["yaml", "json"]) -> object:
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=unique_pairs, parse_constant=_json_constant)
        # A subclass of SafeLoader: only plain data, never arbitrary Python objects.
        return yaml.load(text, Loader=_StrictSafeLoader)
    except DuplicateKey as e:
        raise PlanError(_key_path("", e.key) or "document", "duplicate key") from None
    except (RecursionError, _TooDeep):
        raise PlanError("document", "nested too deeply") from None
    except (ValueError, yaml.YAMLError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError("document", f"not valid {fmt.upper()}: {_parse_error(e)}") from None


def _parse_error(e: Exception) -> str:
    """What the parser says, with the line and column it stopped at (1-based)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = e.problem or e.context or "syntax error"
        return f"{what[:200]} (line {mark.line + 1}, column {mark.column + 1})"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return detail[:200]


def parse_plan(
    source: str | bytes | Mapping[str, Any],
    *,
    fmt: Literal["yaml", "json"] | None = None,
    max_bytes: int = MAX_DOCUMENT_BYTES,
) -> PlanSpec:
    """Parse and validate a plan from YAML or JSON text (or an already decoded mapping).

    `fmt=None` guesses: text starting with `{` is JSON, anything else YAML. Raises only
    `PlanError(field, reason)`.
    """
    if isinstance(source, Mapping):
        return _validate_plan(source)
    if fmt not in (None, "yaml", "json"):
        raise PlanError("format", "expected yaml or json")
    if isinstance(source, bytes | bytearray):
        if len(source) > max_bytes:
            raise PlanError("document", f"larger than {max_bytes} bytes")
        try:
            text = bytes(source).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise PlanError("document", "not UTF-8 text") from None
    elif isinstance(source, str):
        text = source
        if len(text) > max_bytes:  # chars >= bytes/4; the exact byte size is not worth a copy
            raise PlanError("document", f"larger than {max_bytes} bytes")
    else:
        raise PlanError("document", f"expected text or a mapping, got {_kind(source)}")
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "yaml"
    doc = _load_text(text, fmt)
    if doc is None:
        raise PlanError("document", "empty document")
    return _validate_plan(_expect_mapping(doc, "document"))


class _Budget:
    """Counts image entries across the whole plan (see MAX_IMAGE_ENTRIES)."""

    def __init__(self) -> None:
        self.images = 0

    def spend(self, n: int, path: str) -> None:
        self.images += n
        if self.images > MAX_IMAGE_ENTRIES:
            raise PlanError(path, f"the plan has more than {MAX_IMAGE_ENTRIES} image entries")


def _validate_plan(doc: Mapping[Any, Any]) -> PlanSpec:
    doc = _expect_mapping(doc, "document")
    _check_fields(doc, _TOP_FIELDS, "")

    if "name" not in doc:
        raise PlanError("name", "required")
    name = _text(doc["name"], "name", limit=MAX_NAME_CHARS)
    if not name.strip():
        raise PlanError("name", "must not be empty")

    action_raw = doc.get("action", "pull")
    if action_raw not in _ACTIONS:
        raise PlanError("action", f"expected one of {', '.join(_ACTIONS)}")
    action = cast(PlanAction, action_raw)

    budget = _Budget()
    targets = _validate_targets(doc.get("targets", []), action, budget)
    node_images = _validate_paper_nodes(doc.get("nodes", {}), action, budget)
    if not targets and not node_images:
        raise PlanError("targets", "a plan needs at least one target (targets or nodes)")

    policy = _validate_policy(doc.get("policy", {}))
    credentials = _validate_auth(doc.get("auth", {}))
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
    items = _expect_list(value, path, MAX_IMAGES_PER_TARGET)
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
    items = _expect_list(value, "targets", MAX_TARGETS)
    targets: list[Target] = []
    seen: dict[tuple[Hashable, ...], int] = {}
    for i, raw in enumerate(items):
        path = f"targets[{i}]"
        doc = _expect_mapping(raw, path)
        _check_fields(doc, _TARGET_FIELDS, path)
        forms = [f for f in _SELECTION_FIELDS if f in doc]
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
            target = Target(images, nodes=_validate_node_list(doc["nodes"], f"{path}.nodes"))
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


def _validate_node_list(value: object, path: str) -> tuple[str, ...]:
    items = _expect_list(value, path, MAX_NODES_ENTRIES)
    if not items:
        raise PlanError(path, "empty node list")
    nodes: dict[str, int] = {}
    for i, raw in enumerate(items):
        node = _node_name(raw, f"{path}[{i}]")
        if node in nodes:
            raise PlanError(f"{path}[{i}]", f"duplicate of {path}[{nodes[node]}]")
        nodes[node] = i
    return tuple(nodes)


def _validate_selector(value: object, target_path: str) -> dict[str, str]:
    path = f"{target_path}.selector"
    doc = _expect_mapping(value, path)
    if not doc:
        raise PlanError(path, "empty selector (use all: true to select every node)")
    if len(doc) > MAX_SELECTOR_LABELS:
        raise PlanError(path, f"too many labels: {len(doc)} > {MAX_SELECTOR_LABELS}")
    selector: dict[str, str] = {}
    for key, val in doc.items():
        key_path = _key_path(path, key)
        label = _text(key, key_path, limit=MAX_LABEL_CHARS, what="a label name")
        if not label:
            raise PlanError(key_path, "empty label name")
        selector[label] = _text(val, key_path, limit=MAX_LABEL_CHARS)
    return selector


def _validate_paper_nodes(
    value: object, action: PlanAction, budget: _Budget
) -> dict[str, tuple[str, ...]]:
    doc = _expect_mapping(value, "nodes")
    if len(doc) > MAX_NODES_ENTRIES:
        raise PlanError("nodes", f"too many entries: {len(doc)} > {MAX_NODES_ENTRIES}")
    out: dict[str, tuple[str, ...]] = {}
    for key, images in doc.items():
        path = _key_path("nodes", key)
        node = _node_name(key, path)
        out[node] = _validate_images(images, path, action, budget)
    return out


def _validate_policy(value: object) -> Policy:
    doc = _expect_mapping(value, "policy")
    _check_fields(doc, _POLICY_FIELDS, "policy")
    defaults = Policy()
    pull_policy = doc.get("pull_policy", defaults.pull_policy)
    if pull_policy not in _PULL_POLICIES:
        raise PlanError("policy.pull_policy", f"expected one of {', '.join(_PULL_POLICIES)}")
    return Policy(
        parallelism=_integer(
            doc.get("parallelism", defaults.parallelism), "policy.parallelism", 1, MAX_PARALLELISM
        ),
        per_node_parallelism=_integer(
            doc.get("per_node_parallelism", defaults.per_node_parallelism),
            "policy.per_node_parallelism",
            1,
            MAX_PARALLELISM,
        ),
        pull_policy=pull_policy,
        retries=_integer(doc.get("retries", defaults.retries), "policy.retries", 0, MAX_RETRIES),
        timeout_s=parse_duration(doc.get("timeout", defaults.timeout_s), field="policy.timeout"),
        keep_present=_boolean(
            doc.get("keep_present", defaults.keep_present), "policy.keep_present"
        ),
    )


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(path, f"expected true or false, got {_kind(value)}")
    return value


def _secret(value: object, path: str) -> str:
    # Never echo the value: it may be a password pasted into the wrong field.
    if not isinstance(value, str) or not value or len(value) > MAX_SECRET_CHARS:
        raise PlanError(path, f"expected a non-empty string of at most {MAX_SECRET_CHARS} chars")
    return value


def _validate_auth(value: object) -> dict[str, RegistryCredential]:
    doc = _expect_mapping(value, "auth")
    if len(doc) > MAX_AUTH_ENTRIES:
        raise PlanError("auth", f"too many registries: {len(doc)} > {MAX_AUTH_ENTRIES}")
    out: dict[str, RegistryCredential] = {}
    for key, raw in doc.items():
        path = _key_path("auth", key)
        if (
            not isinstance(key, str)
            or len(key) > MAX_NODE_NAME_CHARS
            or not _DOMAIN_RE.fullmatch(key)
        ):
            raise PlanError(path, "expected a registry host like registry.local:5000")
        host = normalize_registry(key)
        if host in out:
            raise PlanError(path, f"second entry for registry {host}")
        entry = _expect_mapping(raw, path)
        for k in entry:
            if k not in ("username", "password", "token"):
                raise PlanError(
                    _key_path(path, k), "unknown field (expected username and password, or token)"
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


# --- JSON Schema (for the OpenAPI document) ---------------------------------------------------

_IMAGE_LIST_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 600},
    "maxItems": MAX_IMAGES_PER_TARGET,
    "uniqueItems": True,
    "description": "Image references (docker pull syntax); empty only for action prune.",
}
_NODE_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NODE_NAME_CHARS,
}
_DURATION_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
        {"type": "string", "pattern": r"^(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h|d))+)$"},
    ],
    "description": "30m, 90s, 1h30m, 500ms, 2d, or a number of seconds.",
}

PLAN_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "houndd plan",
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
        "action": {"enum": list(_ACTIONS), "default": "pull"},
        "targets": {
            "type": "array",
            "maxItems": MAX_TARGETS,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "images": _IMAGE_LIST_SCHEMA,
                    "nodes": {
                        "type": "array",
                        "items": _NODE_NAME_SCHEMA,
                        "minItems": 1,
                        "maxItems": MAX_NODES_ENTRIES,
                        "uniqueItems": True,
                    },
                    "selector": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": MAX_SELECTOR_LABELS,
                        "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_CHARS},
                    },
                    "all": {"const": True},
                },
                "oneOf": [
                    {"required": ["nodes"]},
                    {"required": ["selector"]},
                    {"required": ["all"]},
                ],
            },
        },
        "nodes": {
            "type": "object",
            "maxProperties": MAX_NODES_ENTRIES,
            "additionalProperties": _IMAGE_LIST_SCHEMA,
            "description": "The paper's form: node name -> its images.",
        },
        "policy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parallelism": {"type": "integer", "minimum": 1, "default": 10},
                "per_node_parallelism": {"type": "integer", "minimum": 1, "default": 3},
                "pull_policy": {"enum": list(_PULL_POLICIES), "default": "IfNotPresent"},
                "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES, "default": 3},
                "timeout": {**_DURATION_SCHEMA, "default": "30m"},
                "keep_present": {"type": "boolean", "default": False},
            },
        },
        "auth": {
            "type": "object",
            "maxProperties": MAX_AUTH_ENTRIES,
            "description": "Registry host -> credentials. Write-only: never returned.",
            "writeOnly": True,
            "additionalProperties": {
                "oneOf": [
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["username", "password"],
                        "properties": {
                            "username": {"type": "string", "minLength": 1},
                            "password": {"type": "string", "minLength": 1},
                        },
                    },
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["token"],
                        "properties": {"token": {"type": "string", "minLength": 1}},
                    },
                ]
            },
        },
    },
}
