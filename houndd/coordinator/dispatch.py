"""`DispatchRuntime`: the async shell that runs a node's `NodeCore`.

It moves bytes and time: peer messages from the bus become `NodeCore.receive` events, the
core's actions become sealed datagrams, requests, store commits (a commit that must be durable
is flushed by an fsync on a thread of its own, and is on disk before any later message leaves
the node) and calls into this node's executor (`LocalExecutor`, the worker adaptor), whose
reports flow back as core events. Nothing a peer sends, and no failure of a reply or of the
core itself, stops the loop: it is counted, logged once, and dropped.

Time: every timer runs on the monotonic clock, which is the `now` the core gets; the wall clock
only stamps what leaves the process or is persisted (plan acceptance, cancel and result times,
envelope timestamps), through `Clocks.wall`. A wall-clock step therefore neither triggers an
election nor times an item out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from houndd.config import Config
from houndd.coordinator.local import LocalExecutor, LocalWork
from houndd.coordinator.messages import (
    AbortLocal,
    AckClient,
    Action,
    Dispatch,
    Execute,
    Fenced,
    Persist,
    PlanGet,
    PlanGetReply,
    Reply,
    Request,
    Send,
)
from houndd.coordinator.node import HANDLED_TYPES, NodeCore
from houndd.coordinator.records import PlanDocument, PlanItem, PlanRecord
from houndd.coordinator.replication import PLAN_GET_RESULTS
from houndd.coordinator.results import ItemResult
from houndd.coordinator.sealed import unseal_credentials
from houndd.coordinator.store import Store
from houndd.coordinator.worker_role import ExecutorReport
from houndd.errors import HounddError
from houndd.image.credentials import plan_auth
from houndd.membership.bus import Bus, Message
from houndd.membership.member import Member, MemberState
from houndd.membership.service import Membership
from houndd.metrics import Metrics
from houndd.wire.keyring import Keyring

log = logging.getLogger("houndd.coordinator")

MAX_TICK_WAIT_S = 5.0
"""The longest the runtime sleeps without looking at its timers (they wake it themselves)."""
HOUSEKEEPING_S = 30.0
"""How often the executor's records of finished plans are dropped (the core's replica still
dedupes their items, so nothing is pulled again)."""


@dataclass(frozen=True)
class Clocks:
    """`mono` drives every timer; `wall` stamps what leaves the process or is persisted."""

    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic


class DispatchRuntime:
    """Runs the core: its timers, its messages, its actions. `start()` loads the store and
    builds the core (sync: SQLite on local disk); `run()` serves until cancelled."""

    def __init__(
        self,
        config: Config,
        *,
        bus: Bus,
        membership: Membership,
        store: Store,
        local: LocalExecutor,
        keyring: Keyring,
        metrics: Metrics,
        rng: random.Random | None = None,
        clocks: Clocks | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.membership = membership
        self.store = store
        self.local = local
        self.keyring = keyring
        self.metrics = metrics
        self.clocks = clocks or Clocks()
        self._rng = rng or random.Random()
        self._core: NodeCore | None = None
        self._wake = asyncio.Event()
        self._asleep_until = math.inf  # when the loop's current sleep ends
        self._changed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._dispatch_sent: dict[tuple[str, str], float] = {}
        self._plan_listeners: list[Callable[[PlanRecord], None]] = []
        # fsyncs run here, off the loop: one at a time, each covers every commit before it.
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="houndd-fsync")
        self._flushing: asyncio.Future[None] | None = None
        """The flush of the last commit that must be on disk before anything leaves."""

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def core(self) -> NodeCore:
        """The core (after `start()`)."""
        if self._core is None:
            raise HounddError("the coordinator runtime is not started")
        return self._core

    @property
    def started(self) -> bool:
        """True once `start()` built the core."""
        return self._core is not None

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.bus.node_id

    def start(self) -> None:
        """Load the persisted state, build the core and register its message types."""
        self._core = NodeCore(
            self.node_id,
            self.config,
            self._rng,
            self.clocks.mono(),
            self.store.load(),
            wall=self.clocks.wall,
            scheduler_options={"node_down_timeout_s": self.config.node_return_timeout_s},
        )
        self._core.election.wait_for_discovery()  # until discovery_round_done()
        for msg_type in sorted(HANDLED_TYPES):
            self.bus.register(msg_type, self._on_message)
        self.membership.subscribe(self._on_member_change)

    def discovery_round_done(self) -> None:
        """Discovery ran once: the election's join window starts now."""
        self.core.election.discovery_round_done(self.clocks.mono())
        self.wake()

    async def run(self) -> None:
        """Drive the core's timers and carry out its actions until cancelled."""
        core = self.core
        mono = self.clocks.mono
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                await self.apply(self._membership_event())
                housekeeping_at = mono() + HOUSEKEEPING_S
                while True:
                    if mono() >= housekeeping_at:
                        housekeeping_at = mono() + HOUSEKEEPING_S
                        self._forget_finished()
                    delay = min(core.next_wakeup() - mono(), MAX_TICK_WAIT_S)
                    if delay > 0:
                        self._asleep_until = mono() + delay
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await self._wake.wait()
                    self._asleep_until = -math.inf
                    self._wake.clear()
                    await self.bus.guard(self._tick(), "coordinator tick")
            finally:
                self._tg = None

    async def _tick(self) -> None:
        await self.apply(self.core.tick(self.clocks.mono()))

    def wake(self) -> None:
        """Run the core's timers now (something changed)."""
        self._wake.set()

    def wake_if_due(self) -> None:
        """Wake the loop if the core now has a timer before the end of the loop's sleep
        (most messages only push timers later: a heartbeat needs no extra round)."""
        if self._core is not None and self._core.next_wakeup() < self._asleep_until:
            self._wake.set()

    def on_plan_stored(self, callback: Callable[[PlanRecord], None]) -> None:
        """Call `callback(record)` whenever a plan record is stored here (a new plan, from a
        client or a peer, or its commit)."""
        self._plan_listeners.append(callback)

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when the replica changes next, or after `timeout_s`."""
        await self.wait_change(self.next_change(), timeout_s)

    def next_change(self) -> asyncio.Event:
        """An event set by the next change of the replica: take it before reading the
        replica, then `wait_change` on it, and no change in between is missed."""
        return self._changed

    @staticmethod
    async def wait_change(change: asyncio.Event, timeout_s: float) -> None:
        """Return once `change` (from `next_change`) is set, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await change.wait()

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run `coro` in the runtime's task group, guarded (closed if not running)."""
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(self.bus.guard(coro, what))

    # --- what the rest of the shell asks of the core ---------------------------------------

    def dispatches_in_flight(self) -> int:
        """DISPATCH requests sent and not answered yet."""
        return len(self._dispatch_sent)

    def coordinator(self) -> tuple[str | None, int]:
        """(coordinator node id or None, term) as this node sees them."""
        if self._core is None:
            return None, 0
        return self._core.coordinator(self.clocks.mono()), self._core.term

    async def accept(
        self, plan_id: str, document: PlanDocument, items: list[PlanItem], timeout_s: float
    ) -> AckClient:
        """Coordinator: store and replicate a plan; the answer once it is durable (G1)."""
        fut: asyncio.Future[AckClient] = asyncio.get_running_loop().create_future()
        await self.apply(self.core.submit(plan_id, document, items, self.clocks.mono(), fut))
        self.wake()
        async with asyncio.timeout(timeout_s):
            return await fut

    async def cancel(self, plan_id: str) -> None:
        """Cancel a plan from this node; in-flight local pulls stop."""
        await self.apply(self.core.cancel(plan_id, self.clocks.mono()))
        self.local.abort(plan_id)
        self.wake()

    async def fetch_plan(self, plan_id: str) -> bool:
        """Hold a plan this node does not hold, fetched page by page from a holder (the
        coordinator first, then the holders a part of it names): True once held here."""
        core = self.core
        if core.replica.plan(plan_id) is not None:
            return True
        coordinator, _ = self.coordinator()
        part = core.replica.part(plan_id)
        candidates = [coordinator, *(part.work.holders if part is not None else ())]
        for holder in dict.fromkeys(c for c in candidates if c and c != self.node_id):
            offset = 0
            while True:
                try:
                    reply = await self.bus.request_typed(
                        holder, PlanGet(plan_id, offset), PlanGetReply
                    )
                except HounddError as e:
                    log.info("plan fetch failed plan=%s peer=%s error=%s", plan_id, holder, e)
                    break
                if offset == 0 and reply.plan is None:
                    break  # not held there
                await self.apply(core.receive(holder, reply, self.clocks.mono()))
                if not reply.more:
                    return core.replica.plan(plan_id) is not None
                offset += PLAN_GET_RESULTS
        return False

    def report(self, plan_id: str, image: str, result: ItemResult) -> None:
        """The local executor's report (sync callback): feed the core from the event loop."""
        if self._core is None:
            return
        actions = self._core.executor_report(
            ExecutorReport(plan_id, image, result), self.clocks.mono()
        )
        self.spawn(self._apply_and_wake(actions), "executor report")

    # --- core plumbing ---------------------------------------------------------------------

    async def apply(self, actions: Iterable[Action]) -> Reply | None:
        """Carry out actions in order. A Persist is committed at once; one that must be on
        disk (`Store.commit` says so) is flushed on the fsync thread, and is flushed before
        any later action of `actions`. No message leaves the node (Send, Request, Reply,
        AckClient) before every such commit so far, a concurrent call's too, is flushed.
        Nothing waits for a commit that is derived again after a crash, and local effects
        (Execute, AbortLocal) do not wait for another call's flush: the loop goes on with
        other messages while the disk works."""
        reply: Reply | None = None
        own: asyncio.Future[None] | None = None
        for action in actions:
            if isinstance(action, Persist):
                if self.store.commit(action):
                    self._flushing = own = self._flush()
                self._notify_change(action)
            elif isinstance(action, Reply):
                await self._flushed()
                reply = action
            elif isinstance(action, Send | Request | AckClient):
                await self._flushed()
                await self._send(action)
            else:
                if own is not None:
                    await asyncio.shield(own)
                self._act_locally(action)
        if self._core is not None:
            self.metrics.term.set(self._core.term)
        return reply

    async def _send(self, action: Send | Request | AckClient) -> None:
        if isinstance(action, Send):
            if isinstance(action.payload, Fenced):
                self.metrics.fenced.inc()
            with contextlib.suppress(HounddError):
                await self.bus.send(action.node_id, action.payload)
        elif isinstance(action, Request):
            if isinstance(action.payload, Dispatch):
                sent_key = (action.payload.plan_id, action.node_id)
                self._dispatch_sent[sent_key] = self.clocks.mono()
            self.spawn(self._request(action), f"reply to {action.msg_type.name}")
        else:
            fut = action.client_ref
            if isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_result(action)

    def _act_locally(self, action: Action) -> None:
        if isinstance(action, Execute):
            self._execute(action)
        elif isinstance(action, AbortLocal):
            self.local.abort(action.plan_id, list(action.images))

    async def _flushed(self) -> None:
        """Return once the last write that must be on disk is (raise its error if it
        failed: what waited for it is not sent)."""
        pending = self._flushing
        if pending is None:
            return
        try:
            await asyncio.shield(pending)  # a cancelled waiter must not cancel the write
        finally:
            if self._flushing is pending and pending.done():
                self._flushing = None

    def _flush(self) -> asyncio.Future[None]:
        flushed = asyncio.get_running_loop().run_in_executor(self._flusher, self.store.flush)
        flushed.add_done_callback(_log_failed_flush)
        return flushed

    async def close(self) -> None:
        """Finish the flushes started so far (before the store is closed)."""
        await asyncio.to_thread(self._flusher.shutdown, wait=True)

    async def _apply_and_wake(self, actions: list[Action]) -> None:
        await self.apply(actions)
        self.wake()

    def _notify_change(self, persisted: Persist) -> None:
        """Wake every event stream: the replica changed; tell who listens for plans."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for record in persisted.records:
            if isinstance(record, PlanRecord):
                for listener in self._plan_listeners:
                    listener(record)

    async def _request(self, action: Request) -> None:
        sent_key = (getattr(action.payload, "plan_id", ""), action.node_id)
        try:
            await self._request_once(action)
        finally:
            if isinstance(action.payload, Dispatch):
                self._dispatch_sent.pop(sent_key, None)

    async def _request_once(self, action: Request) -> None:
        mono = self.clocks.mono
        try:
            reply = await self.bus.request(action.node_id, action.payload)
        except HounddError as e:
            log.debug(
                "request failed peer=%s type=%s error=%s", action.node_id, action.msg_type.name, e
            )
            await self.apply(self.core.request_failed(action.token, mono()))
            return
        if isinstance(action.payload, Dispatch):
            sent = self._dispatch_sent.pop((action.payload.plan_id, action.node_id), None)
            if sent is not None:
                self.metrics.dispatch_latency.observe(mono() - sent)
        await self.apply(self.core.response(action.token, reply.sender, reply.payload, mono()))

    async def _on_message(self, msg: Message) -> object | None:
        reply = await self.apply(self.core.receive(msg.sender, msg.payload, self.clocks.mono()))
        self.wake_if_due()
        return None if reply is None else reply.payload

    def _membership_event(self) -> list[Action]:
        # SWIM's suspect members are still members: only a confirmed death (or a missed
        # coordinator heartbeat, which the election watches itself) should move work away.
        members = self.membership.members()
        alive = [
            mb.node_id for mb in members if mb.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        names = {mb.node_id: mb.name for mb in members}
        return self.core.membership(alive, names, self.clocks.mono())

    def _on_member_change(self, member: Member, old: MemberState | None, new: MemberState) -> None:
        if old == new:
            return  # metadata only
        self.spawn(self._member_changed(), "membership change")

    async def _member_changed(self) -> None:
        await self.apply(self._membership_event())
        self.wake()

    # --- the local worker adaptor ----------------------------------------------------------

    def _execute(self, action: Execute) -> None:
        work = action.work
        credentials = unseal_credentials(self.keyring, work.sealed_auth)
        # Blob sharing builds each blob's tree from the nodes that need the same bits.
        peers = {p.digest: tuple(sorted(p.nodes.split(","))) for p in action.peers}
        items = []
        for it in action.items:
            auth = None
            if work.action == "pull":
                with contextlib.suppress(HounddError, ValueError):
                    auth = plan_auth(it.image, credentials)
            items.append(
                LocalWork(
                    op=work.action,
                    image=it.image,
                    digest=it.digest,
                    attempt=it.attempt,
                    timeout_s=it.timeout_s,
                    pull_policy=work.pull_policy,
                    auth=auth,
                    peers=peers.get(it.digest, ()) if it.digest else (),
                )
            )
        self.local.submit(action.plan_id, items, per_node_parallelism=work.per_node_parallelism)

    def _forget_finished(self) -> None:
        """Drop the executor's memory of plans that are final here: its job table would
        otherwise grow for the life of the daemon."""
        replica = self.core.replica
        plan_ids = [r.plan_id for r in replica.plans()] + [p.plan_id for p in replica.parts()]
        for pid in plan_ids:
            mine = replica.node_results(pid, self.node_id)
            if replica.cancelled(pid) or all(r.result.is_final for r in mine):
                self.local.forget(pid)


def _log_failed_flush(flushed: asyncio.Future[None]) -> None:
    if flushed.cancelled():
        return
    error = flushed.exception()
    if error is not None:
        log.error("store flush failed error=%s: %s", type(error).__name__, error)
