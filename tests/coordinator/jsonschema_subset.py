"""A JSON Schema checker for the keywords the plan schema uses (no dependency needed), so the
schema-vs-validator agreement test always runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def schema_errors(schema: Mapping[str, Any], value: Any, path: str = "$") -> list[str]:
    """Every violation of `schema` by `value` (empty: valid)."""
    errors: list[str] = []
    if "type" in schema and not _is(value, schema["type"]):
        return [f"{path}: not {schema['type']}"]
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        errors.append(f"{path}: not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not one of {schema['enum']}")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(s, value, path)]
        if len(matching) != 1:
            errors.append(f"{path}: matches {len(matching)} of oneOf")
    errors.extend(_numbers(schema, value, path))
    errors.extend(_strings(schema, value, path))
    if isinstance(value, list):
        errors.extend(_arrays(schema, value, path))
    if isinstance(value, dict):
        errors.extend(_objects(schema, value, path))
    return errors


def _numbers(schema: Mapping[str, Any], value: Any, path: str) -> list[str]:
    if not _is(value, "number"):
        return []
    out = []
    if "minimum" in schema and value < schema["minimum"]:
        out.append(f"{path}: below minimum")
    if "maximum" in schema and value > schema["maximum"]:
        out.append(f"{path}: above maximum")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        out.append(f"{path}: not above exclusiveMinimum")
    return out


def _strings(schema: Mapping[str, Any], value: Any, path: str) -> list[str]:
    if not isinstance(value, str):
        return []
    out = []
    if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 62):
        out.append(f"{path}: length")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: pattern")
    return out


def _arrays(schema: Mapping[str, Any], value: list[Any], path: str) -> list[str]:
    out = []
    if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 62):
        out.append(f"{path}: item count")
    if schema.get("uniqueItems") and len({repr(v) for v in value}) != len(value):
        out.append(f"{path}: duplicate items")
    for i, item in enumerate(value):
        if "items" in schema:
            out.extend(schema_errors(schema["items"], item, f"{path}[{i}]"))
    return out


def _objects(schema: Mapping[str, Any], value: dict[str, Any], path: str) -> list[str]:
    out = [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
    n = len(value)
    if n < schema.get("minProperties", 0) or n > schema.get("maxProperties", 1 << 62):
        out.append(f"{path}: property count")
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        where = f"{path}.{key}"
        if key in props:
            out.extend(schema_errors(props[key], item, where))
        elif extra is False:
            out.append(f"{where}: not allowed")
        elif isinstance(extra, Mapping):
            out.extend(schema_errors(extra, item, where))
    return out
