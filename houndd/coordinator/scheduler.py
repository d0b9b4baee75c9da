"""The pure pull scheduler: which image goes to which node, and when.

It improves on the paper's Algorithm 1 thread loop:

- one work queue per node, largest image first (the long pulls start early, so the plan's
  makespan is not decided by a big image started last);
- at most `policy.parallelism` nodes with work in flight across the cluster (the paper's
  `workers`) and at most `policy.per_node_parallelism` images in flight on one node;
- idle nodes are started in order of remaining bytes, largest first (longest-processing-time
  rule), ties in plan order;
- one `Dispatch` per node and step carries everything that node gets at once (its batch);
- transient failures are retried up to `policy.retries` times with capped exponential backoff
  and full jitter; permanent failures are final at once;
- an item without a result after its timeout (+ slack) counts as a transient `timeout` failure
  and is aborted on the node;
- a node that is down (membership says dead) or unreachable (a dispatch to it could not be
  delivered) keeps its items queued without charging them a failure: a lost node is not a pull
  failure. An unreachable node gets a cheap re-dispatch with backoff (`redispatch_base_s`
  doubling up to `redispatch_cap_s`), a dead one waits for `on_node_up`; either way, once it
  has been away `node_down_timeout_s` its queued items fail with `node unavailable`.

Like h11, this module does no IO and knows no clock: the async shell feeds it events with the
current time and carries out the returned actions. Randomness (jitter) comes from the injected
`random.Random`, so a simulation is reproducible from its seed.

Attempts: every dispatch of an item gets a new attempt number (1, 2, ...). A result is accepted
only for the attempt currently in flight; anything else is stale (a late answer to an attempt
that already timed out, was re-queued when its node went down, or was cancelled) and ignored.
`failures` counts the transient failures charged against `policy.retries`; a re-dispatch that is
not the item's fault (node down or unreachable, coordinator takeover) bumps the attempt but not
the failures.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from houndd.coordinator.plan import Policy
from houndd.wire.fields import Counter, Digest, Duration, ImageName

__all__ = [
    "NODE_UNAVAILABLE",
    "TIMEOUT",
    "Abort",
    "Action",
    "Dispatch",
    "DispatchItem",
    "Final",
    "ItemView",
    "Policy",
    "RestoredItem",
    "Scheduler",
    "WorkItem",
]

log = logging.getLogger("houndd.coordinator.scheduler")

TIMEOUT = "timeout"
NODE_UNAVAILABLE = "node unavailable"
CANCELLED = "cancelled"

ItemStateName = Literal["pending", "pulling", "done", "failed", "cancelled"]
FinalState = Literal["done", "failed", "cancelled"]
_FINAL_STATES = frozenset({"done", "failed", "cancelled"})


class WorkItem(NamedTuple):
    """One image wanted on one node. `digest` is the plan's resolved digest ("" if none)."""

    node: str
    image: str
    digest: str
    size_bytes: int


class RestoredItem(NamedTuple):
    """A work item with what is known about it, for `Scheduler.restore` after a takeover.

    `state` is one of pending, pulling, done, failed, cancelled (the values of
    `houndd.coordinator.results.ItemState`). A `failed` item with `transient=True` is a failed
    attempt that may still be retried, so it is re-queued like a pending one. `failures` is the
    number of transient failures charged against the retry budget; when unknown (None) it is
    taken as `attempt` for a transient failure and `attempt - 1` otherwise (the attempt in
    flight when the old coordinator died is not charged).
    """

    node: str
    image: str
    digest: str
    size_bytes: int
    state: str
    attempt: int = 0
    failures: int | None = None
    reason: str = ""
    transient: bool = False


