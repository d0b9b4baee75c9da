"""`Holdings`: which of a plan's images each target holds, and how much disk it has free.

The coordinator asks every target of a pull plan at once (HOLDINGS, a peer request) before it
stores the plan (disk-aware admission) or answers a dry run; each target looks its images up
in its own Docker engine (`LocalExecutor.has_image`, by repository and digest) and reports its
free disk. The whole round is bounded by `preview_timeout_s`: a target that has not answered
by then, or whose engine cannot be asked, is reported as unknown (`Answer.error` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from houndd.coordinator.local import LocalExecutor
from houndd.coordinator.messages import MAX_HOLDINGS_QUERY, HoldingsQuery, HoldingsReply, ImageAt
from houndd.errors import HounddError
from houndd.image.reference import InvalidReference, parse_reference
from houndd.membership.bus import Bus, Message
from houndd.wire.types import MsgType

LOOKUPS_AT_ONCE = 8
"""Engine lookups in flight for one query (each is one `docker image inspect`)."""


@dataclass(frozen=True)
class Answer:
    """A target's answer: the images it holds (None if it did not answer: see `error`)."""

    held: frozenset[str] | None
    free_disk_bytes: int | None = None
    error: str = ""


class Holdings:
    """Asks targets what they hold (coordinator side); answers such questions (every node)."""

    def __init__(self, bus: Bus, local: LocalExecutor) -> None:
        self._bus = bus
        self._local = local
        bus.register(MsgType.HOLDINGS, self._on_query)

    async def ask(
        self, wanted: Mapping[str, Sequence[ImageAt]], timeout_s: float
    ) -> dict[str, Answer]:
        """node id -> its answer, for every node in `wanted`, within `timeout_s` in all."""
        answers = {node: Answer(None, error=f"no answer within {timeout_s:g} s") for node in wanted}

        async def one(node: str, images: Sequence[ImageAt]) -> None:
            held: set[str] = set()
            free: int | None = None
            try:
                for start in range(0, len(images), MAX_HOLDINGS_QUERY):
                    chunk = tuple(images[start : start + MAX_HOLDINGS_QUERY])
                    reply = await self._bus.request_typed(
                        node, HoldingsQuery(chunk), HoldingsReply, timeout_s
                    )
                    # a node can only claim what it was asked about
                    held.update(set(reply.held) & {it.image for it in chunk})
                    free = reply.free_disk_bytes
            except HounddError as e:
                answers[node] = Answer(None, error=str(e)[:256])
                return
            answers[node] = Answer(frozenset(held), free)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as tg:
                for node, images in wanted.items():
                    tg.create_task(one(node, images))
        return answers

    async def _on_query(self, msg: Message) -> HoldingsReply:
        query = msg.payload
        assert isinstance(query, HoldingsQuery)  # the bus decodes by type
        gate = asyncio.Semaphore(LOOKUPS_AT_ONCE)
        held: list[str] = []

        async def check(item: ImageAt) -> None:
            try:
                ref = parse_reference(item.image)
            except InvalidReference:
                return  # not an image this node could hold
            async with gate:
                present = await self._local.has_image(f"{ref.familiar_repository}@{item.digest}")
            if present == item.digest:
                held.append(item.image)

        # an engine error ends the lookup: the coordinator hears it as the reason it got no
        # answer (a HounddError in a request handler is answered as an error reply)
        try:
            async with asyncio.TaskGroup() as tg:
                for item in query.images:
                    tg.create_task(check(item))
        except* HounddError as errors:
            raise errors.exceptions[0] from None
        return HoldingsReply(tuple(held), await self._local.free_disk_bytes())
