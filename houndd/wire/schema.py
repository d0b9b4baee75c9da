"""Strict (de)serialisation of payload dataclasses to and from msgpack-ready values.

`encode(obj)` turns a dataclass into a dict of plain values (str, int, float, bool, bytes, None,
lists and dicts). `decode(cls, obj)` checks a decoded msgpack value against the field types of
`cls` and builds it, refusing unknown fields, missing required fields, wrong types and values out
of their bounds with a `SchemaError` that names the path of the offending field, like
`items[2].digest`.

Supported field types: str, int, float (an int is accepted), bool (never an int), bytes, None,
`X | None` and other unions, `Literal[...]`, `list[X]`, `tuple[X, ...]` and fixed tuples,
`dict[str, X]` / `Mapping[str, X]`, IntEnum / StrEnum (any Enum with int or str values), nested
dataclasses and `Any` (passed through unchecked). Fields with a default may be omitted.

Bounds ride on `typing.Annotated`: `Annotated[int, Range(0, 2**62)]`,
`Annotated[str, Size(1, 64), Match(r"[a-z]+")]`, `Annotated[str, Check(fn, "a host")]`. `Size`
is checked on the raw value before its items are decoded, the others after; `Validated` marks
a value the class's own `__post_init__` checks. `unbounded(cls)` lists the fields of a payload
class that carry no bound, so a test can insist on none.

Field metadata (`dataclasses.field(metadata=...)`): `wire_name("id")` puts the field on the
wire under another key (short keys keep gossip small), `LOCAL` keeps a field off the wire (it
must have a default), `OMIT_NONE` leaves the field out when it is None (older peers may not
know it, and a content hash over the encoded form stays the same).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast

from houndd.errors import WireError

T = TypeVar("T")

_Decoder = Callable[[object], Any]

_KIND_NAMES = {"NoneType": "nil", "dict": "map", "list": "array", "tuple": "array"}

LOCAL: Mapping[str, Any] = {"houndd.local": True}
"""Field metadata: the field never goes on the wire (it needs a default)."""
OMIT_NONE: Mapping[str, Any] = {"houndd.omit_none": True}
"""Field metadata: the field is left out of the encoding while it is None."""


def wire_name(name: str, **more: Any) -> dict[str, Any]:
    """Field metadata: the field travels under the key `name`."""
    return {"houndd.wire": name, **more}


def wire_names(cls: type) -> tuple[str, ...]:
    """The keys a dataclass's fields travel under, in field order."""
    return tuple(f.metadata.get("houndd.wire", f.name) for f in dataclasses.fields(cls))


class SchemaError(WireError):
    """A payload does not match its schema. `field` is the path (`items[2].digest`; empty for
    the payload itself) and `problem` what is wrong with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field or 'payload'}: {problem}")
        self.field = field
        self.problem = problem

    def inside(self, part: str) -> SchemaError:
        """This error, seen from the container where it sits at `part` (a key or `[i]`)."""
        if not self.field:
            field = part
        elif self.field.startswith("["):
            field = part + self.field
        else:
            field = f"{part}.{self.field}"
        return SchemaError(field, self.problem)


# --- bounds ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """An int or float within [low, high]."""

    low: float
    high: float

    def check(self, value: Any) -> None:
        if not self.low <= value <= self.high:
            raise SchemaError("", f"expected {self.low!r}..{self.high!r}, got {_short(value)}")


@dataclasses.dataclass(frozen=True)
class Size:
    """A str, bytes, array or map whose length is within [low, high]. Checked before the
    items are decoded, so an oversize array costs nothing."""

    low: int
    high: int

    def check(self, value: Any) -> None:
        try:
            n = len(value)
        except TypeError:
            return  # not a sized value: the type's own decoder refuses it
        if not self.low <= n <= self.high:
            raise SchemaError("", f"expected a length of {self.low}..{self.high}, got {n}")


@dataclasses.dataclass(frozen=True)
class Match:
    """A str that matches `pattern` as a whole; `what` names the shape in errors."""

    pattern: str
    what: str

    def check(self, value: Any) -> None:
        if not _compiled(self.pattern).fullmatch(value):
            raise SchemaError("", f"expected {self.what}")


@dataclasses.dataclass(frozen=True)
class Check:
    """Any value accepted by `fn`, which returns None or what is wrong."""

    fn: Callable[[Any], str | None]
    what: str

    def check(self, value: Any) -> None:
        problem = self.fn(value)
        if problem is not None:
            raise SchemaError("", problem)


@dataclasses.dataclass(frozen=True)
class Validated:
    """Marks a value the class itself checks in full (its `__post_init__` raises ValueError
    naming the problem), so `unbounded` accepts it; `by` says which validator."""

    by: str

    def check(self, value: Any) -> None:
        """Nothing here: the class's own validation runs when it is built."""


