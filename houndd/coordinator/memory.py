"""`MemoryStore`: the in-memory `Store`, for the simulator and tests (same semantics as
`SqliteStore`; the conformance suite runs against both)."""

from __future__ import annotations

from houndd.coordinator.election import ElectionRecord
from houndd.coordinator.messages import Persist
from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanPart,
    PlanRecord,
    Record,
    ResultRecord,
)
from houndd.coordinator.store import PersistedState, must_flush


class MemoryStore:
    """What a node's SQLite store would hold; survives a simulated crash of its node."""

    def __init__(self) -> None:
        self.election = ElectionRecord()
        self.plans: dict[str, PlanRecord] = {}
        self.parts: dict[str, PlanPart] = {}
        self.cancels: dict[str, CancelRecord] = {}
        self.aborted: dict[str, None] = {}
        self.results: dict[tuple[str, str, str], ResultRecord] = {}

    def apply(self, action: Persist) -> None:
        """Apply a Persist action."""
        for rec in action.records:
            if isinstance(rec, ElectionRecord):
                self.election = rec
            elif isinstance(rec, PlanRecord):
                self.aborted.pop(rec.plan_id, None)
                old = self.plans.get(rec.plan_id)
                if old is None or rec.committed:
                    self.plans[rec.plan_id] = rec
            elif isinstance(rec, PlanPart):
                self.aborted.pop(rec.plan_id, None)
                self.parts.setdefault(rec.plan_id, rec)
            elif isinstance(rec, CancelRecord):
                self.cancels[rec.plan_id] = rec
            elif isinstance(rec, AbortRecord):
                self.plans.pop(rec.plan_id, None)
                self.parts.pop(rec.plan_id, None)
                self.cancels.pop(rec.plan_id, None)
                for key in [k for k in self.results if k[0] == rec.plan_id]:
                    del self.results[key]
                self.aborted[rec.plan_id] = None
            elif isinstance(rec, ResultRecord):
                self.results[(rec.plan_id, rec.node_id, rec.image)] = rec
            else:
                raise TypeError(f"cannot persist {type(rec).__name__}")

    def commit(self, action: Persist) -> bool:
        """See `Store.commit` (memory is as durable as it gets here)."""
        self.apply(action)
        return must_flush(action)

    def flush(self) -> None:
        """See `Store.flush`: nothing to do."""

    def load(self) -> PersistedState:
        """The state a restarted node gets."""
        records: list[Record] = [AbortRecord(p) for p in self.aborted]
        plans = sorted(self.plans.values(), key=lambda r: (r.accepted_at, r.plan_id))
        records.extend(plans)
        records.extend(self.parts.values())
        records.extend(self.cancels.values())
        records.extend(self.results.values())
        return PersistedState(self.election, records)

    def close(self) -> None:
        """Nothing to release."""
