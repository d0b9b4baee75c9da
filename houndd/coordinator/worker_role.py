"""The worker role of a node's core: every node takes dispatches for itself (sans IO).

A dispatch is acted on only after the fencing check (`Admit`, the election's), never twice for
one (plan, image) while it runs or once it is done here (dedupe survives a coordinator takeover:
the repeated dispatch is answered under its new attempt number). Accepted items go to the local
executor (`Execute`); its reports become result records, persisted, then reported (`Report`,
which sends them to the coordinator, or feeds them straight to the coordinator role when this
node coordinates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from houndd.coordinator.messages import (
    AbortItems,
    AbortLocal,
    Action,
    Dispatch,
    DispatchReply,
    Execute,
    Persist,
    Reply,
)
from houndd.coordinator.node_state import NodeState
from houndd.coordinator.records import Record
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.scheduler import DispatchItem

Admit = Callable[[int, str, float], tuple[list[Action], bool]]
"""Fencing check of a coordinator message: (term, coordinator, now) -> (actions, accepted)."""
Report = Callable[[list[Record], float], list[Action]]
"""Send changed results of this node where they must go."""


@dataclass(frozen=True, slots=True)
class ExecutorReport:
    """What the local puller says about one image of a plan (attempt is filled in here)."""

    plan_id: str
    image: str
    result: ItemResult


class WorkerRole:
    """Dispatch acceptance, dedupe and the local executor's results."""

    def __init__(self, state: NodeState, *, admit: Admit, report: Report) -> None:
        self._state = state
        self._admit = admit
        self._report = report
        self.running: dict[tuple[str, str], int] = {}
        """(plan, image) -> attempt of what the local executor is running."""

    def on_dispatch(
        self, sender: str, msg: Dispatch, now: float, *, local: bool = False
    ) -> list[Action]:
        """Coordinator -> us: run these items (`local`: the coordinator is this node)."""
        st = self._state
        out: list[Action] = []
        if not local:
            acts, ok = self._admit(msg.term, msg.coordinator, now)
            out.extend(acts)
            if not ok or sender != msg.coordinator:
                out.append(Reply(DispatchReply(msg.plan_id, st.node_id, False, "fenced")))
                return out
        pid = msg.plan_id
        rec = st.replica.plan(pid)
        if rec is None or st.replica.cancelled(pid):
            reason = "unknown plan" if rec is None else "cancelled"
            out.append(Reply(DispatchReply(pid, st.node_id, False, reason)))
            return out
        changed: list[Record] = []
        to_run: list[DispatchItem] = []
        for item in msg.items:
            key = (pid, item.image)
            own = st.replica.result(pid, st.node_id, item.image)
            if own.state is ItemState.DONE or key in self.running:
                # Dedupe by (plan, image@digest): already done or pulling here. Answer under
                # the new attempt number so the coordinator's scheduler accepts it.
                self.running[key] = max(self.running.get(key, 0), item.attempt)
                if own.state is ItemState.DONE:
                    self.running.pop(key)
                res = dataclasses.replace(own, attempt=max(own.attempt, item.attempt))
            else:
                self.running[key] = item.attempt
                to_run.append(item)
                res = ItemResult(
                    ItemState.PULLING, item.attempt, item.digest, started_at=st.stamp(now)
                )
            changed.extend(st.replica.put_result(pid, st.node_id, item.image, res))
        if changed:
            out.append(Persist(tuple(changed)))
        if to_run:
            out.append(Execute(pid, tuple(to_run)))
        out.extend(self._report(changed, now))
        if not local:
            out.append(Reply(DispatchReply(pid, st.node_id, True, "")))
        return out

    def on_abort(self, sender: str, msg: AbortItems, now: float) -> list[Action]:
        """Coordinator -> us: stop these images (fenced like a dispatch)."""
        acts, ok = self._admit(msg.term, msg.coordinator, now)
        if not ok or sender != msg.coordinator:
            return acts
        return acts + self.abort_local(msg.plan_id, msg.images)

    def abort_local(self, pid: str, images: Iterable[str]) -> list[Action]:
        """Stop what of `images` runs here."""
        stop = tuple(i for i in images if self.running.pop((pid, i), None) is not None)
        return [AbortLocal(pid, stop)] if stop else []

    def abort_plan(self, pid: str) -> list[Action]:
        """Stop everything of the plan that runs here (cancelled or aborted)."""
        return self.abort_local(pid, [img for (p, img) in self.running if p == pid])

    def executor_report(self, report: ExecutorReport, now: float) -> list[Action]:
        """Progress or outcome of a local pull."""
        key = (report.plan_id, report.image)
        attempt = self.running.get(key)
        if attempt is None:
            return []  # aborted, or from before a restart: the coordinator moved on
        result = dataclasses.replace(report.result, attempt=max(attempt, report.result.attempt))
        if result.state in (ItemState.DONE, ItemState.FAILED, ItemState.CANCELLED):
            del self.running[key]
        changed = self._state.replica.put_result(
            report.plan_id, self._state.node_id, report.image, result
        )
        if not changed:
            return []
        return [Persist(tuple(changed)), *self._report(changed, now)]

    def interrupted_on_restart(self, now: float) -> list[Action]:
        """Pulls that were running when this node stopped did not survive it: say so, so the
        coordinator retries them now rather than after the item timeout."""
        replica, me = self._state.replica, self._state.node_id
        changed: list[Record] = []
        for rec in replica.open_plans():
            for (node, image), res in replica.results(rec.plan_id).items():
                if node == me and res.state is ItemState.PULLING:
                    failed = dataclasses.replace(
                        res,
                        state=ItemState.FAILED,
                        reason="interrupted",
                        transient=True,
                        finished_at=self._state.stamp(now),
                    )
                    changed.extend(replica.put_result(rec.plan_id, node, image, failed))
        return [Persist(tuple(changed))] if changed else []
