from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Literal

import msgpack
import pytest

from houndd.errors import WireError
from houndd.wire import schema
from houndd.wire.schema import SchemaError


class Op(StrEnum):
    PULL = "pull"
    REMOVE = "remove"


class Priority(IntEnum):
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Item:
    image: str
    digest: str
    size_bytes: int = 0


@dataclass(frozen=True)
class Batch:
    plan_id: str
    op: Op
    items: tuple[Item, ...]
    labels: dict[str, str]
    weight: float
    urgent: bool
    blob: bytes
    note: str | None = None
    priority: Priority = Priority.LOW
    tags: list[str] = field(default_factory=list)
    parent: Item | None = None


@dataclass(frozen=True)
class Exotic:
    mode: Literal["fast", "slow"]
    pair: tuple[int, str]
    env: Mapping[str, int]
    extra: Any = None


@dataclass(frozen=True)
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


def sample() -> Batch:
    return Batch(
        plan_id="p1",
        op=Op.PULL,
        items=(Item("nginx:1.27", "sha256:aa", 10), Item("busybox:1.36", "sha256:bb")),
        labels={"gpu": "true"},
        weight=1.5,
        urgent=False,
        blob=b"\x00\x01",
        note="hello",
        priority=Priority.HIGH,
        tags=["a", "b"],
        parent=Item("x", "sha256:cc"),
    )


def valid_map() -> dict[str, Any]:
    return schema.encode(sample())


def test_round_trip_through_msgpack() -> None:
    wire_bytes = msgpack.packb(schema.encode(sample()), use_bin_type=True)
    back = schema.decode(Batch, msgpack.unpackb(wire_bytes, raw=False))
    assert back == sample()
    assert isinstance(back.items, tuple) and isinstance(back.op, Op)
    assert back.priority is Priority.HIGH


def test_encode_produces_plain_values() -> None:
    data = schema.encode(sample())
    assert data["op"] == "pull" and type(data["op"]) is str
    assert data["priority"] == 2 and type(data["priority"]) is int
    assert data["items"] == [
        {"image": "nginx:1.27", "digest": "sha256:aa", "size_bytes": 10},
        {"image": "busybox:1.36", "digest": "sha256:bb", "size_bytes": 0},
    ]


def test_encode_rejects_non_dataclass_and_unencodable_values() -> None:
    with pytest.raises(TypeError):
        schema.encode({"a": 1})
    with pytest.raises(TypeError):
        schema.encode(Exotic(mode="fast", pair=(1, "a"), env={}, extra=object()))


def test_missing_fields_with_defaults_take_the_default() -> None:
    data = valid_map()
    for name in ("note", "priority", "tags", "parent"):
        del data[name]
    del data["items"][1]["size_bytes"]
    back = schema.decode(Batch, data)
    assert back.note is None and back.priority is Priority.LOW and back.tags == []
    assert back.parent is None and back.items[1].size_bytes == 0


def test_int_is_accepted_for_float() -> None:
    data = valid_map()
    data["weight"] = 3
    back = schema.decode(Batch, data)
    assert back.weight == 3.0 and type(back.weight) is float


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["items"][1].update(layers=3), "items[1].layers"),
        (lambda d: d["parent"].update(zzz=None), "parent.zzz"),
    ],
)
def test_unknown_field_is_refused_with_its_path(mutate: Any, path: str) -> None:
    data = valid_map()
    mutate(data)
    with pytest.raises(SchemaError) as info:
        schema.decode(Batch, data)
    assert info.value.field == path
    assert "unknown field" in str(info.value)


