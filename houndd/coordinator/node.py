"""`NodeCore`: the coordinator-side logic of one node, sans IO; one entry for the shell, the
simulator and the tests.

Every node runs the same core over one shared `NodeState`: the election (`Election`),
replication (`Replication`: the replicated plan/result state and anti-entropy), the worker role
(`WorkerRole`: fenced, deduplicated dispatches for this node) and the coordinator role
(`CoordinatorRole`: submissions and one `Scheduler` per open plan). This facade routes events
to them and glues their reactions together. The async shell (`dispatch.py`) feeds it events and
carries out the actions it returns, in order.

Events (all return `list[Action]`):

- `tick(now)`: call at `next_wakeup()` (or more often): heartbeats, elections, scheduler
  timers, anti-entropy rounds, submission timeouts.
- `membership(alive, names, now)`: the failure detector's view; `alive` = other node ids.
- `receive(sender, payload, now)`: a peer message (datagram or request), its payload one of
  `houndd.coordinator.messages`; handlers are keyed by its `MsgType`. The actions may contain
  one `Reply`: for a request it is the response; for a datagram the shell sends it back to
  `sender` as a datagram.
- `response(token, sender, payload, now)`: the reply to our `Request(token=...)`;
  `request_failed(token, now)` when it timed out or could not be delivered.
- `submit(plan_id, document, items, now, client_ref)`: coordinator only (see
  `coordinator_role.py` for G1). On a non-coordinator the shell forwards the submission.
- `executor_report(ExecutorReport, now)`: progress/result from the local puller.
- `cancel(plan_id, now)`: valid on any node; spreads a cancel record.

Actions (`houndd.coordinator.messages`): `Send(node_id, payload)` datagram;
`Request(node_id, payload, token)`; `Reply(payload)`; `Persist(records)`: apply with
`Store.apply` durably BEFORE carrying out any later action of the same list (votes, acks and
dispatches depend on it); `Execute(plan_id, items)` and `AbortLocal(plan_id, images)` for the
local executor; `AckClient(client_ref, ok, reason)`.

`now` is what every timer compares: the shell passes its monotonic clock. Records the core
creates (acceptance, cancel and result times) are stamped with the injected `wall` clock, as
they leave the process; without one (simulation, tests) `now` stamps them too.

Results flow worker -> coordinator -> the plan's holders, and anti-entropy (digest exchange
with the coordinator, when there is something to settle) repairs whatever was lost.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from houndd.config import Config
from houndd.coordinator.coordinator_role import CoordinatorRole
from houndd.coordinator.election import Election, Role
from houndd.coordinator.messages import (
    AbortItems,
    Action,
    Cancel,
    Dispatch,
    DispatchReply,
    Fenced,
    Heartbeat,
    PlanAbort,
    PlanAck,
    PlanGet,
    PlanGetReply,
    PlanPut,
    Results,
    Send,
    SyncDigest,
    SyncItems,
    VoteReply,
    VoteRequest,
)
from houndd.coordinator.node_state import NodeState
from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanDocument,
    PlanItem,
    PlanRecord,
    Record,
    ResultRecord,
)
from houndd.coordinator.replica import ReplicaState, SyncBatch
from houndd.coordinator.replication import Replication
from houndd.coordinator.store import PersistedState
from houndd.coordinator.worker_role import ExecutorReport, WorkerRole
from houndd.wire.payloads import msg_type_of
from houndd.wire.types import MsgType

__all__ = ["ExecutorReport", "NodeCore"]

log = logging.getLogger("houndd.coordinator")

_Handler = Callable[["NodeCore", str, Any, float], list[Action]]


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
        plan_ack_timeout_s: float | None = None,
        scheduler_options: Mapping[str, float] | None = None,
        wall: Callable[[], float] | None = None,
    ) -> None:
        saved = persisted or PersistedState()
        replica = ReplicaState()
        replica.restore(saved.records)
        election = Election(node_id, config, rng, now, saved.election)
        self.state = NodeState(node_id, config, rng, election, replica, wall=wall)
        self.worker = WorkerRole(self.state, admit=self._admit, report=self._report)
        self.replication = Replication(
            self.state,
            now,
            admit=self._admit,
            on_changes=self._on_changes,
            on_holder=self._on_holder,
        )
        self.coordinating = CoordinatorRole(
            self.state,
            self.worker,
            on_changes=self._on_changes,
            plan_ack_timeout_s=plan_ack_timeout_s,
            scheduler_options=dict(scheduler_options or {}),
        )
        self._outbox: list[Action] = self.worker.interrupted_on_restart(now)

    # --- queries -------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.state.node_id

    @property
    def election(self) -> Election:
        """The election state machine."""
        return self.state.election

    @property
    def replica(self) -> ReplicaState:
        """The replicated plans and results."""
        return self.state.replica

    @property
    def role(self) -> Role:
        """follower, candidate or coordinator."""
        return self.state.election.role

    @property
    def term(self) -> int:
        """The current election term."""
        return self.state.election.term

    def coordinator(self, now: float) -> str | None:
        """The coordinator this node hears (itself included), or None during an election."""
        return self.state.coordinator(now)

    def plans_running(self) -> list[str]:
        """Coordinator: ids of the plans it is scheduling now."""
        return self.coordinating.plans_running()

    def next_wakeup(self) -> float:
        """The earliest time `tick` has something to do."""
        times = [self.replication.next_wakeup(), *self.coordinating.wakeups()]
        e = self.state.election.next_wakeup()
        if e is not None:
            times.append(e)
        return min(times)

    # --- events --------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Time passed."""
        out = self._take_outbox()
        out.extend(self._election_step(lambda: self.state.election.tick(now), now))
        out.extend(self.coordinating.tick(now))
        if now >= self.replication.next_wakeup():
            out.extend(self.replication.anti_entropy(now))
            out.extend(self.coordinating.start_open_runs(now))
        out.extend(self.coordinating.flush(now))
        return out

    def membership(
        self, alive: Iterable[str], names: Mapping[str, str], now: float
    ) -> list[Action]:
        """The failure detector's view of the other members changed."""
        st = self.state
        new = set(alive) - {st.node_id}
        down, up = st.alive - new, new - st.alive
        st.alive = new
        st.names = dict(names)
        out = self._take_outbox()
        out.extend(self._election_step(lambda: st.election.membership(new, now), now))
        out.extend(self.coordinating.members_changed(down, up, now))
        return out

    def receive(self, sender: str, payload: object, now: float) -> list[Action]:
        """A peer message; payloads without a handler here are dropped."""
        try:
            handler = _HANDLERS.get(msg_type_of(payload))
        except TypeError:
            handler = None
        if handler is None:
            log.debug("message dropped peer=%s type=%s", sender, type(payload).__name__)
            return []
        out = self._take_outbox()
        out.extend(handler(self, sender, payload, now))
        return out

    def response(self, token: int, sender: str, payload: object, now: float) -> list[Action]:
        """The reply to one of our requests."""
        self.state.answered(token)
        return self.receive(sender, payload, now)

    def request_failed(self, token: int, now: float) -> list[Action]:
        """One of our requests got no reply."""
        req = self.state.answered(token)
        if req is None:
            return []
        node, payload = req
        if isinstance(payload, Dispatch):
            return self.coordinating.dispatch_failed(node, payload, now)
        if isinstance(payload, PlanPut):
            return self.coordinating.replica_failed(node, payload.plan.plan_id, now)
        if isinstance(payload, Results):
            self.replication.unsettled({r.plan_id for r in payload.entries})
        return []

    def submit(
        self,
        plan_id: str,
        document: PlanDocument,
        items: Iterable[PlanItem],
        now: float,
        client_ref: Any,
    ) -> list[Action]:
        """A client's plan (coordinator only)."""
        out = self._take_outbox()
        out.extend(self.coordinating.submit(plan_id, document, items, now, client_ref))
        return out

    def executor_report(self, report: ExecutorReport, now: float) -> list[Action]:
        """Progress or outcome of a local pull."""
        out = self._take_outbox()
        out.extend(self.worker.executor_report(report, now))
        return out

    def cancel(self, plan_id: str, now: float) -> list[Action]:
        """Cancel a plan (any node). Returns [] if the plan is unknown."""
        out = self._take_outbox()
        out.extend(self.replication.cancel(plan_id, now))
        return out

    # --- glue between the roles ------------------------------------------------------------------

    def _admit(self, term: int, coordinator: str, now: float) -> tuple[list[Action], bool]:
        was = self.state.election.role
        acts, ok = self.state.election.admit(term, coordinator, now)
        return acts + self._role_changed(was, now), ok

    def _election_step(self, step: Callable[[], list[Action]], now: float) -> list[Action]:
        was = self.state.election.role
        out = step()
        out.extend(self._role_changed(was, now))
        return out

    def _role_changed(self, was: Role, now: float) -> list[Action]:
        out = self.coordinating.role_changed(was, now)
        if was is not Role.COORDINATOR and self.state.is_coordinator:
            out.extend(self.replication.takeover(now))
        return out

    def _on_changes(self, changed: list[Record], now: float) -> list[Action]:
        """React to records merged from anywhere: cancels, aborts, new plans, results."""
        out: list[Action] = []
        coordinating = self.state.is_coordinator
        for rec in changed:
            if isinstance(rec, CancelRecord | AbortRecord):
                out.extend(self.coordinating.stop_run(rec.plan_id, now))
                out.extend(self.worker.abort_plan(rec.plan_id))
            elif isinstance(rec, PlanRecord) and coordinating:
                out.extend(self.coordinating.start_run(rec, now))
        if coordinating:
            out.extend(self.coordinating.feed(changed, now))
        return out

    def _report(self, changed: list[Record], now: float) -> list[Action]:
        """Worker results go to the coordinator (and, from it, to everyone)."""
        if not changed:
            return []
        st = self.state
        if st.is_coordinator:
            self.coordinating.fan_out(changed, now)
            return self.coordinating.feed(changed, now)
        coord = st.coordinator(now)
        results = tuple(r for r in changed if isinstance(r, ResultRecord))
        if coord is None or coord == st.node_id:
            # No coordinator to tell: the next anti-entropy round carries it (a target that
            # holds only its part of the plan is in those rounds only while unsettled).
            self.replication.unsettled({r.plan_id for r in results})
            return []
        msg = Results(results)
        if any(r.result.is_final for r in results):
            # An outcome must not wait for the next anti-entropy round because one datagram
            # was dropped: it travels as a request (HTTP); progress stays best-effort.
            return [st.request(coord, msg)]
        return [Send(coord, msg)]

    def _on_holder(self, plan_id: str, node: str) -> None:
        self.coordinating.add_holder(plan_id, node)

    def _take_outbox(self) -> list[Action]:
        out, self._outbox = self._outbox, []
        return out

    # --- message handlers ------------------------------------------------------------------------

    def _h_heartbeat(self, sender: str, p: Heartbeat, now: float) -> list[Action]:
        return self._election_step(lambda: self.state.election.on_heartbeat(sender, p, now), now)

    def _h_fenced(self, sender: str, p: Fenced, now: float) -> list[Action]:
        return self._election_step(lambda: self.state.election.on_fenced(sender, p, now), now)

    def _h_vote_request(self, sender: str, p: VoteRequest, now: float) -> list[Action]:
        return self._election_step(lambda: self.state.election.on_vote_request(sender, p, now), now)

    def _h_vote_reply(self, sender: str, p: VoteReply, now: float) -> list[Action]:
        return self._election_step(lambda: self.state.election.on_vote_reply(sender, p, now), now)

    def _h_results(self, sender: str, p: Results, now: float) -> list[Action]:
        acts, changed = self.replication.merge(SyncBatch(results=p.entries), now)
        if self.state.is_coordinator and changed:
            # Fan out only state changes; byte progress rides on anti-entropy.
            self.coordinating.fan_out(changed, now)
        return acts

    def _h_plan_put(self, sender: str, p: PlanPut, now: float) -> list[Action]:
        return self.replication.on_plan_put(sender, p, now)

    def _h_plan_ack(self, sender: str, p: PlanAck, now: float) -> list[Action]:
        return self.coordinating.on_plan_ack(sender, p, now)

    def _h_plan_abort(self, sender: str, p: PlanAbort, now: float) -> list[Action]:
        return self.replication.on_plan_abort(sender, p, now)

    def _h_dispatch(self, sender: str, p: Dispatch, now: float) -> list[Action]:
        return self.worker.on_dispatch(sender, p, now)

    def _h_dispatch_reply(self, sender: str, p: DispatchReply, now: float) -> list[Action]:
        out = self._h_results(sender, Results(p.results), now) if p.results else []
        return out + self.coordinating.on_dispatch_reply(sender, p, now)

    def _h_abort(self, sender: str, p: AbortItems, now: float) -> list[Action]:
        return self.worker.on_abort(sender, p, now)

    def _h_sync_digest(self, sender: str, p: SyncDigest, now: float) -> list[Action]:
        return self.replication.on_sync_digest(sender, p, now)

    def _h_sync_items(self, sender: str, p: SyncItems, now: float) -> list[Action]:
        return self.replication.on_sync_items(sender, p, now)

    def _h_cancel(self, sender: str, p: Cancel, now: float) -> list[Action]:
        return self.replication.on_cancel(sender, p, now)

    def _h_plan_get(self, sender: str, p: PlanGet, now: float) -> list[Action]:
        return self.replication.on_plan_get(sender, p, now)

    def _h_plan_get_reply(self, sender: str, p: PlanGetReply, now: float) -> list[Action]:
        return self.replication.on_plan_get_reply(sender, p, now)

    def _h_ignore(self, sender: str, p: object, now: float) -> list[Action]:
        return []


