"""`NodeCore`: the whole coordinator-side logic of one node, sans IO.

Every node runs the same core: election (`Election`), the replicated plan/result state
(`ReplicaState`), the coordinator role (one `Scheduler` per open plan) and the worker role
(dispatch acceptance with fencing and dedupe). The async shell (`service.py`) feeds it events
and carries out the actions it returns, in order.

Events (all return `list[Action]`):

- `tick(now)`: call at `next_wakeup()` (or more often): heartbeats, elections, scheduler
  timers, anti-entropy rounds, submission timeouts.
- `membership(alive, names, now)`: the failure detector's view; `alive` = other node ids.
- `receive(sender, msg_type, payload, now)`: a peer message (datagram or request). The actions
  may contain one `Reply`: for a request it is the response body; for a datagram the shell
  sends it back to `sender` as a datagram.
- `response(token, sender, msg_type, payload, now)`: the reply to our `Request(token=...)`;
  `request_failed(token, now)` when it timed out or could not be delivered.
- `submit(plan_id, document, items, now, client_ref)`: coordinator only. Stores the plan as
  tentative, sends PLAN_PUT to the alive members and emits `AckClient(client_ref, True)` once
  min(plan_replicas, alive members + 1) durable copies exist (itself included), or
  `AckClient(client_ref, False, reason)` on timeout (then the tentative copies are dropped with
  a best-effort PLAN_ABORT tombstone). A tentative plan whose coordinator died is run by the
  next coordinator, never silently lost. On a non-coordinator the shell forwards the
  submission (PLAN_FORWARD) to `coordinator()` and calls `submit` there.
- `executor_report(ExecutorReport, now)`: progress/result from the local puller.
- `cancel(plan_id, now)`: valid on any node; spreads a cancel record.

Actions (`houndd.coordinator.messages`): `Send(node_id, msg_type, payload)` datagram;
`Request(node_id, msg_type, payload, token)`; `Reply(msg_type, payload)`;
`Persist(records)`: apply with `Store.apply` durably BEFORE carrying out any later action of
the same list (votes, acks and dispatches depend on it); `Execute(plan_id, items)` and
`AbortLocal(plan_id, images)` for the local executor; `AckClient(client_ref, ok, reason)`.
Message type names are `houndd.wire.MsgType` names; the extra ones this core needs beyond the
brief's list are FENCED, PLAN_ABORT and ABORT.

Takeover: a node that becomes coordinator rebuilds a `Scheduler` per open plan from the merged
results (`Scheduler.restore`); done and finally failed items are never dispatched again.
Results flow worker -> coordinator -> every alive member, and anti-entropy (digest exchange
with a random peer, every other round with the coordinator) repairs whatever was lost.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from houndd.config import Config
from houndd.coordinator import messages as m
from houndd.coordinator.election import Election, Role
from houndd.coordinator.messages import (
    AbortLocal,
    AckClient,
    Action,
    Execute,
    Persist,
    Reply,
    Request,
    Send,
)
from houndd.coordinator.plan import PlanSpec, Policy
from houndd.coordinator.replica import (
    AbortRecord,
    CancelRecord,
    PlanItem,
    PlanRecord,
    Record,
    ReplicaState,
    ResultRecord,
    SyncBatch,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.scheduler import Abort as SchedAbort
from houndd.coordinator.scheduler import Dispatch as SchedDispatch
from houndd.coordinator.scheduler import Final as SchedFinal
from houndd.coordinator.scheduler import RestoredItem, Scheduler
from houndd.coordinator.store import PersistedState

log = logging.getLogger("houndd.coordinator")

FANOUT_DELAY_S = 0.05
"""Outcomes reaching the coordinator within this window go to the members in one batch."""
FANOUT_BATCH = 100
"""Result entries per RESULTS message (~200 bytes each: well inside one datagram)."""


@dataclass(frozen=True, slots=True)
class ExecutorReport:
    """What the local puller says about one image of a plan (attempt is filled in here)."""

    plan_id: str
    image: str
    result: ItemResult


def default_policy(document: Mapping[str, Any]) -> Policy:
    """The plan's policy; a stored document was validated at submission."""
    return PlanSpec.from_document(document).policy


@dataclass
class _Run:
    """The coordinator's scheduler for one plan."""

    scheduler: Scheduler
    fed: set[tuple[str, str, int, str]] = field(default_factory=set)


