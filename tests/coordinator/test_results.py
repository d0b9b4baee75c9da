"""The result lattice: merge is commutative, associative and idempotent."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from houndd.coordinator.results import ItemResult, ItemState, merge

results = st.builds(
    ItemResult,
    state=st.sampled_from(list(ItemState)),
    attempt=st.integers(0, 4),
    digest=st.sampled_from(["", "sha256:" + "a" * 64, "sha256:" + "b" * 64]),
    bytes_done=st.integers(0, 3),
    bytes_total=st.integers(0, 3),
    bytes_registry=st.integers(0, 2),
    bytes_peers=st.integers(0, 2),
    bytes_cache=st.integers(0, 2),
    reason=st.sampled_from(["", "timeout", "unauthorized"]),
    detail=st.sampled_from(["", "x"]),
    started_at=st.none() | st.floats(0, 10, allow_nan=False),
    finished_at=st.none() | st.floats(0, 10, allow_nan=False),
    skipped=st.booleans(),
    transient=st.booleans(),
)


@given(results, results)
def test_merge_commutative(a: ItemResult, b: ItemResult) -> None:
    assert merge(a, b) == merge(b, a)


@given(results, results, results)
def test_merge_associative(a: ItemResult, b: ItemResult, c: ItemResult) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(results)
def test_merge_idempotent(a: ItemResult) -> None:
    assert merge(a, a) == a


@given(results, results)
def test_merge_is_an_upper_bound(a: ItemResult, b: ItemResult) -> None:
    m = merge(a, b)
    assert m in (a, b)
    assert merge(m, a) == m and merge(m, b) == m


@given(results)
def test_wire_round_trip(a: ItemResult) -> None:
    assert ItemResult.from_dict(a.to_dict()) == a


def test_order_table() -> None:
    pend1 = ItemResult(ItemState.PENDING, 1)
    pull1 = ItemResult(ItemState.PULLING, 1)
    fail1 = ItemResult(ItemState.FAILED, 1, reason="timeout", transient=True)
    final1 = ItemResult(ItemState.FAILED, 1, reason="timeout", transient=False)
    done1 = ItemResult(ItemState.DONE, 1)
    pull2 = ItemResult(ItemState.PULLING, 2)
    cancel1 = ItemResult(ItemState.CANCELLED, 1)
    assert merge(pend1, pull1) == pull1
    assert merge(pull1, fail1) == fail1
    assert merge(fail1, final1) == final1  # the coordinator's verdict outranks the report
    assert merge(fail1, pull2) == pull2  # a retry supersedes the failed attempt
    assert merge(done1, pull2) == done1  # done is absorbing
    assert merge(done1, cancel1) == done1
    assert merge(final1, cancel1) == final1
    assert not fail1.is_final and final1.is_final and done1.is_final and cancel1.is_final
    assert not pull1.is_final
