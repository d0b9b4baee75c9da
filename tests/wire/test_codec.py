from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from houndd.errors import WireError
from houndd.wire import MsgType
from houndd.wire.codec import (
    WIRE_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    pack,
    unpack,
)
from houndd.wire.types import WireRefused

MAX = 65536


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "version": WIRE_VERSION,
        "cluster_id": "c1",
        "type": MsgType.DISPATCH,
        "sender": "0123456789abcdef",
        "boot_epoch": 3,
        "seq": 42,
        "ts": 1234.5,
        "payload": {"items": [{"digest": "sha256:aa", "size": 10}], "blob": b"\x00\xff"},
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def raw(*items: object) -> bytes:
    return pack(list(items))


def valid_items() -> list[object]:
    return [WIRE_VERSION, "c1", 17, "0123456789abcdef", 3, 42, 1234.5, {"k": "v"}]


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(WireRefused) as info:
        call()
    return info.value.reason


@contextmanager
def bounded(max_seconds: float = 0.05, max_bytes: int = 1 << 20) -> Iterator[None]:
    """Assert the block ran fast and allocated little (tracemalloc sees PyMem allocations,
    which is where msgpack would preallocate a declared str/bin/array)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < max_seconds, elapsed
    assert peak < max_bytes, peak


def test_round_trip() -> None:
    env = envelope()
    assert decode_envelope(encode_envelope(env), MAX) == env


def test_every_type_round_trips() -> None:
    for msg_type in MsgType:
        env = envelope(type=msg_type, payload={})
        back = decode_envelope(encode_envelope(env), MAX)
        assert back.type is msg_type


def test_unknown_message_type_is_refused() -> None:
    items = valid_items()
    items[2] = max(MsgType) + 1
    assert reason_of(lambda: decode_envelope(raw(*items), MAX)) == "unknown_type"


@pytest.mark.parametrize("version", [0, 2, "1", True, None])
def test_other_versions_are_refused(version: object) -> None:
    items = valid_items()
    items[0] = version
    assert reason_of(lambda: decode_envelope(raw(*items), MAX)) == "version"


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, 5),  # cluster_id
        (2, "PING"),  # type
        (2, True),
        (3, ""),  # sender
        (3, b"node"),
        (4, -1),  # boot_epoch
        (4, 1.0),
        (5, -5),  # seq
        (5, None),
        (6, "now"),  # ts
        (6, float("nan")),
        (6, float("inf")),
        (7, [1, 2]),  # payload must be a map
        (7, None),
    ],
)
def test_wrong_field_types_are_refused(index: int, value: object) -> None:
    items = valid_items()
    items[index] = value
    with pytest.raises(WireError):
        decode_envelope(raw(*items), MAX)


def test_arity_top_level_type_and_trailing_bytes() -> None:
    assert reason_of(lambda: decode_envelope(raw(*valid_items()[:7]), MAX)) == "malformed"
    assert reason_of(lambda: decode_envelope(raw(*valid_items(), 1), MAX)) == "malformed"
    assert reason_of(lambda: decode_envelope(msgpack.packb({"v": 1}), MAX)) == "malformed"
    assert reason_of(lambda: decode_envelope(raw(*valid_items()) + b"\x00", MAX)) == "malformed"
    assert reason_of(lambda: decode_envelope(b"", MAX)) == "malformed"


def test_oversize_is_refused_before_parsing() -> None:
    data = encode_envelope(envelope(payload={"x": "y" * 2000}))
    assert reason_of(lambda: decode_envelope(data, 1000)) == "oversize"


def test_non_string_map_keys_and_ext_types_are_refused() -> None:
    items = valid_items()
    items[7] = {1: "int key"}
    assert reason_of(lambda: decode_envelope(raw(*items), MAX)) == "malformed"
    items[7] = {"t": msgpack.Timestamp(1, 0)}
    assert reason_of(lambda: decode_envelope(raw(*items), MAX)) == "malformed"
    items[7] = {"e": msgpack.ExtType(5, b"")}
    assert reason_of(lambda: decode_envelope(raw(*items), MAX)) == "malformed"


def test_invalid_utf8_is_refused() -> None:
    data = raw(*valid_items()).replace(b"\xa2c1", b"\xa2\xff\xfe")
    assert reason_of(lambda: decode_envelope(data, MAX)) == "malformed"


HUGE = 2**31
HUGE_HEADERS = {
    "str32": b"\xdb" + struct.pack(">I", HUGE),
    "bin32": b"\xc6" + struct.pack(">I", HUGE),
    "array32": b"\xdd" + struct.pack(">I", HUGE),
    "map32": b"\xdf" + struct.pack(">I", HUGE),
    "ext32": b"\xc9" + struct.pack(">I", HUGE) + b"\x05",
}


@pytest.mark.parametrize("name", sorted(HUGE_HEADERS))
@pytest.mark.parametrize("max_size", [MAX, 1 << 20])
def test_huge_declared_length_is_refused_without_allocating(name: str, max_size: int) -> None:
    header = HUGE_HEADERS[name]
    with bounded(), pytest.raises(WireError):
        decode_envelope(header + b"\x00" * 16, max_size)
    # The same header where the payload belongs, inside an otherwise valid envelope.
    prefix = raw(*valid_items())[:-5]  # drop the payload map {"k": "v"}
    assert msgpack.unpackb(prefix + msgpack.packb({}), raw=False)[-1] == {}
    with bounded(), pytest.raises(WireError):
        decode_envelope(prefix + header, max_size)


def test_item_cap_limits_preallocation_of_nested_arrays() -> None:
    # 1000 nested arrays each declaring 65535 slots: unbounded, msgpack would reserve ~500 MB.
    nested = b"\xdc\xff\xff" * 1000
    with bounded(), pytest.raises(WireError):
        unpack(nested, MAX, max_items=8)
    with bounded(max_bytes=8 << 20), pytest.raises(WireError):
        unpack(nested, MAX)  # default cap: the data length (3000 slots per level)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    with suppress(WireError):
        decode_envelope(data, MAX)


VALID = encode_envelope(envelope())


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_envelopes_are_refused(cut: int) -> None:
    with pytest.raises(WireError):
        decode_envelope(VALID[:cut], MAX)


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=len(VALID) * 8 - 1), min_size=1, max_size=4))
def test_bit_flipped_envelopes_decode_or_raise_wire_error(bits: list[int]) -> None:
    data = bytearray(VALID)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    try:
        env = decode_envelope(bytes(data), MAX)
    except WireError:
        return
    # A flip inside a string or number can still be a well-formed envelope: then it is typed.
    assert isinstance(env.type, MsgType) and isinstance(env.payload, dict)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(msgpack_values, max_size=10))
def test_arbitrary_msgpack_arrays_only_ever_raise_wire_error(items: list[object]) -> None:
    with suppress(WireError):
        decode_envelope(msgpack.packb(items, use_bin_type=True), MAX)
