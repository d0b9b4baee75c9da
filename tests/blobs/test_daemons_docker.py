"""Blob sharing between real `houndd run` processes, each with its own dockerd, pulling from
a real docker-registry: the registry sends each blob once, every node ends with the image
exactly as a direct pull leaves it, and a peer stalled mid-transfer costs no item. Each item
says where its bytes came from (registry, peers, cache), and a dry run asks each dockerd which
images it holds.

What the registry sent is read from its access log (bytes written per blob response).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from houndd.blobs.tree import rank
from houndd.client import Client
from tests.fixtures.images import PushedImage, push_image_detailed
from tests.fixtures.services import Dockerd, Registry, start_dockerd
from tests.procs import LocalCluster, http, run_houndd

pytestmark = [pytest.mark.docker, pytest.mark.processes]

NAMES = ["p1", "p2", "p3"]
MB = 1_000_000
_WRITTEN = re.compile(
    r'http\.request\.method=GET .*http\.request\.uri="/v2/[^"]+/blobs/[^"]+".*'
    r'http\.request\.useragent="([^"]*)".*http\.response\.written=(\d+)'
)


@dataclass
class P2PCluster:
    procs: LocalCluster
    dockerds: dict[str, Dockerd]
    registry: Registry
    ids: dict[str, str]  # name -> node id

    def log_mark(self) -> int:
        return self.registry.log_path.stat().st_size

    def blob_bytes_sent(self, since: int) -> dict[str, int]:
        """Blob bytes the registry wrote since a log mark, by client (houndd or dockerd)."""
        with self.registry.log_path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = {"houndd": 0, "dockerd": 0}
        for m in _WRITTEN.finditer(text):
            out["dockerd" if m.group(1).startswith("docker/") else "houndd"] += int(m.group(2))
        return out

    def submit(self, plan: dict[str, Any], via: str = "p1") -> str:
        node = self.procs.nodes[via]
        status, body = http("POST", node.api + "/v1/plans", node.token, plan, timeout=30)
        assert status == 201, body
        return str(body["id"])

    def plan(self, plan_id: str, via: str = "p1") -> dict[str, Any]:
        status, body = self.procs.nodes[via].get(f"/v1/plans/{plan_id}")
        assert status == 200, body
        return dict(body)

    def items(self, plan_id: str, via: str = "p1") -> dict[str, dict[str, Any]]:
        return {i["node"]: i for i in self.plan(plan_id, via)["items"]}

    def wait_final(self, plan_id: str, timeout: float = 90, via: str = "p1") -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            body = self.plan(plan_id, via)
            return body if body["state"] in ("done", "failed", "cancelled") else None

        result: dict[str, Any] = self.procs.wait_for(final, timeout, f"plan {plan_id}")
        return result

    def metric(self, name: str, series: str) -> float:
        node = self.procs.nodes[name]
        with urllib.request.urlopen(node.api + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[1])
        return 0.0

    def image(self, name: str, ref: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """(image id, RepoDigests, RepoTags) of `ref` on the node's dockerd."""
        out = self.dockerds[name].docker("image", "inspect", ref, "--format", "{{json .}}")
        data = json.loads(out.stdout)
        digests, tags = data["RepoDigests"] or [], data["RepoTags"] or []
        return data["Id"], tuple(sorted(digests)), tuple(sorted(tags))

    def names(self, name: str) -> set[str]:
        out = self.dockerds[name].docker("images", "--format", "{{.Repository}}").stdout
        return set(out.split())


