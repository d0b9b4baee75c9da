"""The plan's JSON Schema (served in the OpenAPI document), built from the plan model.

Field names, enums, defaults and bounds come from `plan.model` (the field tuples, `ACTIONS`,
`PULL_POLICIES`, `Policy()` and the MAX_ constants), so the schema cannot drift from what the
validator accepts; `_object` refuses to build a level whose properties differ from the model's
fields. What JSON Schema cannot say (image reference syntax, duplicate images after
normalisation) is left to the validator, which is stricter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from houndd.coordinator.plan.checks import MAX_NODE_NAME_CHARS
from houndd.coordinator.plan.durations import MAX_TIMEOUT_S
from houndd.coordinator.plan.model import (
    ACTIONS,
    CREDENTIAL_FIELDS,
    MAX_AUTH_ENTRIES,
    MAX_IMAGE_CHARS,
    MAX_IMAGES_PER_TARGET,
    MAX_LABEL_CHARS,
    MAX_NAME_CHARS,
    MAX_NODES_ENTRIES,
    MAX_PARALLELISM,
    MAX_RETRIES,
    MAX_SECRET_CHARS,
    MAX_SELECTOR_LABELS,
    MAX_TARGETS,
    POLICY_FIELDS,
    PULL_POLICIES,
    TARGET_FIELDS,
    TOP_FIELDS,
    Policy,
)

DURATION_PATTERN = r"^(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h|d))+)$"


def _object(fields: Sequence[str], properties: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    if tuple(properties) != tuple(fields):
        raise AssertionError(f"schema properties {list(properties)} != model fields {fields}")
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": dict(properties),
        **extra,
    }


def _schema() -> dict[str, Any]:
    defaults = Policy().to_document()
    image_list: dict[str, Any] = {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_IMAGE_CHARS},
        "maxItems": MAX_IMAGES_PER_TARGET,
        "uniqueItems": True,
        "description": "Image references (docker pull syntax); empty only for action prune.",
    }
    node_name = {"type": "string", "minLength": 1, "maxLength": MAX_NODE_NAME_CHARS}
    duration = {
        "oneOf": [
            {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_S},
            {"type": "string", "pattern": DURATION_PATTERN},
        ],
        "description": "30m, 90s, 1h30m, 500ms, 2d, or a number of seconds.",
    }
    secret = {"type": "string", "minLength": 1, "maxLength": MAX_SECRET_CHARS}
    target = _object(
        TARGET_FIELDS,
        {
            "images": image_list,
            "nodes": {
                "type": "array",
                "items": node_name,
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
        oneOf=[{"required": [form]} for form in ("nodes", "selector", "all")],
    )
    policy = _object(
        POLICY_FIELDS,
        {
            "parallelism": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_PARALLELISM,
                "default": defaults["parallelism"],
            },
            "per_node_parallelism": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_PARALLELISM,
                "default": defaults["per_node_parallelism"],
            },
            "pull_policy": {"enum": list(PULL_POLICIES), "default": defaults["pull_policy"]},
            "retries": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_RETRIES,
                "default": defaults["retries"],
            },
            "timeout": {**duration, "default": defaults["timeout"]},
            "keep_present": {"type": "boolean", "default": defaults["keep_present"]},
        },
    )
    username, password, token = CREDENTIAL_FIELDS
    credential = {
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": [username, password],
                "properties": {username: secret, password: secret},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": [token],
                "properties": {token: secret},
            },
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "houndd plan",
        **_object(
            TOP_FIELDS,
            {
                "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                "action": {"enum": list(ACTIONS), "default": ACTIONS[0]},
                "targets": {"type": "array", "maxItems": MAX_TARGETS, "items": target},
                "nodes": {
                    "type": "object",
                    "maxProperties": MAX_NODES_ENTRIES,
                    "additionalProperties": image_list,
                    "description": "The paper's form: node name -> its images.",
                },
                "policy": policy,
                "auth": {
                    "type": "object",
                    "maxProperties": MAX_AUTH_ENTRIES,
                    "description": "Registry host -> credentials. Write-only: never returned.",
                    "writeOnly": True,
                    "additionalProperties": credential,
                },
            },
            required=["name"],
        ),
    }


PLAN_JSON_SCHEMA: dict[str, Any] = _schema()
