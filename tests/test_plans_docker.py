"""Plans end to end through real daemons, real dockerds and a real docker-registry.

Three `houndd run` processes on loopback, each with a dockerd of its own, pull images the test
generates and pushes itself. Everything a user sees goes through the HTTP API or the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.docker import AUTH_USER
from tests.fixtures.images import push_image
from tests.fixtures.services import Dockerd, Registry, start_dockerd
from tests.procs import LocalCluster, http

pytestmark = [pytest.mark.docker, pytest.mark.processes]

NAMES = ["w1", "w2", "w3"]


@dataclass
class DockerCluster:
    procs: LocalCluster
    dockerds: dict[str, Dockerd]
    registry: Registry
    auth_registry: Registry
    digests: dict[str, str]

    def ref(self, name: str) -> str:
        return f"{self.registry.address}/{name}"

    def submit(self, plan: dict[str, Any], via: str = "w2") -> tuple[int, Any]:
        node = self.procs.nodes[via]
        return http("POST", node.api + "/v1/plans", node.token, plan, timeout=30)

    def wait_plan(self, plan_id: str, via: str = "w1", timeout: float = 60) -> dict[str, Any]:
        node = self.procs.nodes[via]

        def final() -> dict[str, Any] | None:
            status, body = node.get(f"/v1/plans/{plan_id}")
            if status == 200 and body["state"] in ("done", "failed", "cancelled"):
                return dict(body)
            return None

        result: dict[str, Any] = self.procs.wait_for(final, timeout, f"plan {plan_id} final")
        return result

    def repo_digests(self, node: str) -> set[str]:
        out = self.dockerds[node].docker("images", "--digests", "--format", "{{json .}}").stdout
        found = set()
        for line in out.splitlines():
            row = json.loads(line)
            if row.get("Digest", "<none>") != "<none>":
                found.add(f"{row['Repository']}@{row['Digest']}")
        return found

    def tags(self, node: str) -> set[str]:
        out = self.dockerds[node].docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        return set(out.split())


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, auth_registry: Registry
) -> Iterator[DockerCluster]:
    root = tmp_path_factory.mktemp("plans")
    dockerds: dict[str, Dockerd] = {}
    procs = LocalCluster(root / "houndd")
    try:
        for name in NAMES:
            dockerds[name] = start_dockerd(root / f"d-{name}", name=f"plans-{name}")
        digests = {
            "app-a:1": push_image(registry.url, "app-a", "1", 2_000_000, seed=1),
            "app-b:1": push_image(registry.url, "app-b", "1", 1_000_000, seed=2, layers=2),
            "app-c:1": push_image(registry.url, "app-c", "1", 3_000_000, seed=3),
            "app-d:1": push_image(registry.url, "app-d", "1", 500_000, seed=4),
            "secret-app:1": push_image(
                auth_registry.url,
                "secret-app",
                "1",
                700_000,
                seed=5,
                auth=(AUTH_USER.username, AUTH_USER.password),
            ),
        }
        first = procs.add(NAMES[0], docker_host=dockerds[NAMES[0]].host)
        for name in NAMES[1:]:
            procs.add(
                name,
                docker_host=dockerds[name].host,
                seeds=[f"127.0.0.1:{first.port}"],
                extra={"labels": {"tier": "gpu" if name == "w3" else "cpu"}},
            )
        procs.start_all(NAMES)
        yield DockerCluster(procs, dockerds, registry, auth_registry, digests)
    finally:
        procs.close()
        for d in dockerds.values():
            d.stop()


def test_plan_pulls_images_at_the_resolved_digest(cluster: DockerCluster) -> None:
    a, b = cluster.ref("app-a:1"), cluster.ref("app-b:1")
    status, accepted = cluster.submit(
        {"name": "warm", "targets": [{"images": [a, b], "nodes": ["w1", "w2"]}]}
    )
    assert status == 201, accepted
    groups = {g["image"]: g for g in accepted["groups"]}
    assert groups[a]["nodes"] == ["w1", "w2"] and groups[b]["nodes"] == ["w1", "w2"]
    assert groups[a]["digest"] == cluster.digests["app-a:1"]

    plan = cluster.wait_plan(accepted["id"], via="w3")  # any node can report
    assert plan["state"] == "done", plan
    assert plan["summary"]["done"] == 4
    for item in plan["items"]:
        assert item["digest"] == cluster.digests[item["image"].rsplit("/", 1)[1]]
        assert item["attempt"] >= 1 and item["finished_at"] >= item["started_at"]
    for node in ("w1", "w2"):
        have = cluster.repo_digests(node)
        assert f"{cluster.registry.address}/app-a@{cluster.digests['app-a:1']}" in have
        assert f"{cluster.registry.address}/app-b@{cluster.digests['app-b:1']}" in have
        assert {a, b} <= cluster.tags(node)
    assert a not in cluster.tags("w3")


def test_if_not_present_skips_and_always_repulls(cluster: DockerCluster) -> None:
    c = cluster.ref("app-c:1")
    status, first = cluster.submit({"name": "c1", "targets": [{"images": [c], "nodes": ["w1"]}]})
    assert status == 201, first
    assert cluster.wait_plan(first["id"])["state"] == "done"

    status, again = cluster.submit({"name": "c2", "targets": [{"images": [c], "nodes": ["w1"]}]})
    plan = cluster.wait_plan(again["id"])
    assert plan["state"] == "done" and plan["items"][0]["skipped"] is True

    status, always = cluster.submit(
        {
            "name": "c3",
            "targets": [{"images": [c], "nodes": ["w1"]}],
            "policy": {"pull_policy": "Always"},
        }
    )
    plan = cluster.wait_plan(always["id"])
    assert plan["state"] == "done" and plan["items"][0]["skipped"] is False


def test_missing_image_fails_named_and_the_rest_completes(cluster: DockerCluster) -> None:
    d, missing = cluster.ref("app-d:1"), cluster.ref("does-not-exist:1")
    status, accepted = cluster.submit(
        {"name": "partial", "targets": [{"images": [d, missing], "all": True}]}
    )
    assert status == 201, accepted
    assert accepted["unresolved"][missing]["reason"] == "manifest unknown"
    plan = cluster.wait_plan(accepted["id"])
    assert plan["state"] == "failed"
    by_image: dict[str, list[dict[str, Any]]] = {}
    for item in plan["items"]:
        by_image.setdefault(item["image"], []).append(item)
    assert {i["state"] for i in by_image[d]} == {"done"} and len(by_image[d]) == 3
    assert {i["reason"] for i in by_image[missing]} == {"manifest unknown"}
    for node in NAMES:
        assert d in cluster.tags(node)


def test_selector_targets_and_unknown_nodes_are_reported(cluster: DockerCluster) -> None:
    d = cluster.ref("app-d:1")
    status, accepted = cluster.submit(
        {
            "name": "sel",
            "targets": [
                {"images": [d], "selector": {"tier": "gpu"}},
                {"images": [d], "nodes": ["ghost"]},
                {"images": [d], "selector": {"tier": "tpu"}},
            ],
        }
    )
    assert status == 201, accepted
    assert accepted["groups"] == [
        {"image": d, "digest": cluster.digests["app-d:1"], "nodes": ["w3"]}
    ]
    assert accepted["unknown_nodes"] == ["ghost"]
    assert accepted["empty_selectors"] == [{"tier": "tpu"}]
    assert cluster.wait_plan(accepted["id"])["state"] == "done"


def test_remove_and_prune_plans(cluster: DockerCluster) -> None:
    d = cluster.ref("app-d:1")
    status, pulled = cluster.submit({"name": "d", "targets": [{"images": [d], "nodes": ["w2"]}]})
    assert cluster.wait_plan(pulled["id"])["state"] == "done"
    assert d in cluster.tags("w2")

    status, removed = cluster.submit(
        {"name": "rm", "action": "remove", "targets": [{"images": [d], "nodes": ["w2"]}]}
    )
    assert status == 201, removed
    assert cluster.wait_plan(removed["id"])["state"] == "done"
    assert d not in cluster.tags("w2")

    # a dangling image for prune to find: untag-by-remove leaves nothing, so build one
    cluster.dockerds["w2"].docker("pull", cluster.ref("app-b:1"))
    cluster.dockerds["w2"].docker("tag", cluster.ref("app-b:1"), "dangling:x")
    status, pruned = cluster.submit(
        {"name": "prune", "action": "prune", "targets": [{"images": [], "nodes": ["w2"]}]}
    )
    assert status == 201, pruned
    plan = cluster.wait_plan(pruned["id"])
    assert plan["state"] == "done", plan


def test_credentials_pull_and_never_leak(cluster: DockerCluster) -> None:
    image = f"{cluster.auth_registry.address}/secret-app:1"
    host = cluster.auth_registry.address
    plan = {
        "name": "auth",
        "targets": [{"images": [image], "nodes": ["w1", "w3"]}],
        "auth": {host: {"username": AUTH_USER.username, "password": AUTH_USER.password}},
    }
    status, accepted = cluster.submit(plan)
    assert status == 201, accepted
    final = cluster.wait_plan(accepted["id"])
    assert final["state"] == "done", final
    assert image in cluster.tags("w1") and image in cluster.tags("w3")

    secret = AUTH_USER.password
    for name, node in cluster.procs.nodes.items():
        assert secret not in node.log(), f"password in {name}'s log"
        db = (node.state_dir / "houndd.db").read_bytes()
        for extra in ("houndd.db-wal",):
            p = node.state_dir / extra
            if p.exists():
                db += p.read_bytes()
        assert secret.encode() not in db, f"password in {name}'s store"
        status, body = node.get(f"/v1/plans/{accepted['id']}")
        assert secret not in json.dumps(body)
    assert secret not in json.dumps(accepted)

    # without credentials the same image fails with a named reason before anything pulls
    status, denied = cluster.submit(
        {"name": "noauth", "targets": [{"images": [image], "nodes": ["w2"]}]}
    )
    assert status == 201
    assert denied["unresolved"][image]["reason"] == "unauthorized"


def test_bad_plans_are_4xx_problems_and_store_nothing(cluster: DockerCluster) -> None:
    node = cluster.procs.nodes["w2"]
    status, before = node.get("/v1/plans")
    cases: list[tuple[Any, str]] = [
        ({"name": "x", "targets": [{"images": "nope", "all": True}]}, "targets[0].images"),
        ({"name": "x", "targets": [{"images": [], "all": True}]}, "targets[0].images"),
        (
            {"name": "x", "targets": [{"images": ["UPPER/Case::bad"], "all": True}]},
            "targets[0].images[0]",
        ),
        ({"name": "x", "targets": [{"images": ["a:1"], "all": True}], "colour": 1}, "colour"),
        (
            {
                "name": "x",
                "targets": [{"images": ["a:1"], "all": True}],
                "policy": {"retries": "3"},
            },
            "policy.retries",
        ),
        ({"name": "x", "targets": [{"images": ["a:1"], "nodes": ["ghost"]}]}, "targets"),
    ]
    for body, field in cases:
        status, problem = http("POST", node.api + "/v1/plans", node.token, body)
        assert status == 400, (body, problem)
        assert problem["field"] == field, (body, problem)
        assert problem["status"] == 400 and problem["title"]
    status, problem = http("POST", node.api + "/v1/plans", node.token, b"x: [unclosed", timeout=10)
    assert status == 400 and "field" in problem
    huge = json.dumps({"name": "x" * (2 << 20)}).encode()
    status, problem = http("POST", node.api + "/v1/plans", node.token, huge, timeout=10)
    assert status == 413 and problem["title"] == "request body too large"
    status, after = node.get("/v1/plans")
    assert [p["id"] for p in after["plans"]] == [p["id"] for p in before["plans"]]
    assert node.alive() and http("GET", node.api + "/v1/health")[0] == 200


def test_cli_submit_wait_exit_codes(cluster: DockerCluster, tmp_path: Path) -> None:
    node = cluster.procs.nodes["w3"]
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"name: cli\ntargets:\n  - images: [{cluster.ref('app-b:1')}]\n    nodes: [w3]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"name: cli-bad\ntargets:\n  - images: [{cluster.ref('nope:1')}]\n    nodes: [w3]\n"
    )
    base = [sys.executable, "-m", "houndd", "submit", "--api", node.api, "--token", node.token]
    done = subprocess.run(
        [*base, str(ok), "--wait", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["state"] == "done" and report["items"][0]["node"] == "w3"
    failed = subprocess.run(
        [*base, str(bad), "--wait"], capture_output=True, text=True, timeout=120, check=False
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "manifest unknown" in failed.stdout
    time.sleep(0)  # keep the subprocess-based checks ordered in the log


def test_keep_present_covers_nodes_that_match_later_and_lost_images(cluster: DockerCluster) -> None:
    image = cluster.ref("app-b:1")
    status, accepted = cluster.submit(
        {
            "name": "keep",
            "targets": [{"images": [image], "selector": {"keep": "yes"}}],
            "policy": {"keep_present": True},
        }
    )
    # nobody carries the label yet: accepted is refused as matching nothing
    assert status == 400 and accepted["field"] == "targets"

    node = cluster.procs.nodes["w1"]
    status, body = http(
        "PUT", node.api + "/v1/nodes/w1/labels", node.token, {"labels": {"keep": "yes"}}
    )
    assert status == 200, body
    cluster.procs.wait_for(
        lambda: cluster.procs.nodes["w2"].get("/v1/nodes/w1")[1]["labels"].get("keep") == "yes",
        10,
        "label spread",
    )
    status, accepted = cluster.submit(
        {
            "name": "keep",
            "targets": [{"images": [image], "selector": {"keep": "yes"}}],
            "policy": {"keep_present": True},
        }
    )
    assert status == 201, accepted
    assert cluster.wait_plan(accepted["id"])["state"] == "done"

    # a node that matches later gets the image without a resubmission
    w2 = cluster.procs.nodes["w2"]
    cluster.dockerds["w2"].docker("rmi", "-f", image, check=False)
    status, _ = http("PUT", w2.api + "/v1/nodes/w2/labels", w2.token, {"labels": {"keep": "yes"}})
    assert status == 200
    cluster.procs.wait_for(lambda: image in cluster.tags("w2"), 30, "w2 got the image")

    # a node that loses the image gets it back
    cluster.dockerds["w1"].docker("rmi", "-f", image)
    assert image not in cluster.tags("w1")
    cluster.procs.wait_for(lambda: image in cluster.tags("w1"), 30, "w1 got the image back")
    status, plans = node.get("/v1/plans")
    names = {p["name"] for p in plans["plans"]}
    assert {"keep/keep-present/w1", "keep/keep-present/w2"} <= names


def test_cli_remove_and_prune(cluster: DockerCluster) -> None:
    node = cluster.procs.nodes["w1"]
    image = cluster.ref("app-d:1")
    _, accepted = cluster.submit({"name": "d1", "targets": [{"images": [image], "nodes": ["w1"]}]})
    assert cluster.wait_plan(accepted["id"])["state"] == "done"
    base = [sys.executable, "-m", "houndd"]
    where = ["--api", node.api, "--token", node.token, "--json"]
    removed = subprocess.run(
        [*base, "remove", image, "--nodes", "w1", *where],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["action"] == "remove"
    assert image not in cluster.tags("w1")
    pruned = subprocess.run(
        [*base, "prune", "--nodes", "w1", *where],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["state"] == "done"
    usage = subprocess.run(
        [*base, "prune", *where], capture_output=True, text=True, timeout=60, check=False
    )
    assert usage.returncode == 2 and "--nodes" in usage.stderr
