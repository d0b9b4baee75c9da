"""NodeCore: submission (G1), dispatch fencing and dedupe, takeover without re-pulling."""

from __future__ import annotations

import random
from typing import Any

from houndd.config import Config, local
from houndd.coordinator.coordinator_role import FANOUT_DELAY_S
from houndd.coordinator.election import Role
from houndd.coordinator.messages import (
    AckClient,
    Action,
    Dispatch,
    DispatchReply,
    Execute,
    Fenced,
    Heartbeat,
    Persist,
    PlanAbort,
    PlanAck,
    PlanPut,
    Reply,
    Request,
    Results,
    Send,
    SyncDigest,
    SyncItems,
    VoteReply,
    VoteRequest,
)
from houndd.coordinator.node import ExecutorReport, NodeCore
from houndd.coordinator.records import (
    PlanDocument,
    PlanItem,
    PlanPart,
    PlanRecord,
    PlanWork,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.scheduler import DispatchItem
from houndd.coordinator.store import PersistedState
from houndd.coordinator.worker_role import START_SLACK_S

CFG = local(plan_replicas=2)
DOC = PlanDocument(
    {"name": "p", "nodes": {"a": ["x:1"], "b": ["x:1"]}, "policy": {"timeout": "5s"}}
)
ITEMS = (PlanItem("a", "x:1", "sha256:1", 10), PlanItem("b", "x:1", "sha256:1", 10))


def coordinator(node: str = "a", alive: set[str] | None = None) -> NodeCore:
    """A node that won an election alone, then sees `alive`."""
    core = NodeCore(node, CFG, random.Random(3), 0.0)
    t = 0.0
    while core.role is not Role.COORDINATOR:
        core.tick(t)
        t += 0.01
    core.membership(alive if alive is not None else {"b"}, {}, t)
    return core


def of(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def test_submit_acks_only_after_enough_durable_copies() -> None:
    core = coordinator()
    acts = core.submit("p", DOC, ITEMS, 1.0, "client-1")
    assert isinstance(acts[0], Persist)  # own tentative copy first
    puts = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    assert [r.node_id for r in puts] == ["b"]
    assert not of(acts, AckClient)
    assert core.replica.plan("p") is not None and not core.replica.plan("p").committed  # type: ignore[union-attr]
    # Dispatch overlaps replication: the plan runs from its acceptance.
    dispatched = [r for r in of(acts, Request) if isinstance(r.payload, Dispatch)]
    assert [d.node_id for d in dispatched] == ["b"] and of(acts, Execute)  # b remote, a local
    assert dispatched[0].payload.work.holders == ("a", "b")
    assert dispatched[0].payload.committed is False
    acts = core.response(puts[0].token, "b", PlanAck("p", "b", True), 1.01)
    assert of(acts, AckClient) == [AckClient("client-1", True)]
    assert core.replica.plan("p").committed  # type: ignore[union-attr]
    assert not [r for r in of(acts, Request) if isinstance(r.payload, Dispatch)]


def test_only_the_replicas_get_the_plan_and_a_failed_one_is_replaced() -> None:
    core = coordinator(alive={"b", "c", "d"})
    acts = core.submit("p", DOC, ITEMS, 1.0, "client")
    (put,) = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    acts = core.request_failed(put.token, 1.1)
    (spare,) = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    assert spare.node_id not in (put.node_id, "a")
    acts = core.response(spare.token, spare.node_id, PlanAck("p", spare.node_id, True), 1.2)
    assert of(acts, AckClient) == [AckClient("client", True)]
    # The commit goes to the replica only; the other members never see the plan.
    sent = [s for s in of(acts, Send) if isinstance(s.payload, PlanPut)]
    assert [s.node_id for s in sent] == [spare.node_id]


def test_the_node_the_client_submitted_through_is_the_replica() -> None:
    core = coordinator(alive={"b", "c", "d"})
    core.membership({"b", "c", "d"}, {"a": "na", "b": "nb", "c": "nc", "d": "nd"}, 0.9)
    doc = PlanDocument({**DOC.spec}, via="nc")
    acts = core.submit("p", doc, ITEMS, 1.0, "client")
    assert [r.node_id for r in of(acts, Request) if isinstance(r.payload, PlanPut)] == ["c"]


def test_submit_times_out_and_aborts() -> None:
    core = coordinator()
    core.submit("p", DOC, ITEMS, 1.0, "c")
    acts = core.tick(1.0 + CFG.peer_request_timeout_s + 0.01)
    assert of(acts, AckClient) == [AckClient("c", False, "replication timeout")]
    assert [s.payload for s in of(acts, Send) if isinstance(s.payload, PlanAbort)] == [
        PlanAbort(core.term, "a", "p")
    ]
    assert core.replica.plan("p") is None and core.replica.is_aborted("p")


def test_single_member_acks_with_one_copy() -> None:
    core = coordinator(alive=set())
    acts = core.submit("p", DOC, ITEMS[:1], 1.0, "c")
    assert of(acts, AckClient) == [AckClient("c", True)]


def test_non_coordinator_refuses_submit() -> None:
    core = NodeCore("b", CFG, random.Random(1), 0.0)
    assert of(core.submit("p", DOC, ITEMS, 0.1, "c"), AckClient)[0].ok is False


def test_a_member_that_joins_later_gets_the_keep_present_plans() -> None:
    core = coordinator(alive={"b"})
    doc = PlanDocument({**DOC.spec, "policy": {"keep_present": True}})
    acts = core.submit("k", doc, ITEMS, 1.0, "client")
    (put,) = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    core.response(put.token, "b", PlanAck("k", "b", True), 1.1)
    core.submit("p", DOC, ITEMS, 1.2, "client")  # not keep_present: replicas only
    acts = core.membership({"b", "c"}, {}, 2.0)
    synced = [s for s in of(acts, Send) if s.node_id == "c" and isinstance(s.payload, SyncItems)]
    assert [r.plan_id for s in synced for r in s.payload.plans] == ["k"]
    assert synced[0].payload.plans[0].committed
    # The new member stores it like any record it merges.
    joiner = NodeCore("c", CFG, random.Random(5), 0.0)
    joiner.receive("a", synced[0].payload, 2.1)
    assert joiner.replica.plan("k") is not None and joiner.replica.plan("k").committed  # type: ignore[union-attr]


WORK = PlanWork("p", "pull", "IfNotPresent", 3, ("a",))


def _worker_with_plan(cfg: Config = CFG) -> NodeCore:
    w = NodeCore("b", cfg, random.Random(1), 0.0)
    w.receive("a", Heartbeat(2, "a"), 0.1)
    return w


def _dispatch(
    term: int = 2, coord: str = "a", attempt: int = 1, committed: bool = True
) -> Dispatch:
    item = DispatchItem("x:1", "sha256:1", attempt, 5.0)
    return Dispatch(term, coord, "p", (item,), WORK, committed=committed)


def test_a_target_runs_its_items_from_the_dispatch_alone() -> None:
    w = _worker_with_plan()
    acts = w.receive("a", _dispatch(), 0.2)
    (execute,) = of(acts, Execute)
    assert execute.work == WORK and [i.image for i in execute.items] == ["x:1"]
    assert w.replica.plan("p") is None and w.replica.part("p") == PlanPart("p", "b", WORK)
    assert PlanPart("p", "b", WORK) in of(acts, Persist)[0].records
    assert of(acts, Reply)[0].payload.accepted


def test_the_dispatch_reply_carries_the_accepted_results() -> None:
    core = coordinator()
    acts = core.submit("p", DOC, ITEMS, 1.0, "client")
    (request,) = [r for r in of(acts, Request) if isinstance(r.payload, Dispatch)]
    w = NodeCore("b", CFG, random.Random(1), 0.0)
    w.receive("a", Heartbeat(core.term, "a"), 1.0)
    acts = w.receive("a", request.payload, 1.01)
    # One message back: the reply holds what a RESULTS message used to carry.
    assert not [m for m in of(acts, Send) + of(acts, Request) if isinstance(m.payload, Results)]
    (reply,) = of(acts, Reply)
    assert [(r.node_id, r.image, r.result.state) for r in reply.payload.results] == [
        ("b", "x:1", ItemState.PULLING)
    ]
    assert core.replica.result("p", "b", "x:1").state is not ItemState.PULLING
    core.response(request.token, "b", reply.payload, 1.02)
    assert core.replica.result("p", "b", "x:1").state is ItemState.PULLING


def test_a_pull_that_starts_as_it_is_accepted_is_not_reported_twice() -> None:
    w = _worker_with_plan()
    w.receive("a", _dispatch(), 0.2)
    accepted = w.replica.result("p", "b", "x:1")
    assert accepted.state is ItemState.PULLING and accepted.started_at == 0.2
    start = ItemResult(ItemState.PULLING, 1, "sha256:1", started_at=0.21)
    assert w.executor_report(ExecutorReport("p", "x:1", start), 0.21) == []
    assert w.replica.result("p", "b", "x:1") == accepted
    # Bytes are news; so is a start long after the acceptance (it waited for a slot).
    moving = ItemResult(ItemState.PULLING, 1, "sha256:1", 5, 10, started_at=0.21)
    acts = w.executor_report(ExecutorReport("p", "x:1", moving), 0.25)
    assert of(acts, Persist) and [s for s in of(acts, Send) if isinstance(s.payload, Results)]
    w2 = _worker_with_plan()
    w2.receive("a", _dispatch(), 0.2)
    queued = ItemResult(ItemState.PULLING, 1, "sha256:1", started_at=0.2 + START_SLACK_S + 0.1)
    acts = w2.executor_report(ExecutorReport("p", "x:1", queued), 0.3)
    assert of(acts, Persist) and [s for s in of(acts, Send) if isinstance(s.payload, Results)]


def test_outcomes_are_batched_but_the_one_that_ends_a_plan_goes_at_once() -> None:
    core = coordinator()
    acts = core.submit("p", DOC, ITEMS, 1.0, "client")
    (put,) = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    (dispatch,) = [r for r in of(acts, Request) if isinstance(r.payload, Dispatch)]
    core.response(put.token, "b", PlanAck("p", "b", True), 1.01)
    core.response(dispatch.token, "b", DispatchReply("p", "b", True, ""), 1.02)

    def fanned(acts: list[Action]) -> list[str]:
        return [
            e.node_id
            for s in of(acts, Send)
            if isinstance(s.payload, Results) and s.node_id == "b"
            for e in s.payload.entries
        ]

    done = ItemResult(ItemState.DONE, 1, "sha256:1", 10, 10)
    core.receive("b", Results((ResultRecord("p", "b", "x:1", done),)), 1.1)
    assert not fanned(core.tick(1.1))  # one item of two: it waits for the batch
    assert fanned(core.tick(1.1 + FANOUT_DELAY_S)) == ["b"]
    acts = core.executor_report(ExecutorReport("p", "x:1", done), 1.2)
    assert core.next_wakeup() <= 1.2  # the last outcome: no batch delay
    assert fanned(acts + core.tick(1.2)) == ["a"]


def test_a_committed_dispatch_outranks_a_tombstone_a_tentative_one_does_not() -> None:
    w = _worker_with_plan()
    w.receive("a", PlanAbort(2, "a", "p"), 0.15)
    assert w.replica.is_aborted("p")
    acts = w.receive("a", _dispatch(committed=False), 0.2)
    assert not of(acts, Execute) and of(acts, Reply)[0].payload.reason == "aborted"
    acts = w.receive("a", _dispatch(attempt=2, committed=True), 0.3)
    assert of(acts, Execute) and not w.replica.is_aborted("p")


def test_an_outcome_with_no_coordinator_to_tell_goes_in_the_next_anti_entropy_round() -> None:
    cfg = local(plan_replicas=2, anti_entropy_idle_s=60.0)
    w = _worker_with_plan(cfg)
    w.membership({"a", "c"}, {}, 0.15)  # b cannot win an election alone
    w.receive("a", _dispatch(), 0.2)
    later = 0.2 + cfg.coordinator_timeout_s + 0.05  # no heartbeat since: no coordinator
    w.tick(later)
    done = ItemResult(ItemState.DONE, 1, "sha256:1", 10, 10)
    acts = w.executor_report(ExecutorReport("p", "x:1", done), later)
    assert not [r for r in of(acts, Request) if isinstance(r.payload, Results)]
    # A target holds only its part, which the frequent rounds skip unless it is unsettled;
    # the idle sweep comes much later (anti_entropy_idle_s).
    asked: list[str] = []
    t = later
    while t < later + 3 * cfg.anti_entropy_interval_s:
        t += 0.05
        for r in of(w.tick(t), Request):
            if isinstance(r.payload, SyncDigest):
                asked.extend(r.payload.digests)
    assert cfg.anti_entropy_idle_s * 0.5 > t  # the sweep cannot be what carried it
    assert "p" in asked


def test_worker_fences_dispatches() -> None:
    w = _worker_with_plan()
    acts = w.receive("z", _dispatch(term=1, coord="z"), 0.2)
    assert not of(acts, Execute)
    assert of(acts, Reply)[0].payload.accepted is False
    assert [s.payload for s in of(acts, Send)] == [Fenced(2, "a")]


def test_worker_dedupes_and_reports_under_the_new_attempt() -> None:
    w = _worker_with_plan()
    first = w.receive("a", _dispatch(attempt=1), 0.2)
    assert [i.image for e in of(first, Execute) for i in e.items] == ["x:1"]
    assert first.index(of(first, Persist)[0]) < first.index(of(first, Execute)[0])
    again = w.receive("a", _dispatch(attempt=2), 0.3)  # still pulling: no re-run
    assert not of(again, Execute)
    done = ItemResult(ItemState.DONE, 1, "sha256:1", 10, 10)
    acts = w.executor_report(ExecutorReport("p", "x:1", done), 0.4)
    # a final outcome goes to the coordinator as a request, not a droppable datagram
    assert not [s for s in of(acts, Send) if isinstance(s.payload, Results)]
    (sent,) = [r for r in of(acts, Request) if isinstance(r.payload, Results)]
    assert sent.node_id == "a" and sent.payload.entries[0].result.attempt == 2
    later = w.receive("a", _dispatch(attempt=3), 0.5)  # done: never pulled again
    assert not of(later, Execute)
    assert w.replica.result("p", "b", "x:1").state is ItemState.DONE


def test_takeover_dispatches_only_what_is_not_done() -> None:
    items = tuple(
        PlanItem(n, img, "sha256:" + img, 10) for n in ("a", "b", "c") for img in ("x:1", "y:1")
    )
    doc = PlanDocument(
        {"name": "p", "nodes": {n: ["x:1", "y:1"] for n in "abc"}, "policy": {"timeout": "5s"}}
    )
    records: list[Any] = [PlanRecord.of("p", doc, items, 0.0, False)]  # tentative: still taken over

    for n in ("a", "b", "c"):
        records.append(ResultRecord("p", n, "x:1", ItemResult(ItemState.DONE, 1)))
    records.append(
        ResultRecord("p", "c", "y:1", ItemResult(ItemState.FAILED, 3, reason="unauthorized"))
    )
    core = NodeCore("b", CFG, random.Random(5), 0.0, PersistedState(records=records))
    core.membership({"a", "c"}, {}, 0.0)
    core.receive("z", Heartbeat(1, "z"), 0.0)  # old coordinator z, then it dies
    acts: list[Action] = []
    t = 0.0
    while core.role is not Role.COORDINATOR and t < 3:
        t += 0.01
        acts = core.tick(t)
        for r in of(acts, Send):
            if isinstance(r.payload, VoteRequest):
                acts += core.receive(r.node_id, VoteReply(core.term, r.node_id, True), t)
    assert core.role is Role.COORDINATOR
    wanted = {
        (d.node_id, i.image)
        for d in of(acts, Request)
        if isinstance(d.payload, Dispatch)
        for i in d.payload.items
    }
    wanted |= {("b", i.image) for e in of(acts, Execute) for i in e.items}
    assert wanted == {("a", "y:1"), ("b", "y:1")}  # done and finally failed items are left alone


def _committed_plan(core: NodeCore) -> list[Action]:
    acts = core.submit("p", DOC, ITEMS, 1.0, "client")
    (put,) = [r for r in of(acts, Request) if isinstance(r.payload, PlanPut)]
    return acts + core.response(put.token, "b", PlanAck("p", "b", True), 1.01)


def _dispatches_to(acts: list[Action], node: str) -> list[Request]:
    return [r for r in of(acts, Request) if isinstance(r.payload, Dispatch) and r.node_id == node]


def test_undelivered_dispatches_wait_for_the_node_without_using_retries() -> None:
    """A target that restarts mid-plan: its dispatches fail (connection refused) for a while.
    That must never end its items 'retries exhausted: node unreachable'."""
    core = coordinator()
    (dispatch,) = _dispatches_to(_committed_plan(core), "b")
    now = 1.1
    for _ in range(8):  # far more than the plan's retries (3)
        acts = core.request_failed(dispatch.token, now)
        assert not _dispatches_to(acts, "b")  # no hot loop: the re-dispatch waits a little
        assert core.replica.result("p", "b", "x:1").state is not ItemState.FAILED
        resent: list[Request] = []
        while not resent:
            now = core.next_wakeup()
            resent = _dispatches_to(core.tick(now), "b")
        (dispatch,) = resent
    assert dispatch.payload.items[0].attempt == 9  # every dispatch is a new attempt ...
    view = core.coordinating._runs["p"].scheduler.item("b", "x:1")
    assert view.failures == 0  # ... and none was charged to the item
    # The node is back: it accepts the dispatch and reports the pull done.
    core.response(dispatch.token, "b", DispatchReply("p", "b", True, ""), now)
    done = ItemResult(ItemState.DONE, 9, "sha256:1", 10, 10)
    core.receive("b", Results((ResultRecord("p", "b", "x:1", done),)), now)
    assert core.replica.result("p", "b", "x:1").state is ItemState.DONE


def test_a_target_away_past_node_return_timeout_fails_node_unavailable() -> None:
    core = coordinator()
    (dispatch,) = _dispatches_to(_committed_plan(core), "b")
    first_failure = now = 1.1
    while core.replica.result("p", "b", "x:1").state is not ItemState.FAILED:
        core.request_failed(dispatch.token, now)
        resent: list[Request] = []
        while not resent and core.replica.result("p", "b", "x:1").state is not ItemState.FAILED:
            now = core.next_wakeup()
            resent = _dispatches_to(core.tick(now), "b")
        if resent:
            (dispatch,) = resent
            now += CFG.peer_request_timeout_s  # the re-dispatch times out
    result = core.replica.result("p", "b", "x:1")
    assert result.reason == "node unavailable"
    assert now - first_failure >= CFG.node_return_timeout_s