@pytest.fixture(scope="module")
def p2p(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[P2PCluster]:
    root = tmp_path_factory.mktemp("p2p")
    dockerds: dict[str, Dockerd] = {}
    procs = LocalCluster(root / "houndd")
    try:
        for name in NAMES:
            dockerds[name] = start_dockerd(root / f"d-{name}", name=f"p2p-{name}")
        extra = {"blob_stall_timeout_s": 2.0, "blob_upload_limit_mbit": 40.0}
        first = procs.add(NAMES[0], docker_host=dockerds[NAMES[0]].host, extra=extra)
        for name in NAMES[1:]:
            procs.add(
                name,
                docker_host=dockerds[name].host,
                seeds=[f"127.0.0.1:{first.port}"],
                extra=extra,
            )
        procs.start_all(NAMES)
        ids = {}
        for name in NAMES:
            _, body = procs.nodes[name].get("/v1/node")
            ids[name] = body["node_id"]
        yield P2PCluster(procs, dockerds, registry, ids)
    finally:
        procs.close()
        for d in dockerds.values():
            d.stop()


def _push(registry: Registry, repo: str, size: int, seed: int, layers: int) -> PushedImage:
    return push_image_detailed(registry.url, repo, "v1", size, layers=layers, seed=seed)


def test_the_registry_sends_each_blob_once_and_images_match_a_direct_pull(
    p2p: P2PCluster,
) -> None:
    images = [
        _push(p2p.registry, "p2p/one", 3 * MB, 701, 2),
        _push(p2p.registry, "p2p/two", 2 * MB, 702, 2),
    ]
    refs = [f"{p2p.registry.address}/{i.repository}:v1" for i in images]
    unique = sum(i.size_bytes for i in images)
    mark = p2p.log_mark()
    plan_id = p2p.submit({"name": "shared", "targets": [{"images": refs, "all": True}]})
    plan = p2p.wait_final(plan_id)
    assert plan["state"] == "done", plan

    sent = p2p.blob_bytes_sent(mark)
    assert sent["dockerd"] == 0  # every blob went through houndd
    assert unique <= sent["houndd"] <= 1.2 * unique, (sent, unique)
    peer_bytes = sum(p2p.metric(n, 'houndd_blob_fetched_bytes_total{source="peer"}') for n in NAMES)
    assert peer_bytes >= 2 * unique, (peer_bytes, sent, unique)

    # per item: where its bytes came from, adding up to the node-wide counters
    sizes = {ref: i.size_bytes for ref, i in zip(refs, images, strict=True)}
    for item in plan["items"]:
        by_source = (item["bytes_registry"], item["bytes_peers"], item["bytes_cache"])
        assert sum(by_source) == sizes[item["image"]] and by_source[2] == 0, item
    from_registry = sum(item["bytes_registry"] for item in plan["items"])
    registry_bytes = sum(
        p2p.metric(n, 'houndd_blob_fetched_bytes_total{source="registry"}') for n in NAMES
    )
    assert from_registry == registry_bytes <= sent["houndd"], (from_registry, sent)
    assert sum(item["bytes_peers"] for item in plan["items"]) == peer_bytes

    for ref, image in zip(refs, images, strict=True):
        states = {n: p2p.image(n, ref) for n in NAMES}
        assert len(set(states.values())) == 1, states
        _, digests, tags = states["p1"]
        assert digests == (f"{p2p.registry.address}/{image.repository}@{image.digest}",)
        assert tags == (ref,)
    for n in NAMES:  # no loopback name (127.0.0.1:PORT/<16 hex token>/...) is left
        assert not [x for x in p2p.names(n) if re.match(r"127\.0\.0\.1:\d+/[0-9a-f]{16}/", x)]

    # The reference: what a direct pull leaves, on a dockerd that never saw houndd.
    direct = p2p.dockerds["p3"]
    direct.docker("image", "rm", "-f", *{p2p.image("p3", r)[0] for r in refs})
    for ref in refs:
        direct.docker("pull", ref)
        assert p2p.image("p3", ref) == p2p.image("p1", ref)


def test_a_pull_of_blobs_in_the_nodes_cache_reports_them_from_cache(p2p: P2PCluster) -> None:
    image = _push(p2p.registry, "p2p/cached", 2 * MB, 731, 2)
    ref = f"{p2p.registry.address}/{image.repository}:v1"
    first = p2p.submit({"name": "warm", "targets": [{"images": [ref], "nodes": ["p2"]}]})
    assert p2p.wait_final(first)["state"] == "done"
    p2p.dockerds["p2"].docker("image", "rm", "-f", p2p.image("p2", ref)[0])

    mark = p2p.log_mark()
    plan_id = p2p.submit({"name": "again", "targets": [{"images": [ref], "nodes": ["p2"]}]})
    node = p2p.procs.nodes["p1"]
    items = []
    with Client(node.api, node.token) as client:
        for event in client.events(plan_id):
            if event is not None and event.get("event") == "item":
                items.append(event["item"])
            if event is not None and event.get("event") == "final":
                break
    (item,) = p2p.plan(plan_id)["items"]
    assert item["state"] == "done" and not item["skipped"], item
    assert (item["bytes_registry"], item["bytes_peers"], item["bytes_cache"]) == (
        0, 0, image.size_bytes
    )  # fmt: skip
    assert p2p.blob_bytes_sent(mark) == {"houndd": 0, "dockerd": 0}
    # the event stream carries them too, and `houndd plan ID` shows them
    assert items and items[-1]["bytes_cache"] == image.size_bytes, items
    shown = run_houndd("plan", plan_id, "--api", node.api, "--token", node.token)
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()[1:3]
    assert row[header.index("FROM") :].startswith("cache 1.9 MiB"), shown.stdout


def test_a_dry_run_asks_each_dockerd_what_it_holds(p2p: P2PCluster) -> None:
    held = _push(p2p.registry, "p2p/dry-held", 1 * MB, 741, 1)
    new = _push(p2p.registry, "p2p/dry-new", 1 * MB, 742, 2)
    held_ref, new_ref = (f"{p2p.registry.address}/{i.repository}:v1" for i in (held, new))
    first = p2p.submit({"name": "dry-held", "targets": [{"images": [held_ref], "nodes": ["p1"]}]})
    assert p2p.wait_final(first)["state"] == "done"

    mark = p2p.log_mark()
    node = p2p.procs.nodes["p2"]
    plan = {"name": "dry", "targets": [{"images": [held_ref, new_ref], "all": True}]}
    status, preview = http("POST", node.api + "/v1/plans?dry_run=true", node.token, plan, 30)
    assert status == 200, preview
    nodes = {n["node"]: n for n in preview["nodes"]}
    assert set(nodes) == set(NAMES)
    assert (nodes["p1"]["present"], nodes["p1"]["lacking"]) == ([held_ref], [new_ref])
    assert nodes["p1"]["bytes_needed"] == new.size_bytes
    for name in ("p2", "p3"):
        assert nodes[name]["lacking"] == [held_ref, new_ref], nodes[name]
        assert nodes[name]["bytes_needed"] == held.size_bytes + new.size_bytes
    for n in nodes.values():
        # each dockerd's disk is this machine's: far more than a few MB free
        assert n["answered"] and n["free_disk_bytes"] > 100 * MB and n["no_space"] == [], n
    assert p2p.blob_bytes_sent(mark) == {"houndd": 0, "dockerd": 0}  # nothing pulled
    assert all(p["name"] != "dry" for p in p2p.procs.nodes["p1"].get("/v1/plans")[1]["plans"])


def test_a_peer_stalled_mid_transfer_costs_no_item(p2p: P2PCluster) -> None:
    image = _push(p2p.registry, "p2p/stall", 8 * MB, 711, 1)
    ref = f"{p2p.registry.address}/{image.repository}:v1"
    layer = image.layer_digests[0]
    root = {v: k for k, v in p2p.ids.items()}[rank(layer, p2p.ids.values())[0]]
    others = [n for n in NAMES if n != root]
    plan_id = p2p.submit({"name": "stall", "targets": [{"images": [ref], "all": True}]})
    series = 'houndd_blob_fetched_bytes_total{source="peer"}'
    before = {n: p2p.metric(n, series) for n in others}
    p2p.procs.wait_for(
        lambda: any(p2p.metric(n, series) > before[n] for n in others), 60, "peer bytes"
    )
    p2p.procs.signal(root, signal.SIGSTOP)  # the root stops mid-upload (40 Mbit/s cap)
    try:

        def others_done() -> bool:
            items = p2p.items(plan_id, via=others[0])
            return all(items[n]["state"] == "done" for n in others)

        p2p.procs.wait_for(others_done, 90, "the other nodes to finish", interval=0.2)
        for n in others:
            expected = f"{p2p.registry.address}/{image.repository}@{image.digest}"
            assert p2p.image(n, ref)[1] == (expected,)
        assert any(
            p2p.metric(n, 'houndd_blob_source_failures_total{kind="stalled"}') >= 1 for n in others
        )
    finally:
        p2p.procs.signal(root, signal.SIGCONT)
    plan = p2p.wait_final(plan_id, via=others[0])
    assert plan["state"] == "done", plan


def test_p2p_off_leaves_pulls_to_dockerd(
    p2p: P2PCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # a short path: containerd's sockets live below it (108-byte limit)
    dockerd = start_dockerd(tmp_path_factory.mktemp("d-off"), name="p2p-off")
    try:
        node = p2p.procs.add(
            "off",
            docker_host=dockerd.host,
            seeds=[f"127.0.0.1:{p2p.procs.nodes['p1'].port}"],
            extra={"p2p": False},
        )
        p2p.procs.start("off")
        p2p.procs.wait_ready("off")
        p2p.procs.wait_for(lambda: "off" in p2p.procs.members("p1"), 20, "off to join")
        image = _push(p2p.registry, "p2p/off", 1 * MB, 721, 1)
        ref = f"{p2p.registry.address}/{image.repository}:v1"
        mark = p2p.log_mark()
        plan_id = p2p.submit({"name": "off", "targets": [{"images": [ref], "nodes": ["off"]}]})
        assert p2p.wait_final(plan_id)["state"] == "done"
        sent = p2p.blob_bytes_sent(mark)
        assert sent == {"houndd": 0, "dockerd": image.size_bytes}
        item = p2p.items(plan_id)["off"]  # dockerd's own count: its layers, all from the registry
        assert 0 < item["bytes_registry"] <= image.size_bytes, item
        assert item["bytes_peers"] == item["bytes_cache"] == 0, item
        status, _ = http("POST", node.api + "/v1/peer/blob", None, b"x")
        assert status == 404  # no blob endpoint when sharing is off
    finally:
        p2p.procs.stop("off")
        dockerd.stop()


def test_the_daemons_blob_endpoint_refuses_what_is_not_a_members_request(
    p2p: P2PCluster,
) -> None:
    node = p2p.procs.nodes["p1"]
    status, body = http("POST", node.api + "/v1/peer/blob", None, b"not sealed" * 10)
    assert status == 403, body  # no installed key id: refused before any crypto
    status, body = http("POST", node.api + "/v1/peer/blob", None, b"x" * (2 << 20))
    assert status == 413, body  # over max_http_body_bytes


def test_blob_metrics_are_exposed_by_prometheus_rules(p2p: P2PCluster) -> None:
    node = p2p.procs.nodes["p1"]
    with urllib.request.urlopen(node.api + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("houndd_blob_fetched_bytes", "houndd_blob_verify_failures"):
        assert families[name].type == "counter"
        assert {s.labels.get("source") for s in families[name].samples} >= {"registry", "peer"}
    assert families["houndd_blob_cache_bytes"].type == "gauge"
    if shutil.which("promtool") is not None:
        proc = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
