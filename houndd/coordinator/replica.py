"""Replicated plan state on one node: plans, cancels, aborts and the result lattice.

Every node keeps a full copy. Plans are immutable once accepted (only the `committed` flag can
turn on); a cancel is a separate record; an abort is a tombstone for a plan that was never
acknowledged. Per plan id the states form a lattice: unknown < tentative < aborted < committed,
so a tombstone wins over a tentative copy (anti-entropy cannot resurrect it) and a plan that some
coordinator acknowledged wins over a tombstone (G1). Results merge
with `houndd.coordinator.results.merge`, so copies from both sides of a partition join without
conflict.

Anti-entropy: `digest()` hashes everything known about each plan (prefixed with `c` or `t`:
does this node hold the plan committed or tentative); a peer answers with `missing_for(digest)`
and the receiver `apply`s it. For every plan whose hash differs the answer carries the plan
record only when the other side lacks it (or holds it tentative only), the cancel record, and
the plan's results, bounded per answer (MAX_SYNC_RESULTS, a random window of a bigger plan's
results, the rest in later rounds), so one answer stays far below `max_http_body_bytes` and a
2,000-item plan does not resend its whole record and every result each round. Each
`apply`/`put_*` returns the records that changed, which the node persists and, on the
coordinator, feeds to the scheduler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanItem,
    PlanRecord,
    Record,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult, merge

log = logging.getLogger("houndd.coordinator")

#: Bounds on what one anti-entropy answer carries; the rest follows in later rounds. With
#: about 250 bytes per result and 200 per plan item on the wire, an answer stays near 1 MB at
#: worst (one plan record of MAX_SYNC_PLAN_ITEMS items plus MAX_SYNC_RESULTS results), inside
#: the default 1 MiB HTTP body cap; a record bigger than that budget still goes alone.
MAX_SYNC_PLANS = 32
MAX_SYNC_PLAN_ITEMS = 2500
MAX_SYNC_RESULTS = 512
#: Caps memory a burst of submissions or tombstones can force on every node.
MAX_PLANS = 10_000
MAX_ABORTED = 10_000
#: Caps one plan's fan-out (nodes x images).
MAX_PLAN_ITEMS = 100_000

__all__ = [
    "AbortRecord",
    "CancelRecord",
    "PlanItem",
    "PlanRecord",
    "Record",
    "ReplicaState",
    "ResultRecord",
    "SyncBatch",
]


@dataclass(frozen=True, slots=True)
class SyncBatch:
    """What one node sends another in anti-entropy (plans first, so results find their plan)."""

    plans: tuple[PlanRecord, ...] = ()
    cancels: tuple[CancelRecord, ...] = ()
    aborted: tuple[str, ...] = ()
    results: tuple[ResultRecord, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.plans or self.cancels or self.aborted or self.results)


@dataclass
class _PlanState:
    record: PlanRecord
    content: str
    results: dict[tuple[str, str], ItemResult] = field(default_factory=dict)
    wanted: frozenset[tuple[str, str]] = frozenset()
    digest: str | None = None  # cache; None when stale


class ReplicaState:
    """Plans and results known to one node."""

    def __init__(self, *, max_plans: int = MAX_PLANS, max_aborted: int = MAX_ABORTED) -> None:
        self._plans: dict[str, _PlanState] = {}
        self._cancels: dict[str, CancelRecord] = {}
        self._aborted: dict[str, None] = {}  # insertion ordered, oldest evicted first
        self._max_plans = max_plans
        self._max_aborted = max_aborted

    # --- queries ---------------------------------------------------------------------------

    def plan(self, plan_id: str) -> PlanRecord | None:
        """The plan record, if known (and not aborted)."""
        st = self._plans.get(plan_id)
        return None if st is None else st.record

    def plans(self) -> list[PlanRecord]:
        """Every known plan, in acceptance order."""
        return sorted(
            (s.record for s in self._plans.values()), key=lambda r: (r.accepted_at, r.plan_id)
        )

    def cancelled(self, plan_id: str) -> CancelRecord | None:
        """The cancel record of the plan, if any."""
        return self._cancels.get(plan_id)

    def is_aborted(self, plan_id: str) -> bool:
        """True if the plan carries an abort tombstone."""
        return plan_id in self._aborted

    def result(self, plan_id: str, node_id: str, image: str) -> ItemResult:
        """The merged result (pending at attempt 0 if nothing is known)."""
        st = self._plans.get(plan_id)
        found = None if st is None else st.results.get((node_id, image))
        return found if found is not None else ItemResult()

    def results(self, plan_id: str) -> dict[tuple[str, str], ItemResult]:
        """(node, image) -> result for every item of the plan (pending when unknown)."""
        st = self._plans.get(plan_id)
        if st is None:
            return {}
        return {
            (i.node_id, i.image): st.results.get((i.node_id, i.image), ItemResult())
            for i in st.record.items
        }

    def remaining(self, plan_id: str) -> list[PlanItem]:
        """Items of the plan that are not final yet."""
        st = self._plans.get(plan_id)
        if st is None:
            return []
        out = []
        for item in st.record.items:
            res = st.results.get((item.node_id, item.image))
            if res is None or not res.is_final:
                out.append(item)
        return out

    def open_plans(self) -> list[PlanRecord]:
        """Plans (committed or tentative) that are neither cancelled nor finished."""
        return [
            r for r in self.plans() if r.plan_id not in self._cancels and self.remaining(r.plan_id)
        ]

    def digest(self) -> dict[str, str]:
        """plan_id -> hash over plan, cancel, abort and results, for anti-entropy."""
        out = {pid: "aborted" for pid in self._aborted}
        for pid, st in self._plans.items():
            if st.digest is None:
                st.digest = self._hash(pid, st)
            out[pid] = st.digest
        for pid in self._cancels.keys() - self._plans.keys() - self._aborted.keys():
            out[pid] = "cancel:" + repr(self._cancels[pid].cancelled_at)
        return out

    def missing_for(self, remote: Mapping[str, str], rng: random.Random | None = None) -> SyncBatch:
        """Everything the remote side (with digest `remote`) lacks, bounded per call.

        With `rng` the plans are visited in random order, so a plan the remote knows better than
        we do cannot keep crowding the others out of the bounded answer.
        """
        local = self.digest()
        differing = sorted(pid for pid, h in local.items() if remote.get(pid) != h)
        if rng is not None:
            rng.shuffle(differing)
        plans: list[PlanRecord] = []
        cancels: list[CancelRecord] = []
        aborted: list[str] = []
        results: list[ResultRecord] = []
        plan_items = 0
        for pid in differing[:MAX_SYNC_PLANS]:
            if pid in self._aborted:
                aborted.append(pid)
                continue
            if pid in self._cancels:
                cancels.append(self._cancels[pid])
            st = self._plans.get(pid)
            if st is None:
                continue
            theirs = remote.get(pid)
            if theirs is None or (st.record.committed and not theirs.startswith("c")):
                # They lack the record (or its commit): it goes first, so results find it.
                if plan_items + len(st.record.items) > MAX_SYNC_PLAN_ITEMS and plan_items:
                    continue
                plans.append(st.record)
                plan_items += len(st.record.items)
            room = MAX_SYNC_RESULTS - len(results)
            if room <= 0:
                continue
            mine = sorted(st.results.items())
            if len(mine) > room:
                # We cannot tell which results they lack: a random window each round
                # reaches every result within a few rounds.
                start = rng.randrange(len(mine)) if rng is not None else 0
                mine = (mine[start:] + mine[:start])[:room]
            results.extend(ResultRecord(pid, node, image, res) for (node, image), res in mine)
        return SyncBatch(tuple(plans), tuple(cancels), tuple(aborted), tuple(results))

    # --- updates ---------------------------------------------------------------------------

    def apply(self, batch: SyncBatch) -> list[Record]:
        """Merge a batch; returns the records that changed (to persist and act on)."""
        changed: list[Record] = []
        for pid in batch.aborted:
            changed.extend(self.put_abort(pid))
        for plan in batch.plans:
            changed.extend(self.put_plan(plan))
        for cancel in batch.cancels:
            changed.extend(self.put_cancel(cancel))
        for rr in batch.results:
            changed.extend(self.put_result(rr.plan_id, rr.node_id, rr.image, rr.result))
        return changed

    def put_plan(self, rec: PlanRecord) -> list[Record]:
        """Store a plan, or turn on `committed` of a known one. Returns what changed."""
        if rec.plan_id in self._aborted:
            if not rec.committed:
                return []
            # Acknowledged by some coordinator (a client may retry one plan id at two
            # coordinators during a partition): an acknowledged plan outranks an abort.
            del self._aborted[rec.plan_id]
        if len(rec.items) > MAX_PLAN_ITEMS:
            log.warning(
                "plan refused: too many items plan=%s items=%d", rec.plan_id, len(rec.items)
            )
            return []
        st = self._plans.get(rec.plan_id)
        if st is None:
            if len(self._plans) >= self._max_plans:
                log.warning("plan refused: store full plan=%s", rec.plan_id)
                return []
            self._plans[rec.plan_id] = _PlanState(
                rec, rec.content_hash(), wanted=frozenset((i.node_id, i.image) for i in rec.items)
            )
            return [rec]
        if rec.content_hash() != st.content:
            # Plan ids are unique per submission; a different body under a known id is a bug or
            # a hostile peer. Immutability wins: keep what we accepted first.
            log.warning("plan body conflict ignored plan=%s", rec.plan_id)
            return []
        if rec.committed and not st.record.committed:
            st.record = dataclasses.replace(st.record, committed=True)
            st.digest = None
            return [st.record]
        return []

    def put_cancel(self, rec: CancelRecord) -> list[Record]:
        """Record a cancel (the earliest time wins). Returns what changed."""
        old = self._cancels.get(rec.plan_id)
        if rec.plan_id in self._aborted or (
            old is not None and old.cancelled_at <= rec.cancelled_at
        ):
            return []
        if old is None and rec.plan_id not in self._plans:
            return []  # a cancel for a plan we do not know is kept by whoever knows it
        self._cancels[rec.plan_id] = rec
        self._touch(rec.plan_id)
        return [rec]

    def put_abort(self, plan_id: str) -> list[Record]:
        """Tombstone a tentative plan. A committed plan cannot be aborted (it was acknowledged)."""
        if plan_id in self._aborted:
            return []
        st = self._plans.get(plan_id)
        if st is not None and st.record.committed:
            log.warning("abort of a committed plan ignored plan=%s", plan_id)
            return []
        self._plans.pop(plan_id, None)
        self._cancels.pop(plan_id, None)
        self._aborted[plan_id] = None
        while len(self._aborted) > self._max_aborted:
            del self._aborted[next(iter(self._aborted))]
        return [AbortRecord(plan_id)]

    def put_result(
        self, plan_id: str, node_id: str, image: str, result: ItemResult
    ) -> list[Record]:
        """Merge one result; returns the new merged record if it changed."""
        st = self._plans.get(plan_id)
        if st is None or (node_id, image) not in st.wanted:
            return []  # results travel with their plan in anti-entropy; bounded by the plan
        key = (node_id, image)
        old = st.results.get(key)
        new = result if old is None else merge(old, result)
        if new == old:
            return []
        st.results[key] = new
        st.digest = None
        return [ResultRecord(plan_id, node_id, image, new)]

    def restore(self, records: Iterable[Record]) -> None:
        """Load persisted records (from `Store.load`) into an empty replica."""
        for rec in records:
            if isinstance(rec, PlanRecord):
                self.put_plan(rec)
            elif isinstance(rec, CancelRecord):
                self.put_cancel(rec)
            elif isinstance(rec, AbortRecord):
                self.put_abort(rec.plan_id)
            else:
                self.put_result(rec.plan_id, rec.node_id, rec.image, rec.result)

    # --- internals ---------------------------------------------------------------------------

    def _touch(self, plan_id: str) -> None:
        st = self._plans.get(plan_id)
        if st is not None:
            st.digest = None

    def _hash(self, pid: str, st: _PlanState) -> str:
        """`c` or `t` (committed or tentative here: tells a peer whether to send the record),
        then a hash over the plan, its commit, cancel and results."""
        h = hashlib.sha256()
        h.update(f"{pid}|{st.content}|{st.record.committed}|".encode())
        cancel = self._cancels.get(pid)
        h.update(repr(None if cancel is None else cancel.cancelled_at).encode())
        for key in sorted(st.results):
            h.update(repr((key, st.results[key].sort_key())).encode())
        return ("c" if st.record.committed else "t") + h.hexdigest()