@dataclass(frozen=True, slots=True)
class DispatchItem:
    """One image of a dispatch: pull `image` at `digest`; the node enforces `timeout_s`.
    The same object travels in DISPATCH, so its fields carry the wire's bounds."""

    image: ImageName
    digest: Digest
    attempt: Counter
    timeout_s: Duration


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send `items` to `node` in one message (the node's batch for this step)."""

    node: str
    items: tuple[DispatchItem, ...]


@dataclass(frozen=True, slots=True)
class Abort:
    """Tell `node` to stop working on `images` (cancel, or the coordinator timed them out)."""

    node: str
    images: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Final:
    """An item reached its final state; `reason` names a failure ("" when done)."""

    node: str
    image: str
    state: FinalState
    reason: str


Action = Dispatch | Abort | Final


@dataclass(frozen=True, slots=True)
class ItemView:
    """A read-only snapshot of one item, for status pages and tests."""

    node: str
    image: str
    digest: str
    size_bytes: int
    state: ItemStateName
    attempt: int
    failures: int
    reason: str
    not_before: float | None
    """When a retry waiting for its backoff may start (None: not waiting)."""
    deadline: float | None
    """When the coordinator declares the attempt in flight timed out."""


class _Item:
    __slots__ = (
        "attempt",
        "deadline",
        "digest",
        "failures",
        "image",
        "node",
        "not_before",
        "order",
        "reason",
        "size",
        "state",
    )

    def __init__(self, node: str, image: str, digest: str, size: int, order: int) -> None:
        self.node = node
        self.image = image
        self.digest = digest
        self.size = size
        self.order = order  # plan order breaks ties between equally large images
        self.state: ItemStateName = "pending"
        self.attempt = 0
        self.failures = 0
        self.reason = ""
        self.not_before = -math.inf
        self.deadline: float | None = None

    def sort_key(self) -> tuple[int, int]:
        return (-self.size, self.order)


class _Node:
    __slots__ = (
        "away_since",
        "dead",
        "inflight",
        "misses",
        "name",
        "order",
        "queue",
        "queued_bytes",
        "retry_at",
    )

    def __init__(self, name: str, order: int) -> None:
        self.name = name
        self.order = order
        # Pending items sorted largest first; items waiting for a retry stay in place with
        # their not_before, so a due retry of a big image goes before small fresh ones.
        self.queue: list[_Item] = []
        self.queued_bytes = 0
        self.inflight: dict[str, _Item] = {}
        self.dead = False  # membership says dead: nothing is dispatched until it is up again
        # When the node was lost (dead or unreachable) and not heard from since: the
        # node_down_timeout_s countdown starts here.
        self.away_since: float | None = None
        self.misses = 0  # consecutive dispatches that could not be delivered
        self.retry_at = -math.inf  # unreachable: the next re-dispatch may not start before

    def enqueue(self, item: _Item) -> None:
        bisect.insort(self.queue, item, key=_Item.sort_key)
        self.queued_bytes += item.size

    def take(self, now: float, count: int) -> list[_Item]:
        picked: list[int] = []
        for n, item in enumerate(self.queue):
            if item.not_before <= now:
                picked.append(n)
                if len(picked) == count:
                    break
        taken = [self.queue[n] for n in picked]
        for n in reversed(picked):
            del self.queue[n]
        self.queued_bytes -= sum(i.size for i in taken)
        return taken

    def discard(self, item: _Item) -> None:
        """Take a queued item out of the queue (it ended without being dispatched)."""
        self.queue.remove(item)
        self.queued_bytes -= item.size

    def clear(self) -> list[_Item]:
        items, self.queue, self.queued_bytes = self.queue, [], 0
        return items


# Timer kinds on the heap; entries are re-checked when popped (lazy deletion), so a timer
# whose item moved on (result arrived, re-dispatched, node came back) is simply dropped.
_DEADLINE = 0
_RETRY = 1
_NODE_DOWN = 2
_NODE_RETRY = 3


class Scheduler:
    """Pure scheduler for one plan. Feed it events; carry out the actions it returns.

    `items` are `(node, image, digest, size_bytes)` tuples (`WorkItem`). Call `start(now)` once;
    then `on_started`, `on_result`, `on_tick`, `on_node_down`, `on_node_up`,
    `on_dispatch_failed`, `on_reachable` and `cancel` as things happen, and call `on_tick` again
    at `next_wakeup()`. Every method returns the actions to carry out, in order.

    The backoff before retry n (n = 1, 2, ...) is uniform in
    `[0, min(backoff_cap_s, backoff_base_s * backoff_factor ** (n - 1))]` ("full jitter": many
    nodes failing together against one registry do not come back in lockstep). The coordinator
    gives a dispatched item `policy.timeout_s + timeout_slack_s` before it declares a timeout;
    the slack covers message delay, since the node enforces `policy.timeout_s` itself.

    Cost: an event touches only the nodes it concerns plus, when a parallelism slot is free,
    one pass over the idle nodes; timers live in a heap. A 1000-node plan stays cheap.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str, str, int]],
        policy: Policy,
        *,
        rng: random.Random,
        backoff_base_s: float = 1.0,
        backoff_factor: float = 2.0,
        backoff_cap_s: float = 60.0,
        timeout_slack_s: float = 10.0,
        node_down_timeout_s: float = 300.0,
        redispatch_base_s: float = 0.5,
        redispatch_cap_s: float = 10.0,
    ) -> None:
        if backoff_base_s < 0 or backoff_cap_s < 0 or backoff_factor < 1:
            raise ValueError("backoff needs base >= 0, cap >= 0 and factor >= 1")
        if timeout_slack_s < 0 or node_down_timeout_s < 0:
            raise ValueError("timeout_slack_s and node_down_timeout_s must be >= 0")
        if not 0 < redispatch_base_s <= redispatch_cap_s:
            # > 0: a refused connection fails at once; a zero delay would re-dispatch in a loop.
            raise ValueError("redispatch needs 0 < base <= cap")
        self.policy = policy
        self._rng = rng
        self._backoff_base_s = backoff_base_s
        self._backoff_factor = backoff_factor
        self._backoff_cap_s = backoff_cap_s
        self._timeout_slack_s = timeout_slack_s
        self._node_down_timeout_s = node_down_timeout_s
        self._redispatch_base_s = redispatch_base_s
        self._redispatch_cap_s = redispatch_cap_s
        self._nodes: dict[str, _Node] = {}
        self._items: dict[tuple[str, str], _Item] = {}
        self._busy: dict[str, _Node] = {}  # nodes with work in flight, insertion ordered
        self._idle: dict[str, _Node] = {}  # up, nothing in flight, something queued
        self._timers: list[tuple[float, int, int, object]] = []
        self._timer_seq = 0
        self._open = 0  # items not final yet; done() is open == 0
        self._started = False
        self._cancelled = False
        self._now = -math.inf
        for raw in items:
            self._add(WorkItem(*raw))

    # --- construction -----------------------------------------------------------------------

    def _add(self, work: WorkItem) -> _Item:
        if work.size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0: node={work.node} image={work.image}")
        key = (work.node, work.image)
        if key in self._items:
            raise ValueError(f"duplicate item: node={work.node} image={work.image}")
        node = self._nodes.get(work.node)
        if node is None:
            node = self._nodes[work.node] = _Node(work.node, len(self._nodes))
        item = _Item(work.node, work.image, work.digest, work.size_bytes, len(self._items))
        self._items[key] = item
        node.enqueue(item)
        self._refresh(node)
        self._open += 1
        return item

    @classmethod
    def restore(
        cls,
        items: Iterable[RestoredItem | tuple[str, str, str, int, str]],
        policy: Policy,
        *,
        rng: random.Random,
        backoff_base_s: float = 1.0,
        backoff_factor: float = 2.0,
        backoff_cap_s: float = 60.0,
        timeout_slack_s: float = 10.0,
        node_down_timeout_s: float = 300.0,
        redispatch_base_s: float = 0.5,
        redispatch_cap_s: float = 10.0,
    ) -> Scheduler:
        """Rebuild a scheduler from known per-item states (a new coordinator on takeover).

        done, cancelled and non-transient failed items are final: they are never dispatched
        again and produce no `Final` action (they already have one). pending, pulling and
        transiently failed items are queued again and keep their attempt counters, so the
        next dispatch uses a fresh attempt number and any late result of the old one is stale.
        """
        sched = cls(
            (),
            policy,
            rng=rng,
            backoff_base_s=backoff_base_s,
            backoff_factor=backoff_factor,
            backoff_cap_s=backoff_cap_s,
            timeout_slack_s=timeout_slack_s,
            node_down_timeout_s=node_down_timeout_s,
            redispatch_base_s=redispatch_base_s,
            redispatch_cap_s=redispatch_cap_s,
        )
        for raw in items:
            known = RestoredItem(*raw)
            state = str(known.state)
            if state not in ("pending", "pulling", "done", "failed", "cancelled"):
                raise ValueError(f"unknown item state {state!r}: node={known.node}")
            if known.attempt < 0:
                raise ValueError(f"attempt must be >= 0: node={known.node} image={known.image}")
            retryable_failure = state == "failed" and known.transient
            if state in ("done", "cancelled") or (state == "failed" and not known.transient):
                sched._add_final(known, cast(FinalState, state))
                continue
            item = sched._add(WorkItem(known.node, known.image, known.digest, known.size_bytes))
            item.attempt = known.attempt
            item.reason = known.reason
            if known.failures is not None:
                item.failures = known.failures
            elif retryable_failure:
                item.failures = known.attempt
            else:
                item.failures = max(0, known.attempt - 1)
        return sched

    def _add_final(self, known: RestoredItem, state: FinalState) -> None:
        key = (known.node, known.image)
        if key in self._items:
            raise ValueError(f"duplicate item: node={known.node} image={known.image}")
        if known.node not in self._nodes:
            self._nodes[known.node] = _Node(known.node, len(self._nodes))
        item = _Item(known.node, known.image, known.digest, known.size_bytes, len(self._items))
        item.state = state
        item.attempt = known.attempt
        item.reason = known.reason
        self._items[key] = item

    # --- queries ----------------------------------------------------------------------------

    def done(self) -> bool:
        """True when every item is final (done, failed or cancelled)."""
        return self._open == 0

    def state(self, node: str, image: str) -> ItemStateName:
        """pending (queued or waiting for a retry), pulling, done, failed or cancelled."""
        return self._items[(node, image)].state

    def item(self, node: str, image: str) -> ItemView:
        """A snapshot of one item. KeyError if the plan does not have it."""
        return self._view(self._items[(node, image)])

    def items(self) -> list[ItemView]:
        """Snapshots of every item, in plan order."""
        return [self._view(i) for i in self._items.values()]

    def busy_nodes(self) -> list[str]:
        """Nodes with work in flight right now."""
        return list(self._busy)

    def in_flight(self, node: str) -> list[str]:
        """Images in flight on `node`."""
        n = self._nodes.get(node)
        return list(n.inflight) if n else []

    def next_wakeup(self) -> float | None:
        """The earliest time `on_tick` has something to do, or None if only events can help.

        A retry whose backoff has expired but that the caps still block is not a reason to
        wake up (it starts on the result that frees a slot); counting it would make the shell
        spin.
        """
        if self._cancelled or self._open == 0:
            return None
        while self._timers:
            at, _, kind, ref = self._timers[0]
            due_but_blocked = kind in (_RETRY, _NODE_RETRY) and at <= self._now
            if self._timer_valid(at, kind, ref) and not due_but_blocked:
                return at
            heapq.heappop(self._timers)
        return None

    def _view(self, i: _Item) -> ItemView:
        return ItemView(
            node=i.node,
            image=i.image,
            digest=i.digest,
            size_bytes=i.size,
            state=i.state,
            attempt=i.attempt,
            failures=i.failures,
            reason=i.reason,
            not_before=i.not_before if i.not_before > -math.inf else None,
            deadline=i.deadline,
        )

    # --- events -----------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin: dispatch the first batches."""
        self._now = max(self._now, now)
        if self._started:
            return []
        self._started = True
        return self._fill(now, ())

    def on_started(self, node: str, image: str, attempt: int, now: float) -> list[Action]:
        """The node began the pull (optional). The deadline then counts from here, because
        the node may have queued the item behind other plans' pulls before starting it."""
        self._now = max(self._now, now)
        item = self._items.get((node, image))
        if item is None or item.state != "pulling" or item.attempt != attempt:
            return []
        self._heard_from(self._nodes[node])
        deadline = now + self.policy.timeout_s + self._timeout_slack_s
        if item.deadline is None or deadline > item.deadline:
            item.deadline = deadline
            self._push_timer(deadline, _DEADLINE, item)
        return []

    def on_result(  # noqa: PLR0917 - the event signature others code against
        self,
        node: str,
        image: str,
        attempt: int,
        ok: bool,
        reason: str,
        transient: bool,
        now: float,
    ) -> list[Action]:
        """The node finished an attempt. Stale or unknown results are ignored.

        A result numbered above every attempt this scheduler sent comes from a previous
        coordinator's dispatch: a new coordinator numbers from what it knew at its takeover,
        and a node may have moved on since (it restarted, or ran a later dispatch of the old
        coordinator). Ignoring it stalled the plan: the node answers a repeated dispatch of
        what it ran or runs under that higher number, so no answer would ever match. Its
        number is adopted instead (see `_from_earlier_coordinator`)."""
        self._now = max(self._now, now)
        item = self._items.get((node, image))
        if item is not None and item.state in ("pending", "pulling") and attempt > item.attempt:
            return self._from_earlier_coordinator(item, attempt, ok, reason, transient, now)
        if item is None or item.state != "pulling" or item.attempt != attempt:
            log.debug(
                "stale result ignored node=%s image=%s attempt=%d current=%s",
                node,
                image,
                attempt,
                None if item is None else item.attempt,
            )
            return []
        self._heard_from(self._nodes[node])
        self._leave_flight(item)
        actions: list[Action] = []
        if ok:
            self._finish(item, "done", "", actions)
        else:
            self._fail(item, reason, transient, now, actions)
        actions.extend(self._fill(now, (self._nodes[node],)))
        return actions

    def _from_earlier_coordinator(  # noqa: PLR0917 - on_result's arguments
        self, item: _Item, attempt: int, ok: bool, reason: str, transient: bool, now: float
    ) -> list[Action]:
        """A result of an attempt this scheduler never sent. Its number is adopted, so the
        next dispatch outnumbers it. In flight, it answers the dispatch out there (the node
        answers a repeated dispatch of what it runs under the higher number). Queued, a
        success ends the item; a failure changes only the numbering (the queued dispatch
        decides)."""
        item.attempt = attempt
        if item.state == "pulling":
            return self.on_result(item.node, item.image, attempt, ok, reason, transient, now)
        if not ok:
            return []
        node = self._nodes[item.node]
        node.discard(item)
        if not node.dead:
            self._heard_from(node)
        self._refresh(node)
        actions: list[Action] = []
        self._finish(item, "done", "", actions)
        actions.extend(self._fill(now, (node,)))
        return actions

    def on_tick(self, now: float) -> list[Action]:
        """Time passed: time out overdue items, fail items of nodes down too long, start
        retries whose backoff has expired."""
        self._now = max(self._now, now)
        if not self._started or self._cancelled:
            return []
        overdue: dict[str, list[_Item]] = {}
        expired: list[_Node] = []
        touched: dict[str, _Node] = {}
        while self._timers and self._timers[0][0] <= now:
            at, _, kind, ref = heapq.heappop(self._timers)
            if not self._timer_valid(at, kind, ref):
                continue
            if kind == _DEADLINE:
                item = cast(_Item, ref)
                overdue.setdefault(item.node, []).append(item)
            elif kind == _NODE_DOWN:
                expired.append(cast(_Node, ref))
            elif kind == _NODE_RETRY:
                node = cast(_Node, ref)
                touched[node.name] = node
            else:
                node = self._nodes[cast(_Item, ref).node]
                touched[node.name] = node
        actions: list[Action] = []
        failed: list[_Item] = []
        for name, items in overdue.items():
            items.sort(key=_Item.sort_key)
            actions.append(Abort(name, tuple(i.image for i in items)))
            for item in items:
                self._leave_flight(item)
                touched[name] = self._nodes[name]
            failed.extend(items)
        for item in failed:
            log.info(
                "item timed out node=%s image=%s attempt=%d", item.node, item.image, item.attempt
            )
            self._fail(item, TIMEOUT, True, now, actions)
        for node in expired:
            if node.inflight:
                continue  # a re-dispatch is out: its reply or failure decides (on_dispatch_failed)
            self._give_up(node, actions)
        actions.extend(self._fill(now, touched.values()))
        return actions

    def on_node_down(self, node: str, now: float) -> list[Action]:
        """Membership says `node` is dead. Its in-flight items go back to its queue (the
        failure is not theirs) and it stops holding a parallelism slot, so another node can
        start. Nothing goes to it until `on_node_up`. May be called before `start`."""
        self._now = max(self._now, now)
        n = self._nodes.get(node)
        if n is None or n.dead or self._cancelled:
            return []
        n.dead = True
        actions: list[Action] = []
        self._lose(n, now, actions)
        actions.extend(self._fill(now, ()))
        return actions

    def on_node_up(self, node: str, now: float) -> list[Action]:
        """Membership says `node` is alive again: its queue is dispatched at once."""
        self._now = max(self._now, now)
        n = self._nodes.get(node)
        if n is None or self._cancelled or (not n.dead and n.away_since is None):
            return []
        n.dead = False
        self._heard_from(n)
        return self._fill(now, ())

    def on_dispatch_failed(
        self, node: str, dispatched: Iterable[tuple[str, int]], now: float
    ) -> list[Action]:
        """A dispatch of `(image, attempt)` pairs could not be delivered to `node` (refused,
        reset, timed out). That is the node's absence, not a pull failure: everything in flight
        there goes back to its queue without using up `retries`, and the node gets a cheap
        re-dispatch after a backoff (or at once on `on_node_up`). Once it has been away
        `node_down_timeout_s`, its queued items fail with `node unavailable`. A failure of a
        dispatch whose items moved on since (stale) changes nothing."""
        self._now = max(self._now, now)
        n = self._nodes.get(node)
        if n is None or self._cancelled:
            return []
        if not any(
            (i := n.inflight.get(image)) is not None and i.attempt == attempt
            for image, attempt in dispatched
        ):
            return []
        n.misses += 1
        actions: list[Action] = []
        self._lose(n, now, actions)
        if n.queue:
            n.retry_at = now + self.redispatch_delay(n.misses)
            self._push_timer(n.retry_at, _NODE_RETRY, n)
            # Once per absence at INFO: a node away for minutes misses a dispatch every few s.
            log.log(
                logging.INFO if n.misses == 1 else logging.DEBUG,
                "node unreachable, re-dispatch later node=%s misses=%d at=%.3f",
                node,
                n.misses,
                n.retry_at,
            )
        actions.extend(self._fill(now, ()))
        return actions

    def on_reachable(self, node: str, now: float) -> list[Action]:
        """`node` answered (it accepted a dispatch): it is no longer away."""
        self._now = max(self._now, now)
        n = self._nodes.get(node)
        if n is None or n.dead or self._cancelled:
            return []
        self._heard_from(n)
        return []

    def cancel(self, now: float) -> list[Action]:
        """Cancel the plan: abort everything in flight, every open item ends `cancelled`."""
        self._now = max(self._now, now)
        if self._cancelled:
            return []
        self._cancelled = True
        actions: list[Action] = []
        finals: list[Action] = []
        for node in self._nodes.values():
            if node.inflight:
                inflight = sorted(node.inflight.values(), key=_Item.sort_key)
                actions.append(Abort(node.name, tuple(i.image for i in inflight)))
                for item in inflight:
                    self._leave_flight(item)
                    self._finish(item, "cancelled", CANCELLED, finals)
            for item in node.clear():
                self._finish(item, "cancelled", CANCELLED, finals)
            self._refresh(node)
        self._timers.clear()
        return actions + finals

    def redispatch_delay(self, misses: int) -> float:
        """The delay before re-dispatching to a node after `misses` undelivered dispatches in
        a row: `redispatch_base_s` doubling up to `redispatch_cap_s`, jittered to [1/2, 1] of
        that (never zero: a refused connection fails at once). Draws from the rng."""
        ceiling = self._redispatch_base_s * 2.0 ** min(misses - 1, 32)
        return min(self._redispatch_cap_s, ceiling) * self._rng.uniform(0.5, 1.0)

    def backoff_delay(self, retry: int) -> float:
        """The jittered delay before retry number `retry` (1-based); draws from the rng."""
        ceiling = self._backoff_base_s
        for _ in range(retry - 1):
            ceiling *= self._backoff_factor
            if ceiling >= self._backoff_cap_s:
                break
        return self._rng.uniform(0.0, min(self._backoff_cap_s, ceiling))

    # --- internals --------------------------------------------------------------------------

    def _push_timer(self, at: float, kind: int, ref: _Item | _Node) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, kind, ref))

    def _timer_valid(self, at: float, kind: int, ref: object) -> bool:
        if kind == _DEADLINE:
            item = cast(_Item, ref)
            return item.state == "pulling" and item.deadline == at
        if kind == _RETRY:
            item = cast(_Item, ref)
            return item.state == "pending" and item.not_before == at
        node = cast(_Node, ref)
        if kind == _NODE_RETRY:
            return not node.dead and node.retry_at == at and bool(node.queue)
        # Valid for as long as this absence lasts, whatever the node's queue holds right now:
        # a re-dispatch in flight empties the queue for a moment, and `next_wakeup` drops
        # invalid timers for good, so a queue check here lost the verdict for ever.
        return node.away_since is not None and node.away_since + self._node_down_timeout_s == at

    def _refresh(self, node: _Node) -> None:
        """Keep `_idle` exact: the nodes a free parallelism slot may go to (an unreachable
        node's `retry_at` is checked when a slot is handed out)."""
        if node.queue and not node.inflight and not node.dead:
            self._idle[node.name] = node
        else:
            self._idle.pop(node.name, None)

    def _lose(self, node: _Node, now: float, out: list[Action]) -> None:
        """The node went away: its in-flight items go back to its queue, uncharged, and the
        node_down_timeout_s countdown starts. If it ran out already (its timer fired while a
        re-dispatch was out), the queue fails now: no timer is left to do it later."""
        for item in list(node.inflight.values()):
            self._leave_flight(item)
            item.state = "pending"
            item.not_before = -math.inf
            node.enqueue(item)
        if node.away_since is None:
            node.away_since = now
            self._push_timer(now + self._node_down_timeout_s, _NODE_DOWN, node)
        elif now >= node.away_since + self._node_down_timeout_s:
            self._give_up(node, out)
        self._refresh(node)

    def _heard_from(self, node: _Node) -> None:
        """The node is reachable: it is no longer away."""
        node.away_since = None
        node.misses = 0
        node.retry_at = -math.inf
        self._refresh(node)

    def _give_up(self, node: _Node, out: list[Action]) -> None:
        items = node.clear()
        if items:
            log.warning(
                "node unavailable, failing its items node=%s items=%d", node.name, len(items)
            )
        for item in items:
            self._finish(item, "failed", NODE_UNAVAILABLE, out)
        self._refresh(node)

    def _leave_flight(self, item: _Item) -> None:
        node = self._nodes[item.node]
        del node.inflight[item.image]
        if not node.inflight:
            self._busy.pop(node.name, None)
        item.deadline = None
        self._refresh(node)

    def _finish(self, item: _Item, state: FinalState, reason: str, out: list[Action]) -> None:
        item.state = state
        item.reason = reason
        item.deadline = None
        self._open -= 1
        out.append(Final(item.node, item.image, state, reason))

    def _fail(
        self, item: _Item, reason: str, transient: bool, now: float, out: list[Action]
    ) -> None:
        if not transient:
            self._finish(item, "failed", reason, out)
            return
        if item.failures >= self.policy.retries:
            self._finish(item, "failed", f"retries exhausted: {reason}", out)
            return
        item.failures += 1
        item.state = "pending"
        item.reason = reason
        item.not_before = now + self.backoff_delay(item.failures)
        node = self._nodes[item.node]
        node.enqueue(item)
        self._refresh(node)
        self._push_timer(item.not_before, _RETRY, item)
        log.debug(
            "retry scheduled node=%s image=%s failures=%d at=%.3f reason=%s",
            item.node,
            item.image,
            item.failures,
            item.not_before,
            reason,
        )

    def _fill(self, now: float, touched: Iterable[_Node]) -> list[Action]:
        """Dispatch what the caps allow. `touched`: busy nodes that may have a free slot or a
        due retry; on start, node down/up every busy node is checked."""
        if not self._started or self._cancelled:
            return []
        cap = self.policy.per_node_parallelism
        batches: dict[str, list[_Item]] = {}
        candidates = list(touched) if touched else list(self._busy.values())
        # Busy nodes first: topping them up costs no new parallelism slot.
        for node in candidates:
            if node.name not in self._busy or node.dead:
                continue
            free = cap - len(node.inflight)
            if free > 0:
                taken = node.take(now, free)
                if taken:
                    batches[node.name] = taken
        slots = self.policy.parallelism - len(self._busy)
        if slots > 0 and self._idle:
            # Most remaining bytes first; eligibility is checked only for the nodes popped.
            ranked = [(-n.queued_bytes, n.order, n) for n in self._idle.values()]
            heapq.heapify(ranked)
            while ranked and slots > 0:
                node = heapq.heappop(ranked)[2]
                if node.retry_at > now:
                    continue  # unreachable: its re-dispatch timer brings it back
                taken = node.take(now, cap)
                if taken:
                    batches[node.name] = taken
                    self._busy[node.name] = node
                    slots -= 1
        actions: list[Action] = []
        deadline = now + self.policy.timeout_s + self._timeout_slack_s
        for name, taken in batches.items():
            node = self._nodes[name]
            taken.sort(key=_Item.sort_key)
            for item in taken:
                item.attempt += 1
                item.state = "pulling"
                item.not_before = -math.inf
                item.deadline = deadline
                node.inflight[item.image] = item
                self._push_timer(deadline, _DEADLINE, item)
            self._refresh(node)
            actions.append(
                Dispatch(
                    name,
                    tuple(
                        DispatchItem(i.image, i.digest, i.attempt, self.policy.timeout_s)
                        for i in taken
                    ),
                )
            )
        return actions
