"""A registry that goes away mid-pull, end to end: a real daemon, a real dockerd, a real
docker-registry behind a throttling proxy that the test cuts. The item is retried (the policy's
retries) and ends failed with a named reason, and the plan is final."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import push_image
from tests.fixtures.services import Dockerd, Registry, start_dockerd
from tests.procs import LocalCluster, http
from tests.puller.proxy import ThrottledProxy

pytestmark = [pytest.mark.docker, pytest.mark.processes]

MB = 1 << 20


class ProxyThread:
    """The asyncio proxy on a loop of its own, driven from this synchronous test."""

    def __init__(self, registry: Registry) -> None:
        host, port = registry.address.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self._run(ThrottledProxy(host, int(port), bytes_per_s=1.5 * MB).start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def cut(self) -> None:
        self._run(self.proxy.cut())

    def close(self) -> None:
        self._run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def fragile(tmp_path: Path) -> Iterator[Dockerd]:
    # gives up on a broken download at once instead of dockerd's 5 tries with back-off
    daemon = start_dockerd(
        tmp_path / "d", name="e2e-fragile", extra_args=["--max-download-attempts=1"]
    )
    yield daemon
    daemon.stop()


def test_registry_gone_mid_pull_is_retried_then_failed_named(
    tmp_path: Path, registry: Registry, fragile: Dockerd
) -> None:
    push_image(registry.url, "gone", "1", 4 * MB, seed=404)
    proxy = ProxyThread(registry)
    cluster = LocalCluster(tmp_path / "houndd")
    node = cluster.add("r1", docker_host=fragile.host)
    try:
        cluster.start("r1")
        cluster.wait_ready("r1")
        cluster.wait_for(lambda: cluster.coordinator("r1")[0] == "r1", 10, "coordinator")
        image = f"{proxy.proxy.address}/gone:1"
        status, accepted = http(
            "POST",
            node.api + "/v1/plans",
            node.token,
            {
                "name": "gone",
                "targets": [{"images": [image], "all": True}],
                "policy": {"retries": 1},
            },
            timeout=30,
        )
        assert status == 201, accepted
        cluster.wait_for(lambda: proxy.proxy.bytes_down >= MB, 30, "the pull under way")
        proxy.cut()

        def final() -> dict[str, Any] | None:
            status, plan = node.get(f"/v1/plans/{accepted['id']}")
            return plan if status == 200 and plan["state"] in ("done", "failed") else None

        plan = cluster.wait_for(final, 60, "the plan final")
        (item,) = plan["items"]
        assert plan["state"] == "failed"
        assert item["state"] == "failed" and item["attempt"] == 2, item
        assert item["reason"] == "retries exhausted: registry unreachable", item
        assert node.alive()
    finally:
        cluster.close()
        proxy.close()
