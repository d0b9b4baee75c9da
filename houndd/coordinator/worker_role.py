"""The worker role of a node's core: every node takes dispatches for itself (sans IO).

A dispatch is acted on only after the fencing check (`Admit`, the election's), never twice for
one (plan, image) while it runs or once it is done here (dedupe survives a coordinator takeover:
the repeated dispatch is answered under its new attempt number). A dispatch carries what the
node needs to run its items (`PlanWork`), so a target need not hold the plan: it keeps a
`PlanPart` and the results of its own items. Accepted items go to the local executor
(`Execute`); its reports become result records, persisted, then reported (`Report`, which
sends them to the coordinator, or feeds them straight to the coordinator role when this node
coordinates).
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
from houndd.coordinator.records import PlanPart, Record, ResultRecord
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


START_SLACK_S = 1.0
"""A pull that starts within this long of its acceptance started as it was accepted."""


def _no_news(own: ItemResult, report: ItemResult) -> bool:
    """True for the executor's start report of a pull that began as its dispatch was
    accepted: the record the dispatch wrote already says "pulling" (with its start time), so
    persisting and sending it again would cost every node on the path and tell nothing. A
    pull that waited for a free slot longer than `START_SLACK_S` is reported: its start
    time is news."""
    if report.state is not ItemState.PULLING or own.state is not ItemState.PULLING:
        return False
    if report.attempt != own.attempt or report.bytes_done or report.bytes_total:
        return False
    if own.started_at is None or report.started_at is None:
        return False
    return report.started_at - own.started_at < START_SLACK_S


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
        replica = st.replica
        changed: list[Record] = []
        if msg.committed and replica.is_aborted(pid):
            replica.lift_abort(pid)  # an acknowledged plan outranks a tombstone (G1)
        if not replica.knows(pid) and not replica.is_aborted(pid):
            changed.extend(replica.put_part(PlanPart(pid, st.node_id, msg.work)))
        refused = ""
        if replica.is_aborted(pid):
            refused = "aborted"
        elif not replica.knows(pid):
            refused = "store full"
        elif replica.cancelled(pid):
            refused = "cancelled"
        if refused:
            out.append(Reply(DispatchReply(pid, st.node_id, False, refused)))
            return out
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
            out.append(Execute(pid, tuple(to_run), msg.work, msg.peers))
        if local:
            out.extend(self._report(changed, now))
        else:
            # The reply carries the results: one message back instead of two (the coordinator
            # reads them as a RESULTS message from us); a lost reply is a failed dispatch,
            # sent again, and answered again from the dedupe above.
            results = tuple(r for r in changed if isinstance(r, ResultRecord))
            out.append(Reply(DispatchReply(pid, st.node_id, True, "", results)))
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
        own = self._state.replica.result(report.plan_id, self._state.node_id, report.image)
        if _no_news(own, result):
            return []
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
        plan_ids = [r.plan_id for r in replica.open_plans()] + [p.plan_id for p in replica.parts()]
        for pid in plan_ids:
            if replica.cancelled(pid):
                continue
            for rr in replica.node_results(pid, me):
                if rr.result.state is ItemState.PULLING:
                    failed = dataclasses.replace(
                        rr.result,
                        state=ItemState.FAILED,
                        reason="interrupted",
                        transient=True,
                        finished_at=self._state.stamp(now),
                    )
                    changed.extend(replica.put_result(pid, me, rr.image, failed))
        return [Persist(tuple(changed))] if changed else []
