from __future__ import annotations

from houndd.wire import MsgType
from houndd.wire.types import RETIRED_NUMBERS

# The values are on the wire: this table is the contract, and may only grow at the end.
WIRE_VALUES = {
    "PING": 1,
    "PING_REQ": 2,
    "ACK": 3,
    "NACK": 4,
    "PUSH_PULL": 8,
    "PUSH_PULL_REPLY": 9,
    "HEARTBEAT": 10,
    "VOTE_REQUEST": 11,
    "VOTE_REPLY": 12,
    "PLAN_PUT": 13,
    "PLAN_ACK": 14,
    "PLAN_FORWARD": 15,
    "PLAN_FORWARD_REPLY": 16,
    "DISPATCH": 17,
    "DISPATCH_REPLY": 18,
    "RESULTS": 19,
    "SYNC_DIGEST": 21,
    "SYNC_ITEMS": 22,
    "KEYRING_OP": 23,
    "KEYRING_REPLY": 24,
    "LABELS_SET": 25,
    "LABELS_REPLY": 26,
    "CANCEL": 27,
    "CANCEL_REPLY": 28,
    "GOSSIP": 29,
    "ERROR_REPLY": 30,
    "FENCED": 31,
    "PLAN_ABORT": 32,
    "ABORT": 33,
    "RECEIPT": 34,
}


def test_existing_values_never_change() -> None:
    for name, value in WIRE_VALUES.items():
        assert MsgType[name] == value


def test_values_are_dense_and_unique_around_the_retired_ones() -> None:
    values = [m.value for m in MsgType]
    assert len(set(values)) == len(values)
    assert not RETIRED_NUMBERS & set(values)
    assert sorted([*values, *RETIRED_NUMBERS]) == list(range(1, len(values) + 5))
