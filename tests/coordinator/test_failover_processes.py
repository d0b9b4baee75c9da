"""Failover with real daemon processes on loopback (G3, G4).

The daemons use the in-memory engine (`docker_host = "fake://?pull_s=..."`: every pull takes
that long) so the plan runs long enough to kill its coordinator mid-way; tags still resolve at a
real docker-registry. `houndd_engine_pulls_total` counts the pulls that reached each engine,
which is how "every item done once" is checked.
"""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import push_image
from tests.fixtures.services import Registry
from tests.procs import LocalCluster, http, start_seeded

pytestmark = [pytest.mark.processes, pytest.mark.docker]

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metric(cluster: LocalCluster, node: str, name: str) -> float:
    text = _OPENER.open(cluster.nodes[node].api + "/metrics", timeout=3).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", line)
        if m:
            total += float(m.group(1))
    return total


@pytest.fixture(scope="module")
def images(registry: Registry) -> list[str]:
    refs = []
    for i in range(6):
        push_image(registry.url, f"fo-{i}", "1", 50_000, seed=100 + i)
        refs.append(f"{registry.address}/fo-{i}:1")
    return refs


def start(tmp_path: Path, names: list[str], pull_s: float) -> LocalCluster:
    cluster = start_seeded(
        tmp_path, names, docker_host=f"fake://?pull_s={pull_s}&size=1000000", timeout=30
    )
    try:
        # Generous: a loaded machine makes SWIM flap and elections repeat for a while.
        cluster.wait_for(lambda: _agreed_coordinator(cluster, names), 30, "one agreed coordinator")
    except BaseException:
        cluster.close()
        raise
    return cluster


def _agreed_coordinator(cluster: LocalCluster, names: list[str]) -> str | None:
    seen = {cluster.coordinator(n) for n in names}
    if len(seen) == 1:
        ((coordinator, _term),) = seen
        return coordinator
    return None


def _submit_through_follower(
    cluster: LocalCluster, plan: dict[str, Any]
) -> tuple[str, int, str, str]:
    """Submit `plan` to a node that is not the coordinator; returns (coordinator, its term,
    the node submitted to, plan id)."""
    names = list(cluster.nodes)
    coordinator = _agreed_coordinator(cluster, names)
    assert coordinator is not None
    _, term = cluster.coordinator(coordinator)
    via = next(n for n in names if n != coordinator)
    node = cluster.nodes[via]
    status, accepted = http("POST", node.api + "/v1/plans", node.token, plan, timeout=30)
    assert status == 201, accepted
    return coordinator, term, via, str(accepted["id"])


def _plan(cluster: LocalCluster, via: str, plan_id: str) -> dict[str, Any]:
    status, body = cluster.nodes[via].get(f"/v1/plans/{plan_id}")
    assert status == 200, body
    return dict(body)


