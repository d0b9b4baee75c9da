"""Registry transport learned from dockerd, against real services: a plain-HTTP docker-registry
on a non-loopback address (its own network namespace, reached over a veth pair) and a real
dockerd started with `--insecure-registry` for it.

Without dockerd's word the registry client speaks HTTPS to it and gets a plain HTTP answer:
that must be reported as exactly that, with the fix. With the trust read from that dockerd's
`GET /info`, the tag resolves, and dockerd itself pulls the digest from the same registry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from houndd.errors import PullError
from houndd.image.registry import RegistryClient
from houndd.image.trust import RegistryTrust
from houndd.puller.docker import DockerEngine
from tests.fixtures.images import push_image
from tests.fixtures.services import Dockerd, Registry, start_dockerd, start_registry

pytestmark = [pytest.mark.docker, pytest.mark.netns]

SUBNET_BASE = "10.214"  # apart from the multi-host harness's 10.213.K.0/24


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    taken = {int(k) for k in re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", used.stdout)}
    return next(k for k in range(256) if k not in taken)


@pytest.fixture(scope="module")
def remote_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP docker-registry at 10.214.K.2:5000 in a namespace of its own."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("needs root and iproute2 (bash .ci/services.sh install)", pytrace=False)
    tag = f"{os.getpid() % 100000}"
    netns, host_link, ns_link = f"hdtls-{tag}", f"htls{tag}h", f"htls{tag}n"
    k = _free_subnet()
    host_addr, reg_addr = f"{SUBNET_BASE}.{k}.1", f"{SUBNET_BASE}.{k}.2"
    _ip("netns", "add", netns)
    registry: Registry | None = None
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
        _ip("link", "set", ns_link, "netns", netns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", netns, "addr", "add", f"{reg_addr}/30", "dev", ns_link)
        _ip("-n", netns, "link", "set", ns_link, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        registry = start_registry(
            tmp_path_factory.mktemp("tls-registry"), host=reg_addr, port=5000, netns=netns
        )
        yield registry
    finally:
        if registry is not None:
            registry.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)


@pytest.fixture(scope="module")
def trusting_dockerd(
    remote_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dockerd]:
    daemon = start_dockerd(
        tmp_path_factory.mktemp("tls-dockerd"),
        name="tls",
        insecure_registries=[remote_registry.address],
    )
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def image(remote_registry: Registry) -> tuple[str, str]:
    digest = push_image(remote_registry.url, "tls/app", "1", 30_000, seed=91)
    return f"{remote_registry.address}/tls/app:1", digest


async def test_a_plain_http_registry_is_named_as_such_with_the_fix(
    remote_registry: Registry, image: tuple[str, str]
) -> None:
    client = RegistryClient(aiohttp.ClientSession)  # dockerd's defaults: HTTPS for this one
    try:
        with pytest.raises(PullError) as err:
            await client.resolve(image[0])
    finally:
        await client.close()
    message = str(err.value)
    assert f"{remote_registry.address} answers in plain HTTP, not TLS" in message
    assert f"--insecure-registry {remote_registry.address}" in message
    assert "insecure_registries" in message
    assert "WRONG_VERSION_NUMBER" not in message and "ClientConnector" not in message
    assert err.value.transient is False  # retrying will not fix a setting


async def test_trust_learned_from_dockerd_reaches_the_registry_dockerd_reaches(
    trusting_dockerd: Dockerd, remote_registry: Registry, image: tuple[str, str]
) -> None:
    engine = DockerEngine(trusting_dockerd.host)
    try:
        info = await engine.info()
        trust = info.registry_trust
        assert trust.named(remote_registry.address) is False  # dockerd's IndexConfigs entry
        assert trust.insecure(remote_registry.address)
        client = RegistryClient(aiohttp.ClientSession, trust=lambda: trust)
        try:
            resolved = await client.resolve(image[0])
        finally:
            await client.close()
        assert resolved.digest == image[1]
        # dockerd agrees: it pulls that digest from the same registry over plain HTTP
        by_digest = f"{remote_registry.address}/tls/app@{image[1]}"
        await engine.pull(by_digest, auth=None, progress=lambda p: None)
        assert await engine.has_image(by_digest) == image[1]
    finally:
        await engine.close()


async def test_the_override_still_wins_without_dockerd(
    remote_registry: Registry, image: tuple[str, str]
) -> None:
    client = RegistryClient(
        aiohttp.ClientSession,
        insecure_registries=[remote_registry.address],
        trust=RegistryTrust,  # an engine that said nothing
    )
    try:
        assert (await client.resolve(image[0])).digest == image[1]
    finally:
        await client.close()


def test_the_namespace_is_really_not_loopback(remote_registry: Registry) -> None:
    # the whole point: 127.0.0.0/8 is always plain HTTP for dockerd and for houndd
    assert not remote_registry.host.startswith("127.")
    assert Path(f"/var/run/netns/hdtls-{os.getpid() % 100000}").exists()