Bound = Range | Size | Match | Check | Validated


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def unbounded(cls: type, path: str = "") -> list[str]:
    """Paths of the fields of dataclass `cls` (recursively) that carry no bound: a str,
    bytes, array or map without `Size`, a number without `Range`, an `Any` without `Check`."""
    found: list[str] = []
    _, fields = _fields_of(cls)
    for f in fields:
        _audit(f.type, _child(path, f.key), found, set())
    return found


def _audit(tp: Any, path: str, found: list[str], seen: set[Any]) -> None:
    bounds: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        bounds = tp.__metadata__
        tp = typing.get_args(tp)[0]
    kinds = {type(b) for b in bounds}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if Validated in kinds or Check in kinds:
        ok = True
    elif tp is Any or tp is object:
        ok = False
    elif tp in (str, bytes):
        ok = Size in kinds or Match in kinds
    elif tp in (int, float):
        ok = Range in kinds
    elif origin in (list, Sequence, dict, Mapping) or (origin is tuple and Ellipsis in args):
        ok = Size in kinds
        for arg in args:
            if arg is not Ellipsis:
                _audit(arg, f"{path}[]", found, seen)
    elif origin is typing.Union or origin is types.UnionType or origin is tuple:
        for arg in args:
            _audit(arg, path, found, seen)
        ok = True
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp not in seen:
            seen.add(tp)
            for f in _fields_of(tp)[1]:
                _audit(f.type, _child(path, f.key), found, seen)
        ok = True
    else:
        ok = True  # None, bool, Literal, enums: a closed set of values
    if not ok:
        found.append(path or "payload")


# --- encoding ------------------------------------------------------------------------------


def encode(obj: object) -> dict[str, Any]:
    """Turn a dataclass instance into a dict of msgpack-ready values.

    Enums become their values, tuples become lists, nested dataclasses become dicts.
    A value that cannot go on the wire raises TypeError (a bug in the caller, not bad input).
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"schema.encode expects a dataclass instance, got {type(obj).__name__}")
    return cast(dict[str, Any], _encode_value(obj))


def decode(cls: type[T], obj: object) -> T:
    """Build a `cls` (a dataclass) from a decoded msgpack value, strictly.

    Raises `SchemaError` (a `WireError`) naming the field path on an unknown field, a missing
    field without default, a value of the wrong type or out of its bounds.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"schema.decode expects a dataclass type, got {cls!r}")
    return cast(T, _decoder_for(cls)(obj))


def _encode_value(value: object) -> Any:
    if isinstance(value, enum.Enum):
        # First: an IntEnum is an int and a StrEnum a str, but they go out as plain ones.
        inner = value.value
        if isinstance(inner, bool) or not isinstance(inner, int | str):
            raise TypeError(f"cannot encode enum {value!r}: values must be int or str")
        return int(inner) if isinstance(inner, int) else str(inner)
    if value is None or isinstance(value, bool | str | bytes | int | float):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _, fields = _fields_of(type(value))
        out: dict[str, Any] = {}
        for f in fields:
            item = getattr(value, f.name)
            if item is None and f.omit_none:
                continue
            out[f.key] = _encode_value(item)
        return out
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, Mapping):
        mapped: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot encode map key {k!r}: keys must be str")
            mapped[k] = _encode_value(v)
        return mapped
    raise TypeError(f"cannot encode a {type(value).__name__} on the wire")


# --- decoding ------------------------------------------------------------------------------


def _kind(value: object) -> str:
    name = type(value).__name__
    return _KIND_NAMES.get(name, name)


def _child(path: str, name: str) -> str:
    name = _clip(name)
    return f"{path}.{name}" if path else name


