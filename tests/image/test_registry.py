"""RegistryClient: the token flow and index handling against a scripted loopback server,
then digests, sizes and auth against the real docker-registry."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from houndd.errors import PullError
from houndd.image.credentials import RegistryAuth
from houndd.image.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
)
from houndd.image.trust import RegistryTrust
from houndd.puller.docker import DockerEngine
from houndd.puller.executor import WorkItem
from tests.fixtures.docker import AUTH_USER
from tests.fixtures.images import push_image_detailed
from tests.fixtures.services import Dockerd, Registry, free_port

MB = 1 << 20
ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    c = RegistryClient(aiohttp.ClientSession)
    yield c
    await c.close()


def _manifest(config_size: int, layer_sizes: list[int], media_type: str = DOCKER_MANIFEST) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "x", "size": config_size, "digest": "sha256:" + "c" * 64},
            "layers": [
                {"mediaType": "y", "size": s, "digest": f"sha256:{i:064x}"}
                for i, s in enumerate(layer_sizes)
            ],
        }
    ).encode()


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


# --- scripted registry ----------------------------------------------------------------------


async def test_bearer_token_flow_with_basic_credentials(
    aiohttp_server: ServerFactory, client: RegistryClient
) -> None:
    body = _manifest(100, [1000, 2000])
    seen_scopes: list[str] = []
    creds = base64.b64encode(b"bob:pw-bearer-123").decode()

    async def token(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Basic {creds}":
            return web.Response(status=401)
        seen_scopes.append(request.query["scope"])
        assert request.query["service"] == "test-registry"
        return web.json_response({"token": "tok-1"})

    async def manifest(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok-1":
            realm = f"http://{request.host}/token"
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="test-registry",'
                    f'scope="repository:team/app:pull"'
                },
            )
        assert OCI_INDEX in request.headers["Accept"]
        return web.Response(body=body, headers={"Content-Type": DOCKER_MANIFEST})

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/team/app/manifests/1.0", manifest)
    server = await aiohttp_server(app)

    resolved = await client.resolve(
        f"127.0.0.1:{server.port}/team/app:1.0", RegistryAuth("bob", "pw-bearer-123", "x")
    )
    assert resolved.digest == _digest(body)  # no Docker-Content-Digest: hash of the body
    assert resolved.size_bytes == 3100
    assert resolved.media_type == DOCKER_MANIFEST
    assert seen_scopes == ["repository:team/app:pull"]

    with pytest.raises(PullError) as info:
        await client.resolve(f"127.0.0.1:{server.port}/team/app:1.0", RegistryAuth("bob", "bad"))
    assert info.value.reason == "unauthorized"


async def test_index_resolves_to_index_digest_and_amd64_size(
    aiohttp_server: ServerFactory, client: RegistryClient
) -> None:
    amd64 = _manifest(10, [500], OCI_MANIFEST)
    arm64 = _manifest(10, [999_999], OCI_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"digest": _digest(arm64), "platform": {"os": "linux", "architecture": "arm64"}},
                {"digest": _digest(amd64), "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }
    ).encode()
    blobs = {"multi": index, _digest(amd64): amd64, _digest(arm64): arm64}

    async def manifest(request: web.Request) -> web.Response:
        body = blobs.get(request.match_info["ref"])
        if body is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        media = OCI_INDEX if body is index else OCI_MANIFEST
        return web.Response(
            body=body, headers={"Content-Type": media, "Docker-Content-Digest": _digest(body)}
        )

    app = web.Application()
    app.router.add_get("/v2/lib/multi/manifests/{ref}", manifest)
    server = await aiohttp_server(app)
    resolved = await client.resolve(f"localhost:{server.port}/lib/multi:multi")
    assert resolved.digest == _digest(index)
    assert resolved.size_bytes == 510
    assert resolved.media_type == OCI_INDEX

    with pytest.raises(PullError) as info:
        await client.resolve(f"localhost:{server.port}/lib/multi:gone")
    assert (info.value.reason, info.value.transient) == ("manifest unknown", False)


@pytest.mark.parametrize(
    ("status", "reason", "transient"),
    [
        (500, "registry unreachable", True),
        (503, "registry unreachable", True),
        (429, "registry unreachable", True),
        (403, "unauthorized", False),
        (404, "manifest unknown", False),
        (400, "pull failed", False),
    ],
)
async def test_http_status_maps_to_reason(
    aiohttp_server: ServerFactory,
    client: RegistryClient,
    status: int,
    reason: str,
    transient: bool,
) -> None:
    async def manifest(request: web.Request) -> web.Response:
        return web.Response(status=status)

    app = web.Application()
    app.router.add_get("/v2/a/manifests/1", manifest)
    server = await aiohttp_server(app)
    with pytest.raises(PullError) as info:
        await client.resolve(f"127.0.0.1:{server.port}/a:1")
    assert (info.value.reason, info.value.transient) == (reason, transient)


async def test_oversize_or_garbage_manifest_is_rejected(
    aiohttp_server: ServerFactory, client: RegistryClient
) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"{" + b" " * (5 * MB) + b"}")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>", headers={"Content-Type": "text/html"})

    app = web.Application()
    app.router.add_get("/v2/a/manifests/big", big)
    app.router.add_get("/v2/a/manifests/garbage", garbage)
    server = await aiohttp_server(app)
    for tag in ("big", "garbage"):
        with pytest.raises(PullError) as info:
            await client.resolve(f"127.0.0.1:{server.port}/a:{tag}")
        assert info.value.reason == "pull failed"


async def test_connection_refused_is_transient_unreachable(client: RegistryClient) -> None:
    with pytest.raises(PullError) as info:
        await client.resolve(f"127.0.0.1:{free_port()}/a:1")
    assert (info.value.reason, info.value.transient) == ("registry unreachable", True)


async def test_scheme_follows_the_override_loopback_and_dockerd() -> None:
    dockerd_info = {
        "RegistryConfig": {
            "InsecureRegistryCIDRs": ["127.0.0.0/8", "10.9.0.0/16", "not a cidr"],
            "IndexConfigs": {
                "docker.io": {"Name": "docker.io", "Secure": True},
                "plain.lan:5000": {"Name": "plain.lan:5000", "Secure": False},
                "10.9.1.1:5000": {"Name": "10.9.1.1:5000", "Secure": True},
            },
        }
    }
    looked_up: list[str] = []

    async def lookup(registry: str) -> list[str]:  # no DNS from tests
        looked_up.append(registry)
        return {"lab.lan:5000": ["10.9.3.4"]}.get(registry, ["192.0.2.7"])

    c = RegistryClient(
        aiohttp.ClientSession,
        insecure_registries=["reg.lan:5000"],
        trust=lambda: RegistryTrust.from_docker_info(dockerd_info),
        lookup=lookup,
    )
    plain = [("http", True)]
    unchecked_then_plain = [("https", False), ("http", True)]
    checked = [("https", True)]
    assert await c._endpoints("reg.lan:5000") == plain  # the override
    assert await c._endpoints("127.0.0.1:5000") == plain
    assert await c._endpoints("localhost:5000") == plain
    assert await c._endpoints("[::1]:5000") == plain
    assert await c._endpoints("plain.lan:5000") == unchecked_then_plain  # --insecure-registry
    assert await c._endpoints("10.9.8.7:5000") == unchecked_then_plain  # in a CIDR
    assert await c._endpoints("lab.lan:5000") == unchecked_then_plain  # resolves into a CIDR
    assert await c._endpoints("10.9.1.1:5000") == checked  # named secure beats the CIDR
    assert await c._endpoints("reg.example.com") == checked
    assert await c._endpoints("registry-1.docker.io") == checked
    assert "plain.lan:5000" not in looked_up and "lab.lan:5000" in looked_up


def test_trust_from_an_engine_without_registry_config_is_dockerds_default() -> None:
    trust = RegistryTrust.from_docker_info({"ServerVersion": "20.10"})
    assert trust.insecure("127.0.0.5:5000") and not trust.insecure("10.0.0.1:5000")
    odd = RegistryTrust.from_docker_info(
        {"RegistryConfig": {"InsecureRegistryCIDRs": "x", "IndexConfigs": {"a": {"Secure": 1}}}}
    )
    assert odd.insecure_networks == () and odd.secure_by_name == {}


# --- the real docker-registry ---------------------------------------------------------------


def _docker_config(tmp_path: Path, server: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {f"http://{server}": {"auth": token}}}))
    return path


@pytest.mark.docker
async def test_resolve_digest_and_size_match_what_was_pushed(
    registry: Registry, client: RegistryClient
) -> None:
    repo = f"resolve/{uuid.uuid4().hex[:8]}"
    pushed = push_image_detailed(registry.url, repo, "v1", 2 * MB, layers=3, seed=11)
    resolved = await client.resolve(f"{registry.address}/{repo}:v1")
    assert resolved.digest == pushed.digest
    assert resolved.size_bytes == pushed.size_bytes == pushed.config_size + sum(pushed.layer_sizes)
    assert resolved.media_type == DOCKER_MANIFEST
    by_digest = await client.resolve(f"{registry.address}/{repo}@{pushed.digest}")
    assert by_digest == resolved

    for missing in (f"{repo}:nope", f"resolve/{uuid.uuid4().hex[:8]}:v1"):
        with pytest.raises(PullError) as info:
            await client.resolve(f"{registry.address}/{missing}")
        assert info.value.reason == "manifest unknown"


@pytest.mark.docker
async def test_auth_registry_resolve_and_pull_with_credentials(
    auth_registry: Registry,
    dockerd: Dockerd,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    user, password = AUTH_USER.username, AUTH_USER.password
    auth = RegistryAuth(user, password, auth_registry.address)
    repo = f"private/{uuid.uuid4().hex[:8]}"
    a = push_image_detailed(auth_registry.url, repo, "a", MB, seed=21, auth=(user, password))
    b = push_image_detailed(auth_registry.url, repo, "b", MB, seed=22, auth=(user, password))
    ref_a, ref_b = f"{auth_registry.address}/{repo}:a", f"{auth_registry.address}/{repo}:b"
    config = _docker_config(tmp_path, auth_registry.address, user, password)
    empty = tmp_path / "missing.json"

    # resolve: credentials from the plan, from the Docker config file, none, wrong ones
    plain = RegistryClient(aiohttp.ClientSession, docker_config_path=empty)
    from_file = RegistryClient(aiohttp.ClientSession, docker_config_path=config)
    try:
        assert (await plain.resolve(ref_a, auth)).digest == a.digest
        assert (await from_file.resolve(ref_a, None)).size_bytes == a.size_bytes
        for bad in (None, RegistryAuth(user, "wrong-password", auth_registry.address)):
            with pytest.raises(PullError) as info:
                await plain.resolve(ref_a, bad)
            assert (info.value.reason, info.value.transient) == ("unauthorized", False)
    finally:
        await plain.close()
        await from_file.close()

    # pull: credentials from the plan, from the Docker config file, none, wrong ones
    engine = DockerEngine(dockerd.host, docker_config_path=empty)
    engine_file = DockerEngine(dockerd.host, docker_config_path=config)
    try:
        for bad in (None, RegistryAuth(user, "wrong-password", auth_registry.address)):
            with pytest.raises(PullError) as info:
                await engine.pull(f"{ref_a}", auth=bad, progress=lambda p: None)
            assert info.value.reason == "unauthorized", info.value
        await engine.pull(
            f"{auth_registry.address}/{repo}@{a.digest}", auth=auth, progress=lambda p: None
        )
        assert await engine.has_image(f"{auth_registry.address}/{repo}@{a.digest}") == a.digest
        await engine_file.pull(ref_b, auth=None, progress=lambda p: None)
        assert await engine_file.has_image(ref_b) == b.digest
    finally:
        await engine.close()
        await engine_file.close()

    item = WorkItem("pull", ref_a, a.digest, auth=auth)
    for text in (caplog.text, repr(auth), str(auth), repr(item)):
        assert password not in text
        assert base64.b64encode(f"{user}:{password}".encode()).decode() not in text
    assert "'***'" in repr(auth)
