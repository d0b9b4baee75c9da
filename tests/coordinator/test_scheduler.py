"""The pure scheduler: caps, order, retries with backoff, timeouts, cancel, restore, node churn.

No asyncio and no sleeps: time is a float the tests advance by hand.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from houndd.coordinator.scheduler import (
    NODE_UNAVAILABLE,
    Abort,
    Action,
    Dispatch,
    DispatchItem,
    Final,
    Policy,
    RestoredItem,
    Scheduler,
)

MB = 1 << 20


def sched(
    items: list[tuple[str, str, str, int]],
    *,
    seed: int = 0,
    timeout_s: float = 60.0,
    **kw: object,
) -> Scheduler:
    policy_kw = {
        k: kw.pop(k) for k in ("parallelism", "per_node_parallelism", "retries") if k in kw
    }
    policy = Policy(timeout_s=timeout_s, **policy_kw)  # type: ignore[arg-type]
    return Scheduler(items, policy, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


def dispatches(actions: list[Action]) -> list[Dispatch]:
    return [a for a in actions if isinstance(a, Dispatch)]


def finals(actions: list[Action]) -> list[Final]:
    return [a for a in actions if isinstance(a, Final)]


def images_of(actions: list[Action]) -> dict[str, list[str]]:
    return {d.node: [i.image for i in d.items] for d in dispatches(actions)}


# --- order and caps -------------------------------------------------------------------------


def test_largest_image_first_on_one_node() -> None:
    s = sched(
        [("n1", "small", "", 10), ("n1", "big", "", 30), ("n1", "mid", "", 20)],
        per_node_parallelism=1,
    )
    assert images_of(s.start(0.0)) == {"n1": ["big"]}
    assert images_of(s.on_result("n1", "big", 1, True, "", False, 1.0)) == {"n1": ["mid"]}
    assert images_of(s.on_result("n1", "mid", 1, True, "", False, 2.0)) == {"n1": ["small"]}
    acts = s.on_result("n1", "small", 1, True, "", False, 3.0)
    assert acts == [Final("n1", "small", "done", "")]
    assert s.done()


def test_one_dispatch_carries_the_nodes_whole_batch_largest_first() -> None:
    items = [("n1", f"img{i}", f"sha256:{i}", size) for i, size in enumerate([5, 50, 20, 40, 1])]
    s = sched(items, per_node_parallelism=3, timeout_s=30.0)
    acts = s.start(0.0)
    assert acts == [
        Dispatch(
            "n1",
            (
                DispatchItem("img1", "sha256:1", 1, 30.0),
                DispatchItem("img3", "sha256:3", 1, 30.0),
                DispatchItem("img2", "sha256:2", 1, 30.0),
            ),
        )
    ]
    acts = s.on_result("n1", "img1", 1, True, "", False, 1.0)
    assert images_of(acts) == {"n1": ["img0"]}
    assert s.in_flight("n1") == ["img3", "img2", "img0"]


def test_slots_freed_together_are_refilled_by_one_dispatch() -> None:
    items = [("n", "a", "", 10), ("n", "b", "", 9), ("n", "c", "", 8), ("n", "d", "", 7)]
    s = sched(items, per_node_parallelism=2, timeout_s=5.0, timeout_slack_s=0.0, backoff_base_s=0.0)
    s.start(0.0)
    acts = s.on_tick(5.0)  # a and b time out together; the retries are due at once
    assert acts == [
        Abort("n", ("a", "b")),
        Dispatch("n", (DispatchItem("a", "", 2, 5.0), DispatchItem("b", "", 2, 5.0))),
    ]


def test_equal_sizes_keep_plan_order() -> None:
    s = sched([("n", "a", "", 1), ("n", "b", "", 1), ("n", "c", "", 1)], per_node_parallelism=3)
    assert images_of(s.start(0.0)) == {"n": ["a", "b", "c"]}


def test_node_with_most_remaining_bytes_starts_first() -> None:
    s = sched(
        [("small", "a", "", 10), ("big", "a", "", 60), ("big", "b", "", 60), ("mid", "a", "", 100)],
        parallelism=1,
    )
    assert list(images_of(s.start(0.0))) == ["big"]


def test_busy_nodes_are_capped_by_parallelism_workers_rule() -> None:
    # Algorithm 1 lines 11-14: min(parallelism, pieces) workers; here nodes with work.
    items = [(f"n{i}", "img", "", 1) for i in range(7)]
    assert len(dispatches(sched(items, parallelism=3).start(0.0))) == 3
    assert len(dispatches(sched(items, parallelism=10).start(0.0))) == 7


def test_freed_slot_goes_to_the_next_node() -> None:
    s = sched([("a", "x", "", 1), ("b", "x", "", 1)], parallelism=1)
    assert list(images_of(s.start(0.0))) == ["a"]
    acts = s.on_result("a", "x", 1, True, "", False, 1.0)
    assert acts == [Final("a", "x", "done", ""), Dispatch("b", (DispatchItem("x", "", 1, 60.0),))]
    assert s.busy_nodes() == ["b"]


# --- retries and backoff --------------------------------------------------------------------


def test_retry_backoff_schedule_is_exact_for_a_seeded_rng() -> None:
    s = sched([("n", "img", "d", 1)], seed=7, retries=3)
    twin = random.Random(7)
    expected = [twin.uniform(0, 1.0), twin.uniform(0, 2.0), twin.uniform(0, 4.0)]
    s.start(0.0)
    now = 0.0
    for attempt, delay in enumerate(expected, start=1):
        now += 5.0
        assert s.on_result("n", "img", attempt, False, "registry unreachable", True, now) == []
        view = s.item("n", "img")
        assert view.state == "pending"
        assert view.not_before == pytest.approx(now + delay)
        assert view.reason == "registry unreachable"
        assert s.next_wakeup() == pytest.approx(now + delay)
        assert s.on_tick(now + delay - 1e-6) == []
        now += delay
        acts = s.on_tick(now)
        assert acts == [Dispatch("n", (DispatchItem("img", "d", attempt + 1, 60.0),))]
    acts = s.on_result("n", "img", 4, False, "registry unreachable", True, now + 1)
    assert acts == [Final("n", "img", "failed", "retries exhausted: registry unreachable")]
    assert s.done()
    assert s.next_wakeup() is None


@pytest.mark.parametrize("seed", range(30))
def test_backoff_stays_within_the_capped_exponential_bounds(seed: int) -> None:
    s = sched([], seed=seed, backoff_base_s=0.5, backoff_factor=2.0, backoff_cap_s=5.0)
    for retry in range(1, 15):
        ceiling = min(5.0, 0.5 * 2 ** (retry - 1))
        assert 0.0 <= s.backoff_delay(retry) <= ceiling


def test_backoff_draws_are_spread_by_jitter() -> None:
    s = sched([], seed=3)
    draws = [s.backoff_delay(6) for _ in range(200)]  # ceiling 32 s
    assert min(draws) < 8.0
    assert max(draws) > 24.0


@pytest.mark.parametrize(
    ("reason", "transient", "final_reason", "retries"),
    [
        ("manifest unknown", False, "manifest unknown", 3),
        ("unauthorized", False, "unauthorized", 3),
        ("no space", False, "no space", 3),
        ("registry unreachable", True, "retries exhausted: registry unreachable", 0),
    ],
)
def test_permanent_errors_are_final_at_once(
    reason: str, transient: bool, final_reason: str, retries: int
) -> None:
    s = sched([("n", "img", "", 1)], retries=retries)
    s.start(0.0)
    acts = s.on_result("n", "img", 1, False, reason, transient, 1.0)
    assert acts == [Final("n", "img", "failed", final_reason)]
    assert s.state("n", "img") == "failed"
    assert s.item("n", "img").attempt == 1
    assert s.on_tick(1000.0) == []


def test_a_node_in_backoff_frees_its_parallelism_slot() -> None:
    s = sched([("a", "x", "", 1), ("b", "x", "", 1)], parallelism=1, backoff_base_s=10.0)
    s.start(0.0)
    acts = s.on_result("a", "x", 1, False, "reset", True, 1.0)
    assert list(images_of(acts)) == ["b"]


# --- timeouts ---------------------------------------------------------------------------------


def test_overdue_item_is_aborted_and_retried_as_a_timeout() -> None:
    s = sched([("n", "img", "", 1)], timeout_s=10.0, timeout_slack_s=2.0, backoff_base_s=0.0)
    s.start(0.0)
    assert s.next_wakeup() == 12.0
    assert s.on_tick(11.9) == []
    acts = s.on_tick(12.0)
    assert acts == [Abort("n", ("img",)), Dispatch("n", (DispatchItem("img", "", 2, 10.0),))]
    assert s.item("n", "img").reason == "timeout"
    # The late answer of the timed-out attempt is stale.
    assert s.on_result("n", "img", 1, True, "", False, 13.0) == []
    assert s.state("n", "img") == "pulling"


def test_timeout_without_retries_left_is_final() -> None:
    s = sched([("n", "img", "", 1)], timeout_s=10.0, timeout_slack_s=0.0, retries=0)
    s.start(0.0)
    assert s.on_tick(10.0) == [
        Abort("n", ("img",)),
        Final("n", "img", "failed", "retries exhausted: timeout"),
    ]
    assert s.done()


def test_started_moves_the_deadline_to_count_from_the_start() -> None:
    s = sched([("n", "img", "", 1)], timeout_s=10.0, timeout_slack_s=1.0)
    s.start(0.0)
    assert s.on_started("n", "img", 1, 5.0) == []
    assert s.next_wakeup() == 16.0
    assert s.on_tick(11.0) == []
    assert s.on_started("n", "img", 7, 20.0) == []  # wrong attempt: ignored
    assert s.next_wakeup() == 16.0
    assert s.on_tick(16.0)[0] == Abort("n", ("img",))


# --- stale input -------------------------------------------------------------------------------


def test_stale_and_unknown_results_are_ignored() -> None:
    s = sched([("n", "img", "", 1)])
    s.start(0.0)
    assert s.on_result("n", "other", 1, True, "", False, 1.0) == []
    assert s.on_result("ghost", "img", 1, True, "", False, 1.0) == []
    assert s.on_result("n", "img", 0, True, "", False, 1.0) == []  # before this dispatch
    assert s.on_result("n", "img", 1, True, "", False, 1.0) == [Final("n", "img", "done", "")]
    assert s.on_result("n", "img", 1, False, "dup", False, 2.0) == []  # duplicate delivery
    assert s.state("n", "img") == "done"


def test_constructor_rejects_bad_items() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        sched([("n", "a", "", 1), ("n", "a", "", 2)])
    with pytest.raises(ValueError, match="size_bytes"):
        sched([("n", "a", "", -1)])


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_aborts_in_flight_and_cancels_everything_open() -> None:
    s = sched(
        [("a", "x", "", 3), ("a", "y", "", 2), ("a", "z", "", 1), ("b", "x", "", 1)],
        per_node_parallelism=2,
        parallelism=1,
    )
    s.start(0.0)
    s.on_result("a", "x", 1, True, "", False, 1.0)  # z takes the slot
    acts = s.cancel(2.0)
    assert acts == [
        Abort("a", ("y", "z")),
        Final("a", "y", "cancelled", "cancelled"),
        Final("a", "z", "cancelled", "cancelled"),
        Final("b", "x", "cancelled", "cancelled"),
    ]
    assert s.done()
    assert s.state("a", "x") == "done"
    assert s.on_result("a", "y", 1, True, "", False, 3.0) == []
    assert s.on_tick(1e9) == []
    assert s.on_node_up("a", 4.0) == []
    assert s.next_wakeup() is None
    assert s.cancel(5.0) == []


# --- node down / up -----------------------------------------------------------------------------


def test_down_node_keeps_items_queued_and_frees_its_slot() -> None:
    s = sched([("a", "x", "", 5), ("b", "x", "", 1)], parallelism=1, node_down_timeout_s=100.0)
    assert list(images_of(s.start(0.0))) == ["a"]
    acts = s.on_node_down("a", 1.0)
    assert list(images_of(acts)) == ["b"]
    assert s.state("a", "x") == "pending"
    assert s.on_result("a", "x", 1, True, "", False, 2.0) == []  # the crashed attempt
    s.on_result("b", "x", 1, True, "", False, 3.0)
    assert s.in_flight("a") == []
    assert s.next_wakeup() == 101.0
    assert s.on_tick(50.0) == []
    acts = s.on_node_up("a", 60.0)
    assert acts == [Dispatch("a", (DispatchItem("x", "", 2, 60.0),))]
    assert s.item("a", "x").failures == 0  # not the item's fault
    s.on_result("a", "x", 2, True, "", False, 61.0)
    assert s.done()


def test_items_of_a_node_down_too_long_fail_as_unavailable() -> None:
    s = sched([("a", "x", "", 2), ("a", "y", "", 1)], node_down_timeout_s=30.0)
    assert s.on_node_down("a", 0.0) == []  # before start: nothing to do yet
    assert s.start(0.0) == []
    assert s.next_wakeup() == 30.0
    assert s.on_tick(29.0) == []
    assert s.on_tick(30.0) == [
        Final("a", "x", "failed", NODE_UNAVAILABLE),
        Final("a", "y", "failed", NODE_UNAVAILABLE),
    ]
    assert s.done()
    assert s.on_node_up("a", 31.0) == []


def test_node_that_returns_in_time_resets_its_timer() -> None:
    s = sched([("a", "x", "", 1)], node_down_timeout_s=30.0)
    s.start(0.0)
    s.on_node_down("a", 0.0)
    s.on_node_up("a", 10.0)
    s.on_node_down("a", 11.0)
    assert s.on_tick(35.0) == []  # 24 s into the second outage
    assert s.next_wakeup() == 41.0


# --- unreachable nodes: an undelivered dispatch is the node's absence, not a pull failure ---------


def undelivered(s: Scheduler, node: str, now: float) -> list[Action]:
    """The dispatch carrying everything in flight on `node` could not be delivered."""
    sent = [(image, s.item(node, image).attempt) for image in s.in_flight(node)]
    assert sent, f"nothing in flight on {node}"
    return s.on_dispatch_failed(node, sent, now)


def test_undelivered_dispatches_never_use_up_retries() -> None:
    # Today's bug: each undelivered dispatch was a transient failure, so a node away for a few
    # re-dispatches ended 'retries exhausted: node unreachable'. Here retries=0: one charged
    # failure would end the item.
    s = sched([("a", "x", "", 2), ("a", "y", "", 1)], retries=0, node_down_timeout_s=300.0)
    s.start(0.0)
    now = 0.0
    for attempt in range(1, 11):
        assert s.in_flight("a") == ["x", "y"]
        assert undelivered(s, "a", now) == []
        for image in ("x", "y"):
            view = s.item("a", image)
            assert (view.state, view.attempt, view.failures) == ("pending", attempt, 0)
        assert s.in_flight("a") == []
        at = s.next_wakeup()
        assert at is not None and at > now
        assert s.on_tick(at - 1e-6) == []  # the node waits for its re-dispatch time
        now = at
        acts = s.on_tick(now)
        assert acts == [
            Dispatch(
                "a",
                (
                    DispatchItem("x", "", attempt + 1, 60.0),
                    DispatchItem("y", "", attempt + 1, 60.0),
                ),
            )
        ]
    assert s.on_result("a", "x", 11, True, "", False, now + 1) == [Final("a", "x", "done", "")]
    assert finals(s.on_result("a", "y", 11, True, "", False, now + 1)) == [
        Final("a", "y", "done", "")
    ]
    assert s.done()
    assert all(v.state == "done" and v.failures == 0 for v in s.items())


@pytest.mark.parametrize("seed", range(10))
def test_redispatch_backoff_doubles_to_its_cap_with_jitter(seed: int) -> None:
    s = sched([], seed=seed, redispatch_base_s=0.5, redispatch_cap_s=4.0)
    for misses, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (60, 4.0)]:
        assert ceiling / 2 <= s.redispatch_delay(misses) <= ceiling


def test_an_unreachable_node_frees_its_slot_and_another_node_starts() -> None:
    s = sched([("a", "x", "", 5), ("b", "x", "", 1)], parallelism=1)
    assert list(images_of(s.start(0.0))) == ["a"]
    acts = undelivered(s, "a", 1.0)
    assert list(images_of(acts)) == ["b"]
    assert s.busy_nodes() == ["b"]


def test_membership_alive_redispatches_at_once() -> None:
    s = sched([("a", "x", "", 1)], redispatch_base_s=5.0, redispatch_cap_s=5.0)
    s.start(0.0)
    undelivered(s, "a", 1.0)
    s.on_node_down("a", 1.5)  # SWIM confirms
    acts = s.on_node_up("a", 2.0)  # long before the re-dispatch backoff (>= 3.5 s) ends
    assert acts == [Dispatch("a", (DispatchItem("x", "", 2, 60.0),))]


def test_unreachable_too_long_fails_as_node_unavailable() -> None:
    s = sched([("a", "x", "", 1)], node_down_timeout_s=30.0, redispatch_cap_s=8.0)
    s.start(0.0)
    undelivered(s, "a", 0.0)
    redispatches = 0
    verdict: list[Action] = []
    now = 0.0
    while not verdict:
        at = s.next_wakeup()
        assert at is not None
        now = at
        acts = s.on_tick(now)
        verdict = finals(acts)
        if dispatches(acts):
            redispatches += 1
            now += 0.5
            verdict = finals(undelivered(s, "a", now))  # each re-dispatch is refused too
    # The countdown runs from the first undelivered dispatch; re-dispatches do not reset it.
    assert 30.0 <= now <= 30.5
    assert redispatches >= 3
    assert verdict == [Final("a", "x", "failed", NODE_UNAVAILABLE)]
    assert s.done()
    assert s.item("a", "x").failures == 0


def test_time_up_while_a_redispatch_is_out_waits_for_its_outcome() -> None:
    s = sched(
        [("a", "x", "", 1)],
        node_down_timeout_s=10.0,
        redispatch_base_s=9.0,
        redispatch_cap_s=9.0,
        seed=1,
    )
    s.start(0.0)
    undelivered(s, "a", 0.0)
    at = s.next_wakeup()
    assert at is not None and 4.5 <= at <= 9.0
    assert images_of(s.on_tick(at)) == {"a": ["x"]}  # the cheap re-dispatch
    assert s.on_tick(10.0) == []  # time is up, but the re-dispatch may still arrive
    assert s.on_reachable("a", 10.5) == []  # it did: the node is back
    assert s.state("a", "x") == "pulling"
    assert s.on_tick(50.0) == []  # no verdict: the node is no longer away
    assert s.on_result("a", "x", 2, True, "", False, 51.0) == [Final("a", "x", "done", "")]


def test_time_up_while_a_redispatch_is_out_then_dead_fails_at_once() -> None:
    # The verdict was deferred to the re-dispatch's outcome; membership declares the node dead
    # first, which takes the re-dispatch back: the verdict must not be lost with it.
    s = sched(
        [("a", "x", "", 1)],
        node_down_timeout_s=10.0,
        redispatch_base_s=9.0,
        redispatch_cap_s=9.0,
    )
    s.start(0.0)
    undelivered(s, "a", 0.0)
    at = s.next_wakeup()
    assert at is not None
    s.on_tick(at)  # the re-dispatch goes out ...
    assert s.on_tick(10.0) == []  # ... and is still out when the time is up
    assert s.on_node_down("a", 11.0) == [Final("a", "x", "failed", NODE_UNAVAILABLE)]
    assert s.done()


def test_reachable_again_restarts_the_countdown() -> None:
    s = sched(
        [("a", "x", "", 2), ("a", "y", "", 1)],
        per_node_parallelism=1,
        node_down_timeout_s=30.0,
        redispatch_base_s=1.0,
        redispatch_cap_s=1.0,
    )
    s.start(0.0)
    undelivered(s, "a", 0.0)
    at = s.next_wakeup()
    assert at is not None
    s.on_tick(at)
    s.on_reachable("a", at + 0.1)
    s.on_result("a", "x", 2, True, "", False, 20.0)
    undelivered(s, "a", 25.0)  # y's dispatch: away again, from 25 s on
    now = 25.0
    while (at := s.next_wakeup()) is not None and at < 55.0:
        now = at
        if images_of(s.on_tick(now)):
            undelivered(s, "a", now)
    assert s.state("a", "y") == "pending"  # 24 s into the second absence: still waiting
    assert s.next_wakeup() is not None


def test_stale_dispatch_failures_change_nothing() -> None:
    s = sched([("a", "x", "", 1)])
    s.start(0.0)
    s.on_started("a", "x", 1, 0.5)
    assert s.on_dispatch_failed("a", [("x", 7)], 1.0) == []  # not the attempt in flight
    assert s.on_dispatch_failed("ghost", [("x", 1)], 1.0) == []
    assert s.state("a", "x") == "pulling"
    s.on_result("a", "x", 1, True, "", False, 2.0)
    assert s.on_dispatch_failed("a", [("x", 1)], 3.0) == []  # a late failure report
    assert s.state("a", "x") == "done"


# --- restore after takeover -------------------------------------------------------------------


def test_restore_never_redispatches_final_items_and_keeps_attempts() -> None:
    s = Scheduler.restore(
        [
            RestoredItem("a", "done-img", "d1", 10, "done", attempt=1),
            RestoredItem("a", "pulling-img", "d2", 20, "pulling", attempt=2),
            RestoredItem("a", "pending-img", "d3", 30, "pending", attempt=0),
            RestoredItem("b", "failed-img", "d4", 10, "failed", attempt=1, reason="unauthorized"),
            RestoredItem("b", "retry-img", "d5", 10, "failed", attempt=2, transient=True),
            RestoredItem("c", "cancelled-img", "d6", 10, "cancelled", attempt=1),
        ],
        Policy(retries=2),
        rng=random.Random(1),
    )
    assert not s.done()
    acts = s.start(100.0)
    assert images_of(acts) == {"a": ["pending-img", "pulling-img"], "b": ["retry-img"]}
    by_image = {i.image: i for d in dispatches(acts) for i in d.items}
    assert by_image["pulling-img"].attempt == 3
    assert by_image["pending-img"].attempt == 1
    assert by_image["retry-img"].attempt == 3
    assert s.item("b", "retry-img").failures == 2
    assert s.item("a", "pulling-img").failures == 1
    assert s.state("a", "done-img") == "done"
    assert s.state("b", "failed-img") == "failed"
    # A late result of the old coordinator's attempt is stale.
    assert s.on_result("a", "pulling-img", 2, True, "", False, 101.0) == []
    # retry-img has used its whole budget: the next transient failure is final.
    acts = s.on_result("b", "retry-img", 3, False, "reset", True, 102.0)
    assert acts == [Final("b", "retry-img", "failed", "retries exhausted: reset")]
    for image, attempt in (("pulling-img", 3), ("pending-img", 1)):
        s.on_result("a", image, attempt, True, "", False, 103.0)
    assert s.done()


def test_success_of_an_earlier_coordinators_later_attempt_ends_a_pulling_item() -> None:
    """After a takeover the new coordinator knew attempt 0 and sends attempt 1; the node had
    run the old coordinator's attempt 2 and answers under 2. A scheduler that called that
    stale waited for an answer that never came (the failover test's stall)."""
    s = Scheduler.restore(
        [RestoredItem("a", "x", "d", 10, "pending", attempt=0)], Policy(), rng=random.Random(1)
    )
    assert dispatches(s.start(0.0))[0].items[0].attempt == 1
    assert s.on_result("a", "x", 2, True, "", False, 1.0) == [Final("a", "x", "done", "")]
    assert s.done()


def test_failure_of_an_earlier_coordinators_later_attempt_is_adopted_and_retried_above_it() -> None:
    s = Scheduler.restore(
        [RestoredItem("a", "x", "d", 10, "pending", attempt=0)],
        Policy(retries=1),
        rng=random.Random(1),
        backoff_base_s=0.0,
    )
    s.start(0.0)
    acts = s.on_result("a", "x", 3, False, "reset", True, 1.0)
    assert dispatches(acts)[0].items[0].attempt == 4  # outnumbers what the node ran
    assert s.on_result("a", "x", 3, True, "", False, 2.0) == []  # now stale
    assert s.on_result("a", "x", 4, True, "", False, 2.0) == [Final("a", "x", "done", "")]


def test_success_of_an_earlier_coordinators_attempt_ends_a_queued_item() -> None:
    """The node is down in the new coordinator's view (queued, not dispatched) when its
    success of the old coordinator's attempt arrives: the item is done, never dispatched."""
    s = Scheduler.restore(
        [RestoredItem("a", "x", "d", 10, "pending", attempt=0)], Policy(), rng=random.Random(1)
    )
    s.on_node_down("a", 0.0)
    assert s.start(0.0) == []
    assert s.on_result("a", "x", 1, False, "reset", True, 1.0) == []  # queued: numbering only
    assert s.item("a", "x").attempt == 1
    assert s.on_result("a", "x", 1, True, "", False, 1.5) == []  # not above what it knows now
    assert s.on_result("a", "x", 2, True, "", False, 2.0) == [Final("a", "x", "done", "")]
    assert s.done()
    assert s.on_node_up("a", 3.0) == []


def test_restore_of_only_final_items_is_done_and_dispatches_nothing() -> None:
    s = Scheduler.restore(
        [("a", "x", "", 1, "done"), ("b", "x", "", 1, "failed")], Policy(), rng=random.Random()
    )
    assert s.done()
    assert s.start(0.0) == []


def test_restore_rejects_unknown_states() -> None:
    with pytest.raises(ValueError, match="unknown item state"):
        Scheduler.restore([("a", "x", "", 1, "exploded")], Policy(), rng=random.Random())


# --- simulation: the caps hold under a fake executor over many random plans ----------------------


@dataclass
class FakeCluster:
    """Executes dispatches with random durations and outcomes; records what is in flight."""

    rng: random.Random
    lose_probability: float = 0.05
    events: list[tuple[float, int, str, tuple[object, ...]]] = field(default_factory=list)
    outstanding: dict[str, set[tuple[str, int]]] = field(default_factory=lambda: defaultdict(set))
    seq: int = 0
    max_per_node: int = 0
    max_busy: int = 0
    dispatched_after_final: int = 0

    def push(self, at: float, kind: str, *payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def apply(self, s: Scheduler, actions: list[Action], now: float, finals: dict) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                sizes = [s.item(action.node, i.image).size_bytes for i in action.items]
                assert sizes == sorted(sizes, reverse=True), "largest first within a batch"
                for item in action.items:
                    if (action.node, item.image) in finals:
                        self.dispatched_after_final += 1
                    self.outstanding[action.node].add((item.image, item.attempt))
                    if self.rng.random() < self.lose_probability:
                        continue  # the result is lost: only the timeout can end it
                    roll = self.rng.random()
                    ok = roll < 0.7
                    transient = roll < 0.95
                    reason = "" if ok else ("reset" if transient else "manifest unknown")
                    at = now + self.rng.uniform(0.1, 5.0)
                    self.push(
                        at, "result", action.node, item.image, item.attempt, ok, reason, transient
                    )
                    if self.rng.random() < 0.05:  # a duplicate, late delivery
                        self.push(
                            at + 1.0,
                            "result",
                            action.node,
                            item.image,
                            item.attempt,
                            ok,
                            reason,
                            transient,
                        )
            elif isinstance(action, Abort):
                self.outstanding[action.node] = {
                    (im, at) for im, at in self.outstanding[action.node] if im not in action.images
                }
            else:
                assert (action.node, action.image) not in finals, "final twice"
                finals[(action.node, action.image)] = action
        per_node = [len(v) for v in self.outstanding.values()]
        self.max_per_node = max([self.max_per_node, *per_node])
        busy = sum(1 for v in self.outstanding.values() if v)
        self.max_busy = max(self.max_busy, busy)
        assert max(per_node, default=0) <= s.policy.per_node_parallelism
        assert busy <= s.policy.parallelism
        assert len(s.busy_nodes()) <= s.policy.parallelism


def simulate(seed: int, n_nodes: int, n_images: int, parallelism: int, per_node: int) -> None:
    rng = random.Random(seed)
    images = [(f"img{i}", rng.randrange(1, 5000) * MB) for i in range(n_images)]
    items = [
        (f"node{n}", name, f"sha256:{name}", size)
        for n in range(n_nodes)
        for name, size in images
        if rng.random() < 0.6
    ]
    policy = Policy(
        parallelism=parallelism, per_node_parallelism=per_node, retries=2, timeout_s=8.0
    )
    s = Scheduler(
        items,
        policy,
        rng=random.Random(seed),
        backoff_base_s=0.2,
        backoff_cap_s=2.0,
        timeout_slack_s=1.0,
        node_down_timeout_s=15.0,
    )
    cluster = FakeCluster(rng)
    final_actions: dict[tuple[str, str], Final] = {}
    nodes = sorted({n for n, *_ in items})
    for node in nodes:
        if rng.random() < 0.2:
            down_at = rng.uniform(0, 20)
            cluster.push(down_at, "down", node)
            if rng.random() < 0.7:
                cluster.push(down_at + rng.uniform(1, 25), "up", node)
    if rng.random() < 0.1:
        cluster.push(rng.uniform(0, 30), "cancel")
    now = 0.0
    cluster.apply(s, s.start(now), now, final_actions)
    steps = 0
    while not s.done():
        steps += 1
        assert steps < 100_000, "no progress"
        wake = s.next_wakeup()
        next_event = cluster.events[0][0] if cluster.events else None
        assert wake is not None or next_event is not None, "stuck: nothing will ever happen"
        if next_event is not None and (wake is None or next_event <= wake):
            now, _, kind, payload = heapq.heappop(cluster.events)
            if kind == "result":
                node, image, attempt, ok, reason, transient = payload
                cluster.outstanding[node].discard((image, attempt))  # type: ignore[arg-type]
                acts = s.on_result(node, image, attempt, ok, reason, transient, now)  # type: ignore[arg-type]
            elif kind == "down":
                cluster.outstanding[payload[0]] = set()  # type: ignore[index]  # crashed: work lost
                cluster.events = [
                    e for e in cluster.events if not (e[2] == "result" and e[3][0] == payload[0])
                ]
                heapq.heapify(cluster.events)
                acts = s.on_node_down(payload[0], now)  # type: ignore[arg-type]
            elif kind == "up":
                acts = s.on_node_up(payload[0], now)  # type: ignore[arg-type]
            else:
                acts = s.cancel(now)
        else:
            assert wake is not None
            assert wake >= now
            now = wake
            acts = s.on_tick(now)
        cluster.apply(s, acts, now, final_actions)
    assert cluster.dispatched_after_final == 0
    assert set(final_actions) == {(n, i) for n, i, *_ in items}
    for view in s.items():
        assert view.state in ("done", "failed", "cancelled")
        assert final_actions[(view.node, view.image)].state == view.state
        if view.state == "failed":
            assert view.reason in (
                "manifest unknown",
                NODE_UNAVAILABLE,
                "retries exhausted: reset",
                "retries exhausted: timeout",
            )
    assert s.next_wakeup() is None
    if items and parallelism < len(nodes):
        assert cluster.max_busy >= 1


@pytest.mark.parametrize("seed", range(150))
def test_simulated_caps_hold_and_everything_ends_final(seed: int) -> None:
    rng = random.Random(seed * 7919)
    simulate(
        seed,
        n_nodes=rng.randint(1, 12),
        n_images=rng.randint(1, 8),
        parallelism=rng.randint(1, 6),
        per_node=rng.randint(1, 4),
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_nodes=st.integers(1, 10),
    n_images=st.integers(1, 6),
    parallelism=st.integers(1, 5),
    per_node=st.integers(1, 3),
)
def test_simulated_caps_hold_property(
    seed: int, n_nodes: int, n_images: int, parallelism: int, per_node: int
) -> None:
    simulate(seed, n_nodes, n_images, parallelism, per_node)


def test_caps_are_reached_not_just_respected() -> None:
    # Without failures, the scheduler fills every slot it may: the caps are tight.
    items = [(f"n{n}", f"i{i}", "", 100 - i) for n in range(6) for i in range(5)]
    s = sched(items, parallelism=4, per_node_parallelism=2)
    acts = s.start(0.0)
    assert len(dispatches(acts)) == 4
    assert all(len(d.items) == 2 for d in dispatches(acts))


def test_next_wakeup_skips_due_retries_blocked_by_the_caps() -> None:
    s = sched(
        [("a", "x", "", 10), ("a", "y", "", 5)],
        per_node_parallelism=1,
        timeout_s=100.0,
        timeout_slack_s=0.0,
    )
    s.start(0.0)
    acts = s.on_result("a", "x", 1, False, "reset", True, 1.0)
    assert images_of(acts) == {"a": ["y"]}
    retry_at = s.item("a", "x").not_before
    assert retry_at is not None
    assert s.next_wakeup() == retry_at
    assert s.on_tick(retry_at + 1.0) == []  # due, but the node's only slot is taken
    assert s.next_wakeup() == 101.0  # y's deadline, not the past retry time
    acts = s.on_result("a", "y", 1, True, "", False, retry_at + 2.0)
    assert acts[-1] == Dispatch("a", (DispatchItem("x", "", 2, 100.0),))


def test_the_away_countdown_survives_a_wakeup_while_a_redispatch_is_out() -> None:
    """Found by the fault suite: the shell asked `next_wakeup` while a re-dispatch was in
    flight (the node's queue empty for that moment) and the away countdown was the earliest
    timer; it was dropped as invalid, and the node, declared dead a moment later, kept its
    items pending for ever."""
    s = sched([("a", "x", "", 1)], node_down_timeout_s=6.0, redispatch_base_s=5.0, seed=3)
    s.start(0.0)
    undelivered(s, "a", 0.0)
    at = s.next_wakeup()
    assert at is not None and at < 6.0
    assert images_of(s.on_tick(at)) == {"a": ["x"]}  # the re-dispatch is out ...
    assert s.next_wakeup() == 6.0  # ... and the countdown is the earliest timer left
    assert undelivered(s, "a", at + 0.01) == []  # refused again; SWIM then says dead
    assert s.on_node_down("a", at + 0.5) == []
    verdict = finals(s.on_tick(6.0))
    assert verdict == [Final("a", "x", "failed", NODE_UNAVAILABLE)]