@pytest.mark.parametrize(
    ("remove", "path"),
    [
        (lambda d: d.pop("plan_id"), "plan_id"),
        (lambda d: d["items"][0].pop("digest"), "items[0].digest"),
        (lambda d: d["parent"].pop("image"), "parent.image"),
    ],
)
def test_missing_required_field_is_refused_with_its_path(remove: Any, path: str) -> None:
    data = valid_map()
    remove(data)
    with pytest.raises(SchemaError) as info:
        schema.decode(Batch, data)
    assert info.value.field == path
    assert "missing" in str(info.value)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("plan_id", 5),
        ("plan_id", b"p1"),
        ("op", "delete"),  # not a member
        ("op", 1),
        ("priority", 7),
        ("priority", True),  # bool is not int, not even for an IntEnum
        ("priority", "2"),
        ("weight", True),  # bool is not a number
        ("weight", "1.5"),
        ("weight", math.nan),
        ("weight", math.inf),
        ("urgent", 1),  # int is not bool
        ("urgent", None),
        ("blob", "text"),
        ("note", 5),
        ("tags", "a,b"),
        ("items", {"0": {}}),
        ("labels", ["gpu"]),
        ("parent", "x"),
    ],
)
def test_wrong_type_is_refused_with_its_path(path: str, value: object) -> None:
    data = valid_map()
    data[path] = value
    with pytest.raises(SchemaError) as info:
        schema.decode(Batch, data)
    assert info.value.field == path


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d["items"][1].update(digest=None), "items[1].digest"),
        (lambda d: d["items"][0].update(size_bytes=True), "items[0].size_bytes"),
        (lambda d: d["items"][0].update(size_bytes=1.5), "items[0].size_bytes"),
        (lambda d: d["items"].append("nginx"), "items[2]"),
        (lambda d: d["tags"].append(3), "tags[2]"),
        (lambda d: d["labels"].update(zone=1), "labels['zone']"),
        (lambda d: d["parent"].update(size_bytes="big"), "parent.size_bytes"),
    ],
)
def test_nested_errors_name_the_full_path(mutate: Any, path: str) -> None:
    data = valid_map()
    mutate(data)
    with pytest.raises(SchemaError) as info:
        schema.decode(Batch, data)
    assert info.value.field == path
    assert str(info.value).startswith(path + ": ")


def test_schema_error_is_a_wire_error_and_names_the_payload_at_the_root() -> None:
    with pytest.raises(WireError, match=r"^payload: expected a map, got array"):
        schema.decode(Batch, [1, 2])
    with pytest.raises(SchemaError, match="expected string keys"):
        schema.decode(Item, {1: "x"})


def test_literal_fixed_tuple_mapping_and_any() -> None:
    data = {"mode": "slow", "pair": [1, "a"], "env": {"A": 1}, "extra": {"free": [1]}}
    back = schema.decode(Exotic, data)
    assert back == Exotic(mode="slow", pair=(1, "a"), env={"A": 1}, extra={"free": [1]})
    with pytest.raises(SchemaError) as info:
        schema.decode(Exotic, {**data, "mode": "medium"})
    assert info.value.field == "mode"
    with pytest.raises(SchemaError) as info:
        schema.decode(Exotic, {**data, "pair": [1]})
    assert info.value.field == "pair"
    with pytest.raises(SchemaError) as info:
        schema.decode(Exotic, {**data, "pair": [1, 2]})
    assert info.value.field == "pair[1]"
    with pytest.raises(SchemaError) as info:
        schema.decode(Exotic, {**data, "env": {"A": "1"}})
    assert info.value.field == "env['A']"


def test_post_init_validation_becomes_a_schema_error() -> None:
    assert schema.decode(Positive, {"n": 3}) == Positive(3)
    with pytest.raises(SchemaError, match="n must be positive"):
        schema.decode(Positive, {"n": 0})


def test_long_unknown_field_names_are_clipped_in_errors() -> None:
    with pytest.raises(SchemaError) as info:
        schema.decode(Item, {"image": "a", "digest": "b", "x" * 10_000: 1})
    assert len(str(info.value)) < 300


def test_decode_requires_a_dataclass_type() -> None:
    with pytest.raises(TypeError):
        schema.decode(dict, {})
