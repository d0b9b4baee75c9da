"""`CoordinatorService`: the async shell around the pure `NodeCore`.

It moves bytes and time: peer messages from the membership bus become `NodeCore.receive`
events, the core's actions become sealed datagrams, requests, store writes (durable before any
later action of the same batch) and executor calls. It also owns the client-facing side of
plans: parsing and validating a submission, resolving targets against the members, resolving
every tag to one digest at the registry, forwarding to the coordinator when this node is not it,
and rendering plan status and progress events from the local replica.

Stored plan documents (immutable once accepted) have this shape::

    {"spec": PlanSpec.to_document() (no credentials),
     "groups": [{"image", "digest", "nodes": [names]}],
     "names": {node_id: name},
     "unknown_nodes": [...], "empty_selectors": [...],
     "unresolved": {image: {"reason", "detail"}},   # failed before any node pulled
     "sealed_auth": base64 | absent,                # registry credentials, SecretBox-sealed
     "via": name of the node that took the submission}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any

from houndd.config import Config
from houndd.coordinator import messages as m
from houndd.coordinator.classify import classify
from houndd.coordinator.messages import (
    AbortLocal,
    AckClient,
    Action,
    Execute,
    Persist,
    Reply,
    Request,
    Send,
)
from houndd.coordinator.node import ExecutorReport, NodeCore
from houndd.coordinator.plan import (
    MAX_NAME_CHARS,
    PlanSpec,
    Policy,
    TargetNode,
    parse_plan,
    resolve_targets,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.store import Store
from houndd.errors import (
    HounddError,
    NoCoordinatorError,
    PlanError,
    PlanFinishedError,
    PullError,
    ReplicationError,
    WireError,
)
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import parse_reference
from houndd.image.registry import RegistryClient
from houndd.membership.member import Member, MemberState
from houndd.membership.service import Membership
from houndd.metrics import Metrics
from houndd.puller.engine import Engine
from houndd.puller.executor import Executor, ItemReport, WorkItem
from houndd.wire import Keyring, MsgType
from houndd.wire.codec import Envelope

log = logging.getLogger("houndd.coordinator")

PRUNE_ITEM = "(prune)"
"""The image column of a prune item: one per node, no image involved."""
EVENT_POLL_S = 1.0
"""An event stream looks at the replica on every change, and at least this often."""
MAX_TICK_WAIT_S = 0.5
HOUSEKEEPING_S = 30.0
"""How often the executor's records of finished plans are dropped (the core's replica still
dedupes their items, so nothing is pulled again)."""
KEEP_PRESENT_MARK = "/keep-present/"
"""Derived plans of a keep_present plan are named `<plan name>/keep-present/<node>`."""
RESOLVE_CONCURRENCY = 8
"""Registry manifest requests in flight for one submission."""
FINISHED = ("done", "failed", "cancelled")
"""Plan states after which nothing changes any more."""
# Core message types the shell handles itself instead of the core.
_SHELL_TYPES = frozenset({"PLAN_FORWARD", "PLAN_REPLY"})


def _msg_type(name: str) -> MsgType:
    return MsgType[name]


def _plan_id() -> str:
    return secrets.token_hex(6)


def _fmt(content_type: str) -> str | None:
    if "json" in content_type:
        return "json"
    if "yaml" in content_type or "yml" in content_type:
        return "yaml"
    return None


def _plan_error_problem(e: PlanError) -> dict[str, Any]:
    return {"status": 400, "title": "invalid plan", "detail": e.reason, "field": e.field}


class NotCoordinator(NoCoordinatorError):
    """This node lost (or never had) the coordinator role while handling a submission."""


NOT_COORDINATOR = "not the coordinator"


class ForwardedProblem(HounddError):
    """The coordinator refused a forwarded submission; carries its problem fields."""

    def __init__(self, problem: Mapping[str, Any]) -> None:
        super().__init__(str(problem.get("detail") or problem.get("title")))
        self.problem = dict(problem)


class CoordinatorService:
    """One node's coordinator/worker shell. `start()` loads state; `run()` until cancelled."""

    def __init__(
        self,
        config: Config,
        *,
        membership: Membership,
        store: Store,
        executor: Executor,
        registry: RegistryClient,
        metrics: Metrics,
        keyring: Keyring,
        engine: Engine | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.membership = membership
        self.store = store
        self.executor = executor
        self.registry = registry
        self.metrics = metrics
        self.keyring = keyring
        self.engine = engine
        self._rng = rng or random.Random()
        self._clock = clock
        self._core: NodeCore | None = None
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._dispatch_sent: dict[tuple[str, str], float] = {}
        self._changed = asyncio.Event()
        self.refused: Counter[str] = Counter()

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def core(self) -> NodeCore:
        if self._core is None:
            raise HounddError("the coordinator service is not started")
        return self._core

    @property
    def node_id(self) -> str:
        return self.membership.local.node_id

    def start(self) -> None:
        """Load the persisted state and build the core (sync: SQLite on local disk)."""
        persisted = self.store.load()
        self._core = NodeCore(
            self.node_id,
            self.config,
            self._rng,
            self._clock(),
            persisted,
            policy_for=lambda doc: PlanSpec.from_document(doc["spec"]).policy,
            scheduler_options={"node_down_timeout_s": self.config.node_return_timeout_s},
        )
        self._core.election.wait_for_discovery()  # until the daemon's discovery_round_done
        for name in m.PAYLOADS:
            if name in _SHELL_TYPES:
                continue
            self.membership.register(_msg_type(name), self._on_message)
        self.membership.register(MsgType.PLAN_FORWARD, self._on_forward)
        self.membership.subscribe(self._on_member_change)

    async def run(self) -> None:
        """Drive the core's timers and carry out its actions until cancelled."""
        core = self.core
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                await self._apply(self._membership_event())
                housekeeping_at = self._clock() + HOUSEKEEPING_S
                while True:
                    if self._clock() >= housekeeping_at:
                        housekeeping_at = self._clock() + HOUSEKEEPING_S
                        self._forget_finished()
                    delay = min(core.next_wakeup() - self._clock(), MAX_TICK_WAIT_S)
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), delay)
                    self._wake.clear()
                    await self._apply(core.tick(self._clock()))
            finally:
                self._tg = None

    def discovery_round_done(self) -> None:
        """Discovery ran once: the election's join window starts now."""
        self.core.election.discovery_round_done(self._clock())
        self._wake.set()

    def _forget_finished(self) -> None:
        """Drop the executor's memory of plans that are final here: its job table would
        otherwise grow for the life of the daemon."""
        replica = self.core.replica
        for rec in replica.plans():
            results = replica.results(rec.plan_id)
            mine = [
                results.get((it.node_id, it.image))
                for it in rec.items
                if it.node_id == self.node_id
            ]
            if replica.cancelled(rec.plan_id) or all(r is not None and r.is_final for r in mine):
                self.executor.forget(rec.plan_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(coro)

    # --- core plumbing ---------------------------------------------------------------------

    async def _apply(self, actions: Iterable[Action]) -> Reply | None:
        """Carry out actions in order; Persist is durable before anything after it."""
        reply: Reply | None = None
        for action in actions:
            if isinstance(action, Persist):
                self.store.apply(action)
                self._notify_change()
            elif isinstance(action, Send):
                if action.msg_type == "FENCED":
                    self.metrics.fenced.inc()
                with contextlib.suppress(HounddError, OSError):
                    await self.membership.send(
                        action.node_id, _msg_type(action.msg_type), m.to_wire(action.payload)
                    )
            elif isinstance(action, Request):
                if action.msg_type == "DISPATCH":
                    self._dispatch_sent[(action.payload.plan_id, action.node_id)] = self._clock()
                self._spawn(self._request(action))
            elif isinstance(action, Reply):
                reply = action
            elif isinstance(action, Execute):
                self._execute(action)
            elif isinstance(action, AbortLocal):
                self.executor.abort(action.plan_id, list(action.images))
            elif isinstance(action, AckClient):
                fut = action.client_ref
                if isinstance(fut, asyncio.Future) and not fut.done():
                    fut.set_result(action)
        self.metrics.term.set(self.core.term)
        return reply

    def _notify_change(self) -> None:
        """Wake every event stream: the replica changed."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _request(self, action: Request) -> None:
        sent_key = (getattr(action.payload, "plan_id", ""), action.node_id)
        try:
            await self._request_once(action)
        finally:
            if action.msg_type == "DISPATCH":
                self._dispatch_sent.pop(sent_key, None)

    async def _request_once(self, action: Request) -> None:
        try:
            env = await self.membership.request(
                action.node_id, _msg_type(action.msg_type), m.to_wire(action.payload)
            )
        except HounddError as e:
            log.debug("request failed peer=%s type=%s error=%s", action.node_id, action.msg_type, e)
            await self._apply(self.core.request_failed(action.token, self._clock()))
            return
        if env.type is MsgType.ACK or env.payload is None:
            await self._apply(self.core.request_failed(action.token, self._clock()))
            return
        try:
            payload = m.from_wire(env.type.name, env.payload)
        except (WireError, KeyError) as e:
            log.warning("bad reply peer=%s type=%s error=%s", env.sender, env.type.name, e)
            await self._apply(self.core.request_failed(action.token, self._clock()))
            return
        if action.msg_type == "DISPATCH":
            sent = self._dispatch_sent.pop((action.payload.plan_id, action.node_id), None)
            if sent is not None:
                self.metrics.dispatch_latency.observe(self._clock() - sent)
        await self._apply(
            self.core.response(action.token, env.sender, env.type.name, payload, self._clock())
        )

    async def _on_message(self, env: Envelope) -> tuple[MsgType, dict[str, Any]] | None:
        name = env.type.name
        try:
            payload = m.from_wire(name, env.payload)
        except WireError as e:
            self.refused["payload"] += 1
            log.debug("payload refused peer=%s type=%s error=%s", env.sender, name, e)
            return None
        reply = await self._apply(self.core.receive(env.sender, name, payload, self._clock()))
        self._wake.set()
        if reply is None:
            return None
        return _msg_type(reply.msg_type), m.to_wire(reply.payload)

    def _membership_event(self) -> list[Action]:
        # SWIM's suspect members are still members: only a confirmed death (or a missed
        # coordinator heartbeat, which the election watches itself) should move work away.
        alive = [
            mb.node_id
            for mb in self.membership.members()
            if mb.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        names = {mb.node_id: mb.name for mb in self.membership.members()}
        return self.core.membership(alive, names, self._clock())

    def _on_member_change(self, member: Member, old: MemberState | None, new: MemberState) -> None:
        if old == new:
            return  # metadata only
        if self._tg is None:
            return
        self._spawn(self._member_changed())

    async def _member_changed(self) -> None:
        await self._apply(self._membership_event())
        self._wake.set()

    # --- worker side -----------------------------------------------------------------------

    def _execute(self, action: Execute) -> None:
        rec = self.core.replica.plan(action.plan_id)
        if rec is None:
            log.warning("dispatch for an unknown plan plan=%s", action.plan_id)
            return
        spec_doc = rec.document.get("spec", {})
        op = spec_doc.get("action", "pull")
        policy = spec_doc.get("policy", {})
        credentials = self._unseal_credentials(rec.document)
        # Blob sharing builds each blob's tree from the nodes that need the same bits.
        needing: dict[str, set[str]] = {}
        for planned in rec.items:
            needing.setdefault(planned.digest, set()).add(planned.node_id)
        items = []
        for it in action.items:
            auth = None
            if op == "pull" and credentials:
                with contextlib.suppress(PlanError, ValueError):
                    auth = _auth_for(it.image, credentials)
            items.append(
                WorkItem(
                    op=op,
                    image=it.image,
                    digest=it.digest,
                    attempt=it.attempt,
                    timeout_s=it.timeout_s,
                    pull_policy=policy.get("pull_policy", "IfNotPresent"),
                    auth=auth,
                    peers=tuple(sorted(needing.get(it.digest, ()))) if it.digest else (),
                )
            )
        self.executor.submit(
            action.plan_id, items, per_node_parallelism=int(policy.get("per_node_parallelism", 3))
        )

    def on_report(self, report: ItemReport) -> None:
        """Executor callback (sync): feed the core from the event loop."""
        if self._core is None:
            return
        state = {"pulling": ItemState.PULLING, "done": ItemState.DONE, "failed": ItemState.FAILED}
        result = ItemResult(
            state=state[report.state],
            attempt=report.attempt,
            digest=report.digest,
            bytes_done=report.bytes_done,
            bytes_total=report.bytes_total,
            reason=report.reason,
            detail=report.detail,
            started_at=report.started_at,
            finished_at=report.finished_at,
            skipped=report.skipped,
            transient=report.transient,
        )
        if report.state == "done" and report.op == "pull" and not report.skipped:
            self.metrics.bytes_pulled.inc(report.bytes_total)
        if report.state in ("done", "failed") and report.started_at and report.finished_at:
            self.metrics.pull_duration.labels(report.state).observe(
                max(0.0, report.finished_at - report.started_at)
            )
        actions = self.core.executor_report(
            ExecutorReport(report.plan_id, report.image, result), self._clock()
        )
        self._spawn(self._apply_and_wake(actions))

    async def _apply_and_wake(self, actions: list[Action]) -> None:
        await self._apply(actions)
        self._wake.set()

    def _unseal_credentials(self, document: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        sealed = document.get("sealed_auth")
        if not sealed:
            return {}
        try:
            plain = self.keyring.open(base64.b64decode(sealed))
            creds = json.loads(plain)
        except (WireError, binascii.Error, ValueError) as e:
            log.warning("plan credentials unreadable (key removed?) error=%s", type(e).__name__)
            return {}
        return creds if isinstance(creds, dict) else {}

    # --- queries ---------------------------------------------------------------------------

    def coordinator(self) -> tuple[str | None, int]:
        if self._core is None:
            return None, 0
        return self._core.coordinator(self._clock()), self._core.term

    def items_by_state(self) -> dict[tuple[str, ...], float]:
        counts: Counter[str] = Counter({s.value: 0 for s in ItemState})
        if self._core is not None:
            for rec in self._core.replica.plans():
                for res in self._core.replica.results(rec.plan_id).values():
                    counts[res.state.value] += 1
        return {(k,): float(v) for k, v in counts.items()}

    def plans_by_state(self) -> dict[tuple[str, ...], float]:
        counts: Counter[str] = Counter(
            {s: 0 for s in ("pending", "running", "done", "failed", "cancelled")}
        )
        for p in self.plans():
            counts[str(p["state"])] += 1
        return {(k,): float(v) for k, v in counts.items()}

    def plans(self) -> list[dict[str, Any]]:
        if self._core is None:
            return []
        views = [self._view(rec.plan_id, items=False) for rec in self._core.replica.plans()]
        return sorted((v for v in views if v), key=lambda v: -float(v["accepted_at"]))

    def plan(self, plan_id: str) -> dict[str, Any] | None:
        return self._view(plan_id, items=True)

    def _name(self, node_id: str, names: Mapping[str, str]) -> str:
        if node_id in names:
            return names[node_id]
        member = self.membership.get(node_id)
        return member.name if member else node_id

    def _view(self, plan_id: str, *, items: bool) -> dict[str, Any] | None:
        core = self.core
        rec = core.replica.plan(plan_id)
        if rec is None:
            return None
        doc = rec.document
        spec = doc.get("spec", {})
        names = doc.get("names", {})
        results = core.replica.results(plan_id)
        cancelled = core.replica.cancelled(plan_id) is not None
        rows: list[dict[str, Any]] = []
        for it in rec.items:
            res = results.get((it.node_id, it.image), ItemResult())
            rows.append(
                {
                    "node": self._name(it.node_id, names),
                    "node_id": it.node_id,
                    "image": it.image,
                    "digest": it.digest or res.digest,
                    "size_bytes": it.size_bytes,
                    "final": res.is_final or (cancelled and res.state is not ItemState.PULLING),
                    **res.to_dict(),
                }
            )
            if cancelled and res.state is ItemState.PENDING:
                rows[-1]["state"] = "cancelled"
        for image, failure in doc.get("unresolved", {}).items():
            for group in doc.get("groups", []):
                if group["image"] != image:
                    continue
                for node in group["nodes"]:
                    rows.append(
                        {
                            "node": node,
                            "image": image,
                            "digest": "",
                            "state": "failed",
                            "attempt": 0,
                            "reason": failure.get("reason", ""),
                            "detail": failure.get("detail", ""),
                            "final": True,
                            "bytes_done": 0,
                            "bytes_total": 0,
                        }
                    )
        summary: Counter[str] = Counter(
            {"total": 0, "done": 0, "failed": 0, "pulling": 0, "pending": 0, "cancelled": 0}
        )
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
        coordinator, term = self.coordinator()
        view: dict[str, Any] = {
            "id": plan_id,
            "name": spec.get("name", ""),
            "action": spec.get("action", "pull"),
            "state": state,
            "accepted_at": rec.accepted_at,
            "committed": rec.committed,
            "via": doc.get("via"),
            "coordinator": self._name(coordinator, {}) if coordinator else None,
            "term": term,
            "summary": dict(summary),
        }
        if items:
            view["policy"] = spec.get("policy", {})
            view["groups"] = doc.get("groups", [])
            view["unknown_nodes"] = doc.get("unknown_nodes", [])
            view["empty_selectors"] = doc.get("empty_selectors", [])
            view["items"] = sorted(rows, key=lambda r: (r["node"], r["image"]))
        return view

    async def events(self, plan_id: str) -> AsyncIterator[dict[str, Any]]:
        """A snapshot, then changed items as they change, then the final plan."""
        view = self.plan(plan_id)
        if view is None:
            return
        yield {"event": "snapshot", "plan": view}
        seen = {(r["node"], r["image"]): r for r in view["items"]}
        while view["state"] not in ("done", "failed", "cancelled"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), EVENT_POLL_S)
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

    # --- submission ------------------------------------------------------------------------

    async def submit(self, body: bytes, content_type: str) -> dict[str, Any]:
        """Validate, then run the submission here if this node coordinates, else forward it."""
        spec = parse_plan(body, fmt=_fmt(content_type))  # type: ignore[arg-type]
        deadline = self._clock() + self.config.submit_wait_s
        while True:
            coordinator = self.core.coordinator(self._clock())
            try:
                if coordinator == self.node_id:
                    return await self._accept(spec, via=self.membership.local.name)
                if coordinator is not None:
                    return await self._forward(coordinator, body, content_type)
            except NotCoordinator:
                pass  # the role moved while we worked: find the new coordinator
            except ForwardedProblem as e:
                if e.problem.get("title") != NOT_COORDINATOR:
                    raise _problem_to_error(e.problem) from None
            except (PlanError, ReplicationError):
                raise
            except HounddError as e:
                log.info("forward failed coordinator=%s error=%s", coordinator, e)
            if self._clock() >= deadline:
                raise NoCoordinatorError(
                    "no coordinator is reachable yet (election in progress?); retry shortly"
                )
            await asyncio.sleep(0.05)

    async def _forward(self, coordinator: str, body: bytes, content_type: str) -> dict[str, Any]:
        env = await self.membership.request(
            coordinator,
            MsgType.PLAN_FORWARD,
            {"body": body, "content_type": content_type, "via": self.membership.local.name},
            timeout_s=self.config.peer_request_timeout_s * 3,
        )
        payload = env.payload if isinstance(env.payload, dict) else {}
        if payload.get("ok") is True and isinstance(payload.get("result"), dict):
            return dict(payload["result"])
        raise ForwardedProblem(payload.get("problem") or {"title": "forward failed", "status": 502})

    async def _on_forward(self, env: Envelope) -> tuple[MsgType, dict[str, Any]]:
        p = env.payload if isinstance(env.payload, dict) else {}
        body, ctype, via = p.get("body"), p.get("content_type"), p.get("via")
        if not isinstance(body, bytes) or not isinstance(ctype, str) or not isinstance(via, str):
            problem = {"status": 400, "title": "bad forward", "detail": "malformed"}
            return MsgType.PLAN_FORWARD_REPLY, {"ok": False, "problem": problem}
        not_coordinator = {"status": 503, "title": NOT_COORDINATOR}
        if self.core.coordinator(self._clock()) != self.node_id:
            return MsgType.PLAN_FORWARD_REPLY, {"ok": False, "problem": not_coordinator}
        try:
            spec = parse_plan(body, fmt=_fmt(ctype))  # type: ignore[arg-type]
            result = await self._accept(spec, via=via)
        except NotCoordinator:
            return MsgType.PLAN_FORWARD_REPLY, {"ok": False, "problem": not_coordinator}
        except PlanError as e:
            return MsgType.PLAN_FORWARD_REPLY, {"ok": False, "problem": _plan_error_problem(e)}
        except HounddError as e:
            problem = {"status": 503, "title": type(e).__name__, "detail": str(e)}
            return MsgType.PLAN_FORWARD_REPLY, {"ok": False, "problem": problem}
        return MsgType.PLAN_FORWARD_REPLY, {"ok": True, "result": result}

    async def _accept(self, spec: PlanSpec, *, via: str) -> dict[str, Any]:
        """Coordinator: resolve targets and digests, store + replicate, answer once durable."""
        members = [mb for mb in self.membership.alive()]
        resolution = resolve_targets(spec, [TargetNode(mb.name, mb.labels) for mb in members])
        if not resolution.requests:
            raise PlanError(
                "targets",
                "no alive member matches the plan's targets"
                + (
                    f" (unknown nodes: {', '.join(resolution.unknown_nodes)})"
                    if resolution.unknown_nodes
                    else ""
                ),
            )
        by_name = {mb.name: mb for mb in members}
        groups = classify({n: imgs or [PRUNE_ITEM] for n, imgs in resolution.requests.items()})
        resolved: dict[str, tuple[str, int]] = {}
        unresolved: dict[str, dict[str, str]] = {}
        if spec.action == "pull":
            resolved, unresolved = await self._resolve_digests(spec, [g.image for g in groups])
        items: list[tuple[str, str, str, int]] = []
        for group in groups:
            if group.image in unresolved:
                continue
            digest, size = resolved.get(group.image, ("", 0))
            for node in group.nodes:
                items.append((by_name[node].node_id, group.image, digest, size))
        document: dict[str, Any] = {
            "spec": spec.to_document(),
            "groups": [
                {
                    "image": g.image,
                    "digest": resolved.get(g.image, ("", 0))[0],
                    "nodes": list(g.nodes),
                }
                for g in groups
            ],
            "names": {mb.node_id: mb.name for mb in members},
            "unknown_nodes": list(resolution.unknown_nodes),
            "empty_selectors": [dict(s) for s in resolution.empty_selectors],
            "unresolved": unresolved,
            "via": via,
        }
        if spec.credentials:
            sealed = self.keyring.seal(json.dumps(spec.credentials_document()).encode())
            document["sealed_auth"] = base64.b64encode(sealed).decode()
        plan_id = _plan_id()
        fut: asyncio.Future[AckClient] = asyncio.get_running_loop().create_future()
        await self._apply(self.core.submit(plan_id, document, items, self._clock(), fut))
        self._wake.set()
        ack = await asyncio.wait_for(fut, self.config.peer_request_timeout_s * 2 + 1)
        if not ack.ok and ack.reason == NOT_COORDINATOR:
            raise NotCoordinator(ack.reason)
        if not ack.ok:
            raise ReplicationError(f"plan not acknowledged: {ack.reason}")
        log.info(
            "plan accepted plan=%s name=%s items=%d unresolved=%d via=%s",
            plan_id,
            spec.name,
            len(items),
            len(unresolved),
            via,
        )
        return {
            "id": plan_id,
            "name": spec.name,
            "action": spec.action,
            "groups": document["groups"],
            "unknown_nodes": document["unknown_nodes"],
            "empty_selectors": document["empty_selectors"],
            "unresolved": unresolved,
            "coordinator": self.membership.local.name,
        }

    async def _resolve_digests(
        self, spec: PlanSpec, images: list[str]
    ) -> tuple[dict[str, tuple[str, int]], dict[str, dict[str, str]]]:
        """Every tag to one digest (and size, for largest-first), once per plan."""
        credentials = spec.credentials_document()
        gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)
        resolved: dict[str, tuple[str, int]] = {}
        unresolved: dict[str, dict[str, str]] = {}

        async def one(image: str) -> None:
            auth = _auth_for(image, credentials) if credentials else None
            async with gate:
                try:
                    r = await self.registry.resolve(image, auth)
                except PullError as e:
                    unresolved[image] = {"reason": e.reason, "detail": e.detail}
                    log.info("image not resolvable image=%s reason=%s", image, e.reason)
                    return
            resolved[image] = (r.digest, r.size_bytes)

        async with asyncio.TaskGroup() as tg:
            for image in images:
                tg.create_task(one(image))
        return resolved, unresolved

    # --- keep_present ----------------------------------------------------------------------

    async def keep_present_loop(self) -> None:
        """Worker side of keep_present plans: a node that matches such a plan's targets but
        lacks one of its images at the plan's digest (it joined later, its labels changed, or
        the image was removed) asks for a derived plan for itself through the normal submit
        path, so the coordinator, replication and progress work as for any plan."""
        if self.engine is None:
            return
        while True:
            await asyncio.sleep(self.config.keep_present_interval_s * self._rng.uniform(0.8, 1.2))
            try:
                await self._keep_present_round()
            except HounddError as e:
                log.info("keep-present round failed error=%s", e)

    async def _keep_present_round(self) -> None:
        assert self.engine is not None
        me = self.membership.local
        replica = self.core.replica
        busy = {str(v["name"]) for v in self.plans() if v["state"] in ("pending", "running")}
        for rec in replica.plans():
            spec_doc = rec.document.get("spec", {})
            if not spec_doc.get("policy", {}).get("keep_present"):
                continue
            if spec_doc.get("action", "pull") != "pull" or replica.cancelled(rec.plan_id):
                continue
            spec = PlanSpec.from_document(spec_doc)
            wanted = resolve_targets(spec, [TargetNode(me.name, me.labels)]).requests.get(me.name)
            suffix = f"{KEEP_PRESENT_MARK}{me.name}"
            name = spec.name[: MAX_NAME_CHARS - len(suffix)] + suffix
            if not wanted or name in busy:
                continue
            digests = {g["image"]: g["digest"] for g in rec.document.get("groups", [])}
            results = replica.results(rec.plan_id)
            mine = {it.image for it in rec.items if it.node_id == me.node_id}
            missing = []
            for image in wanted:
                digest = digests.get(image)
                if not digest:
                    continue  # never resolved: the plan reported it failed
                result = results.get((me.node_id, image), ItemResult())
                if image in mine and not result.is_final:
                    continue  # the plan itself is still working on it
                ref = parse_reference(image)
                if await self.engine.has_image(f"{ref.familiar_repository}@{digest}") == digest:
                    continue
                missing.append(f"{image}@{digest}" if not ref.digest else image)
            if not missing:
                continue
            body: dict[str, Any] = {
                "name": name,
                "targets": [{"images": missing, "nodes": [me.name]}],
                "policy": {**spec_doc.get("policy", {}), "keep_present": False},
            }
            credentials = self._unseal_credentials(rec.document)
            if credentials:
                body["auth"] = credentials
            log.info("keep-present plan=%s node=%s missing=%d", rec.plan_id, me.name, len(missing))
            await self.submit(json.dumps(body).encode(), "application/json")
            busy.add(name)

    async def cancel(self, plan_id: str) -> dict[str, Any] | None:
        """Cancel a running plan. A finished one raises `PlanFinishedError` and nothing is
        stored: its outcome stays what it was."""
        before = self.plan(plan_id)
        if before is not None and before["state"] in FINISHED:
            raise PlanFinishedError(plan_id, str(before["state"]))
        actions = self.core.cancel(plan_id, self._clock())
        await self._apply(actions)
        self.executor.abort(plan_id)
        self._wake.set()
        view = self.plan(plan_id)
        return {"id": plan_id, "state": "cancelled", "plan": view}


def _auth_for(image: str, credentials: Mapping[str, Mapping[str, str]]) -> RegistryAuth | None:
    from houndd.image.reference import parse_reference

    ref = parse_reference(image)
    cred = credentials.get(ref.registry)
    if not cred:
        return None
    if "token" in cred:
        # Docker's X-Registry-Auth takes a registry token as the identity token of a login
        return RegistryAuth(username="<token>", password=cred["token"], server=ref.registry)
    return RegistryAuth(cred.get("username", ""), cred.get("password", ""), ref.registry)


def _problem_to_error(problem: Mapping[str, Any]) -> HounddError:
    if problem.get("status") == 400 and problem.get("field"):
        return PlanError(str(problem["field"]), str(problem.get("detail", "")))
    if problem.get("status") == 503:
        return ReplicationError(str(problem.get("detail") or problem.get("title")))
    return HounddError(str(problem.get("detail") or problem.get("title")))


__all__ = ["CoordinatorService", "Policy"]
