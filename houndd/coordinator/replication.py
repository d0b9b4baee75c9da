"""Replication in a node's core: merging plan state from anywhere, and anti-entropy (sans IO).

Every node keeps a full replica (`ReplicaState`). Records arrive with PLAN_PUT (fenced: only
from the coordinator), PLAN_ABORT, CANCEL, RESULTS and SYNC_ITEMS; whatever changes the
replica is persisted (`Persist`, durable before any later action) and handed to `OnChanges`,
which lets the roles react (a coordinator starts a new plan, a worker stops a cancelled one).
Anti-entropy: every `anti_entropy_interval_s` (jittered) a node sends its digest to a random
peer, every other round to the coordinator, and both sides push what the other lacks.
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


def sync_items(batch: SyncBatch, digests: dict[str, str] | None) -> SyncItems:
    """The SYNC_ITEMS message carrying `batch` (and our digest when we want one back)."""
    return SyncItems(batch.plans, batch.cancels, batch.aborted, batch.results, digests)


class Replication:
    """Merging, anti-entropy and the replication messages of one node."""

    def __init__(
        self, state: NodeState, now: float, *, admit: Admit, on_changes: OnChanges
    ) -> None:
        self._state = state
        self._admit = admit
        self._on_changes = on_changes
        self._ae_at = now + state.rng.uniform(0, state.config.anti_entropy_interval_s)
        self._ae_round = 0

    def next_wakeup(self) -> float:
        """When the next anti-entropy round is due."""
        return self._ae_at

    def merge(self, batch: SyncBatch, now: float) -> tuple[list[Action], list[Record]]:
        """Merge records into the replica: (actions, the records that changed)."""
        changed = self._state.replica.apply(batch)
        if not changed:
            return [], []
        return [Persist(tuple(changed)), *self._on_changes(changed, now)], changed

    def anti_entropy(self, now: float) -> list[Action]:
        """Start an anti-entropy round if one is due."""
        st = self._state
        if now < self._ae_at:
            return []
        self._ae_at = now + st.config.anti_entropy_interval_s * st.rng.uniform(0.8, 1.2)
        peers = sorted(st.alive)
        if not peers:
            return []
        self._ae_round += 1
        coord = st.coordinator(now)
        if coord is not None and coord != st.node_id and coord in st.alive and self._ae_round % 2:
            peer = coord
        else:
            peer = st.rng.choice(peers)
        return [st.request(peer, SyncDigest(st.replica.digest()))]

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
        """A peer's digest: answer with what it lacks, and our digest to get ours back."""
        replica = self._state.replica
        batch = replica.missing_for(p.digests, self._state.rng)
        return [Reply(sync_items(batch, replica.digest()))]

    def on_sync_items(self, sender: str, p: SyncItems, now: float) -> list[Action]:
        """What a peer says we lack; push back what it lacks when it sent its digest."""
        batch = SyncBatch(p.plans, p.cancels, p.aborted, p.results)
        out, _ = self.merge(batch, now)
        if p.digests is not None:
            back = self._state.replica.missing_for(p.digests, self._state.rng)
            if back:
                out.append(Send(sender, sync_items(back, None)))
        return out

    def on_cancel(self, sender: str, p: Cancel, now: float) -> list[Action]:
        """A member cancelled a plan."""
        acts, _ = self.merge(SyncBatch(cancels=(p.cancel,)), now)
        known = self._state.replica.cancelled(p.cancel.plan_id) is not None
        return [*acts, Reply(CancelReply(p.cancel.plan_id, known))]
