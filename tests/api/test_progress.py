"""A plan pulled through two in-process daemons (fake engines, a real docker-registry resolving
the tags): the SSE stream of `GET /v1/plans/{id}/events`, and `/metrics` afterwards.

Two nodes, not one: the coordinator runs its own share without a dispatch round trip, so only
a remote node's dispatch shows in `houndd_dispatch_latency_seconds`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from platform import python_version
from typing import Any

import pytest

from houndd import __version__
from houndd.puller.memory import FakeEngine
from houndd.wire import Keyring
from tests.api.harness import RunningDaemon, running_daemon, sample, scrape
from tests.fixtures.images import PushedImage, push_image_detailed
from tests.fixtures.services import Registry

pytestmark = pytest.mark.docker

PULL_S = 1.0  # long enough for several progress reports (local preset: every 0.2 s)


@dataclass
class Warm:
    node: RunningDaemon  # the one the client talks to
    other: RunningDaemon
    images: dict[str, PushedImage]  # reference -> what the registry holds

    @property
    def nodes(self) -> list[RunningDaemon]:
        return [self.node, self.other]


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Warm]:
    images = {
        f"{registry.address}/api-progress-a:1": push_image_detailed(
            registry.url, "api-progress-a", "1", 300_000, seed=71
        ),
        f"{registry.address}/api-progress-b:1": push_image_detailed(
            registry.url, "api-progress-b", "1", 200_000, seed=72, layers=2
        ),
    }
    engines = [FakeEngine(pull_duration_s=PULL_S, progress_steps=8) for _ in range(2)]
    for engine in engines:
        for ref, pushed in images.items():
            # the fake engines serve the very digests and sizes the real registry resolves to
            engine.add_registry_image(ref, pushed.size_bytes, digest=pushed.digest)
    root = tmp_path_factory.mktemp("api-progress")
    keyring = Keyring.generate()
    with running_daemon(root / "a", name="warm-a", engine=engines[0], keyring=keyring) as a:
        seeds = (f"127.0.0.1:{a.daemon.transport.port}",)
        with running_daemon(
            root / "b", name="warm-b", engine=engines[1], keyring=keyring, seeds=seeds
        ) as b:
            for n in (a, b):
                n.wait_for(partial(_both_alive, n), 10, "both members alive")
                n.wait_for(partial(_coordinator, n), 10, "a coordinator")
            yield Warm(a, b, images)


def _both_alive(node: RunningDaemon) -> bool:
    states = [m["state"] for m in node.get_json("/v1/cluster")["members"]]
    return states == ["alive", "alive"]


def _coordinator(node: RunningDaemon) -> str | None:
    coordinator: str | None = node.get_json("/v1/health")["coordinator"]
    return coordinator


def _plan_done(node: RunningDaemon) -> bool:
    return sample(scrape(node), "houndd_plans", state="done") == 1


def _read_events(node: RunningDaemon, plan_id: str, timeout_s: float) -> list[tuple[str, Any]]:
    """Every SSE event of the stream until the server ends it."""
    resp = node.request("GET", f"/v1/plans/{plan_id}/events", stream=True)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    events: list[tuple[str, Any]] = []
    kind, data = "", ""
    deadline = time.monotonic() + timeout_s
    with resp:
        for raw in resp.iter_lines():
            assert time.monotonic() < deadline, f"stream still open after {timeout_s}s"
            line = raw.decode()
            if line.startswith(":"):
                continue  # keepalive comment
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data += line[len("data: ") :]
            elif line == "" and kind:
                events.append((kind, json.loads(data)))
                kind, data = "", ""
    return events


@pytest.fixture(scope="module")
def pulled(warm: Warm) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """One plan for both images; its event stream from right after submission."""
    submitted = warm.node.submit(
        {"name": "api-progress", "targets": [{"images": sorted(warm.images), "all": True}]}
    )
    events = _read_events(warm.node, submitted["id"], timeout_s=30)
    return submitted, events


def test_stream_is_snapshot_then_items_then_final(
    warm: Warm, pulled: tuple[dict[str, Any], list[tuple[str, Any]]]
) -> None:
    submitted, events = pulled
    kinds = [k for k, _ in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "final", kinds
    assert set(kinds[1:-1]) == {"item"}, kinds

    snapshot, final = events[0][1]["plan"], events[-1][1]["plan"]
    assert snapshot["id"] == final["id"] == submitted["id"]
    assert snapshot["state"] in ("pending", "running")
    assert {g["image"]: g["digest"] for g in submitted["groups"]} == {
        ref: p.digest for ref, p in warm.images.items()
    }

    assert final["state"] == "done"
    assert final["summary"]["done"] == final["summary"]["total"] == 4
    assert "items" not in final  # every reader has them: the snapshot and the item events
    items = {(i["node"], i["image"]): i for i in snapshot["items"]}
    items.update(
        {(e["item"]["node"], e["item"]["image"]): e["item"] for k, e in events if k == "item"}
    )
    assert sorted(items) == sorted((n.name, ref) for n in warm.nodes for ref in warm.images)
    fetched = warm.node.get_json(f"/v1/plans/{submitted['id']}")["items"]
    assert items == {(i["node"], i["image"]): i for i in fetched}  # the stream told it all
    for item in items.values():
        pushed = warm.images[item["image"]]
        assert item["state"] == "done" and item["final"] is True
        assert item["digest"] == pushed.digest
        assert item["bytes_done"] == item["bytes_total"] == pushed.size_bytes


def test_item_progress_bytes_increase_to_the_image_size(
    warm: Warm, pulled: tuple[dict[str, Any], list[tuple[str, Any]]]
) -> None:
    _, events = pulled
    for node, (ref, pushed) in [(n, i) for n in warm.nodes for i in warm.images.items()]:
        rows = [
            e["item"]
            for k, e in events
            if k == "item" and (e["item"]["node"], e["item"]["image"]) == (node.name, ref)
        ]
        states = [r["state"] for r in rows]
        assert states[-1] == "done", states
        assert "pulling" in states, states
        # the lattice never goes back: pulling ... pulling, done
        assert states == sorted(states, key=["pending", "pulling", "done"].index), states
        done_bytes = [r["bytes_done"] for r in rows if r["state"] == "pulling"]
        assert done_bytes == sorted(done_bytes), done_bytes
        assert len(set(done_bytes)) >= 2, f"progress never moved: {done_bytes}"
        assert all(0 <= b <= pushed.size_bytes for b in done_bytes)
        assert rows[-1]["bytes_done"] == pushed.size_bytes


def test_stream_of_a_finished_plan_is_snapshot_and_final(
    warm: Warm, pulled: tuple[dict[str, Any], list[tuple[str, Any]]]
) -> None:
    submitted, _ = pulled
    events = _read_events(warm.node, submitted["id"], timeout_s=5)
    assert [k for k, _ in events] == ["snapshot", "final"]
    assert events[1][1]["plan"]["state"] == "done"


def test_metrics_after_the_plan(
    warm: Warm, pulled: tuple[dict[str, Any], list[tuple[str, Any]]]
) -> None:
    total = sum(p.size_bytes for p in warm.images.values())
    # the plan's results reach every node by replication; wait for the other node's view
    for n in warm.nodes:
        n.wait_for(partial(_plan_done, n), 10, "the plan done in this node's view")
    scrapes = {n.name: scrape(n) for n in warm.nodes}
    assert sample(scrapes[warm.node.name], "houndd_plans_submitted_total") == 1
    assert sample(scrapes[warm.other.name], "houndd_plans_submitted_total") == 0
    for m in scrapes.values():
        assert sample(m, "houndd_plans", state="done") == 1
        assert sample(m, "houndd_plans", state="running") == 0
        assert sample(m, "houndd_plans", state="failed") == 0
        assert sample(m, "houndd_items", state="done") == 4
        assert sample(m, "houndd_items", state="pulling") == 0
        assert sample(m, "houndd_items", state="failed") == 0
        # each node counts what its own puller pulled: both images once
        assert sample(m, "houndd_pulled_bytes_total") == total

        assert sample(m, "houndd_pull_duration_seconds_count", outcome="done") == 2
        pull_sum = sample(m, "houndd_pull_duration_seconds_sum", outcome="done")
        assert 2 * PULL_S * 0.9 <= pull_sum <= 2 * PULL_S + 10, pull_sum
        # each pull takes PULL_S: none in the 0.5 s bucket
        assert sample(m, "houndd_pull_duration_seconds_bucket", outcome="done", le="0.5") == 0
        assert sample(m, "houndd_pull_duration_seconds_bucket", outcome="done", le="+Inf") == 2

        assert sample(m, "houndd_members", state="alive") == 2
        assert sample(m, "houndd_term") >= 1
        assert sample(m, "houndd_fenced_refusals_total") == 0
        assert sample(m, "houndd_engine_up") == 1
        assert sample(m, "houndd_build_info", version=__version__, python=python_version()) == 1
    # exactly one of the two coordinates
    assert sorted(sample(m, "houndd_is_coordinator") for m in scrapes.values()) == [0, 1]

    # the coordinator dispatched the other node's share over the network, once or more
    counts = [sample(m, "houndd_dispatch_latency_seconds_count") for m in scrapes.values()]
    sums = [sample(m, "houndd_dispatch_latency_seconds_sum") for m in scrapes.values()]
    assert sum(counts) >= 1, counts
    assert 0 <= sum(sums) / sum(counts) < 2.0, (sums, counts)


def test_a_failed_item_keeps_the_plans_resolved_digest(warm: Warm, registry: Registry) -> None:
    ref = f"{registry.address}/api-progress-fails:1"
    pushed = push_image_detailed(registry.url, "api-progress-fails", "1", 100_000, seed=73)
    for engine in (warm.node.engine, warm.other.engine):
        engine.add_registry_image(ref, pushed.size_bytes, digest=pushed.digest)
        # transient: the worker's report keeps the digest, the coordinator's final verdict
        # ("retries exhausted") carries none of its own
        engine.fail(
            f"{registry.address}/api-progress-fails@{pushed.digest}", "registry unreachable"
        )
    try:
        submitted = warm.node.submit(
            {
                "name": "api-progress-fails",
                "targets": [{"images": [ref], "all": True}],
                "policy": {"retries": 0},
            }
        )
        final = warm.node.wait_plan(submitted["id"], timeout=30)
    finally:
        for engine in (warm.node.engine, warm.other.engine):
            engine.clear_failures()
    assert final["state"] == "failed", final
    for item in final["items"]:
        assert item["state"] == "failed" and item["reason"].startswith("retries exhausted"), item
        assert item["digest"] == pushed.digest, item
