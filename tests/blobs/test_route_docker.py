"""Pulls through the loopback registry on a real dockerd and docker-registry: the image ends
exactly as a direct `docker pull` leaves it, bytes come from peers, and failures are named."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from houndd.blobs.tree import rank
from houndd.errors import NO_SPACE, REGISTRY_UNREACHABLE, PullError
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import parse_reference
from houndd.image.registry import RegistryClient
from houndd.puller.engine import PullProgress
from tests.blobs.net import BlobNet, BlobNode
from tests.fixtures.docker import AUTH_USER
from tests.fixtures.images import PushedImage, push_image_detailed, push_index
from tests.fixtures.services import Dockerd, Registry, start_dockerd
from tests.puller.proxy import ThrottledProxy
from tests.puller.waiting import eventually

pytestmark = pytest.mark.docker

MB = 1_000_000


@pytest.fixture(scope="module")
def second_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    daemon = start_dockerd(tmp_path_factory.mktemp("dockerd-b"), name="blobs-b")
    try:
        yield daemon
    finally:
        daemon.stop()


def image_state(dockerd: Dockerd, ref: str) -> tuple[str, list[str], list[str]]:
    out = dockerd.docker("image", "inspect", ref, "--format", "{{json .}}").stdout
    data: dict[str, Any] = json.loads(out)
    return data["Id"], sorted(data["RepoDigests"] or []), sorted(data["RepoTags"] or [])


def all_names(dockerd: Dockerd) -> set[str]:
    out = dockerd.docker("images", "--digests", "--format", "{{.Repository}}").stdout
    return set(out.split())


def wipe(dockerd: Dockerd) -> None:
    ids = dockerd.docker("image", "ls", "-aq", "--no-trunc").stdout.split()
    if ids:
        dockerd.docker("image", "rm", "-f", *sorted(set(ids)), check=False)


def push(registry: Registry, repo: str, size: int, seed: int, **kw: Any) -> PushedImage:
    return push_image_detailed(registry.url, repo, "v1", size, layers=2, seed=seed, **kw)


def ignore(_: PullProgress) -> None:
    pass


async def pull_via(
    node: BlobNode,
    ref: str,
    digest: str,
    nodes: tuple[str, ...],
    *,
    auth: RegistryAuth | None = None,
    plan: str = "p1",
) -> None:
    """What the executor does with a route: pull by digest through it, then tag."""
    assert node.route is not None and node.engine is not None
    image = parse_reference(ref)
    await node.route.pull(image, digest, auth=auth, plan_id=plan, nodes=nodes, progress=ignore)
    await node.engine.tag(f"{image.familiar_repository}@{digest}", ref)


def fresh(repo: str) -> str:
    return f"{repo}-{uuid.uuid4().hex[:8]}"


async def test_same_image_id_repo_digests_and_tags_as_a_direct_pull(
    net: BlobNet, registry: Registry, dockerd: Dockerd
) -> None:
    repo = fresh("route/plain")
    pushed = await asyncio.to_thread(push, registry, repo, 2 * MB, 11)
    ref = f"{registry.address}/{repo}:v1"
    node = await net.add(docker_host=dockerd.host)
    await pull_via(node, ref, pushed.digest, (node.node_id,))
    through = image_state(dockerd, ref)
    assert node.loopback is not None
    assert not any(str(node.loopback.port) in name for name in all_names(dockerd))
    assert node.fetcher.stats.fetched_bytes["registry"] == pushed.size_bytes

    wipe(dockerd)
    dockerd.docker("pull", ref)
    assert image_state(dockerd, ref) == through
    assert through[1] == [f"{registry.address}/{repo}@{pushed.digest}"]


async def test_a_multi_platform_index_ends_as_a_direct_pull_of_the_tag(
    net: BlobNet, registry: Registry, dockerd: Dockerd
) -> None:
    repo = fresh("route/multi")
    amd64 = await asyncio.to_thread(push, registry, repo, 1 * MB, 21)
    arm64 = await asyncio.to_thread(push_image_detailed, registry.url, repo, "arm", MB, seed=22)
    index = await asyncio.to_thread(
        push_index, registry.url, repo, "v1", {"linux/amd64": amd64, "linux/arm64": arm64}
    )
    ref = f"{registry.address}/{repo}:v1"
    client = RegistryClient(aiohttp.ClientSession, insecure_registries=(registry.address,))
    try:
        resolved = await client.resolve(ref)
    finally:
        await client.close()
    assert resolved.digest == index  # houndd pins the index, as `docker pull` records it
    node = await net.add(docker_host=dockerd.host)
    await pull_via(node, ref, resolved.digest, (node.node_id,))
    through = image_state(dockerd, ref)
    assert node.fetcher.stats.fetched_bytes["registry"] == amd64.size_bytes  # not arm64's

    wipe(dockerd)
    dockerd.docker("pull", ref)
    assert image_state(dockerd, ref) == through
    assert through[1] == [f"{registry.address}/{repo}@{index}"]


async def test_the_registry_sends_each_blob_once_for_two_hosts(
    net: BlobNet, registry: Registry, dockerd: Dockerd, second_dockerd: Dockerd
) -> None:
    proxy = await ThrottledProxy(registry.host, registry.port, bytes_per_s=1e12).start()
    try:
        net.insecure = (proxy.address,)
        repo = fresh("route/shared")
        pushed = await asyncio.to_thread(push, registry, repo, 3 * MB, 31)
        ref = f"{proxy.address}/{repo}:v1"
        a = await net.add(docker_host=dockerd.host)
        b = await net.add(docker_host=second_dockerd.host)
        nodes = (a.node_id, b.node_id)
        await asyncio.gather(
            pull_via(a, ref, pushed.digest, nodes), pull_via(b, ref, pushed.digest, nodes)
        )
        assert image_state(dockerd, ref) == image_state(second_dockerd, ref)
        fetched = [n.fetcher.stats.fetched_bytes for n in (a, b)]
        assert sum(f["registry"] for f in fetched) == pushed.size_bytes
        assert sum(f["peer"] for f in fetched) == pushed.size_bytes
        # what left the registry: one copy of each blob plus manifests and headers
        assert pushed.size_bytes <= proxy.bytes_down < pushed.size_bytes * 1.05
    finally:
        await proxy.close()
        for d in (dockerd, second_dockerd):
            wipe(d)


async def test_private_registry_with_basic_auth_through_a_peer(
    tmp_path: Path, auth_registry: Registry, dockerd: Dockerd, second_dockerd: Dockerd
) -> None:
    net = BlobNet(tmp_path, insecure=(auth_registry.address,))
    creds = (AUTH_USER.username, AUTH_USER.password)
    auth = RegistryAuth(*creds)
    try:
        repo = fresh("route/private")
        pushed = await asyncio.to_thread(push, auth_registry, repo, MB, 41, auth=creds)
        ref = f"{auth_registry.address}/{repo}:v1"
        a = await net.add(docker_host=dockerd.host, fanout=1)
        b = await net.add(docker_host=second_dockerd.host, fanout=1)
        nodes = (a.node_id, b.node_id)
        leaf = b if rank(pushed.config_digest, nodes)[0] == a.node_id else a
        await pull_via(leaf, ref, pushed.digest, nodes, auth=auth)
        assert leaf.fetcher.stats.fetched_bytes["peer"] > 0  # the parent pulled through
        leaf_docker = dockerd if leaf is a else second_dockerd
        assert image_state(leaf_docker, ref)[1] == [
            f"{auth_registry.address}/{repo}@{pushed.digest}"
        ]
    finally:
        await net.close()
        for d in (dockerd, second_dockerd):
            wipe(d)


async def test_a_peer_serving_corrupt_bytes_under_dockerd_is_caught(
    net: BlobNet, registry: Registry, dockerd: Dockerd, second_dockerd: Dockerd
) -> None:
    repo = fresh("route/corrupt")
    # One layer: dockerd waits 5 s before it retries a layer whose connection broke.
    pushed = await asyncio.to_thread(
        push_image_detailed, registry.url, repo, "v1", 2 * MB, layers=1, seed=51
    )
    ref = f"{registry.address}/{repo}:v1"
    liar = await net.add(docker_host=dockerd.host, fanout=1)
    victim = await net.add(docker_host=second_dockerd.host, fanout=1)
    nodes = (liar.node_id,)  # the victim is a leaf below the liar for every blob
    # The liar holds every blob of the image complete, but with wrong bytes.
    for digest, size in zip(pushed.layer_digests, pushed.layer_sizes, strict=True):
        (liar.cache.root / "sha256" / digest.split(":")[1]).write_bytes(os.urandom(size))
    liar.cache.open()
    try:
        await pull_via(victim, ref, pushed.digest, nodes)
        victim_state = image_state(second_dockerd, ref)
        assert victim_state[1] == [f"{registry.address}/{repo}@{pushed.digest}"]
        assert liar.node_id in victim.fetcher.avoided("p1")
        assert victim.fetcher.stats.verify_failures["peer"] >= 1
        wipe(second_dockerd)
        second_dockerd.docker("pull", ref)
        assert image_state(second_dockerd, ref) == victim_state
    finally:
        for d in (dockerd, second_dockerd):
            wipe(d)


async def test_a_peer_killed_mid_transfer_does_not_fail_the_pull(
    net: BlobNet, registry: Registry, dockerd: Dockerd, second_dockerd: Dockerd
) -> None:
    net.upload_rate_bytes_per_s = 2 * MB  # slow enough to kill the parent in the middle
    repo = fresh("route/killed")
    pushed = await asyncio.to_thread(push, registry, repo, 6 * MB, 61)
    ref = f"{registry.address}/{repo}:v1"
    parent = await net.add(docker_host=dockerd.host, fanout=1)
    child = await net.add(docker_host=second_dockerd.host, fanout=1)
    nodes = (parent.node_id,)  # the child is a leaf below the parent for every blob
    for digest, size in zip(pushed.layer_digests, pushed.layer_sizes, strict=True):
        data = await _blob(registry, repo, digest)
        assert len(data) == size
        await parent.give(data, digest)
    try:
        pull = asyncio.create_task(pull_via(child, ref, pushed.digest, nodes))
        await eventually(lambda: child.fetcher.stats.fetched_bytes["peer"] >= MB, timeout_s=60)
        await net.stop(parent, abrupt=True)
        net.down.add(parent.node_id)
        await asyncio.wait_for(pull, 120)
        assert image_state(second_dockerd, ref)[1] == [f"{registry.address}/{repo}@{pushed.digest}"]
        fetched = child.fetcher.stats.fetched_bytes
        assert fetched["peer"] >= 1 * MB and fetched["registry"] > 0
        assert fetched["peer"] + fetched["registry"] == pushed.size_bytes  # resumed by Range
    finally:
        for d in (dockerd, second_dockerd):
            wipe(d)


async def _blob(registry: Registry, repo: str, digest: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{registry.url}/v2/{repo}/blobs/{digest}") as resp,
    ):
        return await resp.read()


async def test_no_space_fails_the_pull_by_name_and_leaves_nothing(
    net: BlobNet, registry: Registry, dockerd: Dockerd
) -> None:
    repo = fresh("route/nospace")
    pushed = await asyncio.to_thread(push, registry, repo, 3 * MB, 71)
    ref = f"{registry.address}/{repo}:v1"
    node = await net.add(docker_host=dockerd.host, cap_bytes=1 * MB)
    with pytest.raises(PullError) as info:
        await asyncio.wait_for(pull_via(node, ref, pushed.digest, (node.node_id,)), 60)
    assert info.value.reason == NO_SPACE
    # a small blob's download may still be finishing
    await eventually(lambda: node.fetcher.active == 0, timeout_s=30)
    assert node.cache.used_bytes <= 1 * MB
    assert list((node.cache.root / "tmp").iterdir()) == []
    assert not any(str(node.loopback.port) in n for n in all_names(dockerd))  # type: ignore[union-attr]
    wipe(dockerd)


async def test_origin_unreachable_at_the_end_is_registry_unreachable(
    net: BlobNet, registry: Registry, dockerd: Dockerd
) -> None:
    proxy = await ThrottledProxy(registry.host, registry.port, bytes_per_s=1e12).start()
    net.insecure = (proxy.address,)
    repo = fresh("route/origin")
    pushed = await asyncio.to_thread(push, registry, repo, MB, 81)
    ref = f"{proxy.address}/{repo}:v1"
    node = await net.add(docker_host=dockerd.host)
    assert node.engine is not None
    engine_pull = node.engine.pull

    async def cut_before_origin(ref_: str, **kw: Any) -> None:
        if not ref_.startswith("127.0.0.1:" + str(node.loopback.port)):  # type: ignore[union-attr]
            await proxy.cut()  # the blobs are in: now the origin goes away
        await engine_pull(ref_, **kw)

    node.engine.pull = cut_before_origin  # type: ignore[method-assign]
    try:
        with pytest.raises(PullError) as info:
            await pull_via(node, ref, pushed.digest, (node.node_id,))
        assert info.value.reason == REGISTRY_UNREACHABLE and info.value.transient
        assert "did not confirm" in info.value.detail
        assert not any(str(node.loopback.port) in n for n in all_names(dockerd))  # type: ignore[union-attr]
        assert all(d in node.cache for d in pushed.layer_digests)  # a retry moves no bytes
    finally:
        await proxy.close()
        wipe(dockerd)


def _other_address() -> str | None:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


async def test_the_loopback_registry_answers_loopback_only_and_pulls_only(
    net: BlobNet, registry: Registry, dockerd: Dockerd
) -> None:
    node = await net.add(docker_host=dockerd.host)
    assert node.loopback is not None
    port = node.loopback.port
    other = _other_address()
    if other is not None:
        with pytest.raises(OSError):
            socket.create_connection((other, port), timeout=2).close()
    base = f"http://127.0.0.1:{port}/v2"
    digest = "sha256:" + "0" * 64
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/") as resp:
            assert resp.status == 200
        for path in (
            f"/nosuchsession/app/manifests/{digest}",
            f"/nosuchsession/app/blobs/{digest}",
            "/nosuchsession/app/manifests/latest",
            "/nosuchsession/app/tags/list",
        ):
            async with session.get(base + path) as resp:
                assert resp.status == 404, path
        async with session.put(base + f"/x/app/manifests/{digest}", data=b"{}") as resp:
            assert resp.status == 405