def _clip(name: str) -> str:
    # Names in paths may come from a peer: keep error messages (and logs) bounded.
    return name if len(name) <= 64 else name[:61] + "..."


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    key: str  # the name on the wire
    type: Any
    required: bool
    omit_none: bool


@functools.cache
def _fields_of(cls: type) -> tuple[dict[str, _Field], tuple[_Field, ...]]:
    # Cached per class: get_type_hints resolves string annotations, which is slow.
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = tuple(
        _Field(
            name=f.name,
            key=str(f.metadata.get("houndd.wire", f.name)),
            type=hints[f.name],
            required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            omit_none=bool(f.metadata.get("houndd.omit_none")),
        )
        for f in dataclasses.fields(cls)
        if f.init and not f.metadata.get("houndd.local")
    )
    return {f.key: f for f in fields}, fields


def _scalar_decoder(tp: Any) -> _Decoder | None:
    scalars: dict[Any, _Decoder] = {
        type(None): _decode_none,
        None: _decode_none,
        bool: _decode_bool,
        int: _decode_int,
        float: _decode_float,
        str: _decode_str,
        bytes: _decode_bytes,
    }
    if tp is Any or tp is object:
        return lambda value: value
    return scalars.get(tp)


# Decoders are built once per type (and nested types with them), so decoding does no type
# introspection. Bounded by the number of distinct types in the program, not by input.
@functools.cache
def _decoder_for(tp: Any) -> _Decoder:
    scalar = _scalar_decoder(tp)
    if scalar is not None:
        return scalar
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return functools.partial(_decode_enum, tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _DataclassDecoder(tp)
    return _generic_decoder(tp)


def _generic_decoder(tp: Any) -> _Decoder:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        bounds = tuple(tp.__metadata__)
        sizes = tuple(b for b in bounds if isinstance(b, Size))
        others = tuple(b for b in bounds if not isinstance(b, Size | Validated))
        return functools.partial(_decode_bounded, _decoder_for(args[0]), sizes, others)
    if origin is typing.Union or origin is types.UnionType:
        return _union_decoder(args)
    if origin is typing.Literal:
        return functools.partial(_decode_literal, args)
    if origin in (list, Sequence):
        (item,) = args or (Any,)
        return functools.partial(_decode_list, _decoder_for(item))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return functools.partial(_decode_var_tuple, _decoder_for(args[0]))
        return functools.partial(_decode_fixed_tuple, tuple(_decoder_for(a) for a in args))
    if origin in (dict, Mapping):
        key, item = args or (str, Any)
        base = typing.get_args(key)[0] if typing.get_origin(key) is Annotated else key
        if base is not str:
            raise TypeError(f"schema: map keys must be str, got {tp!r}")
        return functools.partial(_decode_map, _decoder_for(key), _decoder_for(item))
    raise TypeError(f"schema: unsupported field type {tp!r}")


def _decode_bounded(
    inner: _Decoder, sizes: tuple[Size, ...], others: tuple[Bound, ...], value: object
) -> Any:
    for size in sizes:
        size.check(value)
    decoded = inner(value)
    for bound in others:
        bound.check(decoded)
    return decoded


def _decode_none(value: object) -> None:
    if value is not None:
        raise SchemaError("", f"expected nil, got {_kind(value)}")


def _decode_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise SchemaError("", f"expected a boolean, got {_kind(value)}")
    return value


def _decode_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError("", f"expected an integer, got {_kind(value)}")
    return value


def _decode_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError("", f"expected a number, got {_kind(value)}")
    number = float(value)
    # NaN compares false with everything: one in a timestamp or a size would slip past bounds.
    if not math.isfinite(number):
        raise SchemaError("", "expected a finite number")
    return number


def _decode_str(value: object) -> str:
    if not isinstance(value, str):
        raise SchemaError("", f"expected a string, got {_kind(value)}")
    return value


def _decode_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise SchemaError("", f"expected binary data, got {_kind(value)}")
    return value


def _decode_enum(cls: type[enum.Enum], value: object) -> enum.Enum:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SchemaError("", f"expected a {cls.__name__} value, got {_kind(value)}")
    member = cls._value2member_map_.get(value)
    if member is None:
        shown = repr(value) if isinstance(value, int) or len(value) <= 40 else "a long string"
        raise SchemaError("", f"{shown} is not a known {cls.__name__}")
    return member


def _union_decoder(arms: tuple[Any, ...]) -> _Decoder:
    optional = type(None) in arms
    candidates = tuple(_decoder_for(a) for a in arms if a is not type(None))
    names = " or ".join(_type_name(a) for a in arms)

    def decode(value: object) -> Any:
        if value is None and optional:
            return None
        first_error: SchemaError | None = None
        for candidate in candidates:
            try:
                return candidate(value)
            except SchemaError as e:
                first_error = first_error or e
        if len(candidates) == 1 and first_error is not None:
            raise first_error
        raise SchemaError("", f"expected {names}, got {_kind(value)}")

    return decode


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return str(getattr(tp, "__name__", repr(tp)))


def _decode_literal(allowed: tuple[Any, ...], value: object) -> Any:
    for option in allowed:
        if value == option and type(value) is type(option):
            return option
    shown = ", ".join(repr(a) for a in allowed)
    raise SchemaError("", f"expected one of {shown}")


def _decode_list(decode_item: _Decoder, value: object) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise SchemaError("", f"expected an array, got {_kind(value)}")
    try:
        return [decode_item(v) for v in value]
    except SchemaError:
        pass
    for i, v in enumerate(value):  # the rare path: find which item, for the error's path
        try:
            decode_item(v)
        except SchemaError as e:
            raise e.inside(f"[{i}]") from None
    raise AssertionError("unreachable: an item failed once and then decoded")


def _decode_var_tuple(decode_item: _Decoder, value: object) -> tuple[Any, ...]:
    return tuple(_decode_list(decode_item, value))


def _decode_fixed_tuple(decoders: tuple[_Decoder, ...], value: object) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise SchemaError("", f"expected an array, got {_kind(value)}")
    if len(value) != len(decoders):
        raise SchemaError("", f"expected {len(decoders)} items, got {len(value)}")
    out = []
    for i, (decode, item) in enumerate(zip(decoders, value, strict=True)):
        try:
            out.append(decode(item))
        except SchemaError as e:
            raise e.inside(f"[{i}]") from None
    return tuple(out)


def _decode_map(decode_key: _Decoder, decode_item: _Decoder, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError("", f"expected a map, got {_kind(value)}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise SchemaError("", f"expected string keys, got {_kind(k)}")
        try:
            out[decode_key(k)] = decode_item(v)
        except SchemaError as e:
            raise e.inside(f"[{_clip(k)!r}]") from None
    return out


class _DataclassDecoder:
    """Builds a dataclass from a map; its field decoders are resolved on first use (a class
    may name itself through a later one)."""

    def __init__(self, cls: type) -> None:
        self._cls = cls
        self._plan: tuple[tuple[str, str, _Decoder, bool], ...] | None = None
        self._keys: frozenset[str] = frozenset()

    def _resolve(self) -> tuple[tuple[str, str, _Decoder, bool], ...]:
        by_key, fields = _fields_of(self._cls)
        self._keys = frozenset(by_key)
        self._plan = tuple((f.key, f.name, _decoder_for(f.type), f.required) for f in fields)
        return self._plan

    def __call__(self, value: object) -> object:
        plan = self._plan if self._plan is not None else self._resolve()
        if not isinstance(value, dict):
            raise SchemaError("", f"expected a map, got {_kind(value)}")
        for key in value:
            if key not in self._keys:
                if not isinstance(key, str):
                    raise SchemaError("", f"expected string keys, got {_kind(key)}")
                known = ", ".join(sorted(self._keys))
                raise SchemaError(_clip(key), f"unknown field (known: {known})")
        kwargs: dict[str, Any] = {}
        for key, name, decode, required in plan:
            if key in value:
                try:
                    kwargs[name] = decode(value[key])
                except SchemaError as e:
                    raise e.inside(key) from None
            elif required:
                raise SchemaError(key, "missing required field")
        try:
            return self._cls(**kwargs)
        except (ValueError, TypeError) as e:
            # A __post_init__ that validates its values: report it at this object's path.
            field = getattr(e, "field", None)
            if isinstance(field, str) and field:
                raise SchemaError(_clip(field), getattr(e, "reason", str(e))) from None
            raise SchemaError("", str(e)) from None
