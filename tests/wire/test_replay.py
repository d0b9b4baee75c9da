from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from houndd.wire.replay import ReplayGuard
from houndd.wire.types import WireRefused

NOW = 1000.0


def refused(
    guard: ReplayGuard, seq: int, *, epoch: int = 1, ts: float = NOW, sender: str = "a"
) -> str:
    with pytest.raises(WireRefused) as info:
        guard.accept(sender, epoch, seq, ts, NOW)
    return info.value.reason


def test_same_message_twice_is_refused() -> None:
    guard = ReplayGuard()
    guard.accept("a", 1, 1, NOW, NOW)
    assert refused(guard, 1) == "replay_duplicate"
    guard.accept("b", 1, 1, NOW, NOW)  # senders are independent


def test_out_of_order_within_the_window_is_accepted_once() -> None:
    guard = ReplayGuard()
    for seq in (10, 5, 7, 6, 11, 8, 1):
        guard.accept("a", 1, seq, NOW, NOW)
    for seq in (10, 5, 7, 6, 11, 8, 1):
        assert refused(guard, seq) == "replay_duplicate"
    guard.accept("a", 1, 9, NOW, NOW)


def test_sequence_below_the_window_is_refused() -> None:
    guard = ReplayGuard(seq_window=1024)
    guard.accept("a", 1, 2000, NOW, NOW)
    assert refused(guard, 2000 - 1024) == "replay_old"
    assert refused(guard, 3) == "replay_old"
    guard.accept("a", 1, 2000 - 1023, NOW, NOW)  # the oldest slot still inside


def test_jump_beyond_the_window_forgets_the_old_bitmap() -> None:
    guard = ReplayGuard(seq_window=64)
    guard.accept("a", 1, 1, NOW, NOW)
    guard.accept("a", 1, 10_000, NOW, NOW)
    assert refused(guard, 1) == "replay_old"
    guard.accept("a", 1, 10_000 - 63, NOW, NOW)
    assert refused(guard, 10_000) == "replay_duplicate"


def test_old_boot_epoch_is_refused_and_a_newer_one_resets_the_window() -> None:
    guard = ReplayGuard()
    guard.accept("a", 5, 100, NOW, NOW)
    assert refused(guard, 101, epoch=4) == "replay_epoch"
    guard.accept("a", 6, 1, NOW, NOW)  # restarted: counts from 1 again
    assert refused(guard, 100, epoch=5) == "replay_epoch"
    assert refused(guard, 1, epoch=6) == "replay_duplicate"


@pytest.mark.parametrize("offset", [-30.5, 30.5, -1e9, 1e9])
def test_timestamp_outside_the_window_is_refused(offset: float) -> None:
    guard = ReplayGuard(window_s=30)
    assert refused(guard, 1, ts=NOW + offset) == "replay_time"


@pytest.mark.parametrize("offset", [-29.9, 0.0, 29.9])
def test_timestamp_inside_the_window_is_accepted(offset: float) -> None:
    ReplayGuard(window_s=30).accept("a", 1, 1, NOW + offset, NOW)


def test_non_finite_timestamps_are_refused() -> None:
    guard = ReplayGuard()
    for ts in (math.nan, math.inf, -math.inf):
        assert refused(guard, 1, ts=ts) == "replay_time"


def test_refused_messages_do_not_move_the_window() -> None:
    guard = ReplayGuard(seq_window=64)
    guard.accept("a", 1, 10, NOW, NOW)
    assert refused(guard, 5000, ts=NOW - 100) == "replay_time"
    guard.accept("a", 1, 9, NOW, NOW)  # still inside: the refused 5000 did not count


def test_tracked_senders_are_bounded() -> None:
    guard = ReplayGuard(max_senders=3)
    for name in "abcd":
        guard.accept(name, 1, 1, NOW, NOW)
    assert len(guard) == 3
    # "a" was evicted (least recently used), so it starts afresh; "d" is still tracked.
    guard.accept("a", 1, 1, NOW, NOW)
    assert refused(guard, 1, sender="d") == "replay_duplicate"


WINDOW = 64


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=400), max_size=300))
def test_matches_a_naive_model(seqs: list[int]) -> None:
    """Accepted iff never accepted before and within WINDOW of the highest accepted."""
    guard = ReplayGuard(seq_window=WINDOW)
    accepted: set[int] = set()
    for seq in seqs:
        highest = max(accepted, default=None)
        expect = seq not in accepted and (highest is None or seq > highest - WINDOW)
        try:
            guard.accept("a", 1, seq, NOW, NOW)
            got = True
        except WireRefused:
            got = False
        assert got == expect, (seq, highest)
        if got:
            accepted.add(seq)


def test_messages_stamped_before_the_start_are_refused_until_the_window_passes() -> None:
    guard = ReplayGuard(window_s=30, started_at=NOW)
    with pytest.raises(WireRefused) as info:
        guard.accept("a", 1, 1, NOW - 0.001, NOW + 1)
    assert info.value.reason == "replay_restart"
    guard.accept("a", 1, 2, NOW, NOW + 1)  # stamped at our start: accepted
    with pytest.raises(WireRefused) as info:
        guard.accept("c", 1, 1, NOW - 1, NOW + 30.5)
    assert info.value.reason == "replay_time"  # from here the timestamp window covers it ...
    # ... so the floor is dropped: after our clock steps back 60 s, peers are heard again.
    guard.accept("b", 1, 1, NOW - 60, NOW - 60)
