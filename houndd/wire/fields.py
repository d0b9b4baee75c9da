"""Bounded field types shared by every peer payload.

A peer that holds the cluster key is authenticated, not trusted: it may be buggy or hostile.
Every field of every payload therefore carries a bound (`houndd.wire.schema`), and these are
the common ones. Each bound caps memory a peer can make us hold, keeps arithmetic on the value
safe (a counter can be incremented and still fits msgpack's uint64), or refuses a value that
would make a system call fail later (a host with a NUL byte in `sendto`).
"""

from __future__ import annotations

from typing import Annotated

from houndd.names import (
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_NAME_CHARS,
    host_problem,
    label_key_problem,
    label_value_problem,
    printable_problem,
)
from houndd.wire.schema import Check, Match, Range, Size

__all__ = [
    "MAX_LABELS",
    "MAX_NAME_CHARS",
    "host_problem",
    "label_key_problem",
    "label_value_problem",
    "printable_problem",
]

MAX_COUNTER = 2**62
"""Incarnations, terms, epochs, sequence numbers, attempts and sizes stay at or below this:
far beyond anything real (a counter bumped a million times a second takes 146,000 years to
get there), and one increment later still far inside msgpack's uint64."""
MAX_TIMESTAMP_S = float(2**40)
"""Seconds since the epoch (about 36,000 years): finite, never negative."""
MAX_DURATION_S = 7 * 24 * 3600.0
"""The longest per-item timeout a plan may set."""
MAX_TEXT_CHARS = 4096
"""Free text: failure details, error messages."""
MAX_SHORT_TEXT_CHARS = 256
"""Short free text: versions, kernel and OS names, failure reasons."""
MAX_IMAGE_CHARS = 600
"""An image reference (name 255 + tag 129 + a sha512 digest 136, with room)."""
MAX_ITEMS = 100_000
"""Items of one plan (nodes x images); arrays of them are bounded by the message size too."""

Counter = Annotated[int, Range(0, MAX_COUNTER)]
Port = Annotated[int, Range(1, 65535)]
Timestamp = Annotated[float, Range(0.0, MAX_TIMESTAMP_S)]
Duration = Annotated[float, Range(0.0, MAX_DURATION_S)]

NODE_ID_PATTERN = r"[0-9a-f]{16}"
NodeId = Annotated[str, Match(NODE_ID_PATTERN, "a node id (16 lowercase hex digits)")]
NodeIdOrNone = Annotated[
    str, Match(f"(?:{NODE_ID_PATTERN})?", "a node id (16 lowercase hex digits) or empty")
]
Digest = Annotated[
    str, Match("(?:sha256:[0-9a-f]{64})?", "a digest (sha256: and 64 lowercase hex) or empty")
]
PlanId = Annotated[
    str, Match(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a plan id (1..64 of A-Z a-z 0-9 . _ -)")
]
Text = Annotated[str, Size(0, MAX_TEXT_CHARS)]
ShortText = Annotated[str, Size(0, MAX_SHORT_TEXT_CHARS)]


Name = Annotated[str, Size(1, MAX_NAME_CHARS), Check(printable_problem, "printable")]
"""A node or plan name: 1..253 printable characters."""
ImageName = Annotated[str, Size(1, MAX_IMAGE_CHARS), Check(printable_problem, "printable")]
"""An image as a plan names it (syntax is checked where it is parsed, not on the wire)."""

Host = Annotated[str, Size(1, MAX_NAME_CHARS), Check(host_problem, "a host")]


LabelKey = Annotated[str, Size(1, MAX_LABEL_KEY_CHARS), Check(label_key_problem, "a label key")]
LabelValue = Annotated[str, Size(0, MAX_LABEL_VALUE_CHARS)]
Labels = Annotated[dict[LabelKey, LabelValue], Size(0, MAX_LABELS)]
