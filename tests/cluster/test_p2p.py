"""Blob sharing across hosts in network namespaces: four hosts, each with its own dockerd and
houndd, warm the same images; the registry's interface sends each blob about once, and every
host's own Docker ends up with every image at the plan's digest, the same image on all.

Links are shaped in both directions (tbf on the bridge side of each host's veth for its
download, on the host's eth0 for its upload, on the registry's eth0 for its egress), so
peers move bytes over links like the registry does, not over free loopback.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from houndd.wire.keyring import Keyring, derive_api_token
from tests.cluster.harness import Cluster, ImageSpec
from tests.cluster.marks import HOUNDD_NETNS_MARKS

pytestmark = HOUNDD_NETNS_MARKS

MB = 1_000_000
N_HOSTS = 4
REGISTRY_MBIT = 100.0
HOST_MBIT = 400.0
IMAGES = (
    ImageSpec("p2p/app", 6 * MB, layers=2, seed=901),
    ImageSpec("p2p/base", 4 * MB, layers=2, seed=902),
)


def _api(cluster: Cluster, host: str, method: str, path: str, body: Any = None) -> Any:
    token = derive_api_token(Keyring.load(cluster.workdir / "cluster.key").primary)
    req = urllib.request.Request(
        cluster.host(host).api_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _blob_bytes(cluster: Cluster, digests: dict[str, str]) -> int:
    """Config plus layer sizes of the pushed images, from their manifests."""
    total = 0
    for spec in IMAGES:
        url = f"{cluster.registry_url}/v2/{spec.name}/manifests/{digests[spec.name]}"
        req = urllib.request.Request(
            url, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            manifest = json.loads(resp.read())
        total += manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(
        N_HOSTS,
        workdir=tmp_path_factory.mktemp("p2p"),
        registry_egress_mbit=REGISTRY_MBIT,
        host_ingress_mbit=HOST_MBIT,
    ) as c:
        for h in c.hosts:
            c.set_host_egress(h, HOST_MBIT)
        yield c


def _fresh_houndd(cluster: Cluster, overrides: dict[str, Any]) -> None:
    """houndd on every host from empty state, engines empty, all members seeing each other."""
    for h in cluster.hosts:
        cluster.stop_houndd(h)
        shutil.rmtree(h.workdir / "state", ignore_errors=True)
        cluster.remove_images(h)
    for h in cluster.hosts:
        cluster.start_houndd(h, {"blob_stall_timeout_s": 3.0, **overrides}, wait_ready=False)
    for h in cluster.hosts:
        cluster.wait_houndd_ready(h)
    names = {h.name for h in cluster.hosts}

    def everyone_sees_everyone() -> bool:
        try:
            view = _api(cluster, "n1", "GET", "/v1/cluster")
        except OSError:
            return False
        alive = {m["name"] for m in view["members"] if m["state"] == "alive"}
        return alive == names and view["coordinator"]["name"] is not None

    _wait(everyone_sees_everyone, 60, lambda: cluster.houndd_log_tail("n1"))


def _wait(check: Callable[[], Any], timeout_s: float, why: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, why()
        time.sleep(0.3)


def _plan(cluster: Cluster, via: str, plan_id: str) -> dict[str, Any] | None:
    try:
        view: dict[str, Any] = _api(cluster, via, "GET", f"/v1/plans/{plan_id}")
    except OSError:
        return None
    return view


def _submit(cluster: Cluster, via: str) -> str:
    refs = [cluster.image_ref(spec.name) for spec in IMAGES]
    plan = {"name": "p2p", "targets": [{"images": refs, "all": True}]}
    return str(_api(cluster, via, "POST", "/v1/plans", plan)["id"])


def _assert_images(cluster: Cluster, hosts: list[str], digests: dict[str, str]) -> None:
    """Each host holds each image at the pushed digest, one image id per ref across hosts,
    and no loopback name is left."""
    image_ids = set()
    for h in hosts:
        held = cluster.image_digests(h)
        for spec in IMAGES:
            assert f"{cluster.registry_address}/{spec.name}@{digests[spec.name]}" in held, h
            ref = cluster.image_ref(spec.name)
            out = cluster.docker(h, "image", "inspect", ref, "--format", "{{.Id}}")
            image_ids.add((ref, out.stdout.strip()))
        leftovers = cluster.docker(h, "images", "--format", "{{.Repository}}").stdout.split()
        assert not [r for r in leftovers if r.startswith("127.0.0.1:")], leftovers
    assert len(image_ids) == len(IMAGES)


@pytest.fixture(scope="module")
def digests(cluster: Cluster) -> dict[str, str]:
    return cluster.push_images(IMAGES)


def test_four_hosts_share_blobs_and_the_registry_sends_each_once(
    cluster: Cluster, digests: dict[str, str]
) -> None:
    unique = _blob_bytes(cluster, digests)
    _fresh_houndd(cluster, {})
    before = cluster.registry_tx_bytes()
    plan_id = _submit(cluster, "n2")

    def final() -> dict[str, Any] | None:
        view = _plan(cluster, "n2", plan_id)
        return view if view and view["state"] in ("done", "failed", "cancelled") else None

    view = _wait(final, 180, lambda: json.dumps(_plan(cluster, "n2", plan_id))[:2000])
    assert view["state"] == "done", json.dumps(view)[:3000]
    sent = cluster.registry_tx_bytes() - before

    # Headers, manifests, the final manifest-only checks and TCP/IP overhead come on top of
    # the blobs; without sharing this would be N_HOSTS times the blob bytes.
    assert unique <= sent <= 1.2 * unique, f"registry sent {sent} for {unique} unique bytes"
    _assert_images(cluster, [h.name for h in cluster.hosts], digests)


def test_coordinator_killed_mid_plan_survivors_still_share(
    cluster: Cluster, digests: dict[str, str]
) -> None:
    unique = _blob_bytes(cluster, digests)
    cluster.set_registry_egress(24.0)  # a few seconds of transfer to kill into
    try:
        _fresh_houndd(cluster, {"node_return_timeout_s": 5.0})
        coordinator = _api(cluster, "n1", "GET", "/v1/cluster")["coordinator"]["name"]
        survivors = [h.name for h in cluster.hosts if h.name != coordinator]
        entry = survivors[0]
        before = cluster.registry_tx_bytes()
        plan_id = _submit(cluster, entry)

        def moving() -> bool:
            view = _plan(cluster, entry, plan_id) or {}
            return any(i["bytes_done"] > 0 for i in view.get("items", []))

        _wait(moving, 60, lambda: json.dumps(_plan(cluster, entry, plan_id))[:2000])
        cluster.kill(coordinator)

        def survivors_done() -> bool:
            view = _plan(cluster, entry, plan_id) or {}
            mine = [i for i in view.get("items", []) if i["node"] in survivors]
            return len(mine) == len(survivors) * len(IMAGES) and all(
                i["state"] == "done" for i in mine
            )

        _wait(survivors_done, 180, lambda: json.dumps(_plan(cluster, entry, plan_id))[:3000])
        sent = cluster.registry_tx_bytes() - before
        # A root that died mid-blob is replaced by the next node in every tree; the new
        # root asks the registry only for what it does not have yet.
        assert sent <= 1.5 * unique, f"registry sent {sent} for {unique} unique bytes"
        _assert_images(cluster, survivors, digests)
    finally:
        cluster.set_registry_egress(REGISTRY_MBIT)
