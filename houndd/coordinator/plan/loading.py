"""Loading plan text: YAML or JSON, bounded, duplicate keys refused, then validated.

Every error is a `PlanError(field, reason)` whose field is a path into the document, so a typo
(`parallelsim`) or a hostile body (nested too deep, aliases multiplying work) gets an answer
naming what is wrong, never an exception of another kind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, cast

import yaml

from houndd.coordinator.plan.checks import expect_mapping, key_path, kind_of
from houndd.coordinator.plan.model import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, PlanSpec
from houndd.coordinator.plan.validation import validate_plan
from houndd.errors import PlanError
from houndd.jsondoc import DuplicateKey, unique_pairs

PlanFormat = Literal["yaml", "json"]


def format_of(content_type: str) -> PlanFormat | None:
    """The plan format a Content-Type names, or None (then the text decides)."""
    if "json" in content_type:
        return "json"
    if "yaml" in content_type or "yml" in content_type:
        return "yaml"
    return None


class _TooDeep(Exception):
    pass


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader (pure Python) that refuses duplicate keys instead of silently keeping the
    last one."""


class _StrictCSafeLoader(yaml.CSafeLoader):
    """The same on libyaml (about ten times faster; PyYAML wheels ship it)."""


_LOADER: type[_StrictSafeLoader] | type[_StrictCSafeLoader] = (
    _StrictCSafeLoader if yaml.__with_libyaml__ else _StrictSafeLoader
)


def _construct_strict_mapping(
    loader: yaml.SafeLoader | yaml.CSafeLoader, node: yaml.MappingNode
) -> dict[Any, Any]:
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


for _loader in (_StrictSafeLoader, _StrictCSafeLoader):
    _loader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping
    )


def _check_depth(root: yaml.Node) -> None:
    """Nesting deeper than a plan can use is refused before anything is constructed. The walk
    is iterative, and an aliased node is walked again only when met deeper than before, so an
    alias bomb costs at most MAX_DOCUMENT_DEPTH visits per node."""
    deepest: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DOCUMENT_DEPTH:
            raise _TooDeep
        if deepest.get(id(node), 0) >= depth:
            continue
        deepest[id(node)] = depth
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))


def _load_yaml(text: str) -> object:
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_depth(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _json_constant(name: str) -> Any:
    raise PlanError("document", f"{name} is not valid JSON")


def _loadtext(text: str, fmt: Literal["yaml", "json"]) -> object:
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=unique_pairs, parse_constant=_json_constant)
        # Safe loaders only: plain data, never arbitrary Python objects.
        return _load_yaml(text)
    except DuplicateKey as e:
        raise PlanError(key_path("", e.key) or "document", "duplicate key") from None
    except (RecursionError, _TooDeep):
        raise PlanError("document", "nested too deeply") from None
    except (ValueError, yaml.YAMLError) as e:
        if isinstance(e, PlanError):
            raise
        if isinstance(e, yaml.MarkedYAMLError) and "maximum nesting depth" in (e.problem or ""):
            raise PlanError("document", "nested too deeply") from None  # libyaml's own cap
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
        return validate_plan(source)
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
        raise PlanError("document", f"expected text or a mapping, got {kind_of(source)}")
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "yaml"
    doc = _loadtext(text, fmt)
    if doc is None:
        raise PlanError("document", "empty document")
    return validate_plan(expect_mapping(doc, "document"))
