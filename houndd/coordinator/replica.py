"""Replicated plan state on one node: plans, parts, cancels, aborts and the result lattice.

A node holds a plan in one of two ways. A *holder* (the plan's coordinator, its replicas, a
node that fetched it to serve a reader) keeps the whole `PlanRecord` and every result it
hears of. A *target* that holds none keeps a `PlanPart`: the work of its own items, and their
results. Plans are immutable once accepted (only the `committed` flag can turn on); a cancel is
a separate record; an abort is a tombstone for a plan that was never acknowledged. Per plan id
the states form a lattice: unknown < part < tentative < aborted < committed, so a tombstone
wins over a tentative copy (anti-entropy cannot resurrect it) and a plan that some coordinator
acknowledged wins over a tombstone (G1). Results merge with
`houndd.coordinator.results.merge`, so copies from both sides of a partition join without
conflict.

Anti-entropy compares one short value per plan (`digest()`): `c` or `t` (a holder, committed or
tentative) then a hash over the plan, its cancel and all results; `p` (a target) then a hash
over the cancel and the target's own results. A holder answering a target compares the target's
value with its *projection* for that node (the same hash over that node's results), so a
target and a holder agree without either sending anything. The hashes are kept up to date
incrementally (an XOR of per-result hashes), so neither a digest nor a projection rehashes a
plan's results. `missing_for` answers with what the other side lacks, bounded per answer
(MAX_SYNC_PLANS plans, MAX_SYNC_PLAN_ITEMS plan items, MAX_SYNC_RESULTS results; a bigger
plan's results go as a random window, the rest in later rounds), so one answer stays far below
`max_http_body_bytes`. A record goes only where it is wanted: to a node that holds the plan
tentative only or tombstoned it (to commit it), or when the asker coordinates (`send_records`).
Each `apply`/`put_*` returns the records that changed, which the node persists and, on the
coordinator, feeds to the scheduler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanItem,
    PlanPart,
    PlanRecord,
    Record,
    ResultRecord,
)
from houndd.coordinator.results import UNKNOWN_RESULT, ItemResult, merge

log = logging.getLogger("houndd.coordinator")

#: Bounds on what one anti-entropy answer carries; the rest follows in later rounds. With
#: about 250 bytes per result and 20 per plan item on the wire, an answer stays well inside
#: the default 1 MiB HTTP body cap; a record bigger than that budget still goes alone.
MAX_SYNC_PLANS = 32
MAX_SYNC_PLAN_ITEMS = 20_000
MAX_SYNC_RESULTS = 512
#: Caps memory a burst of submissions or tombstones can force on every node.
MAX_PLANS = 10_000
MAX_ABORTED = 10_000
#: Caps one plan's fan-out (nodes x images), and the results a target keeps of one part.
MAX_PLAN_ITEMS = 100_000

ABORTED = "aborted"
"""The digest value of a tombstoned plan."""
LACKS = ""
"""A reply digest's value for a plan the replying node does not know."""

