"""The one payload schema: every message type has one class, every field is bounded, and a
payload with an extra field, a missing field or a value out of bounds is refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from houndd.errors import WireError
from houndd.wire import schema
from houndd.wire.payloads import decode_payload, encode_payload, msg_type_of
from houndd.wire.types import MsgType
from tests.wire.payload_samples import classes, malformed_variants, minimal, payload_strategy

LIVE = sorted(MsgType)


def test_every_message_type_has_exactly_one_payload_class() -> None:
    table = classes()
    assert sorted(table) == LIVE
    assert len(set(table.values())) == len(table)
    for msg_type, cls in table.items():
        assert cls.__dataclass_params__.frozen, cls
        assert msg_type_of(schema.decode(cls, minimal(cls))) is msg_type


@pytest.mark.parametrize("msg_type", LIVE, ids=lambda t: t.name)
def test_every_field_is_bounded(msg_type: MsgType) -> None:
    assert schema.unbounded(classes()[msg_type]) == []


@pytest.mark.parametrize("msg_type", LIVE, ids=lambda t: t.name)
def test_minimal_payload_round_trips(msg_type: MsgType) -> None:
    raw = minimal(classes()[msg_type])
    payload = decode_payload(msg_type, raw)
    again_type, encoded = encode_payload(payload)
    assert again_type is msg_type
    assert decode_payload(msg_type, encoded) == payload


@pytest.mark.parametrize("msg_type", LIVE, ids=lambda t: t.name)
def test_extra_missing_and_out_of_range_fields_are_refused(msg_type: MsgType) -> None:
    cls = classes()[msg_type]
    variants = malformed_variants(cls)
    # Every class gets all three, except what a class cannot have: RECEIPT and PLAN_LIST
    # have no fields.
    expected = (
        {"extra field"}
        if msg_type in (MsgType.RECEIPT, MsgType.PLAN_LIST)
        else {
            "extra field",
            "missing field",
            "out of range",
        }
    )
    assert set(variants) == expected
    for name, raw in variants.items():
        with pytest.raises(WireError):
            decode_payload(msg_type, raw)
            pytest.fail(f"{msg_type.name}: {name} was accepted: {raw!r:.300}")


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_generated_payloads_of_every_type_decode_and_round_trip(data: st.DataObject) -> None:
    for msg_type, cls in classes().items():
        raw = data.draw(payload_strategy(cls), label=msg_type.name)
        payload = decode_payload(msg_type, raw)
        assert decode_payload(msg_type, encode_payload(payload)[1]) == payload


def test_the_longest_plan_list_fits_in_a_peer_reply() -> None:
    from houndd.config import Config
    from houndd.coordinator.messages import MAX_LISTED_PLANS, PlanListReply, PlanSummary
    from houndd.wire.fields import MAX_NAME_CHARS

    counts = dict.fromkeys(("total", "done", "failed", "pulling", "pending", "cancelled"), 2**40)
    summary = PlanSummary(
        "p" * 64, "n" * MAX_NAME_CHARS, "pull", "running", 1.7e9, True, "v" * MAX_NAME_CHARS,
        counts,
    )  # fmt: skip
    _, body = encode_payload(PlanListReply((summary,) * MAX_LISTED_PLANS))
    assert len(msgpack.packb(body)) < Config().max_http_body_bytes * 0.8
