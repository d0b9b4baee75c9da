"""`PlanViews`: what the API shows of plans, and their event streams.

A node answers for the plans it holds from its own replica. A plan it does not hold (it is
only a target of it, or knows nothing of it) is fetched from a holder first (PLAN_GET), after
which this node holds it and the coordinator sends it the plan's outcomes; the plan list of a
node that does not coordinate comes from the coordinator (PLAN_LIST), with the plans held here
added.

Rendering is shared, never per reader: each plan's rows are cached per result (a result is an
immutable value, so a row is rendered again only when its result or its node's membership
state changed), and each plan that has readers has one `PlanStream` on this node that renders
each change once, encodes each event once, and hands the same bytes to every subscriber. A
subscriber's queue is bounded: a reader that falls `stream_queue_events` events behind is
dropped with a `dropped` event (its client reconnects and starts from a fresh snapshot), and at
most `max_event_streams` streams are open on a node at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from houndd.coordinator.dispatch import DispatchRuntime
from houndd.coordinator.messages import MAX_LISTED_PLANS, PlanList, PlanListReply, PlanSummary
from houndd.coordinator.records import PlanRecord
from houndd.coordinator.results import UNKNOWN_RESULT, ItemState
from houndd.errors import NO_SPACE, HounddError
from houndd.membership.bus import Message
from houndd.membership.member import MemberState
from houndd.membership.service import Membership
from houndd.wire import schema
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.coordinator")

EVENT_POLL_S = 1.0
"""A stream looks at the replica on every change, and at least this often."""
RENDER_INTERVAL_S = 0.02
"""A stream renders at most this often: changes within it go out as one batch of events."""
READERS_PER_INTERVAL = 10
MAX_RENDER_INTERVAL_S = 1.0
"""A stream with many readers renders less often: RENDER_INTERVAL_S more for every
READERS_PER_INTERVAL readers, up to MAX_RENDER_INTERVAL_S. Changes of one item within an
interval go out as one event, so a crowd costs fewer, larger batches, not more of them."""
PLAN_STATES = ("pending", "running", "done", "failed", "cancelled")
FINAL_PLAN_STATES = frozenset({"done", "failed", "cancelled"})
SUMMARY_FIELDS = schema.wire_names(PlanSummary)
"""The keys of a plan's view that a plan list from the coordinator carries."""
SUMMARY_KEYS = ("total", "done", "failed", "pulling", "pending", "cancelled")
CACHED_PLANS = 16
"""Plans whose rendered rows are kept (the ones being read)."""

Row = dict[str, Any]
Key = tuple[str, str]


class TooManyStreams(HounddError, ConnectionRefusedError):
    """This node serves as many event streams as `max_event_streams` allows; retry shortly
    or follow the plan through another node."""


def sse(event: Mapping[str, Any]) -> bytes:
    """One server-sent event, encoded."""
    kind = str(event.get("event", "update"))
    return f"event: {kind}\ndata: {json.dumps(event, default=str)}\n\n".encode()


@dataclass
class _Rows:
    """The rendered rows of one plan: per item key, the result and member state it was
    rendered from, and the row."""

    rows: dict[Key, tuple[object, Row]] = field(default_factory=dict)


