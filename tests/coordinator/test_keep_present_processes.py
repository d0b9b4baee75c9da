"""keep_present reacts to events, between real `houndd run` processes (the in-memory engine;
tags resolve at a real docker-registry). The periodic check is set to an hour, so only the
event path can deliver within the test: a node that gains a matching label, a node that joins,
and a node that returns after a restart (its engine lost the image) each get the plan's image
at once, through a derived plan `<name>/keep-present/<node>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures.images import push_image_detailed
from tests.fixtures.services import Registry
from tests.procs import LocalCluster, Node, http

pytestmark = [pytest.mark.docker, pytest.mark.processes]

ENGINE = "fake://?pull_s=0.1&size=1000"
EXTRA = {"keep_present_interval_s": 3600.0}
DEADLINE_S = 30.0  # generous for a loaded machine; the periodic check would take an hour


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    procs = LocalCluster(tmp_path_factory.mktemp("keep-present"))
    try:
        yield procs
    finally:
        procs.close()


def _derived_done(procs: LocalCluster, via: str, name: str) -> int:
    """How many derived plans `name` ended done, as `via` sees them."""
    status, body = procs.nodes[via].get("/v1/plans")
    assert status == 200, body
    return sum(1 for p in body["plans"] if p["name"] == name and p["state"] == "done")


def _add(procs: LocalCluster, name: str, first: Node | None, labels: dict[str, str]) -> Node:
    seeds = [f"127.0.0.1:{first.port}"] if first else []
    return procs.add(name, seeds=seeds, docker_host=ENGINE, extra={**EXTRA, "labels": labels})


def test_a_node_that_matches_joins_or_returns_gets_the_images_at_once(
    cluster: LocalCluster, registry: Registry
) -> None:
    procs = cluster
    pushed = push_image_detailed(registry.url, "keep/app", "1", 50_000, seed=901)
    image = f"{registry.address}/keep/app:1"
    first = _add(procs, "k1", None, {"role": "web"})
    _add(procs, "k2", first, {"role": "db"})
    procs.start_all(["k1", "k2"])
    plan: dict[str, Any] = {
        "name": "web",
        "targets": [{"images": [image], "selector": {"role": "web"}}],
        "policy": {"keep_present": True},
    }
    status, accepted = http("POST", first.api + "/v1/plans", first.token, plan, timeout=30)
    assert status == 201, accepted
    procs.wait_for(
        lambda: procs.nodes["k1"].get(f"/v1/plans/{accepted['id']}")[1]["state"] == "done",
        DEADLINE_S,
        "the plan on k1",
    )

    # k2 gains the label: it asks for the image itself, at once
    k2 = procs.nodes["k2"]
    status, body = http(
        "PUT", k2.api + "/v1/nodes/k2/labels", k2.token, {"labels": {"role": "web"}}
    )
    assert status == 200, body
    procs.wait_for(
        lambda: _derived_done(procs, "k1", "web/keep-present/k2") == 1, DEADLINE_S, "k2's plan"
    )

    # k3 joins with the label: the plan reaches it by anti-entropy, and it asks at once
    _add(procs, "k3", first, {"role": "web"})
    procs.start("k3")
    procs.wait_ready("k3")
    procs.wait_for(
        lambda: _derived_done(procs, "k1", "web/keep-present/k3") == 1, DEADLINE_S, "k3's plan"
    )

    # k3 restarts: its in-memory engine lost the image; back, it asks again at once
    procs.stop("k3")
    procs.wait_for(lambda: procs.members("k1").get("k3") in ("left", "dead"), 20, "k3 gone")
    procs.start("k3")
    procs.wait_ready("k3")
    procs.wait_for(
        lambda: _derived_done(procs, "k1", "web/keep-present/k3") == 2, DEADLINE_S, "k3 again"
    )
    status, view = procs.nodes["k1"].get("/v1/plans")
    for p in view["plans"]:
        if p["name"].startswith("web/keep-present/"):
            _, full = procs.nodes["k1"].get(f"/v1/plans/{p['id']}")
            (item,) = full["items"]
            assert item["digest"] == pushed.digest and item["state"] == "done", item
