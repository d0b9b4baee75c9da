"""Durations in plans: `30m`, `90s`, `1h30m`, `500ms`, `2d` or a number of seconds."""

from __future__ import annotations

import math
import re

from houndd.errors import PlanError

MAX_TIMEOUT_S = 7 * 24 * 3600.0

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
