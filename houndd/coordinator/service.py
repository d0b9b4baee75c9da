"""`CoordinatorService`: the coordinator side of one node, assembled from its parts.

- `dispatch.DispatchRuntime`: runs the pure `NodeCore` (timers, messages, actions, the local
  executor adaptor);
- `submission.Submission`: parse, resolve targets and digests, forward, accept;
- `views.PlanViews`: plans, one plan, event streams, metrics callbacks;
- `keep_present.KeepPresent`: the keep_present loop.

The daemon builds this once and calls it; each part can be built on its own in tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator
from typing import Any

from houndd.config import Config
from houndd.coordinator.dispatch import Clocks, DispatchRuntime
from houndd.coordinator.keep_present import KeepPresent
from houndd.coordinator.local import LocalExecutor
from houndd.coordinator.messages import Accepted, Preview
from houndd.coordinator.results import ItemResult
from houndd.coordinator.store import Store
from houndd.coordinator.submission import Resolver, Submission
from houndd.coordinator.views import FINAL_PLAN_STATES, PlanViews
from houndd.errors import PlanFinishedError
from houndd.membership.bus import Bus
from houndd.membership.service import Membership
from houndd.metrics import Metrics
from houndd.wire.keyring import Keyring

log = logging.getLogger("houndd.coordinator")


class CoordinatorService:
    """One node's coordinator/worker shell. `start()` loads state; `run()` until cancelled."""

    def __init__(
        self,
        config: Config,
        *,
        bus: Bus,
        membership: Membership,
        store: Store,
        local: LocalExecutor,
        registry: Resolver,
        metrics: Metrics,
        keyring: Keyring,
        rng: random.Random | None = None,
        clocks: Clocks | None = None,
    ) -> None:
        rng = rng or random.Random()
        self.runtime = DispatchRuntime(
            config,
            bus=bus,
            membership=membership,
            store=store,
            local=local,
            keyring=keyring,
            metrics=metrics,
            rng=rng,
            clocks=clocks,
        )
        self.submission = Submission(
            config, bus=bus, membership=membership, runtime=self.runtime, registry=registry
        )
        self.views = PlanViews(self.runtime, membership)
        self.keep_present = KeepPresent(
            config,
            runtime=self.runtime,
            membership=membership,
            submission=self.submission,
            views=self.views,
            rng=rng,
        )

    def start(self) -> None:
        """Load the persisted state and build the core."""
        self.runtime.start()

    async def run(self) -> None:
        """Run the core until cancelled; the plan parser's child starts beside it, so a slow
        start (up to its 10 s bound) never holds back heartbeats or an election."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._start_parser())
            await self.runtime.run()

    async def _start_parser(self) -> None:
        try:
            await self.submission.start()
        except (OSError, TimeoutError) as e:  # a parse starts it again, or says why not
            log.warning("plan parser did not start error=%s", e)

    async def close(self) -> None:
        """Stop what runs outside the task group (the plan parser's child process, and the
        runtime's fsync thread once the flushes it was given are done)."""
        try:
            await self.submission.close()
        finally:
            await self.runtime.close()  # before the daemon closes the store

    def discovery_round_done(self) -> None:
        """Discovery ran once: the election's join window starts now."""
        self.runtime.discovery_round_done()

    def coordinator(self) -> tuple[str | None, int]:
        """(coordinator node id or None, term) as this node sees them."""
        return self.runtime.coordinator()

    async def submit(self, body: bytes, content_type: str) -> Accepted:
        """A client's plan, submitted to this node."""
        return await self.submission.submit(body, content_type)

    async def preview(self, body: bytes, content_type: str) -> Preview:
        """A dry run of a client's plan: what it would do; nothing stored or pulled."""
        return await self.submission.preview(body, content_type)

    async def cancel(self, plan_id: str) -> dict[str, Any]:
        """Cancel a running plan; returns the cancelled plan's view. A finished one raises
        `PlanFinishedError` and nothing is stored: its outcome stays what it was."""
        before = await self.views.plan(plan_id)
        if before is not None and before["state"] in FINAL_PLAN_STATES:
            raise PlanFinishedError(plan_id, str(before["state"]))
        await self.runtime.cancel(plan_id)
        return {"id": plan_id, "state": "cancelled", "plan": self.views.view(plan_id)}

    async def plans(self) -> list[dict[str, Any]]:
        """Every plan, newest first."""
        return await self.views.plans()

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        """One plan with its items."""
        return await self.views.plan(plan_id)

    def events(self, plan_id: str) -> AsyncGenerator[bytes, None]:
        """The plan's server-sent events, encoded."""
        return self.views.events(plan_id)

    def on_report(self, plan_id: str, image: str, result: ItemResult) -> None:
        """The local executor's report."""
        self.runtime.report(plan_id, image, result)