@dataclass
class _Pending:
    """A submission waiting for durable copies."""

    client_refs: list[Any]
    needed: int
    deadline: float
    acks: set[str]


def _plan_wire(rec: PlanRecord) -> m.PlanWire:
    items = tuple(m.PlanItemWire(*i) for i in rec.items)
    return m.PlanWire(rec.plan_id, rec.document, items, rec.accepted_at, rec.committed)


def _plan_record(w: m.PlanWire) -> PlanRecord:
    items = tuple(PlanItem(i.node_id, i.image, i.digest, i.size_bytes) for i in w.items)
    return PlanRecord(w.plan_id, w.document, items, w.accepted_at, w.committed)


def _entry(r: ResultRecord) -> m.ResultEntry:
    return m.ResultEntry(r.plan_id, r.node_id, r.image, r.result.to_dict())


def _result_record(e: m.ResultEntry) -> ResultRecord:
    return ResultRecord(e.plan_id, e.node_id, e.image, ItemResult.from_dict(dict(e.result)))


def _batch_wire(b: SyncBatch, digests: Mapping[str, str] | None) -> m.SyncItems:
    return m.SyncItems(
        tuple(_plan_wire(p) for p in b.plans),
        tuple(m.CancelWire(c.plan_id, c.cancelled_at) for c in b.cancels),
        b.aborted,
        tuple(_entry(r) for r in b.results),
        digests,
    )


def _batch(w: m.SyncItems) -> SyncBatch:
    return SyncBatch(
        tuple(_plan_record(p) for p in w.plans),
        tuple(CancelRecord(c.plan_id, c.cancelled_at) for c in w.cancels),
        w.aborted,
        tuple(_result_record(e) for e in w.results),
    )


