"""Executor against FakeEngine: dedupe, shared pulls, policies, progress pacing, timeouts, abort."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest

from houndd.image.credentials import RegistryAuth
from houndd.image.reference import ImageRef
from houndd.puller.engine import ByteSources, PullProgress
from houndd.puller.executor import Executor, ItemReport, WorkItem
from houndd.puller.memory import FakeEngine
from tests.puller.waiting import eventually

REG = "registry.test:5000"


class FakeClock:
    """Monotonic time that only moves when the fake engine 'sleeps'."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Harness:
    engine: FakeEngine
    executor: Executor
    reports: list[ItemReport] = field(default_factory=list)

    def final(self, plan: str, image: str) -> list[ItemReport]:
        return [
            r
            for r in self.reports
            if r.plan_id == plan and r.image == image and r.state != "pulling"
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        await eventually(predicate, timeout_s=timeout_s)

    async def settle(self, plan: str, count: int) -> None:
        """Wait until `count` items of `plan` reported done or failed."""
        await self.wait_for(
            lambda: (
                len({r.image for r in self.reports if r.plan_id == plan and r.state != "pulling"})
                >= count
            )
        )


@contextlib.asynccontextmanager
async def harness(engine: FakeEngine, **kwargs: object) -> AsyncIterator[Harness]:
    reports: list[ItemReport] = []
    executor = Executor(
        engine,
        node_id="node-1",
        progress_interval_s=float(kwargs.pop("progress_interval_s", 0.05)),  # type: ignore[arg-type]
        on_report=reports.append,
        **kwargs,  # type: ignore[arg-type]
    )
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(executor.run())
        yield Harness(engine, executor, reports)
        task.cancel()


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with harness(FakeEngine(pull_duration_s=0.05)) as h:
        yield h


def pull(image: str, digest: str, **kw: object) -> WorkItem:
    return WorkItem(op="pull", image=image, digest=digest, **kw)  # type: ignore[arg-type]


async def test_pull_by_digest_then_tag_and_report_lifecycle(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 10_000)
    h.executor.submit("p1", [pull(image, digest)], per_node_parallelism=2)
    await h.settle("p1", 1)

    assert h.engine.pulls == [f"{REG}/app@{digest}"]  # by digest, never by tag
    assert await h.engine.has_image(image) == digest  # tagged locally
    states = [r.state for r in h.reports]
    assert states[0] == "pulling" and states[-1] == "done"
    done = h.reports[-1]
    assert (done.bytes_done, done.bytes_total, done.skipped) == (10_000, 10_000, False)
    # a direct engine pull: every byte came from the registry
    assert (done.bytes_registry, done.bytes_peers, done.bytes_cache) == (10_000, 0, 0)
    assert done.node_id == "node-1" and done.digest == digest and done.attempt == 1
    assert done.started_at is not None and done.finished_at is not None
    assert done.finished_at >= done.started_at


async def test_if_not_present_skips_present_image(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 10_000)
    h.engine.preload(f"{REG}/app@{digest}")
    h.executor.submit("p1", [pull(image, digest)], per_node_parallelism=1)
    await h.settle("p1", 1)

    assert h.engine.pulls == []
    done = h.final("p1", image)[-1]
    assert (done.state, done.skipped, done.bytes_done) == ("done", True, 0)
    assert (done.bytes_registry, done.bytes_peers, done.bytes_cache) == (0, 0, 0)
    assert await h.engine.has_image(image) == digest  # tagged even though not pulled


async def test_if_not_present_pulls_when_tag_points_elsewhere(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    old = h.engine.add_registry_image(image, 5, digest="sha256:" + "1" * 64)
    h.engine.preload(image)  # local app:1.0 is the old digest
    new = h.engine.add_registry_image(image, 7, digest="sha256:" + "2" * 64)
    assert old != new
    h.executor.submit("p1", [pull(image, new)], per_node_parallelism=1)
    await h.settle("p1", 1)
    assert h.engine.pull_counts[f"{REG}/app@{new}"] == 1
    assert await h.engine.has_image(image) == new


async def test_always_pulls_even_if_present(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 100)
    h.engine.preload(f"{REG}/app@{digest}")
    h.executor.submit("p1", [pull(image, digest, pull_policy="Always")], per_node_parallelism=1)
    await h.settle("p1", 1)
    assert h.engine.pull_counts[f"{REG}/app@{digest}"] == 1
    assert h.final("p1", image)[-1].skipped is False


async def test_same_dispatch_twice_pulls_once_and_rereports(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 1000)
    items = [pull(image, digest)]
    h.executor.submit("p1", items, per_node_parallelism=1)
    await h.wait_for(lambda: any(r.state == "pulling" for r in h.reports))
    h.executor.submit("p1", items, per_node_parallelism=1)  # while pulling
    await h.settle("p1", 1)
    h.executor.submit("p1", items, per_node_parallelism=1)  # after done
    await asyncio.sleep(0.01)

    assert h.engine.pull_counts[f"{REG}/app@{digest}"] == 1
    assert h.reports[-1].state == "done"  # the third dispatch re-reported the final state
    assert len(h.final("p1", image)) == 2


async def test_two_tags_of_one_digest_in_a_plan_pull_once_report_both(h: Harness) -> None:
    one, latest = f"{REG}/app:1.0", f"{REG}/app:latest"
    digest = h.engine.add_registry_image(one, 500)
    h.engine.add_registry_image(latest, 500, digest=digest)
    h.executor.submit("p1", [pull(one, digest), pull(latest, digest)], per_node_parallelism=2)
    await h.settle("p1", 2)
    assert h.final("p1", one)[-1].state == h.final("p1", latest)[-1].state == "done"
    assert await h.engine.has_image(one) == await h.engine.has_image(latest) == digest
    assert h.engine.pull_counts[f"{REG}/app@{digest}"] == 1


async def test_failed_item_runs_again_only_with_higher_attempt(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 1000)
    ref = f"{REG}/app@{digest}"
    h.engine.fail(ref, "registry unreachable", times=1)
    h.executor.submit("p1", [pull(image, digest, attempt=1)], per_node_parallelism=1)
    await h.settle("p1", 1)
    failed = h.final("p1", image)[-1]
    assert (failed.state, failed.reason, failed.transient) == (
        "failed",
        "registry unreachable",
        True,
    )

    h.executor.submit("p1", [pull(image, digest, attempt=1)], per_node_parallelism=1)
    await asyncio.sleep(0.01)
    assert h.engine.pull_counts[ref] == 1  # same attempt: re-reported, not re-run

    h.executor.submit("p1", [pull(image, digest, attempt=2)], per_node_parallelism=1)
    await h.wait_for(lambda: h.reports[-1].state == "done")
    assert h.engine.pull_counts[ref] == 2
    assert h.reports[-1].attempt == 2


async def test_concurrent_plans_share_one_pull_of_a_digest(h: Harness) -> None:
    image = f"{REG}/app:1.0"
    digest = h.engine.add_registry_image(image, 1000)
    h.engine.pull_duration_s = 0.2
    h.executor.submit("p1", [pull(image, digest, pull_policy="Always")], per_node_parallelism=1)
    h.executor.submit("p2", [pull(image, digest, pull_policy="Always")], per_node_parallelism=1)
    await h.settle("p1", 1)
    await h.settle("p2", 1)
    assert h.engine.pull_counts[f"{REG}/app@{digest}"] == 1
    assert h.final("p1", image)[-1].state == h.final("p2", image)[-1].state == "done"
    assert h.final("p2", image)[-1].bytes_done == 1000


async def test_per_node_parallelism_bounds_concurrent_pulls(h: Harness) -> None:
    items = []
    for i in range(6):
        image = f"{REG}/app{i}:1"
        items.append(pull(image, h.engine.add_registry_image(image, 100)))
    h.executor.submit("p1", items, per_node_parallelism=2)
    await h.settle("p1", 6)
    assert h.engine.max_active == 2
    assert all(r.state == "done" for r in h.reports if r.state != "pulling")


async def test_missing_image_fails_while_others_complete(h: Harness) -> None:
    good = f"{REG}/good:1"
    digest = h.engine.add_registry_image(good, 100)
    missing = f"{REG}/missing:1"
    h.executor.submit(
        "p1", [pull(missing, "sha256:" + "f" * 64), pull(good, digest)], per_node_parallelism=2
    )
    await h.settle("p1", 2)
    assert h.final("p1", good)[-1].state == "done"
    bad = h.final("p1", missing)[-1]
    assert (bad.state, bad.reason, bad.transient) == ("failed", "manifest unknown", False)


async def test_timeout_fails_with_reason_timeout() -> None:
    async with harness(FakeEngine(pull_duration_s=5.0)) as h:
        image = f"{REG}/slow:1"
        digest = h.engine.add_registry_image(image, 100)
        h.executor.submit("p1", [pull(image, digest, timeout_s=0.1)], per_node_parallelism=1)
        await h.settle("p1", 1)
        failed = h.final("p1", image)[-1]
        assert (failed.state, failed.reason, failed.transient) == ("failed", "timeout", True)
        # the lone waiter left, so the engine pull was cancelled too
        await h.wait_for(lambda: h.engine.active == 0)


async def test_abort_cancels_in_flight_and_queued_items() -> None:
    async with harness(FakeEngine(pull_duration_s=5.0)) as h:
        a, b = f"{REG}/a:1", f"{REG}/b:1"
        items = [
            pull(a, h.engine.add_registry_image(a, 1)),
            pull(b, h.engine.add_registry_image(b, 1)),
        ]
        h.executor.submit("p1", items, per_node_parallelism=1)  # b waits for a's slot
        await h.wait_for(lambda: h.engine.active == 1)
        assert h.executor.abort("p1") == 2
        await h.settle("p1", 2)
        for image in (a, b):
            failed = h.final("p1", image)[-1]
            assert (failed.state, failed.reason, failed.transient) == ("failed", "cancelled", False)
        await h.wait_for(lambda: h.engine.active == 0)
        assert await h.engine.has_image(a) is None


async def test_abort_one_plan_keeps_shared_pull_for_the_other() -> None:
    async with harness(FakeEngine(pull_duration_s=0.3)) as h:
        image = f"{REG}/shared:1"
        digest = h.engine.add_registry_image(image, 1)
        h.executor.submit("p1", [pull(image, digest)], per_node_parallelism=1)
        h.executor.submit("p2", [pull(image, digest)], per_node_parallelism=1)
        await h.wait_for(lambda: h.engine.active == 1)
        h.executor.abort("p1", images=[image])
        await h.settle("p2", 1)
        assert h.final("p1", image)[-1].reason == "cancelled"
        assert h.final("p2", image)[-1].state == "done"
        assert h.engine.pull_counts[f"{REG}/shared@{digest}"] == 1


async def test_progress_reported_at_most_every_interval() -> None:
    clock = FakeClock()
    engine = FakeEngine(sleep=clock.sleep, pull_duration_s=1.0, progress_steps=20)
    async with harness(engine, progress_interval_s=0.25, monotonic=clock) as h:
        image = f"{REG}/big:1"
        digest = engine.add_registry_image(image, 20_000)
        stamps: list[float] = []
        reports = h.reports

        def record(report: ItemReport) -> None:
            stamps.append(clock.now)
            reports.append(report)

        h.executor._on_report = record
        h.executor.submit("p1", [pull(image, digest)], per_node_parallelism=1)
        await h.settle("p1", 1)

        pulling = [t for t, r in zip(stamps, h.reports, strict=True) if r.state == "pulling"]
        assert len(pulling) >= 3, "expected a start report plus periodic progress"
        gaps = [b - a for a, b in itertools.pairwise(pulling)]
        assert min(gaps) >= 0.25 - 1e-9, gaps
        assert len(pulling) <= 1 + 1.0 / 0.25
        progress = [r.bytes_done for r in h.reports if r.state == "pulling"]
        assert progress == sorted(progress) and progress[-1] > 0
        assert h.reports[-1].state == "done" and h.reports[-1].bytes_done == 20_000


async def test_remove_and_prune_items(h: Harness) -> None:
    keep, drop = f"{REG}/keep:1", f"{REG}/drop:1"
    h.engine.add_registry_image(keep, 10)
    h.engine.add_registry_image(drop, 10)
    h.engine.preload(keep)
    h.engine.preload(drop)
    dangling = h.engine.preload(f"{REG}/dangling@sha256:{'3' * 64}", size_bytes=99)
    h.executor.submit(
        "p1",
        [WorkItem(op="remove", image=drop), WorkItem(op="prune", image="")],
        per_node_parallelism=1,
    )
    await h.wait_for(lambda: len([r for r in h.reports if r.state == "done"]) == 2)
    assert await h.engine.has_image(drop) is None
    assert await h.engine.has_image(keep) is not None
    assert await h.engine.has_image(f"{REG}/dangling@{dangling}") is None
    prune = next(r for r in h.reports if r.op == "prune" and r.state == "done")
    assert prune.bytes_done == 99


async def test_auth_is_passed_and_never_in_reports(h: Harness) -> None:
    creds = RegistryAuth("alice", "hunter2-secret", REG)
    image = f"{REG}/private:1"
    digest = h.engine.add_registry_image(image, 10, auth=creds)
    wrong = RegistryAuth("alice", "nope", REG)
    h.executor.submit("p1", [pull(image, digest, auth=wrong)], per_node_parallelism=1)
    h.executor.submit("p2", [pull(image, digest, auth=creds)], per_node_parallelism=1)
    await h.settle("p1", 1)
    await h.settle("p2", 1)
    assert h.final("p1", image)[-1].reason == "unauthorized"
    assert h.final("p2", image)[-1].state == "done"
    text = repr(h.reports) + repr(pull(image, digest, auth=creds))
    assert "hunter2-secret" not in text and "alice" in text


async def test_bad_report_callback_does_not_stop_pulls() -> None:
    engine = FakeEngine()
    calls = 0

    def explode(report: ItemReport) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("receiver bug")

    executor = Executor(engine, node_id="n", progress_interval_s=0.01, on_report=explode)
    image = f"{REG}/x:1"
    digest = engine.add_registry_image(image, 1)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(executor.run())
        executor.submit("p", [pull(image, digest)], per_node_parallelism=1)
        # start and finish were both reported (and raised), and the pull still completed
        await eventually(lambda: calls >= 2 and executor.reports("p")[-1].state == "done")
        task.cancel()
    assert await engine.has_image(image) == digest


async def test_submit_before_run_starts_when_run_starts() -> None:
    engine = FakeEngine()
    reports: list[ItemReport] = []
    executor = Executor(engine, node_id="n", progress_interval_s=0.01, on_report=reports.append)
    image = f"{REG}/x:1"
    executor.submit("p", [pull(image, engine.add_registry_image(image, 1))], per_node_parallelism=1)
    assert reports == []
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(executor.run())
        await eventually(lambda: bool(reports) and reports[-1].state == "done")
        task.cancel()
    assert executor.reports("p")[-1].state == "done"
    executor.forget("p")
    assert executor.reports("p") == []


class SourcedRoute:
    """A `PullRoute` whose bytes came from several sources (as blob sharing reports them)."""

    def __init__(self, engine: FakeEngine, sources: ByteSources) -> None:
        self.engine = engine
        self.sources = sources

    async def pull(
        self,
        image: ImageRef,
        digest: str,
        *,
        auth: RegistryAuth | None,
        plan_id: str,
        nodes: Sequence[str],
        progress: Callable[[PullProgress], None],
    ) -> None:
        def relay(p: PullProgress) -> None:
            progress(replace(p, sources=self.sources))

        await self.engine.pull(f"{image.familiar_repository}@{digest}", auth=auth, progress=relay)


async def test_a_routed_pull_reports_its_bytes_by_source() -> None:
    engine = FakeEngine(pull_duration_s=0.05)
    sources = ByteSources(registry=1_000, peers=7_000, cache=2_000)
    async with harness(engine, route=SourcedRoute(engine, sources)) as h:
        image = f"{REG}/app:1.0"
        digest = engine.add_registry_image(image, 10_000)
        h.executor.submit("p1", [pull(image, digest)], per_node_parallelism=1)
        await h.settle("p1", 1)
    done = h.final("p1", image)[-1]
    assert done.state == "done"
    assert (done.bytes_registry, done.bytes_peers, done.bytes_cache) == (1_000, 7_000, 2_000)
    assert all(r.bytes_peers in (0, 7_000) for r in h.reports)
