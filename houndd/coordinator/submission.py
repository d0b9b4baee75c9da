"""`Submission`: the pipeline from a client's plan to an acknowledged, replicated plan.

Any node takes a submission: it parses and validates the body, then runs it here if this node
coordinates, else forwards the raw body (PLAN_FORWARD) to the coordinator, so validation and
tag resolution happen once. The coordinator resolves the targets against the alive members,
classifies them into one group per image, resolves every tag to one digest at its registry,
seals the plan's registry credentials with the cluster key, and hands the plan to the core,
which answers once enough durable copies exist (G1).

The forward reply is typed (`PlanForwardReply`): the accepted plan, or a `Refusal` whose kind
maps to the error the API answers with: `invalid-plan` -> `PlanError` (400, naming the field),
`replication-failed` -> `ReplicationError` (503), `not-coordinator` -> the forwarding node looks
for the new coordinator until `submit_wait_s`, then `NoCoordinatorError` (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Protocol

from houndd.config import Config
from houndd.coordinator.classify import classify
from houndd.coordinator.coordinator_role import NOT_COORDINATOR
from houndd.coordinator.dispatch import DispatchRuntime
from houndd.coordinator.messages import Accepted, PlanForward, PlanForwardReply, Refusal
from houndd.coordinator.plan import (
    PlanSpec,
    TargetNode,
    format_of,
    resolve_targets,
)
from houndd.coordinator.plan.parser_process import PlanParser
from houndd.coordinator.records import Group, PlanDocument, PlanItem, Unresolved
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
from houndd.membership.service import Membership
from houndd.wire.fields import MAX_ITEMS
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.coordinator")

PRUNE_ITEM = "(prune)"
"""The image column of a prune item: one per node, no image involved."""
RESOLVE_CONCURRENCY = 8
"""Registry manifest requests in flight for one submission."""
RETRY_S = 0.05
"""Pause before looking for the coordinator again while the role moves."""


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
        self._parser = PlanParser(config.plan_parse_timeout_s)
        bus.register(MsgType.PLAN_FORWARD, self._on_forward)

    async def close(self) -> None:
        """Stop the plan parser's child process."""
        await self._parser.close()

    async def submit(self, body: bytes, content_type: str) -> Accepted:
        """Validate, then run the submission here if this node coordinates, else forward it."""
        # a bad plan never leaves this node
        spec = await self._parser.parse(body, format_of(content_type))
        runtime = self._runtime
        mono = runtime.clocks.mono
        deadline = mono() + self._config.submit_wait_s
        while True:
            coordinator, _ = runtime.coordinator()
            try:
                if coordinator == runtime.node_id:
                    return await self.accept(spec, via=self._membership.local.name)
                if coordinator is not None:
                    return await self._forward(coordinator, body, content_type)
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

    async def _forward(self, coordinator: str, body: bytes, content_type: str) -> Accepted:
        request = PlanForward(body, content_type[:256], self._membership.local.name)
        timeout = self._config.peer_request_timeout_s * 3
        reply = await self._bus.request_typed(coordinator, request, PlanForwardReply, timeout)
        if reply.accepted is not None:
            return reply.accepted
        refusal = reply.refusal
        assert refusal is not None  # PlanForwardReply carries exactly one of the two
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
        """Coordinator: resolve targets and digests, store + replicate, answer once durable."""
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
        resolved: dict[str, Resolved] = {}
        unresolved: dict[str, Unresolved] = {}
        if spec.action == "pull":
            resolved, unresolved = await self._resolve_digests(spec, [g.image for g in groups])
        items: list[PlanItem] = []
        for group in groups:
            if group.image in unresolved:
                continue
            found = resolved.get(group.image)
            digest, size = (found.digest, found.size_bytes) if found else ("", 0)
            items.extend(
                PlanItem(by_name[n].node_id, group.image, digest, size) for n in group.nodes
            )
        document = PlanDocument.of(
            spec,
            groups=tuple(
                Group(g.image, resolved[g.image].digest if g.image in resolved else "", g.nodes)
                for g in groups
            ),
            names={mb.node_id: mb.name for mb in members},
            unknown_nodes=tuple(resolution.unknown_nodes),
            empty_selectors=tuple(dict(s) for s in resolution.empty_selectors),
            unresolved=unresolved,
            sealed_auth=(
                seal_credentials(self._runtime.keyring, spec.credentials)
                if spec.credentials
                else None
            ),
            via=via,
        )
        plan_id = new_plan_id()
        timeout = self._config.peer_request_timeout_s * 2 + 1
        ack = await self._runtime.accept(plan_id, document, items, timeout)
        if not ack.ok and ack.reason == NOT_COORDINATOR:
            raise NotCoordinator(ack.reason)
        if not ack.ok:
            raise ReplicationError(f"plan not acknowledged: {ack.reason}")
        log.info(
            "plan accepted plan=%s name=%s items=%d unresolved=%d via=%s",
            plan_id, spec.name, len(items), len(unresolved), via,
        )  # fmt: skip
        return Accepted(
            plan_id=plan_id,
            name=spec.name,
            action=spec.action,
            groups=document.groups,
            unknown_nodes=document.unknown_nodes,
            empty_selectors=document.empty_selectors,
            unresolved=unresolved,
            coordinator=self._membership.local.name,
        )

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
