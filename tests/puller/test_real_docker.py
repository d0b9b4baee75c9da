"""The executor over a real dockerd, pulling images the tests push to a real registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from houndd.image.credentials import RegistryAuth
from houndd.puller.docker import DockerEngine
from houndd.puller.engine import PullProgress
from houndd.puller.executor import Executor, ItemReport, WorkItem
from tests.fixtures.images import push_image
from tests.fixtures.services import Dockerd, Registry, start_dockerd
from tests.puller.proxy import ThrottledProxy
from tests.puller.waiting import eventually

pytestmark = pytest.mark.docker

MB = 1 << 20


class CountingDockerEngine(DockerEngine):
    """DockerEngine that remembers which references it was asked to pull."""

    def __init__(self, docker_host: str) -> None:
        super().__init__(docker_host)
        self.pulled: list[str] = []

    async def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | None,
        progress: Callable[[PullProgress], None],
    ) -> None:
        self.pulled.append(ref)
        await super().pull(ref, auth=auth, progress=progress)


@dataclass
class Node:
    engine: CountingDockerEngine
    executor: Executor
    dockerd: Dockerd
    reports: list[ItemReport] = field(default_factory=list)

    def last(self, plan: str, image: str) -> ItemReport:
        return [r for r in self.reports if r.plan_id == plan and r.image == image][-1]

    async def settle(self, plan: str, count: int, timeout_s: float = 60.0) -> None:
        def settled() -> bool:
            finished = {r.image for r in self.reports if r.plan_id == plan and r.state != "pulling"}
            return len(finished) >= count

        await eventually(settled, timeout_s=timeout_s, interval_s=0.02)


@contextlib.asynccontextmanager
async def running_node(dockerd: Dockerd) -> AsyncIterator[Node]:
    engine = CountingDockerEngine(dockerd.host)
    reports: list[ItemReport] = []
    executor = Executor(engine, node_id="real-1", progress_interval_s=0.1, on_report=reports.append)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(executor.run())
        yield Node(engine, executor, dockerd, reports)
        task.cancel()
    await engine.close()


@pytest.fixture
async def node(dockerd: Dockerd) -> AsyncIterator[Node]:
    async with running_node(dockerd) as n:
        yield n


@pytest.fixture(scope="module")
def fragile_dockerd(
    tmp_path_factory: pytest.TempPathFactory, dockerd: Dockerd
) -> Iterator[Dockerd]:
    """A dockerd that gives up on a broken download at once (instead of 5 tries with back-off
    of 5..20 s), so a cut registry shows up within the test's time budget."""
    daemon = start_dockerd(
        tmp_path_factory.mktemp("fragile-dockerd"),
        name="fragile",
        extra_args=["--max-download-attempts=1"],
    )
    yield daemon
    daemon.stop()


