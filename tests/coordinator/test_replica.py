"""Replica state: plan immutability, tombstones, and anti-entropy convergence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from houndd.coordinator.records import PlanDocument
from houndd.coordinator.replica import (
    MAX_SYNC_RESULTS,
    CancelRecord,
    PlanItem,
    PlanRecord,
    ReplicaState,
)
from houndd.coordinator.results import ItemResult, ItemState

NODES = ("a", "b", "c")
IMAGES = ("x:1", "y:1")


def plan(pid: str, committed: bool = True) -> PlanRecord:
    items = tuple(PlanItem(n, i, f"sha256:{i}", 10) for n in NODES for i in IMAGES)
    return PlanRecord(pid, _doc(pid), items, 1.0, committed)


def _doc(name: str) -> PlanDocument:
    return PlanDocument({"name": name, "nodes": {n: list(IMAGES) for n in NODES}})


def random_replica(rng: random.Random) -> ReplicaState:
    r = ReplicaState()
    for k in range(rng.randint(0, 4)):
        pid = f"p{k}"
        if rng.random() < 0.1:
            r.put_abort(pid)
            continue
        r.put_plan(plan(pid, committed=rng.random() < 0.8))
        if rng.random() < 0.2:
            r.put_cancel(CancelRecord(pid, rng.choice([5.0, 6.0])))
        for _ in range(rng.randint(0, 6)):
            res = ItemResult(
                rng.choice(list(ItemState)), rng.randint(0, 3), bytes_done=rng.randint(0, 5)
            )
            r.put_result(pid, rng.choice(NODES), rng.choice(IMAGES), res)
    return r


def sync(a: ReplicaState, b: ReplicaState, rng: random.Random) -> None:
    """One push-pull round: a asks b, then pushes back what b lacks."""
    a.apply(b.missing_for(a.digest(), rng))
    b.apply(a.missing_for(b.digest(), rng))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 4))
def test_anti_entropy_converges(seed: int, n: int) -> None:
    rng = random.Random(seed)
    replicas = [random_replica(rng) for _ in range(n)]
    for _ in range(n * n * 2):
        a, b = rng.sample(replicas, 2)
        sync(a, b, rng)
    for a in replicas:
        for b in replicas:
            sync(a, b, rng)
    digests = [r.digest() for r in replicas]
    assert all(d == digests[0] for d in digests)


def test_plan_is_immutable_and_commit_turns_on() -> None:
    r = ReplicaState()
    assert r.put_plan(plan("p", committed=False))
    other = PlanRecord("p", _doc("evil"), (), 2.0, True)
    assert r.put_plan(other) == []
    assert r.plan("p") is not None and r.plan("p").document == _doc("p")  # type: ignore[union-attr]
    assert r.put_plan(plan("p", committed=True))
    assert r.plan("p").committed  # type: ignore[union-attr]


def test_abort_beats_tentative_and_committed_beats_abort() -> None:
    r = ReplicaState()
    r.put_plan(plan("p", committed=False))
    assert r.put_abort("p")
    assert r.plan("p") is None
    assert r.put_plan(plan("p", committed=False)) == []  # no resurrection
    assert r.put_plan(plan("p", committed=True))  # an acknowledged copy wins
    assert r.put_abort("p") == []
    assert r.plan("p") is not None


def test_remaining_and_open_plans() -> None:
    r = ReplicaState()
    r.put_plan(plan("p"))
    assert len(r.remaining("p")) == 6
    for n in NODES:
        for i in IMAGES:
            r.put_result("p", n, i, ItemResult(ItemState.DONE, 1))
    r.put_result("p", "a", "x:1", ItemResult(ItemState.PULLING, 2))  # done is absorbing
    assert r.remaining("p") == []
    assert r.open_plans() == []
    r.put_plan(plan("q"))
    r.put_result("q", "a", "x:1", ItemResult(ItemState.FAILED, 1, transient=True))
    assert [p.plan_id for p in r.open_plans()] == ["q"]
    assert PlanItem("a", "x:1", "sha256:x:1", 10) in r.remaining("q")
    r.put_cancel(CancelRecord("q", 3.0))
    assert r.open_plans() == []


def test_results_for_unknown_plans_or_items_are_dropped() -> None:
    r = ReplicaState()
    assert r.put_result("nope", "a", "x:1", ItemResult(ItemState.DONE, 1)) == []
    r.put_plan(plan("p"))
    assert r.put_result("p", "zz", "x:1", ItemResult(ItemState.DONE, 1)) == []


def big_plan(pid: str, nodes: int = 4, images: int = 500) -> PlanRecord:
    items = tuple(
        PlanItem(f"node-{n:02d}", f"registry:5000/many:t{i:03d}", "sha256:" + "a" * 64, 1000)
        for n in range(nodes)
        for i in range(images)
    )
    return PlanRecord(pid, _doc(pid), items, 1.0, True)


def test_a_big_plan_catches_up_in_bounded_answers() -> None:
    """A node that missed a 2,000-item plan gets it by anti-entropy in answers that each stay
    far below the 1 MiB HTTP cap; the plan record travels once, not every round."""
    rng = random.Random(5)
    ahead, behind = ReplicaState(), ReplicaState()
    rec = big_plan("p")
    ahead.put_plan(rec)
    for i, item in enumerate(rec.items):
        state = ItemState.DONE if i % 7 else ItemState.FAILED
        ahead.put_result("p", item.node_id, item.image, ItemResult(state, 1, item.digest))
    records_sent = 0
    rounds = 0
    while behind.digest() != ahead.digest():
        rounds += 1
        assert rounds <= 40, "anti-entropy does not converge"
        batch = ahead.missing_for(behind.digest(), rng)
        assert len(batch.results) <= MAX_SYNC_RESULTS <= 1000
        records_sent += len(batch.plans)
        behind.apply(batch)
    assert records_sent == 1
    assert behind.results("p") == ahead.results("p")
    # Converged: nothing more to send either way.
    assert not ahead.missing_for(behind.digest(), rng)
    assert not behind.missing_for(ahead.digest(), rng)


def test_the_record_is_resent_only_to_a_node_that_lacks_its_commit() -> None:
    committed, tentative = ReplicaState(), ReplicaState()
    committed.put_plan(plan("p", committed=True))
    tentative.put_plan(plan("p", committed=False))
    assert [p.committed for p in committed.missing_for(tentative.digest()).plans] == [True]
    assert tentative.missing_for(committed.digest()).plans == ()
    committed.put_result("p", "a", "x:1", ItemResult(ItemState.DONE, 1))
    tentative.apply(committed.missing_for(tentative.digest()))
    assert tentative.digest() == committed.digest()
