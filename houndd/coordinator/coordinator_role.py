"""The coordinator role of a node's core (sans IO): submissions and the scheduling of plans.

Submission (G1): the coordinator stores a plan as tentative, sends PLAN_PUT to
min(plan_replicas, alive members + 1) - 1 replicas (the member the client submitted through
first: it is the one likely to serve the client's reads) and acknowledges the client
(`AckClient`) once that many durable copies exist, itself included; a replica that refuses or
cannot be reached is replaced by another member. Only the replicas receive the whole plan
(a plan marked keep_present goes to every member: each checks it against its own images).
Dispatching does not wait for the copies: the plan runs from its acceptance, and a plan that
never gets its copies is aborted (the client gets a refusal, every member a PLAN_ABORT
tombstone, and the targets stop). A tentative plan whose coordinator died is run by the next
one, never silently lost.

Scheduling: one pure `Scheduler` per open plan, rebuilt from the merged results on takeover
(`Scheduler.restore`), so done and finally failed items are never dispatched again. Its
dispatches go to workers as DISPATCH requests (to this node's own worker role directly), each
carrying what the target needs to run its items (`PlanWork`, and who else needs each digest
for blob sharing); its final verdicts become result records. Outcomes are fanned out in
batches to the plan's holders: the replicas and nodes that fetched the plan to serve readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from houndd.coordinator.cohorts import peer_cohorts
from houndd.coordinator.election import Role
from houndd.coordinator.messages import (
    MAX_PEERS,
    AbortItems,
    AckClient,
    Action,
    Dispatch,
    DispatchReply,
    Peers,
    Persist,
    PlanAbort,
    PlanAck,
    PlanPut,
    Results,
    Send,
    SyncItems,
)
from houndd.coordinator.node_state import NodeState
from houndd.coordinator.records import (
    PlanDocument,
    PlanItem,
    PlanRecord,
    PlanWork,
    Record,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.scheduler import Abort as SchedAbort
from houndd.coordinator.scheduler import Dispatch as SchedDispatch
from houndd.coordinator.scheduler import Final as SchedFinal
from houndd.coordinator.scheduler import RestoredItem, Scheduler
from houndd.coordinator.worker_role import WorkerRole

log = logging.getLogger("houndd.coordinator")

FANOUT_DELAY_S = 0.01
"""Outcomes reaching the coordinator within this window go to the holders in one batch."""
FANOUT_BATCH = 100
"""Result entries per RESULTS message (~200 bytes each: well inside one datagram)."""
NOT_COORDINATOR = "not the coordinator"
"""The refusal of a submission made to a node that does not coordinate."""

OnChanges = Callable[[list[Record], float], list[Action]]


@dataclass
class _Run:
    """The coordinator's scheduler for one plan, and what its dispatches carry."""

    scheduler: Scheduler
    work: PlanWork
    peers: dict[tuple[str, str], Peers]  # (digest, node) -> the node's blob-sharing cohort
    fed: set[tuple[str, str, int, str]] = field(default_factory=set)


@dataclass
class _Pending:
    """A submission waiting for durable copies."""

    client_refs: list[Any]
    needed: int
    deadline: float
    acks: set[str]
    asked: set[str]  # replicas sent the plan (acked, waiting, or failed)