class NodeCore:
    """The sans-IO node (see the module docstring for the event/action API)."""

    def __init__(
        self,
        node_id: str,
        config: Config,
        rng: random.Random,
        now: float,
        persisted: PersistedState | None = None,
        *,
        policy_for: Callable[[Mapping[str, Any]], Policy] = default_policy,
        plan_ack_timeout_s: float | None = None,
        scheduler_options: Mapping[str, float] | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self._rng = rng
        self._policy_for = policy_for
        self._ack_timeout_s = plan_ack_timeout_s or config.peer_request_timeout_s
        self._sched_opts = dict(scheduler_options or {})
        state = persisted or PersistedState()
        self.election = Election(node_id, config, rng, now, state.election)
        self.replica = ReplicaState()
        self.replica.restore(state.records)
        self.alive: set[str] = set()
        self.names: dict[str, str] = {}
        self._runs: dict[str, _Run] = {}
        self._pending: dict[str, _Pending] = {}
        self._running: dict[tuple[str, str], int] = {}  # worker: (plan, image) -> attempt
        self._has_plan: dict[str, set[str]] = {}  # coordinator: nodes known to store a plan
        self._requests: dict[int, tuple[str, str, Any]] = {}
        self._next_token = 1
        self._ae_at = now + rng.uniform(0, config.anti_entropy_interval_s)
        self._ae_round = 0
        self._fanout: dict[tuple[str, str, str], ResultRecord] = {}
        self._fanout_at: float | None = None
        self._outbox: list[Action] = self._interrupted_on_restart(now)

    # --- queries -----------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        """follower, candidate or coordinator."""
        return self.election.role

    @property
    def term(self) -> int:
        """The current election term."""
        return self.election.term

    def coordinator(self, now: float) -> str | None:
        """The coordinator this node hears (itself included), or None during an election."""
        return self.election.coordinator(now)

    def plans_running(self) -> list[str]:
        """Coordinator: ids of the plans it is scheduling now."""
        return list(self._runs)

    def next_wakeup(self) -> float:
        """The earliest time `tick` has something to do."""
        times = [self._ae_at]
        if self._fanout_at is not None:
            times.append(self._fanout_at)
        e = self.election.next_wakeup()
        if e is not None:
            times.append(e)
        times.extend(p.deadline for p in self._pending.values())
        for run in self._runs.values():
            w = run.scheduler.next_wakeup()
            if w is not None:
                times.append(w)
        return min(times)

    # --- events ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Time passed."""
        out = self._take_outbox()
        out.extend(self._election_step(lambda: self.election.tick(now), now))
        for pid, pend in list(self._pending.items()):
            if now >= pend.deadline:
                out.extend(self._fail_submission(pid, pend, "replication timeout", now))
        for pid, run in list(self._runs.items()):
            out.extend(self._sched_actions(pid, run.scheduler.on_tick(now), now))
        if now >= self._ae_at:
            self._ae_at = now + self.config.anti_entropy_interval_s * self._rng.uniform(0.8, 1.2)
            out.extend(self._anti_entropy(now))
            if self.election.is_coordinator:
                # Safety net: every open plan has a scheduler (e.g. a plan another coordinator
                # acknowledged while our own submission of the same id was still pending).
                for rec in self.replica.open_plans():
                    out.extend(self._start_run(rec, now))
        out.extend(self._flush_fan_out(now))
        return out

    def membership(
        self, alive: Iterable[str], names: Mapping[str, str], now: float
    ) -> list[Action]:
        """The failure detector's view of the other members changed."""
        new = set(alive) - {self.node_id}
        down, up = self.alive - new, new - self.alive
        self.alive = new
        self.names = dict(names)
        out = self._take_outbox()
        out.extend(self._election_step(lambda: self.election.membership(new, now), now))
        for pid, run in list(self._runs.items()):
            for node in sorted(down):
                out.extend(self._sched_actions(pid, run.scheduler.on_node_down(node, now), now))
            for node in sorted(up):
                out.extend(self._sched_actions(pid, run.scheduler.on_node_up(node, now), now))
        return out

    def receive(self, sender: str, msg_type: str, payload: Any, now: float) -> list[Action]:
        """A peer message. Unknown types and mismatched payloads are dropped."""
        handler = _HANDLERS.get(msg_type)
        if handler is None or not isinstance(payload, m.PAYLOADS[msg_type]):
            log.debug("message dropped peer=%s type=%s", sender, msg_type)
            return []
        out = self._take_outbox()
        out.extend(handler(self, sender, payload, now))
        return out

    def response(
        self, token: int, sender: str, msg_type: str, payload: Any, now: float
    ) -> list[Action]:
        """The reply to one of our requests."""
        self._requests.pop(token, None)
        return self.receive(sender, msg_type, payload, now)

    def request_failed(self, token: int, now: float) -> list[Action]:
        """One of our requests got no reply."""
        req = self._requests.pop(token, None)
        if req is None:
            return []
        node, msg_type, payload = req
        if msg_type == "DISPATCH" and self.election.is_coordinator:
            run = self._runs.get(payload.plan_id)
            if run is not None:
                # The node is away, which is no pull failure: no retry is used up.
                sent = [(item.image, item.attempt) for item in payload.items]
                acts = run.scheduler.on_dispatch_failed(node, sent, now)
                return self._sched_actions(payload.plan_id, acts, now)
        return []

    def submit(
        self,
        plan_id: str,
        document: Mapping[str, Any],
        items: Iterable[tuple[str, str, str, int]],
        now: float,
        client_ref: Any,
    ) -> list[Action]:
        """A client's plan (coordinator only); see the module docstring for G1."""
        out = self._take_outbox()
        if not self.election.is_coordinator:
            out.append(AckClient(client_ref, False, "not the coordinator"))
            return out
        rec = PlanRecord(plan_id, dict(document), tuple(PlanItem(*i) for i in items), now, False)
        known = self.replica.plan(plan_id)
        if known is not None and known.content_hash() != rec.content_hash():
            out.append(AckClient(client_ref, False, "plan id already used"))
            return out
        if self.replica.is_aborted(plan_id):
            out.append(AckClient(client_ref, False, "plan was aborted; submit it with a new id"))
            return out
        if known is not None and known.committed:
            out.append(AckClient(client_ref, True))  # a client's retry: idempotent
            return out
        pending = self._pending.get(plan_id)
        if pending is not None:
            pending.client_refs.append(client_ref)
            return out
        if known is not None:
            # Tentative copy (ours from a retry, or taken over from a dead coordinator): run the
            # replication round again so this client gets its answer.
            rec = known
        else:
            changed = self.replica.put_plan(rec)
            if not changed:
                out.append(AckClient(client_ref, False, "plan refused (store full or too large)"))
                return out
            out.append(Persist(tuple(changed)))
        needed = min(self.config.plan_replicas, len(self.alive) + 1)
        pend = _Pending([client_ref], needed, now + self._ack_timeout_s, {self.node_id})
        self._pending[plan_id] = pend
        log.info("plan accepted plan=%s items=%d copies_needed=%d", plan_id, len(rec.items), needed)
        put = m.PlanPut(self.election.term, self.node_id, _plan_wire(rec))
        for node in sorted(self.alive):
            out.append(self._request(node, "PLAN_PUT", put))
        out.extend(self._check_commit(plan_id, now))
        return out

    def executor_report(self, report: ExecutorReport, now: float) -> list[Action]:
        """Progress or outcome of a local pull."""
        out = self._take_outbox()
        key = (report.plan_id, report.image)
        attempt = self._running.get(key)
        if attempt is None:
            return out  # aborted, or from before a restart: the coordinator moved on
        result = dataclasses.replace(report.result, attempt=max(attempt, report.result.attempt))
        if result.state in (ItemState.DONE, ItemState.FAILED, ItemState.CANCELLED):
            del self._running[key]
        out.extend(self._own_result(report.plan_id, report.image, result, now))
        return out

    def cancel(self, plan_id: str, now: float) -> list[Action]:
        """Cancel a plan (any node). Returns [] if the plan is unknown."""
        out = self._take_outbox()
        changed = self.replica.put_cancel(CancelRecord(plan_id, now))
        if not changed:
            return out
        out.append(Persist(tuple(changed)))
        msg = m.Cancel(m.CancelWire(plan_id, now))
        out.extend(Send(n, "CANCEL", msg) for n in sorted(self.alive))
        out.extend(self._on_changes(changed, now))
        return out

    # --- election glue -------------------------------------------------------------------------

    def _election_step(self, step: Callable[[], list[Action]], now: float) -> list[Action]:
        was = self.election.role
        out = step()
        out.extend(self._role_changed(was, now))
        return out

    def _role_changed(self, was: Role, now: float) -> list[Action]:
        role = self.election.role
        if was is role:
            return []
        if was is Role.COORDINATOR:
            self._runs.clear()
            self._has_plan.clear()
            log.info("coordinator role lost term=%d", self.election.term)
        if role is Role.COORDINATOR:
            return self._take_over(now)
        return []

    def _take_over(self, now: float) -> list[Action]:
        out: list[Action] = []
        for rec in self.replica.open_plans():
            out.extend(self._start_run(rec, now))
        log.info("coordinating term=%d open_plans=%d", self.election.term, len(self._runs))
        return out

    def _start_run(self, rec: PlanRecord, now: float) -> list[Action]:
        pid = rec.plan_id
        if pid in self._runs or pid in self._pending or self.replica.cancelled(pid):
            return []
        if not self.replica.remaining(pid):
            return []
        try:
            policy = self._policy_for(rec.document)
        except ValueError as e:
            log.warning("plan policy unreadable, using defaults plan=%s error=%s", pid, e)
            policy = Policy()
        known = self.replica.results(pid)
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
        sched = Scheduler.restore(restored, policy, rng=self._rng, **self._sched_opts)
        run = _Run(sched)
        self._runs[pid] = run
        self._has_plan.setdefault(pid, set())
        out: list[Action] = []
        for node in sorted({i.node_id for i in rec.items} - self.alive - {self.node_id}):
            out.extend(self._sched_actions(pid, sched.on_node_down(node, now), now))
        out.extend(self._sched_actions(pid, sched.start(now), now))
        return out

    # --- coordinator role ----------------------------------------------------------------------

    def _sched_actions(self, pid: str, actions: Iterable[object], now: float) -> list[Action]:
        out: list[Action] = []
        changed: list[Record] = []
        term, me = self.election.term, self.node_id
        for act in actions:
            if isinstance(act, SchedDispatch):
                items = tuple(
                    m.DispatchItemWire(i.image, i.digest, i.attempt, i.timeout_s) for i in act.items
                )
                msg = m.Dispatch(term, me, pid, items)
                if act.node == me:
                    out.extend(self._on_dispatch(me, msg, now, local=True))
                else:
                    rec = self.replica.plan(pid)
                    if rec is not None and act.node not in self._has_plan.get(pid, set()):
                        # The node may have missed PLAN_PUT: push the plan ahead of the dispatch.
                        out.append(Send(act.node, "PLAN_PUT", m.PlanPut(term, me, _plan_wire(rec))))
                    out.append(self._request(act.node, "DISPATCH", msg))
            elif isinstance(act, SchedAbort):
                if act.node == me:
                    out.extend(self._abort_local(pid, act.images))
                else:
                    out.append(Send(act.node, "ABORT", m.AbortItems(term, me, pid, act.images)))
            elif isinstance(act, SchedFinal) and act.state != "done":
                run = self._runs.get(pid)
                attempt = run.scheduler.item(act.node, act.image).attempt if run else 0
                state = ItemState(act.state)
                res = ItemResult(state, attempt, reason=act.reason, finished_at=now)
                changed.extend(self.replica.put_result(pid, act.node, act.image, res))
        if changed:
            out.insert(0, Persist(tuple(changed)))
            out.extend(self._fan_out(changed, now))
        return out

    def _feed(self, changed: Iterable[Record], now: float) -> list[Action]:
        """Coordinator: turn merged result changes into scheduler events."""
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
            sched = run.scheduler
            if r.state is ItemState.PULLING:
                acts = sched.on_started(rec.node_id, rec.image, r.attempt, now)
            elif r.state is ItemState.DONE:
                acts = sched.on_result(rec.node_id, rec.image, r.attempt, True, "", False, now)
            elif r.state is ItemState.FAILED:
                acts = sched.on_result(
                    rec.node_id, rec.image, r.attempt, False, r.reason, r.transient, now
                )
            else:
                continue
            run.fed.add(mark)
            out.extend(self._sched_actions(rec.plan_id, acts, now))
        for pid in [p for p, run in self._runs.items() if run.scheduler.done()]:
            del self._runs[pid]
            log.info("plan finished plan=%s", pid)
        return out

    def _check_commit(self, pid: str, now: float) -> list[Action]:
        pend = self._pending.get(pid)
        if pend is None or len(pend.acks) < pend.needed:
            return []
        del self._pending[pid]
        rec = self.replica.plan(pid)
        if rec is None:  # aborted meanwhile by an outside tombstone
            return [AckClient(ref, False, "plan aborted") for ref in pend.client_refs]
        committed = dataclasses.replace(rec, committed=True)
        changed = self.replica.put_plan(committed)
        out: list[Action] = [Persist(tuple(changed))] if changed else []
        out.extend(AckClient(ref, True) for ref in pend.client_refs)
        log.info("plan committed plan=%s copies=%d", pid, len(pend.acks))
        put = m.PlanPut(self.election.term, self.node_id, _plan_wire(committed))
        out.extend(Send(n, "PLAN_PUT", put) for n in sorted(self.alive))
        if self.election.is_coordinator:
            out.extend(self._start_run(committed, now))
        return out

    def _fail_submission(self, pid: str, pend: _Pending, reason: str, now: float) -> list[Action]:
        del self._pending[pid]
        log.warning(
            "plan not acknowledged plan=%s reason=%s copies=%d", pid, reason, len(pend.acks)
        )
        out: list[Action] = [AckClient(ref, False, reason) for ref in pend.client_refs]
        changed = self.replica.put_abort(pid)
        rec = self.replica.plan(pid)
        if rec is not None and self.election.is_coordinator:
            out.extend(self._start_run(rec, now))  # committed elsewhere: the abort was refused
        if changed:
            out.insert(0, Persist(tuple(changed)))
            msg = m.PlanAbort(self.election.term, self.node_id, pid)
            out.extend(Send(n, "PLAN_ABORT", msg) for n in sorted(self.alive))
            out.extend(self._on_changes(changed, now))
        return out

    def _fan_out(self, changed: Iterable[Record], now: float) -> list[Action]:
        """Queue outcomes for every member. Sending each result to each member at once costs
        N messages per result, N^2 per plan; a batch per FANOUT_DELAY_S costs N per batch.
        Progress is left to anti-entropy."""
        for r in changed:
            if isinstance(r, ResultRecord) and r.result.is_final:
                self._fanout[(r.plan_id, r.node_id, r.image)] = r
        if self._fanout and self._fanout_at is None:
            self._fanout_at = now + FANOUT_DELAY_S
        return []

    def _flush_fan_out(self, now: float) -> list[Action]:
        if self._fanout_at is None or now < self._fanout_at:
            return []
        entries = [_entry(r) for r in self._fanout.values()]
        self._fanout.clear()
        self._fanout_at = None
        if not self.election.is_coordinator:
            return []
        out: list[Action] = []
        for i in range(0, len(entries), FANOUT_BATCH):
            msg = m.Results(tuple(entries[i : i + FANOUT_BATCH]))
            out.extend(Send(n, "RESULTS", msg) for n in sorted(self.alive))
        return out

    # --- worker role ---------------------------------------------------------------------------

    def _on_dispatch(
        self, sender: str, msg: m.Dispatch, now: float, *, local: bool = False
    ) -> list[Action]:
        out: list[Action] = []
        if not local:
            acts, ok = self._admit(msg.term, msg.coordinator, now)
            out.extend(acts)
            if not ok or sender != msg.coordinator:
                out.append(
                    Reply(
                        "DISPATCH_REPLY",
                        m.DispatchReply(msg.plan_id, self.node_id, False, "fenced"),
                    )
                )
                return out
        pid = msg.plan_id
        rec = self.replica.plan(pid)
        if rec is None or self.replica.cancelled(pid):
            reason = "unknown plan" if rec is None else "cancelled"
            out.append(Reply("DISPATCH_REPLY", m.DispatchReply(pid, self.node_id, False, reason)))
            return out
        changed: list[Record] = []
        to_run: list[m.DispatchItemWire] = []
        for item in msg.items:
            key = (pid, item.image)
            own = self.replica.result(pid, self.node_id, item.image)
            if own.state is ItemState.DONE or key in self._running:
                # Dedupe by (plan, image@digest): already done or pulling here. Answer under
                # the new attempt number so the coordinator's scheduler accepts it.
                self._running[key] = max(self._running.get(key, 0), item.attempt)
                if own.state is ItemState.DONE:
                    self._running.pop(key)
                res = dataclasses.replace(own, attempt=max(own.attempt, item.attempt))
            else:
                self._running[key] = item.attempt
                to_run.append(item)
                res = ItemResult(ItemState.PULLING, item.attempt, item.digest, started_at=now)
            changed.extend(self.replica.put_result(pid, self.node_id, item.image, res))
        if changed:
            out.append(Persist(tuple(changed)))
        if to_run:
            out.append(Execute(pid, tuple(to_run)))
        out.extend(self._report(changed, now))
        if not local:
            out.append(Reply("DISPATCH_REPLY", m.DispatchReply(pid, self.node_id, True, "")))
        return out

    def _abort_local(self, pid: str, images: Iterable[str]) -> list[Action]:
        stop = tuple(i for i in images if self._running.pop((pid, i), None) is not None)
        return [AbortLocal(pid, stop)] if stop else []

    def _own_result(self, pid: str, image: str, result: ItemResult, now: float) -> list[Action]:
        changed = self.replica.put_result(pid, self.node_id, image, result)
        if not changed:
            return []
        return [Persist(tuple(changed)), *self._report(changed, now)]

    def _report(self, changed: list[Record], now: float) -> list[Action]:
        """Worker results go to the coordinator (and, from it, to everyone)."""
        if not changed:
            return []
        if self.election.is_coordinator:
            return self._fan_out(changed, now) + self._feed(changed, now)
        coord = self.election.coordinator(now)
        if coord is None or coord == self.node_id:
            return []  # anti-entropy will carry it
        results = [r for r in changed if isinstance(r, ResultRecord)]
        msg = m.Results(tuple(_entry(r) for r in results))
        if any(r.result.is_final for r in results):
            # An outcome must not wait for the next anti-entropy round because one datagram
            # was dropped: it travels as a request (HTTP); progress stays best-effort.
            return [self._request(coord, "RESULTS", msg)]
        return [Send(coord, "RESULTS", msg)]

    def _interrupted_on_restart(self, now: float) -> list[Action]:
        """Pulls that were running when this node stopped did not survive it: say so, so the
        coordinator retries them now rather than after the item timeout."""
        changed: list[Record] = []
        for rec in self.replica.open_plans():
            for (node, image), res in self.replica.results(rec.plan_id).items():
                if node == self.node_id and res.state is ItemState.PULLING:
                    failed = dataclasses.replace(
                        res,
                        state=ItemState.FAILED,
                        reason="interrupted",
                        transient=True,
                        finished_at=now,
                    )
                    changed.extend(self.replica.put_result(rec.plan_id, node, image, failed))
        return [Persist(tuple(changed))] if changed else []

    # --- replication -----------------------------------------------------------------------------

    def _on_changes(self, changed: list[Record], now: float) -> list[Action]:
        """React to records merged from anywhere: cancels, aborts, new plans, results."""
        out: list[Action] = []
        for rec in changed:
            if isinstance(rec, CancelRecord | AbortRecord):
                pid = rec.plan_id
                run = self._runs.pop(pid, None)
                if run is not None:
                    self._runs[pid] = run
                    out.extend(self._sched_actions(pid, run.scheduler.cancel(now), now))
                    self._runs.pop(pid, None)
                images = [img for (p, img) in self._running if p == pid]
                out.extend(self._abort_local(pid, images))
            elif isinstance(rec, PlanRecord) and self.election.is_coordinator:
                out.extend(self._start_run(rec, now))
        if self.election.is_coordinator:
            out.extend(self._feed(changed, now))
        return out

    def _merge(self, batch: SyncBatch, now: float) -> tuple[list[Action], list[Record]]:
        changed = self.replica.apply(batch)
        if not changed:
            return [], []
        return [Persist(tuple(changed)), *self._on_changes(changed, now)], changed

    def _anti_entropy(self, now: float) -> list[Action]:
        peers = sorted(self.alive)
        if not peers:
            return []
        self._ae_round += 1
        coord = self.election.coordinator(now)
        if (
            coord is not None
            and coord != self.node_id
            and coord in self.alive
            and self._ae_round % 2
        ):
            peer = coord
        else:
            peer = self._rng.choice(peers)
        return [self._request(peer, "SYNC_DIGEST", m.SyncDigest(self.replica.digest()))]

    def _request(self, node: str, msg_type: str, payload: Any) -> Request:
        token = self._next_token
        self._next_token += 1
        # Bounded: the shell answers every request (reply or failure); drop the oldest if not.
        if len(self._requests) >= 10_000:
            self._requests.pop(next(iter(self._requests)))
        self._requests[token] = (node, msg_type, payload)
        return Request(node, msg_type, payload, token)

    def _take_outbox(self) -> list[Action]:
        out, self._outbox = self._outbox, []
        return out

    # --- message handlers ------------------------------------------------------------------------

    def _h_heartbeat(self, sender: str, p: m.Heartbeat, now: float) -> list[Action]:
        return self._election_step(lambda: self.election.on_heartbeat(sender, p, now), now)

    def _h_fenced(self, sender: str, p: m.Fenced, now: float) -> list[Action]:
        return self._election_step(lambda: self.election.on_fenced(sender, p, now), now)

    def _h_vote_request(self, sender: str, p: m.VoteRequest, now: float) -> list[Action]:
        return self._election_step(lambda: self.election.on_vote_request(sender, p, now), now)

    def _h_vote_reply(self, sender: str, p: m.VoteReply, now: float) -> list[Action]:
        return self._election_step(lambda: self.election.on_vote_reply(sender, p, now), now)

    def _h_plan_put(self, sender: str, p: m.PlanPut, now: float) -> list[Action]:
        out: list[Action] = []
        if sender != p.coordinator:
            return out
        acts, ok = self._admit(p.term, p.coordinator, now)
        out.extend(acts)
        if not ok:
            out.append(Reply("PLAN_ACK", m.PlanAck(p.plan.plan_id, self.node_id, False)))
            return out
        acts, _ = self._merge(SyncBatch(plans=(_plan_record(p.plan),)), now)
        out.extend(acts)
        stored = self.replica.plan(p.plan.plan_id) is not None
        out.append(Reply("PLAN_ACK", m.PlanAck(p.plan.plan_id, self.node_id, stored)))
        return out

    def _h_plan_ack(self, sender: str, p: m.PlanAck, now: float) -> list[Action]:
        if p.node != sender or not p.ok:
            return []
        self._has_plan.setdefault(p.plan_id, set()).add(sender)
        pend = self._pending.get(p.plan_id)
        if pend is None:
            return []
        pend.acks.add(sender)
        return self._check_commit(p.plan_id, now)

    def _h_plan_abort(self, sender: str, p: m.PlanAbort, now: float) -> list[Action]:
        # Not fenced: only the coordinator that accepted a plan aborts it, possibly after it
        # lost its role, and a tombstone never touches a committed plan.
        if sender != p.coordinator:
            return []
        acts, _ = self._merge(SyncBatch(aborted=(p.plan_id,)), now)
        return acts

    def _h_dispatch(self, sender: str, p: m.Dispatch, now: float) -> list[Action]:
        return self._on_dispatch(sender, p, now)

    def _h_dispatch_reply(self, sender: str, p: m.DispatchReply, now: float) -> list[Action]:
        if p.node != sender or not self.election.is_coordinator:
            return []
        run = self._runs.get(p.plan_id)
        if run is None:
            return []
        if p.accepted:
            return self._sched_actions(p.plan_id, run.scheduler.on_reachable(sender, now), now)
        if p.reason == "unknown plan":
            self._has_plan.get(p.plan_id, set()).discard(sender)
        # A refused dispatch is a transient failure of every item in flight there: retried
        # with backoff (a fenced refusal also reaches us as FENCED and ends our role).
        out: list[Action] = []
        for image in run.scheduler.in_flight(sender):
            attempt = run.scheduler.item(sender, image).attempt
            acts = run.scheduler.on_result(sender, image, attempt, False, p.reason, True, now)
            out.extend(self._sched_actions(p.plan_id, acts, now))
        return out

    def _h_abort(self, sender: str, p: m.AbortItems, now: float) -> list[Action]:
        acts, ok = self._admit(p.term, p.coordinator, now)
        if not ok or sender != p.coordinator:
            return acts
        return acts + self._abort_local(p.plan_id, p.images)

    def _h_results(self, sender: str, p: m.Results, now: float) -> list[Action]:
        try:
            batch = SyncBatch(results=tuple(_result_record(e) for e in p.entries))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad results dropped peer=%s error=%s", sender, e)
            return []
        acts, changed = self._merge(batch, now)
        if self.election.is_coordinator and changed:
            # Fan out only state changes; byte progress rides on anti-entropy.
            acts.extend(self._fan_out(changed, now))
        return acts

    def _h_sync_digest(self, sender: str, p: m.SyncDigest, now: float) -> list[Action]:
        batch = self.replica.missing_for(p.digests, self._rng)
        return [Reply("SYNC_ITEMS", _batch_wire(batch, self.replica.digest()))]

    def _h_sync_items(self, sender: str, p: m.SyncItems, now: float) -> list[Action]:
        try:
            batch = _batch(p)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("bad sync items dropped peer=%s error=%s", sender, e)
            return []
        out, _ = self._merge(batch, now)
        if p.digests is not None:
            back = self.replica.missing_for(p.digests, self._rng)
            if back:
                out.append(Send(sender, "SYNC_ITEMS", _batch_wire(back, None)))
        return out

    def _h_cancel(self, sender: str, p: m.Cancel, now: float) -> list[Action]:
        acts, _ = self._merge(
            SyncBatch(cancels=(CancelRecord(p.cancel.plan_id, p.cancel.cancelled_at),)), now
        )
        known = self.replica.cancelled(p.cancel.plan_id) is not None
        return [*acts, Reply("CANCEL_REPLY", m.CancelReply(p.cancel.plan_id, known))]

    def _h_ignore(self, sender: str, p: Any, now: float) -> list[Action]:
        return []

    def _admit(self, term: int, coordinator: str, now: float) -> tuple[list[Action], bool]:
        was = self.election.role
        acts, ok = self.election.admit(term, coordinator, now)
        return acts + self._role_changed(was, now), ok


_HANDLERS: dict[str, Callable[[NodeCore, str, Any, float], list[Action]]] = {
    "HEARTBEAT": NodeCore._h_heartbeat,
    "FENCED": NodeCore._h_fenced,
    "VOTE_REQUEST": NodeCore._h_vote_request,
    "VOTE_REPLY": NodeCore._h_vote_reply,
    "PLAN_PUT": NodeCore._h_plan_put,
    "PLAN_ACK": NodeCore._h_plan_ack,
    "PLAN_ABORT": NodeCore._h_plan_abort,
    "DISPATCH": NodeCore._h_dispatch,
    "DISPATCH_REPLY": NodeCore._h_dispatch_reply,
    "ABORT": NodeCore._h_abort,
    "RESULTS": NodeCore._h_results,
    "RESULTS_ACK": NodeCore._h_ignore,
    "SYNC_DIGEST": NodeCore._h_sync_digest,
    "SYNC_ITEMS": NodeCore._h_sync_items,
    "CANCEL": NodeCore._h_cancel,
    "CANCEL_REPLY": NodeCore._h_ignore,
}