_HANDLERS: dict[MsgType, _Handler] = {
    MsgType.HEARTBEAT: NodeCore._h_heartbeat,
    MsgType.FENCED: NodeCore._h_fenced,
    MsgType.VOTE_REQUEST: NodeCore._h_vote_request,
    MsgType.VOTE_REPLY: NodeCore._h_vote_reply,
    MsgType.PLAN_PUT: NodeCore._h_plan_put,
    MsgType.PLAN_ACK: NodeCore._h_plan_ack,
    MsgType.PLAN_ABORT: NodeCore._h_plan_abort,
    MsgType.DISPATCH: NodeCore._h_dispatch,
    MsgType.DISPATCH_REPLY: NodeCore._h_dispatch_reply,
    MsgType.ABORT: NodeCore._h_abort,
    MsgType.RESULTS: NodeCore._h_results,
    MsgType.SYNC_DIGEST: NodeCore._h_sync_digest,
    MsgType.SYNC_ITEMS: NodeCore._h_sync_items,
    MsgType.CANCEL: NodeCore._h_cancel,
    MsgType.CANCEL_REPLY: NodeCore._h_ignore,  # the receipt of a CANCEL datagram
    MsgType.PLAN_GET: NodeCore._h_plan_get,
    MsgType.PLAN_GET_REPLY: NodeCore._h_plan_get_reply,
}
HANDLED_TYPES = frozenset(_HANDLERS)
"""Message types the core handles (the shell registers exactly these on the bus)."""