__all__ = [
    "ABORTED",
    "LACKS",
    "AbortRecord",
    "CancelRecord",
    "PlanItem",
    "PlanPart",
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


def _result_hash(node: str, image: str, result: ItemResult) -> int:
    text = repr((node, image, result.sort_key()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class _PlanState:
    record: PlanRecord | None
    part: PlanPart | None = None
    content: str = ""  # the record's content hash
    results: dict[tuple[str, str], ItemResult] = field(default_factory=dict)
    wanted: frozenset[tuple[str, str]] = frozenset()  # the record's items
    open_items: int = 0  # record items whose result is not final
    hashes: dict[tuple[str, str], int] = field(default_factory=dict)  # per result
    acc: int = 0  # XOR of every result's hash
    node_acc: dict[str, int] = field(default_factory=dict)  # XOR per node
    by_node: dict[str, set[str]] = field(default_factory=dict)  # node -> images with a result
    digest: str | None = None  # cache; None when stale

    def accepts(self, node_id: str, image: str) -> bool:
        if self.record is not None:
            return (node_id, image) in self.wanted
        return self.part is not None and node_id == self.part.node_id


class ReplicaState:
    """Plans, parts and results known to one node."""

    def __init__(self, *, max_plans: int = MAX_PLANS, max_aborted: int = MAX_ABORTED) -> None:
        self._plans: dict[str, _PlanState] = {}
        self._cancels: dict[str, CancelRecord] = {}
        self._aborted: dict[str, None] = {}  # insertion ordered, oldest evicted first
        self._max_plans = max_plans
        self._max_aborted = max_aborted

    # --- queries ---------------------------------------------------------------------------

    def plan(self, plan_id: str) -> PlanRecord | None:
        """The plan record, if this node holds the plan (and it is not aborted)."""
        st = self._plans.get(plan_id)
        return None if st is None else st.record

    def part(self, plan_id: str) -> PlanPart | None:
        """This node's part of a plan it does not hold (it is one of its targets)."""
        st = self._plans.get(plan_id)
        return None if st is None or st.record is not None else st.part

    def knows(self, plan_id: str) -> bool:
        """True if this node holds the plan or a part of it."""
        return plan_id in self._plans

    def plans(self) -> list[PlanRecord]:
        """Every plan held here, in acceptance order."""
        return sorted(
            (s.record for s in self._plans.values() if s.record is not None),
            key=lambda r: (r.accepted_at, r.plan_id),
        )

    def parts(self) -> list[PlanPart]:
        """Every part held here (plans this node is a target of but does not hold)."""
        return [s.part for s in self._plans.values() if s.record is None and s.part is not None]

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
        return found if found is not None else UNKNOWN_RESULT

    def results(self, plan_id: str) -> dict[tuple[str, str], ItemResult]:
        """(node, image) -> result for every item of a held plan (pending when unknown); for
        a part, the results known of its own items."""
        st = self._plans.get(plan_id)
        if st is None:
            return {}
        if st.record is None:
            return dict(st.results)
        return {
            (i.node_id, i.image): st.results.get((i.node_id, i.image), UNKNOWN_RESULT)
            for i in st.record.items
        }

    def node_results(self, plan_id: str, node_id: str) -> list[ResultRecord]:
        """The results known of one node's items of a plan."""
        st = self._plans.get(plan_id)
        if st is None:
            return []
        return [
            ResultRecord(plan_id, node_id, image, st.results[(node_id, image)])
            for image in sorted(st.by_node.get(node_id, ()))
        ]

    def result_page(self, plan_id: str, offset: int, count: int) -> list[ResultRecord]:
        """The known results of items `offset` to `offset + count` of a held plan."""
        st = self._plans.get(plan_id)
        if st is None or st.record is None:
            return []
        page = []
        for item in st.record.items[offset : offset + count]:
            res = st.results.get((item.node_id, item.image))
            if res is not None:
                page.append(ResultRecord(plan_id, item.node_id, item.image, res))
        return page

    def is_open(self, plan_id: str) -> bool:
        """A held plan that is neither cancelled nor finished."""
        st = self._plans.get(plan_id)
        return (
            st is not None
            and st.record is not None
            and st.open_items > 0
            and plan_id not in self._cancels
        )

    def remaining(self, plan_id: str) -> list[PlanItem]:
        """Items of a held plan that are not final yet."""
        st = self._plans.get(plan_id)
        if st is None or st.record is None or st.open_items == 0:
            return []
        out = []
        for item in st.record.items:
            res = st.results.get((item.node_id, item.image))
            if res is None or not res.is_final:
                out.append(item)
        return out

    def open_plans(self) -> list[PlanRecord]:
        """Held plans (committed or tentative) that are neither cancelled nor finished."""
        return [r for r in self.plans() if self.is_open(r.plan_id)]

    # --- digests ---------------------------------------------------------------------------

    def entry(self, plan_id: str) -> str | None:
        """This node's digest value of one plan (None: unknown here)."""
        if plan_id in self._aborted:
            return ABORTED
        st = self._plans.get(plan_id)
        if st is None:
            cancel = self._cancels.get(plan_id)
            return None if cancel is None else "cancel:" + repr(cancel.cancelled_at)
        if st.digest is None:
            st.digest = self._hash(plan_id, st)
        return st.digest

    def digest(self, plan_ids: Iterable[str] | None = None) -> dict[str, str]:
        """plan_id -> digest value, for every plan known here (or those of `plan_ids`)."""
        keys = [*self._aborted, *self._plans, *self._cancels] if plan_ids is None else plan_ids
        out: dict[str, str] = {}
        for pid in keys:
            value = self.entry(pid)
            if value is not None:
                out[pid] = value
        return out

    def projection(self, plan_id: str, node_id: str) -> str | None:
        """What a target's `p` digest value of a held plan is when it agrees with this node:
        the hash over the cancel and that node's results."""
        st = self._plans.get(plan_id)
        if st is None or st.record is None:
            return None
        return self._part_hash(plan_id, st.node_acc.get(node_id, 0))

    def reply_digest(self, remote: Mapping[str, str], node_id: str) -> dict[str, str]:
        """Our values for the plans in `remote` (a digest `node_id` sent): a projection where
        it holds a part and we hold the plan, LACKS where we know nothing."""
        out: dict[str, str] = {}
        for pid, theirs in remote.items():
            mine: str | None
            if theirs.startswith("p") and pid not in self._aborted:
                # A target's part: only a holder has anything to compare it with; anyone
                # else echoes it (nothing to exchange between two targets).
                mine = self.projection(pid, node_id) if self.plan(pid) is not None else theirs
            else:
                mine = self.entry(pid)
            out[pid] = LACKS if mine is None else mine
        return out

    def missing_for(
        self,
        remote: Mapping[str, str],
        keys: Collection[str],
        *,
        remote_node: str = "",
        rng: random.Random | None = None,
        send_records: bool = False,
    ) -> SyncBatch:
        """What the other side (`remote_node`, whose digest values are `remote`) lacks of the
        plans in `keys`, bounded per call.

        A plan the other side does not know goes only when `send_records` (it coordinates:
        it should hold every plan). With `rng` the plans are visited in random order, so a
        plan the other side knows better cannot keep crowding the others out of the answer.
        """
        differing = sorted(pid for pid in keys if remote.get(pid, LACKS) != self.entry(pid))
        if rng is not None:
            rng.shuffle(differing)
        out = _Answer()
        for pid in differing:
            if len(out.touched) >= MAX_SYNC_PLANS:
                break
            self._answer_one(
                pid,
                remote.get(pid, LACKS),
                remote_node=remote_node,
                rng=rng,
                send_records=send_records,
                out=out,
            )
        return SyncBatch(
            tuple(out.plans), tuple(out.cancels), tuple(out.aborted), tuple(out.results)
        )

    def _answer_one(
        self,
        pid: str,
        theirs: str,
        *,
        remote_node: str,
        rng: random.Random | None,
        send_records: bool,
        out: _Answer,
    ) -> None:
        if pid in self._aborted:
            if theirs != ABORTED:
                out.touch(pid)
                out.aborted.append(pid)
            return
        cancel = self._cancels.get(pid)
        st = self._plans.get(pid)
        if st is None:  # a cancel of a plan we do not know
            if cancel is not None and theirs != LACKS:
                out.touch(pid)
                out.cancels.append(cancel)
            return
        if theirs == LACKS and not send_records:
            return  # they neither hold the plan nor should
        if st.record is None:
            # A target: its own results are all it can give, and only a holder takes them
            # (its value is the plan's, or its projection of ours: a `p` that differs).
            if theirs[:1] in ("c", "t", "p"):
                out.touch(pid)
                if cancel is not None:
                    out.cancels.append(cancel)
                out.add_results(pid, sorted(st.results.items()), rng)
            return
        if theirs.startswith("p") and not send_records:
            if self.projection(pid, remote_node) == theirs:
                return
            out.touch(pid)
            if cancel is not None:
                out.cancels.append(cancel)
            out.add_results(pid, self._pairs(st, remote_node), rng)
            return
        out.touch(pid)
        if cancel is not None:
            out.cancels.append(cancel)
        rec = st.record
        lacks = theirs == LACKS or theirs.startswith(("cancel:", "p"))
        if lacks or (rec.committed and not theirs.startswith("c")):
            # They lack the record, its commit, or tombstoned a plan that was acknowledged:
            # the record goes first, so results find it.
            if out.plan_items + len(rec.items) > MAX_SYNC_PLAN_ITEMS and out.plan_items:
                return
            out.plans.append(rec)
            out.plan_items += len(rec.items)
        out.add_results(pid, sorted(st.results.items()), rng)

    @staticmethod
    def _pairs(st: _PlanState, node: str) -> list[tuple[tuple[str, str], ItemResult]]:
        return [
            ((node, image), st.results[(node, image)]) for image in sorted(st.by_node.get(node, ()))
        ]

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
        """Hold a plan, or turn on `committed` of a held one. Returns what changed."""
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
        if st is None or st.record is None:
            if st is None and len(self._plans) >= self._max_plans:
                log.warning("plan refused: store full plan=%s", rec.plan_id)
                return []
            self._hold(rec, st)
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

    def _hold(self, rec: PlanRecord, before: _PlanState | None) -> None:
        wanted = frozenset((i.node_id, i.image) for i in rec.items)
        st = _PlanState(rec, content=rec.content_hash(), wanted=wanted, open_items=len(wanted))
        self._plans[rec.plan_id] = st
        if before is not None:
            # A target that now holds the plan keeps what it knew of its own items.
            for (node, image), res in before.results.items():
                self.put_result(rec.plan_id, node, image, res)

    def put_part(self, part: PlanPart) -> list[Record]:
        """Keep a target's part of a plan (nothing changes if the plan is held or known)."""
        if part.plan_id in self._aborted or part.plan_id in self._plans:
            return []
        if len(self._plans) >= self._max_plans:
            log.warning("plan part refused: store full plan=%s", part.plan_id)
            return []
        self._plans[part.plan_id] = _PlanState(None, part)
        return [part]

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
        st = self._plans.get(rec.plan_id)
        if st is not None:
            st.digest = None
        return [rec]

    def put_abort(self, plan_id: str) -> list[Record]:
        """Tombstone a tentative plan (or a part of one). A committed plan cannot be aborted
        (it was acknowledged)."""
        if plan_id in self._aborted:
            return []
        st = self._plans.get(plan_id)
        if st is not None and st.record is not None and st.record.committed:
            log.warning("abort of a committed plan ignored plan=%s", plan_id)
            return []
        self._plans.pop(plan_id, None)
        self._cancels.pop(plan_id, None)
        self._aborted[plan_id] = None
        while len(self._aborted) > self._max_aborted:
            del self._aborted[next(iter(self._aborted))]
        return [AbortRecord(plan_id)]

    def lift_abort(self, plan_id: str) -> None:
        """Drop a tombstone because the plan turned out acknowledged (a committed dispatch:
        only the part a target keeps next comes back, persisted, which drops the stored
        tombstone too)."""
        self._aborted.pop(plan_id, None)

    def put_result(
        self, plan_id: str, node_id: str, image: str, result: ItemResult
    ) -> list[Record]:
        """Merge one result; returns the new merged record if it changed."""
        st = self._plans.get(plan_id)
        if st is None or not st.accepts(node_id, image):
            return []  # results travel with their plan; bounded by the plan (or part)
        key = (node_id, image)
        old = st.results.get(key)
        new = result if old is None else merge(old, result)
        if new == old:
            return []
        if old is None and st.record is None and len(st.results) >= MAX_PLAN_ITEMS:
            return []
        st.results[key] = new
        h = _result_hash(node_id, image, new)
        previous = st.hashes.get(key, 0)
        st.hashes[key] = h
        st.acc ^= previous ^ h
        st.node_acc[node_id] = st.node_acc.get(node_id, 0) ^ previous ^ h
        st.by_node.setdefault(node_id, set()).add(image)
        if key in st.wanted:
            st.open_items += (old is not None and old.is_final) - new.is_final
        st.digest = None
        return [ResultRecord(plan_id, node_id, image, new)]

    def restore(self, records: Iterable[Record]) -> None:
        """Load persisted records (from `Store.load`) into an empty replica."""
        for rec in records:
            if isinstance(rec, PlanRecord):
                self.put_plan(rec)
            elif isinstance(rec, PlanPart):
                self.put_part(rec)
            elif isinstance(rec, CancelRecord):
                self.put_cancel(rec)
            elif isinstance(rec, AbortRecord):
                self.put_abort(rec.plan_id)
            else:
                self.put_result(rec.plan_id, rec.node_id, rec.image, rec.result)

    # --- internals ---------------------------------------------------------------------------

    def _cancel_text(self, pid: str) -> str:
        cancel = self._cancels.get(pid)
        return repr(None if cancel is None else cancel.cancelled_at)

    def _part_hash(self, pid: str, acc: int) -> str:
        return "p" + _short_hash(f"{pid}|{self._cancel_text(pid)}|{acc:x}")

    def _hash(self, pid: str, st: _PlanState) -> str:
        """`c` or `t` (a holder, committed or tentative: tells a peer whether to send the
        record) then a hash over the plan, its commit, cancel and results; `p` (a target)
        then a hash over the cancel and its own results."""
        if st.record is None:
            return self._part_hash(pid, st.acc)
        committed = st.record.committed
        text = f"{pid}|{st.content}|{committed}|{self._cancel_text(pid)}|{st.acc:x}"
        return ("c" if committed else "t") + _short_hash(text)


@dataclass
class _Answer:
    """One bounded anti-entropy answer being built."""

    plans: list[PlanRecord] = field(default_factory=list)
    cancels: list[CancelRecord] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    plan_items: int = 0
    touched: set[str] = field(default_factory=set)

    def touch(self, pid: str) -> None:
        self.touched.add(pid)

    def add_results(
        self,
        pid: str,
        pairs: list[tuple[tuple[str, str], ItemResult]],
        rng: random.Random | None,
    ) -> None:
        room = MAX_SYNC_RESULTS - len(self.results)
        if room <= 0:
            return
        if len(pairs) > room:
            # We cannot tell which results they lack: a random window each round reaches
            # every result within a few rounds.
            start = rng.randrange(len(pairs)) if rng is not None else 0
            pairs = (pairs[start:] + pairs[:start])[:room]
        self.results.extend(ResultRecord(pid, node, image, res) for (node, image), res in pairs)
