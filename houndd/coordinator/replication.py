"""Replication in a node's core: merging plan state from anywhere, and anti-entropy (sans IO).

Records arrive with PLAN_PUT (fenced: only from the coordinator), PLAN_ABORT, CANCEL, RESULTS,
SYNC_ITEMS and PLAN_GET_REPLY; whatever changes the replica is persisted (`Persist`, durable
before any later action, progress excepted) and handed to `OnChanges`, which lets the roles
react (a coordinator starts a new plan, a worker stops a cancelled one).

Anti-entropy goes to the coordinator, the one node that holds every plan, and only when there
is something to settle, so a cluster at rest exchanges nothing but a sweep now and then:

- every `anti_entropy_interval_s` (jittered) a node that holds an open plan, or has a result
  the coordinator may have missed (its report could not be delivered), sends the digest of
  those plans; the coordinator answers with what the node lacks and its own values, and the
  node pushes back what the coordinator lacks (records too: the coordinator holds them all);
- every `anti_entropy_idle_s` (jittered) every node sends its whole digest (a sweep);
- a node that becomes coordinator asks every member at once (`takeover`, `want_plans`): the
  replicas send the records of plans it lacks, open ones first, so it resumes them at once.

The coordinator itself starts no rounds: everyone comes to it. PLAN_GET serves a node that
needs a plan it does not hold (to answer a reader), page by page; that node holds it from
then on.
"""

from __future__ import annotations

from collections.abc import Callable

from houndd.coordinator.messages import (
    Action,
    Cancel,
    CancelReply,
    Persist,
    PlanAbort,
    PlanAck,
    PlanGet,
    PlanGetReply,
    PlanPut,
    Reply,
    Send,
    SyncDigest,
    SyncItems,
)
from houndd.coordinator.node_state import NodeState
from houndd.coordinator.records import CancelRecord, Record
from houndd.coordinator.replica import SyncBatch
from houndd.coordinator.worker_role import Admit

OnChanges = Callable[[list[Record], float], list[Action]]
"""React to records that changed the replica (after they are persisted)."""
OnHolder = Callable[[str, str], None]
"""(plan id, node): the node holds the whole plan (it answered a digest, or fetched it)."""

PLAN_GET_RESULTS = 1000
"""Results per PLAN_GET_REPLY page (about 250 KB: with a 10,000-node record, inside the 1 MiB
body cap)."""


def sync_items(batch: SyncBatch, digests: dict[str, str] | None) -> SyncItems:
    """The SYNC_ITEMS message carrying `batch` (and our digest when we want one back)."""
    return SyncItems(batch.plans, batch.cancels, batch.aborted, batch.results, digests)


