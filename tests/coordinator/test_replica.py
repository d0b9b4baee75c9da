"""Replica state: plan immutability, tombstones, parts, and anti-entropy convergence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from houndd.coordinator.records import PlanDocument, PlanWork
from houndd.coordinator.replica import (
    LACKS,
    MAX_SYNC_RESULTS,
    CancelRecord,
    PlanItem,
    PlanPart,
    PlanRecord,
    ReplicaState,
    SyncBatch,
)
from houndd.coordinator.results import ItemResult, ItemState

NODES = ("a", "b", "c")
IMAGES = ("x:1", "y:1")


def plan(pid: str, committed: bool = True) -> PlanRecord:
    items = tuple(PlanItem(n, i, f"sha256:{i}", 10) for n in NODES for i in IMAGES)
    return PlanRecord.of(pid, _doc(pid), items, 1.0, committed)


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
    """One push-pull round between two holders that should both hold every plan: a asks b,
    then pushes back what b lacks."""
    keys = set(a.digest()) | set(b.digest())
    a.apply(b.missing_for(a.digest(), keys, rng=rng, send_records=True))
    b.apply(a.missing_for(b.digest(), keys, rng=rng, send_records=True))


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
    other = PlanRecord.of("p", _doc("evil"), (), 2.0, True)
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
    return PlanRecord.of(pid, _doc(pid), items, 1.0, True)


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
        batch = ahead.missing_for(behind.digest(), {"p"}, rng=rng, send_records=True)
        assert len(batch.results) <= MAX_SYNC_RESULTS <= 1000
        records_sent += len(batch.plans)
        behind.apply(batch)
    assert records_sent == 1
    assert behind.results("p") == ahead.results("p")
    # Converged: nothing more to send either way.
    assert not ahead.missing_for(behind.digest(), {"p"}, rng=rng, send_records=True)
    assert not behind.missing_for(ahead.digest(), {"p"}, rng=rng, send_records=True)


def test_the_record_is_resent_only_to_a_node_that_lacks_its_commit() -> None:
    committed, tentative = ReplicaState(), ReplicaState()
    committed.put_plan(plan("p", committed=True))
    tentative.put_plan(plan("p", committed=False))
    assert [p.committed for p in committed.missing_for(tentative.digest(), {"p"}).plans] == [True]
    assert tentative.missing_for(committed.digest(), {"p"}).plans == ()
    committed.put_result("p", "a", "x:1", ItemResult(ItemState.DONE, 1))
    tentative.apply(committed.missing_for(tentative.digest(), {"p"}))
    assert tentative.digest() == committed.digest()


def test_a_node_that_neither_holds_nor_should_is_sent_nothing() -> None:
    holder, other = ReplicaState(), ReplicaState()
    holder.put_plan(plan("p"))
    assert not holder.missing_for(other.digest(), {"p"})
    assert [r.plan_id for r in holder.missing_for({}, {"p"}, send_records=True).plans] == ["p"]


WORK = PlanWork("p", "pull", "IfNotPresent", 3)


def target(node: str = "a") -> ReplicaState:
    r = ReplicaState()
    assert r.put_part(PlanPart("p", node, WORK)) == [PlanPart("p", node, WORK)]
    return r


def test_a_target_keeps_its_part_and_only_its_own_results() -> None:
    r = target("a")
    assert r.plan("p") is None and r.part("p") == PlanPart("p", "a", WORK) and r.knows("p")
    assert r.put_result("p", "a", "x:1", ItemResult(ItemState.PULLING, 1))
    assert r.put_result("p", "b", "x:1", ItemResult(ItemState.DONE, 1)) == []
    assert r.digest()["p"].startswith("p")
    assert r.open_plans() == [] and r.plans() == []
    # Holding the plan later keeps what it knew of its own items.
    assert r.put_plan(plan("p"))
    assert r.result("p", "a", "x:1").state is ItemState.PULLING
    assert r.part("p") is None and r.digest()["p"].startswith("c")


def test_a_target_and_a_holder_agree_by_projection_without_the_record() -> None:
    rng = random.Random(1)
    holder, tgt = ReplicaState(), target("a")
    holder.put_plan(plan("p"))
    holder.put_result("p", "b", "y:1", ItemResult(ItemState.DONE, 1))  # not a's business
    tgt.put_result("p", "a", "x:1", ItemResult(ItemState.DONE, 1))
    holder.put_result("p", "a", "y:1", ItemResult(ItemState.FAILED, 2, reason="timeout"))
    for _ in range(3):
        # The target asks; the holder answers with what it lacks and its projection.
        ask = tgt.digest()
        tgt.apply(holder.missing_for(ask, ask, remote_node="a", rng=rng))
        reply = holder.reply_digest(ask, "a")
        holder.apply(tgt.missing_for(reply, reply, remote_node="h", rng=rng))
    assert tgt.digest()["p"] == holder.projection("p", "a")
    assert holder.result("p", "a", "x:1").state is ItemState.DONE
    assert tgt.result("p", "a", "y:1").reason == "timeout"
    assert tgt.plan("p") is None  # a target never gets the record it does not need
    assert tgt.result("p", "b", "y:1").state is ItemState.PENDING
    # Agreed: nothing to send either way.
    ask = tgt.digest()
    assert not holder.missing_for(ask, ask, remote_node="a")
    reply = holder.reply_digest(ask, "a")
    assert reply == ask
    assert not tgt.missing_for(reply, reply, remote_node="h")


def test_only_a_coordinator_is_sent_the_record_a_target_holds_a_part_of() -> None:
    holder, tgt = ReplicaState(), target("a")
    holder.put_plan(plan("p"))
    ask = tgt.digest()
    assert holder.missing_for(ask, ask, remote_node="a").plans == ()
    assert [r.plan_id for r in holder.missing_for(ask, ask, send_records=True).plans] == ["p"]


def test_two_targets_and_unknown_plans_have_nothing_to_exchange() -> None:
    a, b, nobody = target("a"), target("b"), ReplicaState()
    a.put_result("p", "a", "x:1", ItemResult(ItemState.DONE, 1))
    ask = a.digest()
    assert b.reply_digest(ask, "a") == ask  # echoed: nothing to settle between targets
    assert nobody.reply_digest(ask, "a") == ask
    assert nobody.reply_digest({"q": "c123"}, "a") == {"q": LACKS}
    assert not b.missing_for(ask, ask, remote_node="a")


def test_an_abort_reaches_a_target_and_removes_its_part() -> None:
    coordinator, tgt = ReplicaState(), target("a")
    coordinator.put_plan(plan("p", committed=False))
    coordinator.put_abort("p")
    ask = tgt.digest()
    batch = coordinator.missing_for(ask, ask, remote_node="a")
    assert batch == SyncBatch(aborted=("p",))
    tgt.apply(batch)
    assert tgt.is_aborted("p") and not tgt.knows("p")
