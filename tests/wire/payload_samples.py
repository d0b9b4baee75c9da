"""Payloads of every message type, built from the schema classes themselves: a minimal valid
one, hypothesis strategies of valid ones (with extreme values), and malformed variants.

Everything here works on the raw, msgpack-ready form (what a peer puts on the wire), so the
tests exercise `decode_payload` exactly as the bus does.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

from hypothesis import strategies as st

# Importing the message modules registers their classes in the wire's table.
import houndd.coordinator.messages
import houndd.membership.messages
from houndd.blobs.protocol import BlobRequest, repository_problem
from houndd.membership.messages import Update
from houndd.wire import payloads, schema
from houndd.wire.fields import host_problem, label_key_problem, printable_problem
from houndd.wire.schema import Check, Match, Range, Size, Validated
from houndd.wire.types import MsgType

__all__ = ["classes", "malformed_variants", "minimal", "payload_strategy", "raw_fields"]

assert houndd.membership.messages and houndd.coordinator.messages  # imported for registration

SPECS: list[dict[str, Any]] = [
    {"name": "p", "nodes": {"node-1": ["busybox:1.36"]}},
    {
        "name": "warm",
        "action": "pull",
        "targets": [{"images": ["registry.local:5000/a:1"], "all": True}],
        "policy": {"retries": 20, "timeout": "7d", "parallelism": 1_000_000},
    },
    {"name": "prune", "action": "prune", "targets": [{"all": True}]},
]

_PATTERN_SAMPLES = {
    "[0-9a-f]{16}": "0123456789abcdef",
    "[0-9a-f]{16}(?:,[0-9a-f]{16})*": "0123456789abcdef,fedcba9876543210",
    "(?:[0-9a-f]{16})?": "",
    "(?:sha256:[0-9a-f]{64})?": "",
    "[A-Za-z0-9][A-Za-z0-9._-]{0,63}": "p1",
    "sha256:[0-9a-f]{64}": "sha256:" + "0" * 64,
}
_CHECK_SAMPLES: dict[Callable[[Any], str | None], str] = {
    host_problem: "127.0.0.1",
    printable_problem: "n",
    label_key_problem: "k",
    repository_problem: "127.0.0.1:5000/app/x",
}
_REPOSITORIES = st.sampled_from(
    ["127.0.0.1:5000/app/x", "registry.local/library/busybox", "registry.local:5000/a/b-c_d.e"]
)
_HOSTS = st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "node-1", "a.b-c.example", "x" * 63])


def classes() -> dict[MsgType, type]:
    """Every registered payload class."""
    return dict(payloads.registered())


def raw_fields(cls: type) -> list[tuple[str, Any, bool]]:
    """(wire key, annotated type, required) of a payload class."""
    _, fields = schema._fields_of(cls)
    return [(f.key, f.type, f.required) for f in fields]


def _split(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0], tuple(tp.__metadata__)
    return tp, ()


def _bound(bounds: Sequence[Any], kind: type) -> Any:
    return next((b for b in bounds if isinstance(b, kind)), None)


# --- minimal valid values ---------------------------------------------------------------------


def minimal(tp: Any, *, rich: bool = False) -> Any:
    """A deterministic valid raw value of type `tp` (a payload class gives its map). `rich`
    fills every optional field, union and collection (so nested bounds are reachable)."""
    base, bounds = _split(tp)
    if _bound(bounds, Validated):
        return dict(SPECS[0])
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return _minimal_dataclass(base, rich)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and not rich:
            return None
        return minimal(next(a for a in args if a is not type(None)), rich=rich)
    if origin is typing.Literal:
        return args[0]
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return next(iter(base)).value
    size = _bound(bounds, Size)
    low = size.low if size else 0
    count = max(low, 1) if rich else low
    if origin in (list, tuple, Sequence):
        return [minimal(args[0], rich=rich) for _ in range(count)]
    if origin in (dict, Mapping):
        return {minimal(args[0]): minimal(args[1], rich=rich)} if count else {}
    return _minimal_scalar(base, bounds, low)


def _minimal_scalar(base: Any, bounds: Sequence[Any], low: int) -> Any:
    rng = _bound(bounds, Range)
    if base is bool:
        return False
    if base is int:
        return int(rng.low) if rng else 0
    if base is float:
        return float(rng.low) if rng else 0.0
    if base is bytes:
        return b"\x01" * max(low, 1 if low else 0)
    if base is str:
        match, check = _bound(bounds, Match), _bound(bounds, Check)
        if match:
            return _PATTERN_SAMPLES[match.pattern]
        if check:
            return _CHECK_SAMPLES[check.fn]
        return "x" * low
    if base is type(None):
        return None
    raise TypeError(f"no minimal value for {base!r}")


def _minimal_dataclass(cls: type, rich: bool) -> dict[str, Any]:
    if cls is Update:
        node = "0123456789abcdef"
        return {"s": "suspect", "id": node, "inc": 0, "by": node, "m": None}
    if cls.__name__ == "PlanForwardReply":
        return {"refusal": minimal(_non_none(raw_fields(cls)[1][1]), rich=rich)}
    return {k: minimal(tp, rich=rich) for k, tp, required in raw_fields(cls) if required or rich}


# --- hypothesis strategies ---------------------------------------------------------------------


def payload_strategy(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Valid raw payloads of `cls`, often at the edges of their bounds."""
    strategy: st.SearchStrategy[dict[str, Any]] = _strategy(cls)
    return strategy