class CoordinatorRole:
    """Submissions, replication rounds and the schedulers of open plans."""

    def __init__(
        self,
        state: NodeState,
        worker: WorkerRole,
        *,
        on_changes: OnChanges,
        plan_ack_timeout_s: float | None = None,
        scheduler_options: dict[str, float] | None = None,
    ) -> None:
        self._state = state
        self._worker = worker
        self._on_changes = on_changes
        self._ack_timeout_s = plan_ack_timeout_s or state.config.peer_request_timeout_s
        self._sched_opts = dict(scheduler_options or {})
        self._runs: dict[str, _Run] = {}
        self._pending: dict[str, _Pending] = {}
        self._holders: dict[str, set[str]] = {}  # other nodes known to hold a plan
        self._fanout: dict[tuple[str, str, str], ResultRecord] = {}
        self._fanout_at: float | None = None

    # --- queries ---------------------------------------------------------------------------

    def plans_running(self) -> list[str]:
        """Ids of the plans it is scheduling now."""
        return list(self._runs)

    def wakeups(self) -> list[float]:
        """Times at which `tick` has something to do."""
        times = [p.deadline for p in self._pending.values()]
        if self._fanout_at is not None:
            times.append(self._fanout_at)
        for run in self._runs.values():
            w = run.scheduler.next_wakeup()
            if w is not None:
                times.append(w)
        return times

    # --- events ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Submission timeouts and scheduler timers."""
        out: list[Action] = []
        for pid, pend in list(self._pending.items()):
            if now >= pend.deadline:
                out.extend(self._fail_submission(pid, pend, "replication timeout", now))
        for pid, run in list(self._runs.items()):
            out.extend(self._sched_actions(pid, run.scheduler.on_tick(now), now))
        return out

    def flush(self, now: float) -> list[Action]:
        """Send the batch of outcomes if it is due."""
        if self._fanout_at is None or now < self._fanout_at:
            return []
        entries = list(self._fanout.values())
        self._fanout.clear()
        self._fanout_at = None
        st = self._state
        if not st.is_coordinator:
            return []
        by_plan: dict[str, list[ResultRecord]] = {}
        for entry in entries:
            by_plan.setdefault(entry.plan_id, []).append(entry)
        out: list[Action] = []
        for pid, plan_entries in by_plan.items():
            holders = sorted(self.holders(pid) & st.alive)
            for i in range(0, len(plan_entries), FANOUT_BATCH):
                msg = Results(tuple(plan_entries[i : i + FANOUT_BATCH]))
                out.extend(Send(n, msg) for n in holders)
        return out

    def holders(self, plan_id: str) -> set[str]:
        """Other nodes known to hold the whole plan (its outcomes go to them)."""
        return set(self._holders.get(plan_id, ()))

    def add_holder(self, plan_id: str, node: str) -> None:
        """`node` holds the whole plan (a replica, a reader's node, a digest said so)."""
        if node != self._state.node_id and self._state.replica.plan(plan_id) is not None:
            self._holders.setdefault(plan_id, set()).add(node)

    def members_changed(self, down: set[str], up: set[str], now: float) -> list[Action]:
        """Nodes went down or came back: their queues wait, or move again."""
        out: list[Action] = []
        for pid, run in list(self._runs.items()):
            for node in sorted(down):
                out.extend(self._sched_actions(pid, run.scheduler.on_node_down(node, now), now))
            for node in sorted(up):
                out.extend(self._sched_actions(pid, run.scheduler.on_node_up(node, now), now))
        if self._state.is_coordinator:
            for node in sorted(up):
                out.extend(self._keep_present_to(node))
        return out

    def _keep_present_to(self, node: str) -> list[Action]:
        """A member joined or came back: it gets every committed keep_present plan (each
        member checks those against its own images; it may have missed them)."""
        st = self._state
        plans = tuple(
            rec
            for rec in st.replica.plans()
            if rec.committed
            and rec.document.plan.policy.keep_present
            and rec.document.plan.action == "pull"
            and st.replica.cancelled(rec.plan_id) is None
        )
        out: list[Action] = []
        for rec in plans:
            self.add_holder(rec.plan_id, node)
            out.append(Send(node, SyncItems((rec,), (), (), (), None)))
        return out

    def role_changed(self, was: Role, now: float) -> list[Action]:
        """The election moved us in or out of the coordinator role."""
        st = self._state
        role = st.election.role
        if was is role:
            return []
        if was is Role.COORDINATOR:
            self._runs.clear()
            self._holders.clear()
            log.info("coordinator role lost term=%d", st.election.term)
        if role is Role.COORDINATOR:
            out = self.start_open_runs(now)
            log.info("coordinating term=%d open_plans=%d", st.election.term, len(self._runs))
            return out
        return []

    def start_open_runs(self, now: float) -> list[Action]:
        """Coordinator: every open plan gets a scheduler (takeover, and a safety net for a plan
        another coordinator acknowledged while our submission of the same id was pending)."""
        if not self._state.is_coordinator:
            return []
        out: list[Action] = []
        for rec in self._state.replica.open_plans():
            out.extend(self.start_run(rec, now))
        return out

    def submit(
        self,
        plan_id: str,
        document: PlanDocument,
        items: Iterable[PlanItem],
        now: float,
        client_ref: Any,
    ) -> list[Action]:
        """A client's plan; see the module docstring for G1."""
        st = self._state
        if not st.is_coordinator:
            return [AckClient(client_ref, False, NOT_COORDINATOR)]
        rec = PlanRecord.of(plan_id, document, items, st.stamp(now), False)
        known = st.replica.plan(plan_id)
        if known is not None and known.content_hash() != rec.content_hash():
            return [AckClient(client_ref, False, "plan id already used")]
        if st.replica.is_aborted(plan_id):
            return [AckClient(client_ref, False, "plan was aborted; submit it with a new id")]
        if known is not None and known.committed:
            return [AckClient(client_ref, True)]  # a client's retry: idempotent
        pending = self._pending.get(plan_id)
        if pending is not None:
            pending.client_refs.append(client_ref)
            return []
        out: list[Action] = []
        if known is not None:
            # Tentative copy (ours from a retry, or taken over from a dead coordinator): run the
            # replication round again so this client gets its answer.
            rec = known
        else:
            changed = st.replica.put_plan(rec)
            if not changed:
                return [AckClient(client_ref, False, "plan refused (store full or too large)")]
            out.append(Persist(tuple(changed)))
        needed = min(st.config.plan_replicas, len(st.alive) + 1)
        if rec.document.plan.policy.keep_present:
            # Every member checks keep_present plans against its own images: all hold it.
            replicas = sorted(st.alive)
        else:
            replicas = self._replica_candidates(rec, needed - 1)
        pend = _Pending([client_ref], needed, now + self._ack_timeout_s, {st.node_id}, set())
        self._pending[plan_id] = pend
        log.info("plan accepted plan=%s items=%d copies_needed=%d", plan_id, len(rec.items), needed)
        out.extend(self._put_to(rec, replicas, pend))
        out.extend(self.start_run(rec, now))  # dispatch overlaps replication
        out.extend(self._check_commit(plan_id, now))
        return out

    def _replica_candidates(self, rec: PlanRecord, count: int) -> list[str]:
        """The first `count` alive members in the order they are asked to replicate `rec`:
        the member the client submitted through first (it serves the client's reads), then
        an order of the plan's own (rendezvous on the plan id), which spreads plans over the
        members."""
        st = self._state
        via = next((n for n, name in st.names.items() if name == rec.document.via), None)

        def rank(node: str) -> tuple[bool, bytes]:
            weight = hashlib.blake2b(f"{rec.plan_id}|{node}".encode(), digest_size=8).digest()
            return (node != via, weight)

        return heapq.nsmallest(count, st.alive, key=rank)

    def _put_to(self, rec: PlanRecord, nodes: Iterable[str], pend: _Pending) -> list[Action]:
        st = self._state
        put = PlanPut(st.election.term, st.node_id, rec)
        out: list[Action] = []
        for node in nodes:
            pend.asked.add(node)
            out.append(st.request(node, put))
        return out

    def replica_failed(self, node: str, plan_id: str, now: float) -> list[Action]:
        """A replica did not store the plan (refused, unreachable): ask another member."""
        pend = self._pending.get(plan_id)
        rec = self._state.replica.plan(plan_id)
        if pend is None or rec is None or node in pend.acks:
            return []
        ranked = self._replica_candidates(rec, len(pend.asked) + 1)
        spare = [n for n in ranked if n not in pend.asked]
        return self._put_to(rec, spare[:1], pend)

    def on_plan_ack(self, sender: str, p: PlanAck, now: float) -> list[Action]:
        """A replica stored a plan durably."""
        if p.node != sender:
            return []
        if not p.ok:
            return self.replica_failed(sender, p.plan_id, now)
        out: list[Action] = []
        if sender not in self.holders(p.plan_id):
            self.add_holder(p.plan_id, sender)
            # Dispatch did not wait for this copy: outcomes fanned out before it was stored
            # went to nobody there, so they follow now.
            out.extend(self._catch_up(p.plan_id, sender))
        pend = self._pending.get(p.plan_id)
        if pend is None:
            return out
        pend.acks.add(sender)
        return out + self._check_commit(p.plan_id, now)

    def _catch_up(self, plan_id: str, node: str) -> list[Action]:
        finals = [
            ResultRecord(plan_id, n, image, res)
            for (n, image), res in self._state.replica.results(plan_id).items()
            if res.is_final
        ]
        return [
            Send(node, Results(tuple(finals[i : i + FANOUT_BATCH])))
            for i in range(0, len(finals), FANOUT_BATCH)
        ]

    def on_dispatch_reply(self, sender: str, p: DispatchReply, now: float) -> list[Action]:
        """An accepted dispatch ends the node's absence, if it was away. A refused one is a
        transient failure of everything in flight there, retried with backoff (a fenced
        refusal also reaches us as FENCED and ends our role)."""
        if p.node != sender or not self._state.is_coordinator:
            return []
        run = self._runs.get(p.plan_id)
        if run is None:
            return []
        if p.accepted:
            return self._sched_actions(p.plan_id, run.scheduler.on_reachable(sender, now), now)
        out: list[Action] = []
        for image in run.scheduler.in_flight(sender):
            attempt = run.scheduler.item(sender, image).attempt
            acts = run.scheduler.on_result(sender, image, attempt, False, p.reason, True, now)
            out.extend(self._sched_actions(p.plan_id, acts, now))
        return out

    def dispatch_failed(self, node: str, msg: Dispatch, now: float) -> list[Action]:
        """A DISPATCH request got no answer: the node is away, which is no pull failure, so
        no retry is used up (the scheduler re-dispatches when it is back, or fails the items
        `node unavailable` after `node_return_timeout_s`)."""
        run = self._runs.get(msg.plan_id)
        if run is None or not self._state.is_coordinator:
            return []
        sent = [(item.image, item.attempt) for item in msg.items]
        return self._sched_actions(
            msg.plan_id, run.scheduler.on_dispatch_failed(node, sent, now), now
        )

    def stop_run(self, pid: str, now: float) -> list[Action]:
        """The plan was cancelled or aborted: its scheduler cancels what is in flight."""
        run = self._runs.get(pid)
        if run is None:
            return []
        out = self._sched_actions(pid, run.scheduler.cancel(now), now)
        self._runs.pop(pid, None)
        return out

    def fan_out(self, changed: Iterable[Record], now: float) -> None:
        """Queue outcomes for every member. Sending each result to each member at once costs
        N messages per result, N^2 per plan; a batch per FANOUT_DELAY_S costs N per batch.
        The outcome that ends a plan goes at once: a client waiting for the plan is told by
        a holder, so a batch's delay would be added to every plan's end. Progress is left to
        anti-entropy."""
        due = now + FANOUT_DELAY_S
        for r in changed:
            if isinstance(r, ResultRecord) and r.result.is_final:
                self._fanout[(r.plan_id, r.node_id, r.image)] = r
                if not self._state.replica.is_open(r.plan_id):
                    due = now
        if self._fanout and (self._fanout_at is None or due < self._fanout_at):
            self._fanout_at = due

    def feed(self, changed: Iterable[Record], now: float) -> list[Action]:
        """Turn merged result changes into scheduler events."""
        out: list[Action] = []
        for rec in changed:
            if not isinstance(rec, ResultRecord):
                continue
            run = self._runs.get(rec.plan_id)
            if run is None:
                continue
            r = rec.result
            mark = (rec.node_id, rec.image, r.attempt, r.state.value)
            if mark in run.fed:
                continue
            acts = self._scheduler_event(run.scheduler, rec, now)
            if acts is None:
                continue
            run.fed.add(mark)
            out.extend(self._sched_actions(rec.plan_id, acts, now))
        for pid in [p for p, run in self._runs.items() if run.scheduler.done()]:
            del self._runs[pid]
            log.info("plan finished plan=%s", pid)
        return out

    @staticmethod
    def _scheduler_event(sched: Scheduler, rec: ResultRecord, now: float) -> list[Any] | None:
        r = rec.result
        if r.state is ItemState.PULLING:
            return sched.on_started(rec.node_id, rec.image, r.attempt, now)
        if r.state is ItemState.DONE:
            return sched.on_result(rec.node_id, rec.image, r.attempt, True, "", False, now)
        if r.state is ItemState.FAILED:
            return sched.on_result(
                rec.node_id, rec.image, r.attempt, False, r.reason, r.transient, now
            )
        return None

    # --- internals ---------------------------------------------------------------------------

    def start_run(self, rec: PlanRecord, now: float) -> list[Action]:
        """Coordinator: schedule a plan (if it is open and not scheduled yet)."""
        st = self._state
        pid = rec.plan_id
        if pid in self._runs or st.replica.cancelled(pid) or st.replica.is_aborted(pid):
            return []
        if not st.replica.remaining(pid):
            return []
        known = st.replica.results(pid)
        restored = []
        for item in rec.items:
            res = known.get((item.node_id, item.image), ItemResult())
            restored.append(
                RestoredItem(
                    item.node_id,
                    item.image,
                    item.digest,
                    item.size_bytes,
                    res.state.value,
                    res.attempt,
                    None,
                    res.reason,
                    res.transient,
                )
            )
        policy = rec.document.plan.policy
        sched = Scheduler.restore(restored, policy, rng=st.rng, **self._sched_opts)
        holders = [st.node_id, *sorted(self.holders(pid) | self._asked(pid))]
        self._runs[pid] = _Run(sched, PlanWork.of(rec, holders), self._peers_of(rec))
        out: list[Action] = []
        for node in sorted({i.node_id for i in rec.items} - st.alive - {st.node_id}):
            out.extend(self._sched_actions(pid, sched.on_node_down(node, now), now))
        out.extend(self._sched_actions(pid, sched.start(now), now))
        return out

    def _asked(self, pid: str) -> set[str]:
        pend = self._pending.get(pid)
        return set(pend.asked) if pend is not None else set()

    def _peers_of(self, rec: PlanRecord) -> dict[tuple[str, str], Peers]:
        """Blob sharing: for each (digest, node), the nodes of the plan that need that digest
        (a cohort of them in a very big group), one shared value per cohort."""
        if not self._state.config.p2p or rec.document.plan.action != "pull":
            return {}
        nodes: dict[str, list[str]] = {}
        for item in rec.items:
            if item.digest:
                nodes.setdefault(item.digest, []).append(item.node_id)
        out: dict[tuple[str, str], Peers] = {}
        for digest, members in nodes.items():
            for cohort in peer_cohorts(digest, members, MAX_PEERS):
                peers = Peers(digest, ",".join(cohort))
                for node in cohort:
                    out[(digest, node)] = peers
        return out

    def _sched_actions(self, pid: str, actions: Iterable[object], now: float) -> list[Action]:
        st = self._state
        out: list[Action] = []
        changed: list[Record] = []
        term, me = st.election.term, st.node_id
        run = self._runs.get(pid)
        for act in actions:
            if isinstance(act, SchedDispatch):
                if run is None:
                    continue
                peers = {
                    id(p): p
                    for p in (run.peers.get((i.digest, act.node)) for i in act.items)
                    if p is not None
                }
                rec = st.replica.plan(pid)
                committed = rec is not None and rec.committed
                msg = Dispatch(term, me, pid, act.items, run.work, tuple(peers.values()), committed)
                if act.node == me:
                    out.extend(self._worker.on_dispatch(me, msg, now, local=True))
                else:
                    out.append(st.request(act.node, msg))
            elif isinstance(act, SchedAbort):
                if act.node == me:
                    out.extend(self._worker.abort_local(pid, act.images))
                else:
                    out.append(Send(act.node, AbortItems(term, me, pid, act.images)))
            elif isinstance(act, SchedFinal) and act.state != "done":
                attempt = run.scheduler.item(act.node, act.image).attempt if run else 0
                state = ItemState(act.state)
                res = ItemResult(state, attempt, reason=act.reason, finished_at=st.stamp(now))
                changed.extend(st.replica.put_result(pid, act.node, act.image, res))
        if changed:
            out.insert(0, Persist(tuple(changed)))
            self.fan_out(changed, now)
        return out

    def _check_commit(self, pid: str, now: float) -> list[Action]:
        st = self._state
        pend = self._pending.get(pid)
        if pend is None or len(pend.acks) < pend.needed:
            return []
        del self._pending[pid]
        rec = st.replica.plan(pid)
        if rec is None:  # aborted meanwhile by an outside tombstone
            return [AckClient(ref, False, "plan aborted") for ref in pend.client_refs]
        committed = dataclasses.replace(rec, committed=True)
        changed = st.replica.put_plan(committed)
        out: list[Action] = [Persist(tuple(changed))] if changed else []
        out.extend(AckClient(ref, True) for ref in pend.client_refs)
        log.info("plan committed plan=%s copies=%d", pid, len(pend.acks))
        # The replicas hold it tentative: they learn the commit (so anti-entropy never offers
        # them the record again). Anyone else needs nothing.
        put = PlanPut(st.election.term, st.node_id, committed)
        out.extend(Send(n, put) for n in sorted(pend.acks - {st.node_id}))
        out.extend(self.start_run(committed, now) if st.is_coordinator else [])
        return out

    def _fail_submission(self, pid: str, pend: _Pending, reason: str, now: float) -> list[Action]:
        st = self._state
        del self._pending[pid]
        log.warning(
            "plan not acknowledged plan=%s reason=%s copies=%d", pid, reason, len(pend.acks)
        )
        out: list[Action] = [AckClient(ref, False, reason) for ref in pend.client_refs]
        changed = st.replica.put_abort(pid)
        rec = st.replica.plan(pid)
        if rec is not None and st.is_coordinator:
            out.extend(self.start_run(rec, now))  # committed elsewhere: the abort was refused
        if changed:
            out.insert(0, Persist(tuple(changed)))
            msg = PlanAbort(st.election.term, st.node_id, pid)
            out.extend(Send(n, msg) for n in sorted(st.alive))
            out.extend(self._on_changes(changed, now))
        return out
