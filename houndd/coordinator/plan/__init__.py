"""Plan documents: the model, loading from YAML/JSON, validation, target resolution and the
JSON Schema. Every error is a `PlanError(field, reason)`; see `plan.model` for the document."""

from houndd.coordinator.plan.durations import MAX_TIMEOUT_S, format_duration, parse_duration
from houndd.coordinator.plan.loading import PlanFormat, format_of, parse_plan
from houndd.coordinator.plan.model import (
    MAX_AUTH_ENTRIES,
    MAX_DOCUMENT_BYTES,
    MAX_IMAGE_ENTRIES,
    MAX_IMAGES_PER_TARGET,
    MAX_NAME_CHARS,
    MAX_NODE_ENTRIES,
    MAX_NODES_ENTRIES,
    MAX_SELECTOR_LABELS,
    MAX_TARGETS,
    PlanAction,
    PlanSpec,
    Policy,
    PullPolicy,
    Target,
    TargetNode,
)
from houndd.coordinator.plan.schema import PLAN_JSON_SCHEMA
from houndd.coordinator.plan.targets import Resolution, resolve_targets
from houndd.coordinator.plan.validation import validate_plan

__all__ = [
    "MAX_AUTH_ENTRIES",
    "MAX_DOCUMENT_BYTES",
    "MAX_IMAGES_PER_TARGET",
    "MAX_IMAGE_ENTRIES",
    "MAX_NAME_CHARS",
    "MAX_NODES_ENTRIES",
    "MAX_NODE_ENTRIES",
    "MAX_SELECTOR_LABELS",
    "MAX_TARGETS",
    "MAX_TIMEOUT_S",
    "PLAN_JSON_SCHEMA",
    "PlanAction",
    "PlanFormat",
    "PlanSpec",
    "Policy",
    "PullPolicy",
    "Resolution",
    "Target",
    "TargetNode",
    "format_duration",
    "format_of",
    "parse_duration",
    "parse_plan",
    "resolve_targets",
    "validate_plan",
]