def _strategy(tp: Any) -> st.SearchStrategy[Any]:
    base, bounds = _split(tp)
    if _bound(bounds, Validated):
        return st.sampled_from(SPECS).map(dict)
    if isinstance(base, type) and dataclasses.is_dataclass(base):
        return _dataclass_strategy(base)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Union or origin is types.UnionType:
        return st.one_of(*(_strategy(a) for a in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return st.sampled_from([m.value for m in base])
    size = _bound(bounds, Size)
    low, high = (size.low, min(size.high, 3)) if size else (0, 3)
    if origin in (list, tuple, Sequence):
        return st.lists(_strategy(args[0]), min_size=low, max_size=max(low, high))
    if origin in (dict, Mapping):
        keys, values = _strategy(args[0]), _strategy(args[1])
        return st.dictionaries(keys, values, min_size=low, max_size=max(low, high))
    return _scalar_strategy(base, bounds)


def _scalar_strategy(base: Any, bounds: Sequence[Any]) -> st.SearchStrategy[Any]:
    rng, size = _bound(bounds, Range), _bound(bounds, Size)
    if base is type(None):
        return st.none()
    if base is bool:
        return st.booleans()
    if base is int:
        lo, hi = (int(rng.low), int(rng.high)) if rng else (-(2**63), 2**64 - 1)
        return st.integers(lo, hi) | st.sampled_from([lo, hi])
    if base is float:
        lo, hi = (rng.low, rng.high) if rng else (-1e300, 1e300)
        return st.floats(lo, hi, allow_nan=False) | st.sampled_from([float(lo), float(hi)])
    if base is bytes:
        low, high = (size.low, min(size.high, 64)) if size else (0, 64)
        return st.binary(min_size=low, max_size=max(low, high))
    match, check = _bound(bounds, Match), _bound(bounds, Check)
    if match:
        return st.from_regex(match.pattern, fullmatch=True)
    if check is not None and check.fn is host_problem:
        return _HOSTS
    if check is not None and check.fn is repository_problem:
        return _REPOSITORIES
    if check is not None and check.fn is label_key_problem:
        return st.from_regex(r"[A-Za-z0-9._/-]{1,63}", fullmatch=True)
    low, high = (size.low, size.high) if size else (0, 64)
    if check is not None:  # printable: letters, digits, punctuation, symbols, spaces
        alphabet = st.characters(categories=["L", "N", "P", "S"]) | st.just(" ")
        text = st.text(alphabet, min_size=low, max_size=max(low, min(high, 40)))
        return text.filter(lambda t: check.fn(t) is None)
    text = st.text(min_size=low, max_size=max(low, min(high, 40)))
    return text | st.just("é" * high) if high <= 300 else text


def _dataclass_strategy(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    fields = raw_fields(cls)
    required = {k: _strategy(tp) for k, tp, req in fields if req}
    optional = {k: _strategy(tp) for k, tp, req in fields if not req}
    maps = st.fixed_dictionaries(required, optional=optional)
    if cls is Update:
        return maps.map(_fix_update)
    if cls is BlobRequest:  # a request starts inside the blob
        return maps.map(lambda raw: {**raw, "offset": min(raw["offset"], raw["size"])})
    if cls.__name__ == "PlanForwardReply":  # exactly one of the two
        return st.one_of(
            *(st.fixed_dictionaries({k: _strategy(_non_none(tp))}) for k, tp, _ in fields)
        )
    return maps


def _non_none(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _fix_update(raw: dict[str, Any]) -> dict[str, Any]:
    """Updates carry the member record exactly when they say alive, matching id and inc."""
    member = raw["m"]
    if member is None:
        return {**raw, "s": "dead" if raw["s"] == "alive" else raw["s"]}
    return {**raw, "s": "alive", "id": member["id"], "inc": member.get("inc", 0)}


# --- malformed variants ----------------------------------------------------------------------


def malformed_variants(cls: type) -> dict[str, dict[str, Any]]:
    """name -> a raw payload of `cls` that must be refused: an extra field, a missing field,
    a value out of its bounds (those the class has)."""
    good = minimal(cls)
    out: dict[str, dict[str, Any]] = {"extra field": {**good, "zz_extra": 1}}
    present = [k for k in good]
    if present:
        out["missing field"] = {k: v for k, v in good.items() if k != present[0]}
    broken = _out_of_range(cls, minimal(cls, rich=True))
    if broken is not None:
        out["out of range"] = broken
    return out


def _out_of_range(tp: Any, value: Any) -> Any:
    """`value` with one bounded scalar (an integer first) pushed past its bound, or None."""
    for want_int in (True, False):
        found = _push(tp, value, want_int)
        if found is not None:
            return found
    return None


def _push(tp: Any, value: Any, want_int: bool) -> Any:
    base, bounds = _split(tp)
    if _bound(bounds, Validated):
        return None
    if isinstance(base, type) and dataclasses.is_dataclass(base) and isinstance(value, dict):
        for key, ftp, _ in raw_fields(base):
            if key in value:
                pushed = _push(ftp, value[key], want_int)
                if pushed is not None:
                    return {**value, key: pushed}
        return None
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Union or origin is types.UnionType:
        for arm in args:
            pushed = _push(arm, value, want_int) if arm is not type(None) else None
            if pushed is not None:
                return pushed
        return None
    if origin in (dict, Mapping) and isinstance(value, dict) and value:
        key, item = next(iter(value.items()))
        pushed = _push(args[1], item, want_int)
        if pushed is not None:
            return {**value, key: pushed}
        pushed_key = _push(args[0], key, want_int)
        return None if pushed_key is None else {pushed_key: item}
    if origin in (list, tuple, Sequence) and isinstance(value, list):
        size = _bound(bounds, Size)
        if value:
            pushed = _push(args[0], value[0], want_int)
            if pushed is not None:
                return [pushed, *value[1:]]
        if not want_int and size and size.high < 100_000:
            return [minimal(args[0])] * (size.high + 1)
        return None
    return _push_scalar(base, bounds, want_int)


def _push_scalar(base: Any, bounds: Sequence[Any], want_int: bool) -> Any:
    rng, size, match = _bound(bounds, Range), _bound(bounds, Size), _bound(bounds, Match)
    if want_int and base is int and rng:
        return 2**64 - 1 if rng.high < 2**64 - 1 else -1
    if want_int:
        return None
    if base is float and rng:
        return -1.0 if rng.low >= 0 else float(rng.high) * 2
    if base is str and match:
        return "not-a-valid-one!"
    if base in (str, bytes) and size and size.high < 2_000_000:
        return ("x" if base is str else b"x") * (size.high + 1)
    return None
