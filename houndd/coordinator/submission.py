"""`Submission`: the pipeline from a client's plan to an acknowledged, replicated plan.

Any node takes a submission: it parses and validates the body (in a child process, see
`plan.parser_process`), then runs it here if this node coordinates, else forwards the raw body
(PLAN_FORWARD) to the coordinator, so tag resolution happens once. The coordinator resolves the
targets against the alive members, classifies them into one group per image, resolves every tag
to one digest and size at its registry, asks every target which images it holds and how much
disk it has free (`holdings`), admits what fits (`admission`: the rest are failed items
`no space`), seals the plan's registry credentials with the cluster key, and hands the plan to
the core, which answers once enough durable copies exist (G1). A dry run does the same up to
admission and answers a `Preview` instead of storing anything.

The forward reply is typed (`PlanForwardReply`): the accepted plan, or a `Refusal` whose kind
maps to the error the API answers with: `invalid-plan` -> `PlanError` (400, naming the field),
`replication-failed` -> `ReplicationError` (503), `not-coordinator` -> the forwarding node looks
for the new coordinator until `submit_wait_s`, then `NoCoordinatorError` (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from houndd.config import Config
from houndd.coordinator.admission import Verdict, Wanted, admit
from houndd.coordinator.classify import Group as ClassGroup
from houndd.coordinator.classify import classify
from houndd.coordinator.coordinator_role import NOT_COORDINATOR
from houndd.coordinator.dispatch import DispatchRuntime
from houndd.coordinator.holdings import Answer, Holdings
from houndd.coordinator.messages import (
    Accepted,
    ImageAt,
    NodePreview,
    PlanForward,
    PlanForwardReply,
    Preview,
    Refusal,
)
from houndd.coordinator.plan import (
    PlanSpec,
    Resolution,
    TargetNode,
    format_of,
    resolve_targets,
)
from houndd.coordinator.plan.parser_process import PlanParser
from houndd.coordinator.records import Group, NoSpace, PlanDocument, PlanItem, Unresolved
from houndd.coordinator.sealed import seal_credentials
from houndd.errors import (
    HounddError,
    NoCoordinatorError,
    PlanError,
    PullError,
    ReplicationError,
)
from houndd.image.credentials import RegistryAuth, plan_auth
from houndd.image.registry import Resolved
from houndd.membership.bus import Bus, Message
from houndd.membership.member import Member
from houndd.membership.service import Membership
from houndd.wire.fields import MAX_ITEMS, MAX_SHORT_TEXT_CHARS
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.coordinator")

PRUNE_ITEM = "(prune)"
"""The image column of a prune item: one per node, no image involved."""
RESOLVE_CONCURRENCY = 8
"""Registry manifest requests in flight for one submission."""
RETRY_S = 0.05
"""Pause before looking for the coordinator again while the role moves."""
ROOMY_FACTOR = 2
"""A target whose gossiped free disk is this many times what a plan could need on it is
admitted without asking it (the gossiped figure may be 30 s old)."""


class NotCoordinator(NoCoordinatorError):
    """This node lost (or never had) the coordinator role while handling a submission."""


class Resolver(Protocol):
    """What the submission needs from the registry client: tag -> digest and size."""

    async def resolve(self, ref: str, auth: RegistryAuth | None = None) -> Resolved:
        """Resolve `ref`; `PullError` with a named reason when it cannot be."""
        ...


def new_plan_id() -> str:
    """A fresh plan id (12 hex digits)."""
    return secrets.token_hex(6)


@dataclass
class _Prepared:
    """What the coordinator worked out about a plan before storing it (or answering a dry
    run)."""

    members: list[Member]
    by_name: dict[str, Member]
    resolution: Resolution
    groups: list[ClassGroup]
    resolved: dict[str, Resolved] = field(default_factory=dict)
    unresolved: dict[str, Unresolved] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)  # node id -> holdings
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # node id -> admission

    @property
    def names(self) -> dict[str, str]:
        """node id -> name."""
        return {mb.node_id: mb.name for mb in self.members}

    def document_groups(self) -> tuple[Group, ...]:
        """The groups with their resolved digests."""
        return tuple(
            Group(g.image, self.resolved[g.image].digest if g.image in self.resolved else "",
                  g.nodes)
            for g in self.groups
        )  # fmt: skip


class Submission:
    """Takes submissions on this node; answers forwarded ones when it coordinates."""

    def __init__(
        self,
        config: Config,
        *,
        bus: Bus,
        membership: Membership,
        runtime: DispatchRuntime,
        registry: Resolver,
    ) -> None:
        self._config = config
        self._bus = bus
        self._membership = membership
        self._runtime = runtime
        self.registry = registry
        self.holdings = Holdings(bus, runtime.local)
        self._parser = PlanParser(config.plan_parse_timeout_s)
        bus.register(MsgType.PLAN_FORWARD, self._on_forward)

    async def start(self) -> None:
        """Start the plan parser's child process (else the first plan waits for it)."""
        await self._parser.start()

    async def close(self) -> None:
        """Stop the plan parser's child process."""
        await self._parser.close()

    async def submit(self, body: bytes, content_type: str) -> Accepted:
        """Validate, then run the submission here if this node coordinates, else forward it."""
        result = await self._route(body, content_type, dry_run=False)
        assert isinstance(result, Accepted)
        return result

    async def preview(self, body: bytes, content_type: str) -> Preview:
        """A dry run: what the plan would do on each target; nothing stored, nothing pulled."""
        result = await self._route(body, content_type, dry_run=True)
        assert isinstance(result, Preview)
        return result

    async def _route(self, body: bytes, content_type: str, *, dry_run: bool) -> Accepted | Preview:
        # a bad plan never leaves this node
        spec = await self._parser.parse(body, format_of(content_type))
        runtime = self._runtime
        mono = runtime.clocks.mono
        deadline = mono() + self._config.submit_wait_s
        while True:
            coordinator, _ = runtime.coordinator()
            try:
                if coordinator == runtime.node_id:
                    via = self._membership.local.name
                    if dry_run:
                        return await self.dry_run(spec, via=via)
                    return await self.accept(spec, via=via)
                if coordinator is not None:
                    return await self._forward(coordinator, body, content_type, dry_run)
            except NotCoordinator:
                pass  # the role moved while we worked: find the new coordinator
            except (PlanError, ReplicationError):
                raise
            except HounddError as e:
                log.info("forward failed coordinator=%s error=%s", coordinator, e)
            if mono() >= deadline:
                raise NoCoordinatorError(
                    "no coordinator is reachable yet (election in progress?); retry shortly"
                )
            await asyncio.sleep(RETRY_S)

    async def _forward(
        self, coordinator: str, body: bytes, content_type: str, dry_run: bool
    ) -> Accepted | Preview:
        request = PlanForward(body, content_type[:256], self._membership.local.name, dry_run)
        # the coordinator parses, resolves, asks the targets, then replicates
        config = self._config
        timeout = (
            config.peer_request_timeout_s * 3
            + config.plan_parse_timeout_s
            + config.preview_timeout_s
        )
        reply = await self._bus.request_typed(coordinator, request, PlanForwardReply, timeout)
        if reply.accepted is not None:
            return reply.accepted
        if reply.preview is not None:
            return reply.preview
        refusal = reply.refusal
        assert refusal is not None  # PlanForwardReply carries exactly one of the three
        if refusal.kind == "invalid-plan":
            raise PlanError(refusal.field or "document", refusal.reason)
        if refusal.kind == "not-coordinator":
            raise NotCoordinator(refusal.reason or NOT_COORDINATOR)
        raise ReplicationError(refusal.reason or "the coordinator could not store the plan")

    async def _on_forward(self, msg: Message) -> PlanForwardReply:
        p = msg.payload
        assert isinstance(p, PlanForward)  # the bus decodes by type
        if self._runtime.coordinator()[0] != self._runtime.node_id:
            return PlanForwardReply(refusal=Refusal("not-coordinator", NOT_COORDINATOR))
        try:
            spec = await self._parser.parse(p.body, format_of(p.content_type))
            if p.dry_run:
                return PlanForwardReply(preview=await self.dry_run(spec, via=p.via))
            accepted = await self.accept(spec, via=p.via)
        except NotCoordinator as e:
            return PlanForwardReply(refusal=Refusal("not-coordinator", str(e)[:1024]))
        except PlanError as e:
            refusal = Refusal("invalid-plan", e.reason[:1024], e.field[:256])
            return PlanForwardReply(refusal=refusal)
        except HounddError as e:
            return PlanForwardReply(refusal=Refusal("replication-failed", str(e)[:1024]))
        return PlanForwardReply(accepted=accepted)

    async def accept(self, spec: PlanSpec, *, via: str) -> Accepted:
        """Coordinator: resolve targets and digests, admit what fits on each target's disk,
        store + replicate, answer once durable."""
        prep = await self._prepare(spec)
        refused = {node: set(v.refused) for node, v in prep.verdicts.items() if v.refused}
        items: list[PlanItem] = []
        for group in prep.groups:
            if group.image in prep.unresolved:
                continue
            found = prep.resolved.get(group.image)
            digest, size = (found.digest, found.size_bytes) if found else ("", 0)
            for name in group.nodes:
                node_id = prep.by_name[name].node_id
                if group.image not in refused.get(node_id, ()):
                    items.append(PlanItem(node_id, group.image, digest, size))
        no_space = {
            node: NoSpace(
                {image: prep.resolved[image].size_bytes for image in sorted(images)},
                prep.verdicts[node].needed_bytes,
                prep.answers[node].free_disk_bytes or 0,
            )
            for node, images in refused.items()
        }
        document = PlanDocument.of(
            spec,
            groups=prep.document_groups(),
            names={mb.node_id: mb.name for mb in prep.members},
            unknown_nodes=tuple(prep.resolution.unknown_nodes),
            empty_selectors=tuple(dict(s) for s in prep.resolution.empty_selectors),
            unresolved=prep.unresolved,
            sealed_auth=(
                seal_credentials(self._runtime.keyring, spec.credentials)
                if spec.credentials
                else None
            ),
            via=via,
            no_space=no_space or None,
        )
        plan_id = new_plan_id()
        timeout = self._config.peer_request_timeout_s * 2 + 1
        ack = await self._runtime.accept(plan_id, document, items, timeout)
        if not ack.ok and ack.reason == NOT_COORDINATOR:
            raise NotCoordinator(ack.reason)
        if not ack.ok:
            raise ReplicationError(f"plan not acknowledged: {ack.reason}")
        log.info(
            "plan accepted plan=%s name=%s items=%d unresolved=%d no_space=%d via=%s",
            plan_id, spec.name, len(items), len(prep.unresolved),
            sum(len(v) for v in refused.values()), via,
        )  # fmt: skip
        return Accepted(
            plan_id=plan_id,
            name=spec.name,
            action=spec.action,
            groups=document.groups,
            unknown_nodes=document.unknown_nodes,
            empty_selectors=document.empty_selectors,
            unresolved=prep.unresolved,
            coordinator=self._membership.local.name,
            no_space={prep.names[node]: tuple(sorted(images)) for node, images in refused.items()},
        )

    async def dry_run(self, spec: PlanSpec, *, via: str) -> Preview:
        """Coordinator: what `accept` would decide, per target; nothing is stored."""
        prep = await self._prepare(spec, ask_all=True)
        nodes = []
        for name in prep.resolution.requests:
            node_id = prep.by_name[name].node_id
            verdict = prep.verdicts.get(node_id)
            answer = prep.answers.get(node_id)
            if verdict is None or answer is None:  # not a pull plan: nothing to transfer
                nodes.append(NodePreview(name, False, None, (), (), 0, (), f"a {spec.action} plan"))
                continue
            nodes.append(
                NodePreview(
                    node=name,
                    answered=answer.held is not None,
                    free_disk_bytes=answer.free_disk_bytes,
                    lacking=verdict.lacking,
                    present=verdict.present,
                    bytes_needed=verdict.needed_bytes,
                    no_space=verdict.refused,
                    note=answer.error[:MAX_SHORT_TEXT_CHARS],
                )
            )
        log.info("dry run name=%s nodes=%d via=%s", spec.name, len(nodes), via)
        return Preview(
            name=spec.name,
            action=spec.action,
            groups=prep.document_groups(),
            sizes={image: r.size_bytes for image, r in prep.resolved.items()},
            nodes=tuple(nodes),
            unknown_nodes=tuple(prep.resolution.unknown_nodes),
            empty_selectors=tuple(dict(s) for s in prep.resolution.empty_selectors),
            unresolved=prep.unresolved,
            coordinator=self._membership.local.name,
        )

    async def _prepare(self, spec: PlanSpec, *, ask_all: bool = False) -> _Prepared:
        """Targets, groups, digests and, for a pull plan, each target's admission."""
        members = self._membership.alive()
        resolution = resolve_targets(
            spec, [TargetNode(mb.name, mb.labels) for mb in members], max_items=MAX_ITEMS
        )
        if not resolution.requests:
            unknown = ", ".join(resolution.unknown_nodes)
            raise PlanError(
                "targets",
                "no alive member matches the plan's targets"
                + (f" (unknown nodes: {unknown})" if unknown else ""),
            )
        by_name = {mb.name: mb for mb in members}
        groups = classify({n: imgs or [PRUNE_ITEM] for n, imgs in resolution.requests.items()})
        prep = _Prepared(members, by_name, resolution, groups)
        if spec.action == "pull":
            images = [g.image for g in groups]
            prep.resolved, prep.unresolved = await self._resolve_digests(spec, images)
            await self._admit(prep, ask_all=ask_all)
        return prep

    async def _admit(self, prep: _Prepared, *, ask_all: bool) -> None:
        """Ask the targets what they hold and how much disk they have; decide what fits.

        Unless `ask_all` (a dry run), a target whose free disk in the member table (gossiped,
        refreshed every 30 s) is at least ROOMY_FACTOR times all it could need is not asked:
        nothing can be refused there, and most submissions then cost no extra round trip.
        """
        wanted: dict[str, list[Wanted]] = {}
        members = {mb.node_id: mb for mb in prep.members}
        for group in prep.groups:
            found = prep.resolved.get(group.image)
            if found is None:
                continue
            for name in group.nodes:
                wanted.setdefault(prep.by_name[name].node_id, []).append(
                    Wanted(group.image, found.digest, found.size_bytes)
                )
        asked = {
            node: [ImageAt(w.image, w.digest) for w in ws]
            for node, ws in wanted.items()
            if ask_all
            or members[node].free_disk_bytes < ROOMY_FACTOR * admit(ws, None, None).needed_bytes
        }
        prep.answers = await self.holdings.ask(asked, self._config.preview_timeout_s)
        for node, ws in wanted.items():
            answer = prep.answers.get(node, Answer(None, error="not asked: ample free disk"))
            verdict = admit(ws, answer.held, answer.free_disk_bytes)
            prep.verdicts[node] = verdict
            if verdict.refused:
                log.info(
                    "admission: no space node=%s refused=%d needed=%d free=%s",
                    prep.names[node], len(verdict.refused), verdict.needed_bytes,
                    answer.free_disk_bytes,
                )  # fmt: skip

    async def _resolve_digests(
        self, spec: PlanSpec, images: list[str]
    ) -> tuple[dict[str, Resolved], dict[str, Unresolved]]:
        """Every tag to one digest (and size, for largest-first), once per plan."""
        gate = asyncio.Semaphore(RESOLVE_CONCURRENCY)
        resolved: dict[str, Resolved] = {}
        unresolved: dict[str, Unresolved] = {}

        async def one(image: str) -> None:
            auth = plan_auth(image, spec.credentials)
            async with gate:
                try:
                    resolved[image] = await self.registry.resolve(image, auth)
                except PullError as e:
                    unresolved[image] = Unresolved(e.reason, e.detail)
                    log.info("image not resolvable image=%s reason=%s", image, e.reason)

        async with asyncio.TaskGroup() as tg:
            for image in images:
                tg.create_task(one(image))
        return resolved, unresolved