class PlanViews:
    """Read models of plans for the API and the metrics."""

    def __init__(self, runtime: DispatchRuntime, membership: Membership) -> None:
        self._runtime = runtime
        self._membership = membership
        self._cache: OrderedDict[str, _Rows] = OrderedDict()
        self._streams: dict[str, PlanStream] = {}
        self._fetching: dict[str, asyncio.Future[bool]] = {}
        self.subscribers = 0
        """Event streams open on this node."""
        runtime.bus.register(MsgType.PLAN_LIST, self._on_plan_list)

    # --- reads -----------------------------------------------------------------------------

    def local_plans(self) -> list[dict[str, Any]]:
        """Every plan held here (without items), newest first."""
        if not self._runtime.started:
            return []
        replica = self._runtime.core.replica
        views = [self._view(rec, items=False) for rec in replica.plans()]
        return sorted(views, key=lambda v: -float(v["accepted_at"]))

    async def plans(self) -> list[dict[str, Any]]:
        """Every plan (without items), newest first: the coordinator's list and ours."""
        local = self.local_plans()
        runtime = self._runtime
        coordinator, _ = runtime.coordinator()
        if coordinator is None or coordinator == runtime.node_id:
            return local
        try:
            reply = await runtime.bus.request_typed(coordinator, PlanList(), PlanListReply)
        except HounddError as e:
            log.info(
                "plan list from the coordinator failed coordinator=%s error=%s", coordinator, e
            )
            return local
        merged = {str(v["id"]): v for v in local}
        for summary in reply.plans:
            merged.setdefault(summary.plan_id, schema.encode(summary))
        return sorted(merged.values(), key=lambda v: -float(v["accepted_at"]))

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        """One plan with its items, or None if no holder knows it."""
        if not await self.hold(plan_id):
            return None
        return self.view(plan_id)

    def view(self, plan_id: str) -> dict[str, Any] | None:
        """One plan held here, with its items (None if not held)."""
        if not self._runtime.started:
            return None
        rec = self._runtime.core.replica.plan(plan_id)
        return None if rec is None else self._view(rec, items=True)

    async def hold(self, plan_id: str) -> bool:
        """Make sure this node holds the plan (fetch it from a holder if not); False if no
        holder could be found that knows it."""
        runtime = self._runtime
        if not runtime.started:
            return False
        if runtime.core.replica.plan(plan_id) is not None:
            return True
        pending = self._fetching.get(plan_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._fetching[plan_id] = fut
        try:
            held = await runtime.fetch_plan(plan_id)
            fut.set_result(held)
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            del self._fetching[plan_id]
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: waiters saw it
        return held

    # --- event streams -----------------------------------------------------------------------

    async def events(self, plan_id: str) -> AsyncGenerator[bytes, None]:
        """The plan's server-sent events, encoded: a snapshot, then changed items as they
        change, then the final plan (or a `dropped` event if this reader fell behind)."""
        if not await self.hold(plan_id):
            return
        limit = self._runtime.config.max_event_streams
        if self.subscribers >= limit:
            raise TooManyStreams(
                f"this node serves {limit} event streams already (max_event_streams); retry "
                "shortly or follow the plan through another node"
            )
        stream = self._streams.get(plan_id)
        if stream is None or stream.closed:
            stream = PlanStream(self, plan_id)
            self._streams[plan_id] = stream
            self._runtime.spawn(stream.pump(), f"event stream plan={plan_id}")
        sub = stream.subscribe()
        self.subscribers += 1
        try:
            while True:
                chunk = await sub.get()
                if chunk is None:
                    return
                yield chunk
        finally:
            self.subscribers -= 1
            stream.unsubscribe(sub)

    def _stream_done(self, stream: PlanStream) -> None:
        if self._streams.get(stream.plan_id) is stream:
            del self._streams[stream.plan_id]

    # --- metrics callbacks ------------------------------------------------------------------

    def plans_by_state(self) -> dict[tuple[str, ...], float]:
        """Plans by state."""
        counts: Counter[str] = Counter(dict.fromkeys(PLAN_STATES, 0))
        for p in self.local_plans():
            counts[str(p["state"])] += 1
        return {(k,): float(v) for k, v in counts.items()}

    # --- peers ---------------------------------------------------------------------------------

    async def _on_plan_list(self, msg: Message) -> PlanListReply:
        newest = self.local_plans()[:MAX_LISTED_PLANS]
        return PlanListReply(
            tuple(
                schema.decode(PlanSummary, {k: v[k] for k in SUMMARY_FIELDS if k in v})
                for v in newest
            )
        )

    # --- rendering -----------------------------------------------------------------------------

    def _name(self, node_id: str, names: Mapping[str, str]) -> str:
        if node_id in names:
            return names[node_id]
        member = self._membership.get(node_id)
        return member.name if member else node_id

    def _rows_cache(self, plan_id: str) -> _Rows:
        cache = self._cache.get(plan_id)
        if cache is None:
            cache = self._cache[plan_id] = _Rows()
            while len(self._cache) > CACHED_PLANS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(plan_id)
        return cache

    def _rows(self, rec: PlanRecord, cancelled: bool) -> list[Row]:
        doc = rec.document
        results = self._runtime.core.replica.results(rec.plan_id)
        cache = self._rows_cache(rec.plan_id)
        timeout_s = self._runtime.config.node_return_timeout_s
        rows: list[Row] = []
        for it in rec.items:
            res = results.get((it.node_id, it.image), UNKNOWN_RESULT)
            member = self._membership.get(it.node_id)
            state = member.state if member is not None else None
            key = (it.node_id, it.image)
            stamp = (res, state, cancelled)
            cached = cache.rows.get(key)
            if cached is not None and cached[0] == stamp:
                row = cached[1]
            else:
                row = {
                    "node": self._name(it.node_id, doc.names),
                    "node_id": it.node_id,
                    "image": it.image,
                    "size_bytes": it.size_bytes,
                    "final": res.is_final or (cancelled and res.state is not ItemState.PULLING),
                    **res.to_dict(),
                    # the plan's resolved digest: a coordinator's verdict (retries exhausted,
                    # node unavailable) carries none, and must not blank it
                    "digest": it.digest or res.digest,
                    "node_state": state.value if state is not None else "unknown",
                }
                if cancelled and res.state is ItemState.PENDING:
                    row["state"] = "cancelled"
                cache.rows[key] = (stamp, row)
            down = state in (MemberState.DEAD, MemberState.LEFT)
            if member is not None and down and not row["final"]:
                # About how long until its items fail as 'node unavailable', counted from
                # when this node last heard the target: time-dependent, never cached.
                left = member.last_heard + timeout_s - time.time()
                row = {**row, "unavailable_in_s": round(max(0.0, left), 1)}
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
                    "node_state": self._node_state_of(node_id),
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
                        "node_state": self._node_state(node),
                    }
                    for node in group.nodes
                )
        return rows

    def _node_state_of(self, node_id: str) -> str:
        member = self._membership.get(node_id)
        return member.state.value if member is not None else "unknown"

    def _node_state(self, name: str) -> str:
        member = self._membership.by_name(name)
        return member.state.value if member is not None else "unknown"

    def _summary(self, rec: PlanRecord, cancelled: bool) -> tuple[Counter[str], bool]:
        """State counts and whether every item is final, from the replica (no rows)."""
        results = self._runtime.core.replica.results(rec.plan_id)
        summary: Counter[str] = Counter(dict.fromkeys(SUMMARY_KEYS, 0))
        all_final = True
        for res in results.values():
            state = res.state.value
            final = res.is_final
            if cancelled and res.state is ItemState.PENDING:
                state, final = "cancelled", True
            elif cancelled and res.state is not ItemState.PULLING:
                final = True
            summary["total"] += 1
            summary[state] += 1
            all_final = all_final and final
        for refused in (rec.document.no_space or {}).values():
            summary["total"] += len(refused.images)
            summary["failed"] += len(refused.images)
        for image in rec.document.unresolved:
            for group in rec.document.groups:
                if group.image == image:
                    summary["total"] += len(group.nodes)
                    summary["failed"] += len(group.nodes)
        return summary, all_final

    def _view(self, rec: PlanRecord, *, items: bool) -> dict[str, Any]:
        doc = rec.document
        cancelled = self._runtime.core.replica.cancelled(rec.plan_id) is not None
        rows: list[Row] = []
        if items:
            rows = self._rows(rec, cancelled)
            summary: Counter[str] = Counter(dict.fromkeys(SUMMARY_KEYS, 0))
            for r in rows:
                summary["total"] += 1
                summary[str(r["state"])] += 1
            all_final = all(r["final"] for r in rows)
        else:
            summary, all_final = self._summary(rec, cancelled)
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


