"""`PlanViews`: what the API shows of plans, read from this node's replica.

Every node has the full replica, so any node answers: the plan list, one plan per node x image
(state, digest, bytes, attempts, error, timings), its server-sent event stream, and the
plan/item counts the metrics read at scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from houndd.coordinator.dispatch import DispatchRuntime
from houndd.coordinator.records import PlanRecord
from houndd.coordinator.results import ItemResult, ItemState
from houndd.errors import NO_SPACE
from houndd.membership.service import Membership
from houndd.wire import schema

EVENT_POLL_S = 1.0
"""An event stream looks at the replica on every change, and at least this often."""
PLAN_STATES = ("pending", "running", "done", "failed", "cancelled")
FINAL_PLAN_STATES = frozenset({"done", "failed", "cancelled"})
SUMMARY_KEYS = ("total", "done", "failed", "pulling", "pending", "cancelled")


class PlanViews:
    """Read models of plans for the API and the metrics."""

    def __init__(self, runtime: DispatchRuntime, membership: Membership) -> None:
        self._runtime = runtime
        self._membership = membership

    def plans(self) -> list[dict[str, Any]]:
        """Every plan (without items), newest first."""
        if not self._runtime.started:
            return []
        replica = self._runtime.core.replica
        views = [self._view(rec, items=False) for rec in replica.plans()]
        return sorted(views, key=lambda v: -float(v["accepted_at"]))

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        """One plan with its items, or None if unknown here."""
        if not self._runtime.started:
            return None
        rec = self._runtime.core.replica.plan(plan_id)
        return None if rec is None else self._view(rec, items=True)

    async def events(self, plan_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """A snapshot, then changed items as they change, then the final plan."""
        view = self.plan(plan_id)
        if view is None:
            return
        yield {"event": "snapshot", "plan": view}
        seen = {(r["node"], r["image"]): r for r in view["items"]}
        while view["state"] not in FINAL_PLAN_STATES:
            await self._runtime.wait_changed(EVENT_POLL_S)
            new = self.plan(plan_id)
            if new is None:
                return
            view = new
            for row in view["items"]:
                key = (row["node"], row["image"])
                if seen.get(key) != row:
                    seen[key] = row
                    yield {"event": "item", "item": row}
        yield {"event": "final", "plan": view}

    # --- metrics callbacks ------------------------------------------------------------------

    def plans_by_state(self) -> dict[tuple[str, ...], float]:
        """Plans by state."""
        counts: Counter[str] = Counter(dict.fromkeys(PLAN_STATES, 0))
        for p in self.plans():
            counts[str(p["state"])] += 1
        return {(k,): float(v) for k, v in counts.items()}

    # --- internals ---------------------------------------------------------------------------

    def _name(self, node_id: str, names: Mapping[str, str]) -> str:
        if node_id in names:
            return names[node_id]
        member = self._membership.get(node_id)
        return member.name if member else node_id

    def _rows(self, rec: PlanRecord, cancelled: bool) -> list[dict[str, Any]]:
        doc = rec.document
        results = self._runtime.core.replica.results(rec.plan_id)
        rows: list[dict[str, Any]] = []
        for it in rec.items:
            res = results.get((it.node_id, it.image), ItemResult())
            row = {
                "node": self._name(it.node_id, doc.names),
                "node_id": it.node_id,
                "image": it.image,
                "size_bytes": it.size_bytes,
                "final": res.is_final or (cancelled and res.state is not ItemState.PULLING),
                **res.to_dict(),
                # the plan's resolved digest: a coordinator's verdict (retries exhausted, node
                # unavailable) carries none, and must not blank it
                "digest": it.digest or res.digest,
            }
            if cancelled and res.state is ItemState.PENDING:
                row["state"] = "cancelled"
            rows.append(row)
        digests = {g.image: g.digest for g in doc.groups}
        for node_id, refused in (doc.no_space or {}).items():
            detail = (
                f"the node lacks {_mib(refused.needed_bytes)} of this plan's images "
                f"and has {_mib(refused.free_bytes)} free"
            )
            rows.extend(
                {
                    "node": self._name(node_id, doc.names),
                    "node_id": node_id,
                    "image": image,
                    "digest": digests.get(image, ""),
                    "size_bytes": size,
                    "state": "failed",
                    "attempt": 0,
                    "reason": NO_SPACE,
                    "detail": detail,
                    "final": True,
                    "bytes_done": 0,
                    "bytes_total": 0,
                }
                for image, size in refused.images.items()
            )
        for image, failure in doc.unresolved.items():
            for group in doc.groups:
                if group.image != image:
                    continue
                rows.extend(
                    {
                        "node": node,
                        "image": image,
                        "digest": "",
                        "state": "failed",
                        "attempt": 0,
                        "reason": failure.reason,
                        "detail": failure.detail,
                        "final": True,
                        "bytes_done": 0,
                        "bytes_total": 0,
                    }
                    for node in group.nodes
                )
        return rows

    def _view(self, rec: PlanRecord, *, items: bool) -> dict[str, Any]:
        doc = rec.document
        cancelled = self._runtime.core.replica.cancelled(rec.plan_id) is not None
        rows = self._rows(rec, cancelled)
        summary: Counter[str] = Counter(dict.fromkeys(SUMMARY_KEYS, 0))
        for r in rows:
            summary["total"] += 1
            summary[str(r["state"])] += 1
        all_final = all(r["final"] for r in rows)
        if cancelled and all_final and summary["cancelled"]:
            # A cancel that stopped nothing (it raced the last result, or came from a node
            # that had not seen the end yet) does not rewrite how the plan ended.
            state = "cancelled"
        elif not rec.committed and not all_final:
            state = "pending"
        elif all_final:
            state = "failed" if summary["failed"] or summary["cancelled"] else "done"
        else:
            state = "running"
        coordinator, term = self._runtime.coordinator()
        view: dict[str, Any] = {
            "id": rec.plan_id,
            "name": doc.plan.name,
            "action": doc.plan.action,
            "state": state,
            "accepted_at": rec.accepted_at,
            "committed": rec.committed,
            "via": doc.via,
            "coordinator": self._name(coordinator, {}) if coordinator else None,
            "term": term,
            "summary": dict(summary),
        }
        if items:
            view["policy"] = doc.plan.policy.to_document()
            view["groups"] = [schema.encode(g) for g in doc.groups]
            view["unknown_nodes"] = list(doc.unknown_nodes)
            view["empty_selectors"] = [dict(s) for s in doc.empty_selectors]
            view["items"] = sorted(rows, key=lambda r: (r["node"], r["image"]))
        return view


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
