"""Dry runs and disk-aware admission between real `houndd run` processes: the in-memory engine
with a set amount of free disk (`fake://?disk=BYTES`) on each node, tags resolved at a real
docker-registry (which gives the image sizes).

- `submit --dry-run` says per node which images it lacks, the bytes to transfer, whether its
  free disk suffices, and which node could not answer (its engine is down); nothing is stored.
- Submitted, a node without room gets those items failed as `no space` before any pull (its
  engine is never asked to pull them), the rest of the plan runs.
- Images a node already holds need no room: the next dry run fits what did not before.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.images import PushedImage, push_image_detailed
from tests.fixtures.services import Registry
from tests.procs import LocalCluster, http, run_houndd

pytestmark = [pytest.mark.docker, pytest.mark.processes]

NAMES = ["roomy", "tight", "full", "nodocker"]


@dataclass
class Setup:
    cluster: LocalCluster
    a: PushedImage  # about 1 MB
    b: PushedImage  # about 2 MB
    refs: tuple[str, str]

    def post(self, path: str, plan: dict[str, Any]) -> tuple[int, Any]:
        node = self.cluster.nodes["roomy"]
        return http("POST", node.api + path, node.token, plan, timeout=30)

    def plans(self) -> list[Any]:
        status, body = self.cluster.nodes["roomy"].get("/v1/plans")
        assert status == 200, body
        return list(body["plans"])

    def metric(self, name: str, series: str) -> float:
        with urllib.request.urlopen(self.cluster.nodes[name].api + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(series + " "):
                    return float(line.split()[1])
        return 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Setup]:
    a = push_image_detailed(registry.url, "admission/a", "1", 1_000_000, seed=801)
    b = push_image_detailed(registry.url, "admission/b", "1", 2_000_000, seed=802)
    refs = (f"{registry.address}/admission/a:1", f"{registry.address}/admission/b:1")
    disks = {"roomy": 100 << 30, "tight": 2_500_000, "full": 100_000}
    cluster = LocalCluster(tmp_path_factory.mktemp("admission"))
    first = None
    for name in NAMES:
        host = f"fake://?pull_s=0.1&size=1000&disk={disks[name]}" if name in disks else None
        node = cluster.add(
            name,
            seeds=[f"127.0.0.1:{first.port}"] if first else [],
            # nodocker keeps the default: a Docker socket that does not exist
            **({"docker_host": host} if host else {}),
        )
        first = first or node
    try:
        cluster.start_all(NAMES)
        yield Setup(cluster, a, b, refs)
    finally:
        cluster.close()


def _by_node(preview: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in preview["nodes"]}


def test_a_dry_run_says_what_each_node_lacks_and_whether_it_fits(
    setup: Setup, tmp_path: Path
) -> None:
    a, b = setup.refs
    plan = {"name": "dry", "targets": [{"images": [a, b], "nodes": NAMES}]}
    before = len(setup.plans())
    status, preview = setup.post("/v1/plans?dry_run=true", plan)
    assert status == 200, preview
    assert preview["sizes"] == {a: setup.a.size_bytes, b: setup.b.size_bytes}
    both = setup.a.size_bytes + setup.b.size_bytes
    nodes = _by_node(preview)
    assert nodes["roomy"] == {
        "node": "roomy", "answered": True, "free_disk_bytes": 100 << 30, "lacking": [a, b],
        "present": [], "bytes_needed": both, "no_space": [], "note": "",
    }  # fmt: skip
    # largest first: b fits in 2.5 MB, a no longer does
    assert (nodes["tight"]["bytes_needed"], nodes["tight"]["no_space"]) == (both, [a])
    assert nodes["full"]["no_space"] == [a, b]
    assert nodes["nodocker"]["answered"] is False
    assert "engine unavailable" in nodes["nodocker"]["note"], nodes["nodocker"]
    assert len(setup.plans()) == before  # nothing stored

    # the CLI's table, and its exit code: 1, something would fail
    path = tmp_path / "dry.json"
    path.write_text(json.dumps(plan))
    node = setup.cluster.nodes["tight"]  # not necessarily the coordinator: forwarded
    shown = run_houndd("submit", "--dry-run", str(path), "--api", node.api, "--token", node.token)
    assert shown.returncode == 1, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()[2:]}
    assert rows["roomy"].endswith("yes"), shown.stdout
    assert rows["tight"].endswith(f"no: {a} would fail as no space"), shown.stdout
    assert "unknown: " in rows["nodocker"] and "engine unavailable" in rows["nodocker"]
    assert "nothing stored" in shown.stdout.splitlines()[0]
    assert len(setup.plans()) == before

    # a prune plan transfers nothing: its targets are listed, not asked
    status, preview = setup.post(
        "/v1/plans?dry_run=true", {"name": "gc", "action": "prune", "targets": [{"all": True}]}
    )
    assert status == 200, preview
    assert {n["node"]: (n["answered"], n["bytes_needed"], n["note"]) for n in preview["nodes"]} == {
        name: (False, 0, "a prune plan") for name in NAMES
    }
    assert len(setup.plans()) == before


def test_a_node_without_room_gets_no_space_before_any_pull(setup: Setup) -> None:
    a, b = setup.refs
    names = ["roomy", "tight", "full"]
    plan = {"name": "warm", "targets": [{"images": [a, b], "nodes": names}]}
    status, accepted = setup.post("/v1/plans", plan)
    assert status == 201, accepted
    assert accepted["no_space"] == {"tight": [a], "full": [a, b]}
    final = setup.cluster.wait_for(lambda: _final(setup, accepted["id"]), 60, "the plan to finish")
    assert final["state"] == "failed"
    items = {(i["node"], i["image"]): i for i in final["items"]}
    assert len(items) == 6
    for key in [("roomy", a), ("roomy", b), ("tight", b)]:
        assert items[key]["state"] == "done", items[key]
    digests = {g["image"]: g["digest"] for g in final["groups"]}
    for key in [("tight", a), ("full", a), ("full", b)]:
        item = items[key]
        assert (item["state"], item["reason"], item["attempt"]) == ("failed", "no space", 0)
        assert item["digest"] == digests[key[1]] and item["final"] is True
        assert "MiB free" in item["detail"], item
    assert final["summary"] == {
        "total": 6, "done": 3, "failed": 3, "pulling": 0, "pending": 0, "cancelled": 0
    }  # fmt: skip
    # never pulled: the engine of `full` was not asked at all, `tight` only for b
    assert setup.metric("full", "houndd_engine_pulls_total") == 0
    assert setup.metric("tight", "houndd_engine_pulls_total") == 1

    # what a node holds needs no room: a now fits on tight, beside the b it holds
    status, preview = setup.post(
        "/v1/plans?dry_run=true", {"name": "again", "targets": [{"images": [a, b], "nodes": names}]}
    )
    assert status == 200, preview
    nodes = _by_node(preview)
    assert (nodes["roomy"]["lacking"], nodes["roomy"]["present"]) == ([], [a, b])
    assert nodes["roomy"]["bytes_needed"] == 0
    assert (nodes["tight"]["lacking"], nodes["tight"]["present"]) == ([a], [b])
    assert (nodes["tight"]["bytes_needed"], nodes["tight"]["no_space"]) == (setup.a.size_bytes, [])


def _final(setup: Setup, plan_id: str) -> dict[str, Any] | None:
    status, body = setup.cluster.nodes["roomy"].get(f"/v1/plans/{plan_id}")
    assert status == 200, body
    return dict(body) if body["state"] in ("done", "failed", "cancelled") else None
