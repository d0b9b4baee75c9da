"""`Executor`: runs dispatched work items (pull, remove, prune) against this node's engine.

Rules it keeps, because the coordinator relies on them:

- Dedupe by (plan id, digest, image): a dispatch repeated after a coordinator takeover never
  pulls an image again that is pulling or done; the item's current state is re-reported.
  A failed item runs again only when dispatched with a higher attempt number.
- One pull per digest on this node: plans asking for the same bits at the same time share it.
  The shared pull stops only when every item waiting on it has left (aborted, timed out).
- Pull by digest, then tag locally as the requested tag, so every node holds the same bits
  under the name users run. With a `PullRoute` (blob sharing), the bytes of a pull by digest
  take that route; the result is the same image, tagged the same way.
- Reports: one when an item starts, at most one per `progress_interval_s` while it pulls, one
  when it finishes. Every item finishes `done` or `failed` with a stable reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from houndd.errors import CANCELLED, PULL_FAILED, PullError, PullTimeout
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import ImageRef, InvalidReference, parse_reference
from houndd.puller.engine import ByteSources, Engine, PullProgress

__all__ = ["Executor", "ItemReport", "ItemState", "Op", "PullPolicy", "PullRoute", "WorkItem"]

log = logging.getLogger("houndd.puller")

Op = Literal["pull", "remove", "prune"]
PullPolicy = Literal["IfNotPresent", "Always"]
ItemState = Literal["pulling", "done", "failed"]
_JobState = Literal["queued", "pulling", "done", "failed"]


@dataclass(frozen=True)
class WorkItem:
    """One dispatched unit of work for this node.

    `image` is the requested reference (a tag); `digest` the plan's resolved digest ("" if
    unresolved: then the tag is pulled as is). `timeout_s` bounds the execution, not the wait
    for a parallelism slot.
    """

    op: Op
    image: str
    digest: str = ""
    attempt: int = 1
    timeout_s: float = 1800.0
    pull_policy: PullPolicy = "IfNotPresent"
    auth: RegistryAuth | None = None  # its repr hides the password
    peers: tuple[str, ...] = ()  # node ids of the plan that need this digest (blob sharing)


class PullRoute(Protocol):
    """Another way for the bytes of a pull by digest to reach the engine (blob sharing).

    It must leave the engine as `Engine.pull(repository@digest)` would: the image present,
    with the same id and RepoDigests. `nodes` are the plan's nodes that need the image.
    """

    async def pull(
        self,
        image: ImageRef,
        digest: str,
        *,
        auth: RegistryAuth | None,
        plan_id: str,
        nodes: Sequence[str],
        progress: Callable[[PullProgress], None],
    ) -> None: ...


@dataclass(frozen=True)
class ItemReport:
    """The state of one item on this node, as sent to the coordinator."""

    plan_id: str
    node_id: str
    image: str
    digest: str
    attempt: int
    state: ItemState
    bytes_done: int = 0
    bytes_total: int = 0
    # where the bytes came from (see `ByteSources`); all zero for a skipped item
    bytes_registry: int = 0
    bytes_peers: int = 0
    bytes_cache: int = 0
    reason: str = ""
    detail: str = ""
    transient: bool = False
    skipped: bool = False  # done without pulling: IfNotPresent found the image
    started_at: float | None = None
    finished_at: float | None = None
    op: Op = "pull"


@dataclass(eq=False)
class _Job:
    plan_id: str
    item: WorkItem
    key: tuple[str, str]
    limit: asyncio.Semaphore
    state: _JobState = "queued"
    task: asyncio.Task[None] | None = None
    aborted: bool = False
    bytes_done: int = 0
    bytes_total: int = 0
    sources: ByteSources | None = None  # None: a direct engine pull (all from the registry)
    started_at: float | None = None
    last_emit: float = float("-inf")
    report: ItemReport | None = None


@dataclass(eq=False)
class _SharedPull:
    """One engine pull that several jobs wait on."""

    ref: str
    auth: RegistryAuth | None
    future: asyncio.Future[None]
    routed: tuple[ImageRef, str, str, tuple[str, ...]] | None = None  # image, digest, plan, nodes
    task: asyncio.Task[None] | None = None
    listeners: set[Callable[[PullProgress], None]] = field(default_factory=set)
    waiters: int = 0
    last: PullProgress | None = None

    def publish(self, progress: PullProgress) -> None:
        self.last = progress
        for listener in list(self.listeners):
            listener(progress)


def _job_key(plan_id: str, item: WorkItem) -> tuple[str, str]:
    # The image name is part of the key: two tags of one digest in a plan are two items, each
    # needing its own report and local tag. They still share one transfer (`_SharedPull`).
    return plan_id, f"{item.op}|{item.digest}|{item.image}"


class Executor:
    """Runs work items on one node. `run()` must be running for work to start.

    `clock` gives report timestamps (wall time, seconds); `monotonic` paces progress reports.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        node_id: str,
        progress_interval_s: float,
        on_report: Callable[[ItemReport], None],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        route: PullRoute | None = None,
    ) -> None:
        self._engine = engine
        self._route = route
        self._node_id = node_id
        self._interval_s = progress_interval_s
        self._on_report = on_report
        self._clock = clock
        self._monotonic = monotonic
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._ready: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._limits: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._shared: dict[tuple[str, RegistryAuth | None], _SharedPull] = {}
        self._tg: asyncio.TaskGroup | None = None

    # --- public ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start submitted work until cancelled; cancelling stops every item this owns."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                while True:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    ready, self._ready = self._ready, []
                    for job in ready:
                        if not job.aborted:
                            job.task = tg.create_task(self._run_job(job))
            finally:
                self._tg = None

    def submit(self, plan_id: str, items: Sequence[WorkItem], *, per_node_parallelism: int) -> None:
        """Queue `items` of `plan_id`; at most `per_node_parallelism` of the plan run at once."""
        limit = self._limits.get((plan_id, per_node_parallelism))
        if limit is None:
            limit = self._limits[(plan_id, per_node_parallelism)] = asyncio.Semaphore(
                max(1, per_node_parallelism)
            )
        for item in items:
            key = _job_key(plan_id, item)
            existing = self._jobs.get(key)
            if existing is not None and (
                existing.state != "failed" or item.attempt <= existing.item.attempt
            ):
                log.debug(
                    "duplicate dispatch plan=%s image=%s state=%s",
                    plan_id,
                    item.image,
                    existing.state,
                )
                if existing.report is not None:
                    self._emit(existing.report)
                continue
            job = _Job(plan_id=plan_id, item=item, key=key, limit=limit)
            self._jobs[key] = job
            self._ready.append(job)
        self._wakeup.set()

    def abort(self, plan_id: str, images: Sequence[str] | None = None) -> int:
        """Cancel queued and in-flight items of `plan_id` (only `images` if given); each ends
        `failed` with reason "cancelled". Returns how many were aborted."""
        wanted = set(images) if images is not None else None
        count = 0
        for job in list(self._jobs.values()):
            if job.plan_id != plan_id or job.state in ("done", "failed") or job.aborted:
                continue
            if wanted is not None and job.item.image not in wanted:
                continue
            job.aborted = True
            count += 1
            if job.task is not None:
                job.task.cancel()
            else:  # not started yet: run() will skip it
                self._finish(job, error=PullError(CANCELLED, "aborted before start"))
        return count

    def reports(self, plan_id: str) -> list[ItemReport]:
        """The latest report of every item of `plan_id` this node has started."""
        return [j.report for j in self._jobs.values() if j.plan_id == plan_id and j.report]

    def forget(self, plan_id: str) -> None:
        """Drop the records of a finished plan (its dedupe memory goes with them)."""
        self.abort(plan_id)
        for key in [k for k in self._jobs if k[0] == plan_id]:
            del self._jobs[key]
        for lkey in [k for k in self._limits if k[0] == plan_id]:
            del self._limits[lkey]

    # --- one job ---------------------------------------------------------------------------

    async def _run_job(self, job: _Job) -> None:
        item = job.item
        try:
            async with job.limit:
                job.state = "pulling"
                job.started_at = self._clock()
                self._emit_progress(job, force=True)
                try:
                    async with asyncio.timeout(item.timeout_s):
                        skipped = await self._execute(job)
                except TimeoutError:
                    raise PullTimeout(
                        f"{item.op} {item.image} took over {item.timeout_s}s"
                    ) from None
        except asyncio.CancelledError:
            if not job.aborted:
                raise  # shutdown: the TaskGroup is going away
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self._finish(job, error=PullError(CANCELLED, "aborted"))
        except PullError as e:
            self._finish(job, error=e)
        except Exception as e:
            # A bug in an engine must not leave the item "pulling" forever (G2).
            log.exception("item failed unexpectedly plan=%s image=%s", job.plan_id, item.image)
            self._finish(job, error=PullError(PULL_FAILED, f"internal error: {type(e).__name__}"))
        else:
            self._finish(job, skipped=skipped)

    async def _execute(self, job: _Job) -> bool:
        """Carry out the item; True if it was skipped (already present)."""
        item = job.item
        if item.op == "prune":
            report = await self._engine.prune()
            job.bytes_done = job.bytes_total = report.space_reclaimed_bytes
            return False
        try:
            ref = parse_reference(item.image)
        except InvalidReference as e:
            raise PullError(PULL_FAILED, str(e)) from None
        digest = item.digest or ref.digest or ""
        if item.op == "remove":
            # Removing the tag deletes the image once nothing else names it (docker's rule);
            # by digest only when no tag was asked for, so images users tagged survive.
            if ref.tag is not None:
                await self._engine.remove(f"{ref.familiar_repository}:{ref.tag}")
            elif digest:
                await self._engine.remove(f"{ref.familiar_repository}@{digest}")
            return False

        pull_ref = f"{ref.familiar_repository}@{digest}" if digest else item.image
        tag_ref = f"{ref.familiar_repository}:{ref.tag}" if digest and ref.tag else None
        if item.pull_policy == "IfNotPresent":
            present = await self._engine.has_image(pull_ref)
            if present is not None and (not digest or present == digest):
                if tag_ref is not None:
                    await self._engine.tag(pull_ref, tag_ref)
                return True
        routed = (ref, digest, job.plan_id, item.peers) if digest else None
        await self._shared_pull(job, pull_ref, item.auth, routed)
        if tag_ref is not None:
            await self._engine.tag(pull_ref, tag_ref)
        return False

    async def _shared_pull(
        self,
        job: _Job,
        ref: str,
        auth: RegistryAuth | None,
        routed: tuple[ImageRef, str, str, tuple[str, ...]] | None,
    ) -> None:
        # Different credentials for the same bits pull separately: one bad password must not
        # fail another plan's items.
        key = (ref, auth)
        shared = self._shared.get(key)
        if shared is None:
            if self._tg is None:
                raise PullError(CANCELLED, "executor stopped")
            shared = _SharedPull(
                ref=ref,
                auth=auth,
                future=asyncio.get_running_loop().create_future(),
                routed=routed,
            )
            self._shared[key] = shared
            shared.task = self._tg.create_task(self._pull(key, shared))

        def on_progress(progress: PullProgress) -> None:
            self._on_progress(job, progress)

        shared.waiters += 1
        shared.listeners.add(on_progress)
        if shared.last is not None:
            on_progress(shared.last)
        try:
            await asyncio.shield(shared.future)
        finally:
            shared.listeners.discard(on_progress)
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.future.done() and shared.task is not None:
                shared.task.cancel()

    async def _pull(self, key: tuple[str, RegistryAuth | None], shared: _SharedPull) -> None:
        """The one engine pull behind a `_SharedPull`. Never raises into the TaskGroup
        except CancelledError: outcomes travel through the future."""
        try:
            if self._route is not None and shared.routed is not None:
                image, digest, plan_id, nodes = shared.routed
                await self._route.pull(
                    image,
                    digest,
                    auth=shared.auth,
                    plan_id=plan_id,
                    nodes=nodes,
                    progress=shared.publish,
                )
            else:
                await self._engine.pull(shared.ref, auth=shared.auth, progress=shared.publish)
        except asyncio.CancelledError:
            shared.future.cancel()
            raise
        except PullError as e:
            shared.future.set_exception(e)
        except Exception as e:
            log.exception("engine pull failed unexpectedly ref=%s", shared.ref)
            shared.future.set_exception(
                PullError(PULL_FAILED, f"internal error: {type(e).__name__}")
            )
        else:
            shared.future.set_result(None)
        finally:
            if self._shared.get(key) is shared:
                del self._shared[key]
            if shared.future.done() and not shared.future.cancelled():
                shared.future.exception()  # mark retrieved: waiters may all have left

    # --- reports ---------------------------------------------------------------------------

    def _on_progress(self, job: _Job, progress: PullProgress) -> None:
        job.bytes_done = progress.bytes_done
        job.bytes_total = progress.bytes_total
        if progress.sources is not None:
            job.sources = progress.sources
        self._emit_progress(job, force=False)

    def _emit_progress(self, job: _Job, *, force: bool) -> None:
        now = self._monotonic()
        if not force and now - job.last_emit < self._interval_s:
            return
        job.last_emit = now
        self._set_report(job, self._report(job, "pulling"))

    def _finish(self, job: _Job, *, error: PullError | None = None, skipped: bool = False) -> None:
        if error is None:
            job.state = "done"
            if skipped:
                job.bytes_done = job.bytes_total = 0
                job.sources = ByteSources()
            elif job.item.op == "pull":
                job.bytes_done = job.bytes_total = max(job.bytes_done, job.bytes_total)
            report = replace(self._report(job, "done"), skipped=skipped)
            log.info(
                "item done plan=%s op=%s image=%s skipped=%s bytes=%d",
                job.plan_id,
                job.item.op,
                job.item.image,
                skipped,
                job.bytes_done,
            )
        else:
            job.state = "failed"
            report = replace(
                self._report(job, "failed"),
                reason=error.reason,
                detail=error.detail,
                transient=error.transient,
            )
            log.warning(
                "item failed plan=%s op=%s image=%s attempt=%d reason=%s detail=%s",
                job.plan_id,
                job.item.op,
                job.item.image,
                job.item.attempt,
                error.reason,
                error.detail,
            )
        self._set_report(job, replace(report, finished_at=self._clock()))

    def _report(self, job: _Job, state: ItemState) -> ItemReport:
        item = job.item
        sources = job.sources
        if sources is None:
            # a direct engine pull: whatever it downloaded came from the registry
            sources = ByteSources(registry=job.bytes_done if item.op == "pull" else 0)
        return ItemReport(
            plan_id=job.plan_id,
            node_id=self._node_id,
            image=item.image,
            digest=item.digest,
            attempt=item.attempt,
            state=state,
            bytes_done=job.bytes_done,
            bytes_total=job.bytes_total,
            bytes_registry=sources.registry,
            bytes_peers=sources.peers,
            bytes_cache=sources.cache,
            started_at=job.started_at,
            op=item.op,
        )

    def _set_report(self, job: _Job, report: ItemReport) -> None:
        job.report = report
        self._emit(report)

    def _emit(self, report: ItemReport) -> None:
        # The receiver is someone else's code: its failure must not stop the pull.
        try:
            self._on_report(report)
        except Exception:
            log.exception("report callback failed plan=%s image=%s", report.plan_id, report.image)
