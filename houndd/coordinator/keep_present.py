"""`KeepPresent`: the worker side of keep_present plans.

A node checks the keep_present plans whose targets it matches (by name or its current labels).
For an image it lacks at the plan's digest it submits a derived plan
`<name>/keep-present/<node>` for itself through the normal submit path, pinned to the parent's
digest (`repo:tag@digest`), so the coordinator, admission, replication and progress work as for
any plan.

It checks at once when something may have made it a target or taken its images: when it
starts (a node that returns after a restart), when its own labels change (it gains a matching
label), when a keep_present plan reaches its replica (a node that joins gets the cluster's
plans by anti-entropy within a second), and when a member comes back from dead or unknown
(this node may be the one that was cut off). A burst of such events costs one check. Every
`keep_present_interval_s` (jittered) it checks anyway, for images removed behind houndd's back.
A check that cannot submit (no coordinator yet) is retried soon, backing off to the interval.
The same missing images are not asked for again before the interval has passed since the last
derived plan for them, so a derived plan that fails (no space) is not resubmitted at every
membership event.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from houndd.membership.member import Member, MemberState
from houndd.membership.service import Membership

log = logging.getLogger("houndd.coordinator")

KEEP_PRESENT_MARK = "/keep-present/"
"""Derived plans of a keep_present plan are named `<plan name>/keep-present/<node>`."""
SETTLE_S = 0.1
"""After an event, wait this long for the rest of its burst (a joining node's plans arrive
together) before checking."""
RETRY_S = 0.5
"""First pause before a check that failed is tried again (doubling up to the interval)."""


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
        self._kick = asyncio.Event()
        self._labels = dict(membership.local.labels)
        # parent plan id -> (missing images asked for, monotonic time of the derived plan)
        self._asked: dict[str, tuple[tuple[str, ...], float]] = {}
        # derived plan name -> id of the plan this node last submitted under it
        self._derived: dict[str, str] = {}
        membership.subscribe(self._on_member)
        runtime.on_plan_stored(self._on_plan)

    def kick(self) -> None:
        """Check soon (something may have changed what this node should hold)."""
        self._kick.set()

    async def run(self) -> None:
        """Check at start, on events, and every interval, until cancelled."""
        interval = self._config.keep_present_interval_s
        retry = RETRY_S
        wait_s = 0.0  # at start: a node that returns checks at once
        while True:
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._kick.wait()
            if self._kick.is_set():
                await asyncio.sleep(min(SETTLE_S, interval))
            self._kick.clear()
            try:
                await self.round()
            except HounddError as e:
                log.info("keep-present check failed, retrying retry_s=%.1f error=%s", retry, e)
                wait_s, retry = retry, min(2 * retry, interval)
                continue
            retry = RETRY_S
            wait_s = interval * self._rng.uniform(0.8, 1.2)

    def _on_member(self, member: Member, old: MemberState | None, new: MemberState) -> None:
        if member.node_id == self._runtime.node_id:
            if old == new and member.labels != self._labels:
                self._labels = dict(member.labels)
                self.kick()  # this node's labels changed: it may match other plans now
        elif new is MemberState.ALIVE and old in (None, MemberState.DEAD, MemberState.LEFT):
            self.kick()  # a member joined or came back: this node may be the one that did

    def _on_plan(self, record: PlanRecord) -> None:
        plan = record.document.plan
        if plan.policy.keep_present and plan.action == "pull":
            self.kick()

    async def round(self) -> None:
        """One check of every keep_present plan."""
        replica = self._runtime.core.replica
        mono = self._runtime.clocks.mono
        busy = await self._busy_derived()
        for rec in replica.plans():
            plan = rec.document.plan
            if not plan.policy.keep_present or plan.action != "pull" or not rec.committed:
                continue
            if replica.cancelled(rec.plan_id):
                continue
            name = self._derived_name(plan.name)
            if name in busy:
                continue
            missing = await self._missing(rec)
            if not missing:
                continue
            asked = self._asked.get(rec.plan_id)
            recently = self._config.keep_present_interval_s * 0.8
            if asked is not None and asked[0] == tuple(missing) and mono() - asked[1] < recently:
                continue  # asked for the same images a moment ago (it failed, or they left)
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
            accepted = await self._submission.submit(json.dumps(body).encode(), "application/json")
            self._derived[name] = accepted.plan_id
            self._asked[rec.plan_id] = (tuple(missing), mono())
            busy.add(name)

    async def _busy_derived(self) -> set[str]:
        """Names of this node's derived plans that are still pending or running: those it
        submitted (asked of a holder: only the replicas hold a plan) and those held here."""
        suffix = f"{KEEP_PRESENT_MARK}{self._membership.local.name}"
        busy = {
            str(v["name"])
            for v in self._views.local_plans()
            if str(v["name"]).endswith(suffix) and v["state"] in ("pending", "running")
        }
        for name, plan_id in list(self._derived.items()):
            if name in busy:
                continue
            view = await self._views.plan(plan_id)
            if view is not None and view["state"] in ("pending", "running"):
                busy.add(name)
            else:
                del self._derived[name]
        return busy

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
