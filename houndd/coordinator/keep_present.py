"""`KeepPresent`: the worker side of keep_present plans.

Every `keep_present_interval_s` (jittered) a node checks the keep_present plans whose targets
it matches (by name or its current labels). For an image it lacks at the plan's digest (it
joined later, its labels changed, or the image was removed) it submits a derived plan
`<name>/keep-present/<node>` for itself through the normal submit path, pinned to the parent's
digest (`repo:tag@digest`), so the coordinator, replication and progress work as for any plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

from houndd.config import Config
from houndd.coordinator.dispatch import DispatchRuntime
from houndd.coordinator.plan import MAX_NAME_CHARS, TargetNode, resolve_targets
from houndd.coordinator.records import PlanRecord
from houndd.coordinator.results import ItemResult
from houndd.coordinator.sealed import unseal_credentials
from houndd.coordinator.submission import Submission
from houndd.coordinator.views import PlanViews
from houndd.errors import HounddError
from houndd.image.credentials import auth_document
from houndd.image.reference import parse_reference
from houndd.membership.service import Membership

log = logging.getLogger("houndd.coordinator")

KEEP_PRESENT_MARK = "/keep-present/"
"""Derived plans of a keep_present plan are named `<plan name>/keep-present/<node>`."""


class KeepPresent:
    """Keeps this node holding the images of the keep_present plans it matches."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: DispatchRuntime,
        membership: Membership,
        submission: Submission,
        views: PlanViews,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._membership = membership
        self._submission = submission
        self._views = views
        self._rng = rng or random.Random()

    async def run(self) -> None:
        """Check every interval, until cancelled."""
        while True:
            await asyncio.sleep(self._config.keep_present_interval_s * self._rng.uniform(0.8, 1.2))
            try:
                await self.round()
            except HounddError as e:
                log.info("keep-present round failed error=%s", e)

    async def round(self) -> None:
        """One check of every keep_present plan."""
        replica = self._runtime.core.replica
        busy = {
            str(v["name"])
            for v in self._views.local_plans()
            if v["state"] in ("pending", "running")
        }
        for rec in replica.plans():
            plan = rec.document.plan
            if not plan.policy.keep_present or plan.action != "pull":
                continue
            if replica.cancelled(rec.plan_id):
                continue
            name = self._derived_name(plan.name)
            if name in busy:
                continue
            missing = await self._missing(rec)
            if not missing:
                continue
            body: dict[str, Any] = {
                "name": name,
                "targets": [{"images": missing, "nodes": [self._membership.local.name]}],
                "policy": {**plan.policy.to_document(), "keep_present": False},
            }
            credentials = unseal_credentials(self._runtime.keyring, rec.document.sealed_auth)
            if credentials:
                body["auth"] = auth_document(credentials)
            log.info(
                "keep-present plan=%s node=%s missing=%d",
                rec.plan_id, self._membership.local.name, len(missing),
            )  # fmt: skip
            await self._submission.submit(json.dumps(body).encode(), "application/json")
            busy.add(name)

    def _derived_name(self, name: str) -> str:
        suffix = f"{KEEP_PRESENT_MARK}{self._membership.local.name}"
        return name[: MAX_NAME_CHARS - len(suffix)] + suffix

    async def _missing(self, rec: PlanRecord) -> list[str]:
        """Images of `rec` this node should hold but lacks at the plan's digest."""
        me = self._membership.local
        wanted = resolve_targets(rec.document.plan, [TargetNode(me.name, me.labels)])
        images = wanted.requests.get(me.name)
        if not images:
            return []
        digests = {g.image: g.digest for g in rec.document.groups}
        results = self._runtime.core.replica.results(rec.plan_id)
        mine = {it.image for it in rec.items if it.node_id == me.node_id}
        missing = []
        for image in images:
            digest = digests.get(image)
            if not digest:
                continue  # never resolved: the plan reported it failed
            result = results.get((me.node_id, image), ItemResult())
            if image in mine and not result.is_final:
                continue  # the plan itself is still working on it
            ref = parse_reference(image)
            present = await self._runtime.local.has_image(f"{ref.familiar_repository}@{digest}")
            if present == digest:
                continue
            missing.append(f"{image}@{digest}" if not ref.digest else image)
        return missing