class Replication:
    """Merging, anti-entropy and the replication messages of one node."""

    def __init__(
        self,
        state: NodeState,
        now: float,
        *,
        admit: Admit,
        on_changes: OnChanges,
        on_holder: OnHolder | None = None,
    ) -> None:
        self._state = state
        self._admit = admit
        self._on_changes = on_changes
        self._on_holder = on_holder or (lambda plan_id, node: None)
        cfg = state.config
        self._ae_at = now + state.rng.uniform(0, cfg.anti_entropy_interval_s)
        self._sweep_at = now + state.rng.uniform(0.5, 1.0) * cfg.anti_entropy_idle_s
        self._unsettled: set[str] = set()

    def next_wakeup(self) -> float:
        """When the next anti-entropy round is due."""
        return self._ae_at

    def unsettled(self, plan_ids: set[str]) -> None:
        """The coordinator may lack what we know of these plans (a report was not delivered):
        settle them in the next round."""
        self._unsettled |= plan_ids

    def merge(self, batch: SyncBatch, now: float) -> tuple[list[Action], list[Record]]:
        """Merge records into the replica: (actions, the records that changed)."""
        changed = self._state.replica.apply(batch)
        if not changed:
            return [], []
        return [Persist(tuple(changed)), *self._on_changes(changed, now)], changed

    def anti_entropy(self, now: float) -> list[Action]:
        """Start an anti-entropy round if one is due and there is something to settle."""
        st = self._state
        cfg = st.config
        if now < self._ae_at:
            return []
        self._ae_at = now + cfg.anti_entropy_interval_s * st.rng.uniform(0.8, 1.2)
        if st.is_coordinator or not st.alive:
            return []
        replica = st.replica
        if now >= self._sweep_at:
            self._sweep_at = now + cfg.anti_entropy_idle_s * st.rng.uniform(0.8, 1.2)
            digests = replica.digest()
        else:
            keys = {r.plan_id for r in replica.open_plans()} | self._unsettled
            digests = replica.digest(sorted(keys))
        self._unsettled &= set(digests)
        if not digests:
            return []
        coord = st.coordinator(now)
        peer = coord if coord is not None and coord in st.alive else st.rng.choice(sorted(st.alive))
        return [st.request(peer, SyncDigest(digests))]

    def takeover(self, now: float) -> list[Action]:
        """This node just became coordinator: ask every member for the plans it lacks."""
        st = self._state
        replica = st.replica
        msg = SyncDigest(replica.digest(r.plan_id for r in replica.open_plans()), want_plans=True)
        return [st.request(node, msg) for node in sorted(st.alive)]

    def cancel(self, plan_id: str, now: float) -> list[Action]:
        """Cancel a plan (any node): record it here and tell every member."""
        st = self._state
        record = CancelRecord(plan_id, st.stamp(now))
        changed = st.replica.put_cancel(record)
        if not changed:
            return []
        out: list[Action] = [Persist(tuple(changed))]
        msg = Cancel(record)
        out.extend(Send(n, msg) for n in sorted(st.alive))
        out.extend(self._on_changes(changed, now))
        return out

    # --- messages ----------------------------------------------------------------------------

    def on_plan_put(self, sender: str, p: PlanPut, now: float) -> list[Action]:
        """Coordinator -> us: store the plan (fenced), then acknowledge once it is durable."""
        st = self._state
        out: list[Action] = []
        if sender != p.coordinator:
            return out
        acts, ok = self._admit(p.term, p.coordinator, now)
        out.extend(acts)
        if not ok:
            out.append(Reply(PlanAck(p.plan.plan_id, st.node_id, False)))
            return out
        acts, _ = self.merge(SyncBatch(plans=(p.plan,)), now)
        out.extend(acts)
        stored = st.replica.plan(p.plan.plan_id) is not None
        out.append(Reply(PlanAck(p.plan.plan_id, st.node_id, stored)))
        return out

    def on_plan_abort(self, sender: str, p: PlanAbort, now: float) -> list[Action]:
        """Not fenced: only the coordinator that accepted a plan aborts it, possibly after it
        lost its role, and a tombstone never touches a committed plan."""
        if sender != p.coordinator:
            return []
        acts, _ = self.merge(SyncBatch(aborted=(p.plan_id,)), now)
        return acts

    def on_sync_digest(self, sender: str, p: SyncDigest, now: float) -> list[Action]:
        """A peer's digest: answer with what it lacks, and our values to get ours back."""
        st = self._state
        replica = st.replica
        keys = set(p.digests)
        if p.want_plans:
            keys |= {r.plan_id for r in replica.open_plans()}
        for pid, value in p.digests.items():
            if value[:1] in ("c", "t"):
                self._on_holder(pid, sender)
        batch = replica.missing_for(
            p.digests, keys, remote_node=sender, rng=st.rng, send_records=p.want_plans
        )
        return [Reply(sync_items(batch, replica.reply_digest(p.digests, sender)))]

    def on_sync_items(self, sender: str, p: SyncItems, now: float) -> list[Action]:
        """What a peer says we lack; with its values, push back what it lacks (records too
        when it coordinates: the coordinator holds every plan)."""
        st = self._state
        batch = SyncBatch(p.plans, p.cancels, p.aborted, p.results)
        out, _ = self.merge(batch, now)
        if p.digests is None:
            return out
        replica = st.replica
        to_coordinator = sender == st.coordinator(now) and not st.is_coordinator
        back = replica.missing_for(
            p.digests, p.digests, remote_node=sender, rng=st.rng, send_records=to_coordinator
        )
        if back:
            out.append(Send(sender, sync_items(back, None)))
        if to_coordinator:
            pushed = {r.plan_id for r in back.plans} | {r.plan_id for r in back.results}
            self._unsettled -= {
                pid for pid, theirs in p.digests.items() if pid not in pushed and theirs
            }
        return out

    def on_cancel(self, sender: str, p: Cancel, now: float) -> list[Action]:
        """A member cancelled a plan."""
        acts, _ = self.merge(SyncBatch(cancels=(p.cancel,)), now)
        known = self._state.replica.cancelled(p.cancel.plan_id) is not None
        return [*acts, Reply(CancelReply(p.cancel.plan_id, known))]

    def on_plan_get(self, sender: str, p: PlanGet, now: float) -> list[Action]:
        """A node asks for a plan we hold (to serve a reader): one page of it."""
        replica = self._state.replica
        rec = replica.plan(p.plan_id)
        if rec is None:
            return [Reply(PlanGetReply(None, None, (), False))]
        self._on_holder(p.plan_id, sender)
        results = replica.result_page(p.plan_id, p.offset, PLAN_GET_RESULTS)
        more = p.offset + PLAN_GET_RESULTS < len(rec.items)
        reply = PlanGetReply(
            rec if p.offset == 0 else None, replica.cancelled(p.plan_id), tuple(results), more
        )
        return [Reply(reply)]

    def on_plan_get_reply(self, sender: str, p: PlanGetReply, now: float) -> list[Action]:
        """A page of a plan we asked for."""
        batch = SyncBatch(
            plans=(p.plan,) if p.plan is not None else (),
            cancels=(p.cancel,) if p.cancel is not None else (),
            results=p.results,
        )
        acts, _ = self.merge(batch, now)
        return acts