def _repo(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def _inspect(dockerd: Dockerd, ref: str) -> dict[str, Any] | None:
    result = dockerd.docker("image", "inspect", ref, check=False)
    if result.returncode != 0:
        return None
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data[0]


async def _push(reg: Registry, repo: str, tag: str, size: int, seed: int = 0) -> str:
    return await asyncio.to_thread(push_image, reg.url, repo, tag, size, seed=seed)


async def test_pull_leaves_image_at_digest_with_tag(node: Node, registry: Registry) -> None:
    repo = _repo("real")
    digest = await _push(registry, repo, "1.0", 3 * MB, seed=1)
    image = f"{registry.address}/{repo}:1.0"
    node.executor.submit("p1", [WorkItem("pull", image, digest)], per_node_parallelism=2)
    await node.settle("p1", 1)

    done = node.last("p1", image)
    assert (done.state, done.skipped) == ("done", False), done
    assert done.bytes_done == done.bytes_total >= 3 * MB
    assert node.engine.pulled == [f"{registry.address}/{repo}@{digest}"]
    inspected = _inspect(node.dockerd, image)
    assert inspected is not None
    assert f"{registry.address}/{repo}@{digest}" in inspected["RepoDigests"]
    assert image in inspected["RepoTags"]


async def test_if_not_present_skips_and_always_repulls(node: Node, registry: Registry) -> None:
    repo = _repo("policy")
    digest = await _push(registry, repo, "1.0", MB, seed=2)
    image = f"{registry.address}/{repo}:1.0"
    node.executor.submit("p1", [WorkItem("pull", image, digest)], per_node_parallelism=1)
    await node.settle("p1", 1)
    assert len(node.engine.pulled) == 1

    node.executor.submit("p2", [WorkItem("pull", image, digest)], per_node_parallelism=1)
    await node.settle("p2", 1)
    skipped = node.last("p2", image)
    assert (skipped.state, skipped.skipped, skipped.bytes_done) == ("done", True, 0)
    assert len(node.engine.pulled) == 1

    always = WorkItem("pull", image, digest, pull_policy="Always")
    node.executor.submit("p3", [always], per_node_parallelism=1)
    await node.settle("p3", 1)
    assert (node.last("p3", image).state, node.last("p3", image).skipped) == ("done", False)
    assert len(node.engine.pulled) == 2


async def test_missing_image_fails_while_others_complete(node: Node, registry: Registry) -> None:
    repo = _repo("mixed")
    digest = await _push(registry, repo, "ok", MB, seed=3)
    good = f"{registry.address}/{repo}:ok"
    missing = f"{registry.address}/{repo}:missing"
    node.executor.submit(
        "p1",
        [WorkItem("pull", missing, "sha256:" + "e" * 64), WorkItem("pull", good, digest)],
        per_node_parallelism=2,
    )
    await node.settle("p1", 2)
    assert node.last("p1", good).state == "done"
    bad = node.last("p1", missing)
    assert (bad.state, bad.reason, bad.transient) == ("failed", "manifest unknown", False)


async def test_remove_and_prune_items(node: Node, registry: Registry) -> None:
    repo = _repo("cleanup")
    d1 = await _push(registry, repo, "keep", MB, seed=4)
    d2 = await _push(registry, repo, "drop", MB, seed=5)
    d3 = await _push(registry, repo, "dangling", MB, seed=6)
    keep, drop = f"{registry.address}/{repo}:keep", f"{registry.address}/{repo}:drop"
    dangling = f"{registry.address}/{repo}@{d3}"
    node.executor.submit(
        "p1", [WorkItem("pull", keep, d1), WorkItem("pull", drop, d2)], per_node_parallelism=2
    )
    await node.settle("p1", 2)
    await node.engine.pull(dangling, auth=None, progress=lambda p: None)  # no tag
    assert _inspect(node.dockerd, dangling) is not None

    node.executor.submit("p2", [WorkItem("remove", drop, d2)], per_node_parallelism=1)
    await node.settle("p2", 1)
    assert node.last("p2", drop).state == "done"
    assert _inspect(node.dockerd, drop) is None
    assert _inspect(node.dockerd, f"{registry.address}/{repo}@{d2}") is None

    node.executor.submit("p3", [WorkItem("prune", "")], per_node_parallelism=1)
    await node.settle("p3", 1)
    pruned = node.last("p3", "")
    assert pruned.state == "done" and pruned.bytes_done >= MB
    assert _inspect(node.dockerd, dangling) is None
    assert _inspect(node.dockerd, keep) is not None


async def _slow_setup(
    registry: Registry, size: int, rate: float
) -> tuple[ThrottledProxy, str, str]:
    repo = _repo("slow")
    digest = await _push(registry, repo, "1.0", size, seed=7)
    proxy = await ThrottledProxy(registry.host, registry.port, bytes_per_s=rate).start()
    return proxy, f"{proxy.address}/{repo}:1.0", digest


async def test_registry_gone_mid_pull_is_transient_unreachable(
    fragile_dockerd: Dockerd, registry: Registry
) -> None:
    proxy, image, digest = await _slow_setup(registry, 4 * MB, rate=1.5 * MB)
    try:
        async with running_node(fragile_dockerd) as node:
            node.executor.submit("p1", [WorkItem("pull", image, digest)], per_node_parallelism=1)
            await eventually(lambda: proxy.bytes_down >= MB, timeout_s=20)
            assert node.last("p1", image).state == "pulling"
            await proxy.cut()
            await node.settle("p1", 1, timeout_s=30)
            failed = node.last("p1", image)
            assert (failed.state, failed.reason, failed.transient) == (
                "failed",
                "registry unreachable",
                True,
            ), failed
            assert any(r.state == "pulling" and r.bytes_done > 0 for r in node.reports)
            assert await node.engine.has_image(image) is None
    finally:
        await proxy.close()


async def test_abort_cancels_in_flight_pull(node: Node, registry: Registry) -> None:
    size = 2 * MB
    proxy, image, digest = await _slow_setup(registry, size, rate=1 * MB)
    try:
        node.executor.submit("p1", [WorkItem("pull", image, digest)], per_node_parallelism=1)
        await eventually(lambda: proxy.bytes_down >= 300 * 1024, timeout_s=20)
        assert node.executor.abort("p1") == 1
        await node.settle("p1", 1, timeout_s=2)
        failed = node.last("p1", image)
        assert (failed.state, failed.reason, failed.transient) == ("failed", "cancelled", False)

        # dockerd 20.10 lets an in-flight layer download run to its end after the client
        # went away, but the cancelled pull never registers an image: wait until the
        # layer's bytes have passed and check.
        await eventually(
            lambda: proxy.bytes_down >= size or not proxy.open_connections, timeout_s=20
        )
        await asyncio.sleep(0.3)
        assert _inspect(node.dockerd, image) is None
        assert len(node.engine.pulled) == 1
    finally:
        await proxy.close()


async def test_progress_reports_while_pulling(node: Node, registry: Registry) -> None:
    proxy, image, digest = await _slow_setup(registry, 3 * MB, rate=3 * MB)
    try:
        node.executor.submit("p1", [WorkItem("pull", image, digest)], per_node_parallelism=1)
        await node.settle("p1", 1, timeout_s=30)
        pulling = [r for r in node.reports if r.state == "pulling"]
        assert len(pulling) >= 3, pulling
        assert any(0 < r.bytes_done < r.bytes_total for r in pulling)
        assert node.last("p1", image).state == "done"
    finally:
        await proxy.close()
