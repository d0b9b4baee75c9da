"""Blob sharing across hosts in network namespaces: four hosts, each with its own dockerd and
houndd, warm the same images; the registry's interface sends each blob about once, and every
host's own Docker ends up with every image at the plan's digest, the same image on all.

Links are shaped in both directions (tbf on the bridge side of each host's veth for its
download, on the host's eth0 for its upload, on the registry's eth0 for its egress), so
peers move bytes over links like the registry does, not over free loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from houndd.wire.keyring import Keyring, derive_api_token
from tests.cluster.harness import Cluster, ImageSpec, houndd_missing
from tests.fixtures.services import missing_binaries

_missing = missing_binaries() + [t for t in ("ip", "tc", "iptables") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(_missing), reason=f"missing {', '.join(_missing)}"),
    pytest.mark.skipif(houndd_missing() is not None, reason=str(houndd_missing())),
]

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


def test_four_hosts_share_blobs_and_the_registry_sends_each_once(cluster: Cluster) -> None:
    digests = cluster.push_images(IMAGES)
    unique = _blob_bytes(cluster, digests)
    for h in cluster.hosts:
        cluster.start_houndd(h, {"blob_stall_timeout_s": 3.0}, wait_ready=False)
    for h in cluster.hosts:
        cluster.wait_houndd_ready(h)
    names = [h.name for h in cluster.hosts]

    def everyone_sees_everyone() -> bool:
        try:
            view = _api(cluster, "n1", "GET", "/v1/cluster")
        except OSError:
            return False
        alive = {m["name"] for m in view["members"] if m["state"] == "alive"}
        return alive == set(names) and view["coordinator"]["name"] is not None

    deadline = time.monotonic() + 60
    while not everyone_sees_everyone():
        assert time.monotonic() < deadline, cluster.houndd_log_tail("n1")
        time.sleep(0.2)

    refs = [cluster.image_ref(spec.name) for spec in IMAGES]
    before = cluster.registry_tx_bytes()
    accepted = _api(
        cluster,
        "n2",
        "POST",
        "/v1/plans",
        {"name": "p2p", "targets": [{"images": refs, "all": True}]},
    )
    deadline = time.monotonic() + 180
    while True:
        view = _api(cluster, "n2", "GET", f"/v1/plans/{accepted['id']}")
        if view["state"] in ("done", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, json.dumps(view)[:2000]
        time.sleep(0.5)
    assert view["state"] == "done", json.dumps(view)[:3000]
    sent = cluster.registry_tx_bytes() - before

    # Headers, manifests, the final manifest-only checks and TCP/IP overhead come on top of
    # the blobs; without sharing this would be N_HOSTS times the blob bytes.
    assert unique <= sent <= 1.2 * unique, f"registry sent {sent} for {unique} unique bytes"

    image_ids = set()
    for h in cluster.hosts:
        held = cluster.image_digests(h)
        for spec in IMAGES:
            assert f"{cluster.registry_address}/{spec.name}@{digests[spec.name]}" in held, h.name
        for ref in refs:
            out = cluster.docker(h, "image", "inspect", ref, "--format", "{{.Id}}")
            image_ids.add((ref, out.stdout.strip()))
        leftovers = cluster.docker(h, "images", "--format", "{{.Repository}}").stdout.split()
        assert not [r for r in leftovers if r.startswith("127.0.0.1:")], leftovers
    assert len(image_ids) == len(refs)  # one image id per ref, the same on every host
