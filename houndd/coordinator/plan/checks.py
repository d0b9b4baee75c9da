"""Small checks shared by the plan model and its validation; each raises `PlanError(field, reason)`
with `field` a path into the document (`targets[1].images[0]`, `nodes["node 2"]`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from houndd.errors import PlanError

MAX_NODE_NAME_CHARS = 253  # a DNS name's limit; node names default to hostnames

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def key_path(parent: str, key: object) -> str:
    """`parent.key`, or `parent["odd key"]` when the key is not a plain identifier."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    text = str(key)
    if len(text) > 64:
        text = text[:61] + "..."
    return f"{parent}[{json.dumps(text)}]"


def kind_of(value: object) -> str:
    """A user-facing name of the value's type (mapping, list, string, ...)."""
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


def expect_mapping(value: object, path: str) -> Mapping[Any, Any]:
    """`value` if it is a mapping."""
    if not isinstance(value, Mapping):
        raise PlanError(path or "document", f"expected a mapping, got {kind_of(value)}")
    return value


def expect_list(value: object, path: str, limit: int) -> Sequence[Any]:
    """`value` if it is a list of at most `limit` entries."""
    if not isinstance(value, list | tuple):
        raise PlanError(path, f"expected a list, got {kind_of(value)}")
    if len(value) > limit:
        raise PlanError(path, f"too many entries: {len(value)} > {limit}")
    return value


def check_fields(doc: Mapping[Any, Any], allowed: Sequence[str], path: str) -> None:
    """Refuse keys of `doc` that are not in `allowed` (so typos are not ignored)."""
    for key in doc:
        if not isinstance(key, str) or key not in allowed:
            raise PlanError(
                key_path(path, key), f"unknown field (expected one of {', '.join(allowed)})"
            )


def text(value: object, path: str, *, limit: int, what: str = "a string") -> str:
    """`value` if it is a printable string of at most `limit` characters."""
    if not isinstance(value, str):
        hint = ' (quote it: "true")' if isinstance(value, bool) else ""
        raise PlanError(path, f"expected {what}, got {kind_of(value)}{hint}")
    if len(value) > limit:
        raise PlanError(path, f"longer than {limit} characters")
    if not value.isprintable():
        raise PlanError(path, "contains control characters")
    return value


def node_name(value: object, path: str) -> str:
    """`value` if it is a non-empty node name without surrounding spaces."""
    name = text(value, path, limit=MAX_NODE_NAME_CHARS, what="a node name")
    if not name or name.strip() != name:
        raise PlanError(path, "node names are non-empty and have no surrounding spaces")
    return name


def integer(value: object, path: str, low: int, high: int) -> int:
    """`value` if it is an integer (not a boolean) within low..high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(path, f"expected an integer, got {kind_of(value)}")
    if not low <= value <= high:
        raise PlanError(path, f"expected {low}..{high}, got {value}")
    return value