class _Subscriber:
    """One reader of a stream: a bounded queue of encoded event batches; None ends it. The
    batches are shared with every other reader (never copied per reader)."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(size + 2)
        self._size = size
        self.ended = False

    def put(self, chunk: bytes) -> bool:
        """Queue a batch; False if the reader is too far behind (it is then dropped)."""
        if self.ended:
            return False
        if self._queue.qsize() >= self._size:
            self.drop()
            return False
        self._queue.put_nowait(chunk)
        return True

    def drop(self) -> None:
        """End this reader's stream with a `dropped` event, whatever it had not read yet."""
        if self.ended:
            return
        self.ended = True
        while not self._queue.empty():
            self._queue.get_nowait()
        event = {
            "event": "dropped",
            "reason": "this reader fell behind; reconnect to get a fresh snapshot",
        }
        self._queue.put_nowait(sse(event))
        self._queue.put_nowait(None)

    def end(self) -> None:
        """The stream is over (after its final event)."""
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(None)

    async def get(self) -> bytes | None:
        return await self._queue.get()


class PlanStream:
    """One plan's events on this node, rendered and encoded once for every subscriber."""

    def __init__(self, views: PlanViews, plan_id: str) -> None:
        self.plan_id = plan_id
        self._views = views
        self._subs: set[_Subscriber] = set()
        self._seen: dict[Key, Row] = {}
        self._view: dict[str, Any] | None = None  # the last rendered view
        self._snapshot: bytes | None = None  # encoded from _view when a subscriber needs it
        self._final: bytes | None = None
        self._change = views._runtime.next_change()
        self.closed = False

    def subscribe(self) -> _Subscriber:
        """A new reader: it starts with a snapshot of what was published so far."""
        sub = _Subscriber(self._views._runtime.config.stream_queue_events)
        if self._view is None and self._final is None:
            self._render()
        if self._view is not None:
            if self._snapshot is None:
                self._snapshot = sse({"event": "snapshot", "plan": self._view})
            sub.put(self._snapshot)
        if self._final is not None:
            sub.put(self._final)
            sub.end()
            return sub
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._subs.discard(sub)

    def interval_s(self) -> float:
        """How long to gather changes before the next render, for this many readers."""
        steps = max(1.0, len(self._subs) / READERS_PER_INTERVAL)
        return min(MAX_RENDER_INTERVAL_S, RENDER_INTERVAL_S * steps)

    async def pump(self) -> None:
        """Render changes and publish them until the plan is final or nobody reads (the
        last reader leaving is noticed at the next change or poll)."""
        runtime = self._views._runtime
        try:
            while self._subs and self._final is None:
                await runtime.wait_change(self._change, EVENT_POLL_S)
                if not self._subs:
                    break
                events = self._render()
                if events:
                    self._publish(b"".join(events))
                await asyncio.sleep(self.interval_s())
        finally:
            self.closed = True
            self._views._stream_done(self)
            for sub in list(self._subs):
                sub.end()

    def _render(self) -> list[bytes]:
        """Render the plan; returns the events since the last render."""
        # Taken before reading the replica: a change while we render wakes the next round.
        self._change = self._views._runtime.next_change()
        view = self._views.view(self.plan_id)
        if view is None:
            self._final = sse({"event": "final", "plan": None})
            return [self._final]
        events: list[bytes] = []
        first = self._view is None
        for row in view["items"]:
            key = (row["node"], row["image"])
            seen = self._seen.get(key)
            if seen is not row:
                if not first and seen != row:
                    events.append(sse({"event": "item", "item": row}))
                self._seen[key] = row
        self._view, self._snapshot = view, None
        if view["state"] in FINAL_PLAN_STATES:
            # Without its items: every reader has them (its snapshot and the item events), and
            # at a few thousand items they would double what a crowd of readers is sent.
            ended = {k: v for k, v in view.items() if k != "items"}
            self._final = sse({"event": "final", "plan": ended})
            events.append(self._final)
        return events

    def _publish(self, chunk: bytes) -> None:
        for sub in list(self._subs):
            if not sub.put(chunk):
                log.info("event stream reader dropped plan=%s", self.plan_id)
                self._subs.discard(sub)
            elif self._final is not None:
                sub.end()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