@pytest.fixture
def five(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = start(tmp_path, [f"n{i}" for i in range(1, 6)], pull_s=1.0)
    try:
        yield cluster
    finally:
        cluster.close()


def test_sigkill_coordinator_mid_plan_another_takes_over_and_completes(
    five: LocalCluster, images: list[str]
) -> None:
    cluster = five
    names = list(cluster.nodes)
    plan = {
        "name": "failover",
        "targets": [{"images": images, "all": True}],
        "policy": {"parallelism": 5, "per_node_parallelism": 1},
    }
    coordinator, old_term, via, plan_id = _submit_through_follower(cluster, plan)

    # let every node finish at least one item, then kill the coordinator mid-plan
    cluster.wait_for(
        lambda: _plan(cluster, via, plan_id)["summary"]["done"] >= len(names),
        20,
        "first items done",
    )
    done_before = {
        (i["node"], i["image"]): (i["started_at"], i["finished_at"])
        for i in _plan(cluster, via, plan_id)["items"]
        if i["state"] == "done"
    }
    cluster.signal(coordinator, signal.SIGKILL)
    killed_at = time.monotonic()
    survivors = [n for n in names if n != coordinator]

    new = cluster.wait_for(
        lambda: (c := _agreed_coordinator(cluster, survivors)) not in (None, coordinator) and c,
        15,
        "a new coordinator among the survivors",
    )
    took = time.monotonic() - killed_at
    _, new_term = cluster.coordinator(new)
    assert new_term > old_term
    assert took < 10, f"takeover took {took:.1f}s"

    # the killed node comes back and gets its remaining items; the plan completes
    cluster.start(coordinator)
    cluster.wait_ready(coordinator)
    final = cluster.wait_for(
        lambda: (p := _plan(cluster, via, plan_id))["state"] in ("done", "failed") and p,
        60,
        "plan final",
    )
    assert final["state"] == "done", final["summary"]
    assert final["summary"]["done"] == len(names) * len(images)
    for item in final["items"]:
        key = (item["node"], item["image"])
        if key in done_before:  # finished before the kill: never pulled again
            assert (item["started_at"], item["finished_at"]) == done_before[key]
    # every surviving node's engine pulled each of its images exactly once
    for name in survivors:
        assert metric(cluster, name, "houndd_engine_pulls_total") == len(images), name


def test_sigstop_coordinator_is_fenced_and_steps_down(
    five: LocalCluster, images: list[str]
) -> None:
    cluster = five
    names = list(cluster.nodes)
    plan = {
        "name": "paused",
        "targets": [{"images": images, "all": True}],
        "policy": {"parallelism": 2, "per_node_parallelism": 1, "timeout": "3s"},
    }
    coordinator, old_term, via, plan_id = _submit_through_follower(cluster, plan)

    cluster.signal(coordinator, signal.SIGSTOP)
    survivors = [n for n in names if n != coordinator]
    new = cluster.wait_for(
        lambda: (c := _agreed_coordinator(cluster, survivors)) not in (None, coordinator) and c,
        15,
        "a new coordinator while the old one is paused",
    )
    _, new_term = cluster.coordinator(new)
    assert new_term > old_term
    time.sleep(4.0)  # past the plan's item timeout: the paused scheduler will want to act

    fenced_before = sum(metric(cluster, n, "houndd_fenced_refusals_total") for n in survivors)
    log_offset = len(cluster.nodes[coordinator].log())
    cluster.signal(coordinator, signal.SIGCONT)

    def fenced_or_told() -> str | None:
        # Either its stale messages (heartbeats, the scheduler's timeouts) reach a survivor
        # first and are refused by term, or the new coordinator's heartbeat, queued in its
        # socket while it was paused, reaches it first and it steps down without acting:
        # which of the two comes first is the kernel's and the event loop's order.
        fenced = sum(metric(cluster, n, "houndd_fenced_refusals_total") for n in survivors)
        if fenced > fenced_before:
            return "fenced"
        resumed = cluster.nodes[coordinator].log()[log_offset:]
        return "told" if f"coordinates term {new_term}" in resumed else None

    cluster.wait_for(fenced_or_told, 10, "the resumed coordinator fenced or told of the new term")
    cluster.wait_for(
        lambda: cluster.coordinator(coordinator) == (new, cluster.coordinator(new)[1]),
        10,
        "the old coordinator stepped down and follows the new one",
    )
    log = cluster.nodes[coordinator].log()
    assert "coordinator role lost" in log or "stepping down" in log
    final = cluster.wait_for(
        lambda: (p := _plan(cluster, via, plan_id))["state"] in ("done", "failed") and p,
        60,
        "plan final",
    )
    assert final["state"] == "done", final["summary"]


@pytest.mark.parametrize("victim", ["coordinator", "follower"])
def test_two_node_cluster_survivor_coordinates(tmp_path: Path, victim: str) -> None:
    cluster = start(tmp_path, ["a", "b"], pull_s=0.1)
    try:
        coordinator = _agreed_coordinator(cluster, ["a", "b"])
        assert coordinator is not None
        other = "b" if coordinator == "a" else "a"
        killed, survivor = (coordinator, other) if victim == "coordinator" else (other, coordinator)
        cluster.signal(killed, signal.SIGKILL)
        cluster.wait_for(
            lambda: (
                cluster.coordinator(survivor)[0] == survivor
                and cluster.members(survivor).get(killed) == "dead"
            ),
            15,
            f"{survivor} coordinating alone",
        )
        # and it still takes plans: a single alive member is enough copies
        status, body = http(
            "POST",
            cluster.nodes[survivor].api + "/v1/plans",
            cluster.nodes[survivor].token,
            {"name": "alone", "action": "prune", "targets": [{"images": [], "all": True}]},
            timeout=30,
        )
        assert status == 201, body
    finally:
        cluster.close()
