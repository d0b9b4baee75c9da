"""The loopback registry over HTTP, with the fetcher on in-memory transfers: what dockerd
may ask for, Range resumption, retired sessions, and streams that must not complete."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from houndd.blobs.loopback import RETIRED_SESSION_S, LoopbackRegistry, LoopbackSession
from houndd.blobs.source import BlobContext
from houndd.errors import NO_SPACE, UNAUTHORIZED, pull_error
from houndd.image.credentials import RegistryAuth
from tests.blobs.conftest import ME, FetcherRig, RigFactory
from tests.puller.waiting import eventually

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Manifests:
    """A `ManifestSource` from a dict; counts fetches."""

    docs: dict[str, bytes] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)
    refuse: bool = False

    def add(self, doc: dict[str, object]) -> str:
        body = json.dumps(doc).encode()
        self.docs[_digest(body)] = body
        return _digest(body)

    async def manifest(
        self, name: str, digest: str, auth: RegistryAuth | None = None
    ) -> tuple[bytes, str]:
        self.fetched.append(digest)
        if self.refuse:
            raise pull_error(UNAUTHORIZED, "HTTP 401")
        body = self.docs[digest]
        doc = json.loads(body)
        return body, str(doc.get("mediaType", ""))


@dataclass
class Loop:
    rig: FetcherRig
    manifests: Manifests
    registry: LoopbackRegistry
    http: aiohttp.ClientSession
    clock: list[float]

    def url(self, session: LoopbackSession, kind: str, ref: str) -> str:
        return f"http://{self.registry.address}/v2/{session.token}/app/x/{kind}/{ref}"

    def image(self, *blobs: bytes) -> str:
        config = self.rig.transfers.publish(b'{"config": true}')
        layers = [self.rig.transfers.publish(b) for b in blobs]
        return self.manifests.add({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"digest": config, "size": 16},
            "layers": [{"digest": d, "size": len(b)} for d, b in zip(layers, blobs, strict=True)],
        })  # fmt: skip

    def session(self, image: str) -> LoopbackSession:
        ctx = BlobContext("plan-1", "127.0.0.1:5000/app/x", image, (ME,))
        return self.registry.open_session(ctx, "app/x")


@pytest.fixture
async def loop(rig: RigFactory) -> AsyncIterator[Loop]:
    async with rig() as r:
        manifests = Manifests()
        clock = [0.0]
        registry = LoopbackRegistry(r.fetcher, manifests, r.cache, monotonic=lambda: clock[0])
        await registry.start()
        try:
            async with aiohttp.ClientSession() as http:
                yield Loop(r, manifests, registry, http, clock)
        finally:
            await registry.close()


async def test_a_pull_by_digest_gets_manifest_and_blobs(loop: Loop) -> None:
    layer = os.urandom(100_000)
    image = loop.image(layer)
    session = loop.session(image)
    async with loop.http.get(f"http://{loop.registry.address}/v2/") as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    async with loop.http.head(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == image
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == MANIFEST
        assert _digest(await resp.read()) == image
    async with loop.http.get(loop.url(session, "blobs", _digest(layer))) as resp:
        assert resp.status == 200 and await resp.read() == layer
    async with loop.http.get(
        loop.url(session, "blobs", _digest(layer)), headers={"Range": "bytes=4000-"}
    ) as resp:
        assert resp.status == 206 and await resp.read() == layer[4000:]
        assert resp.headers["Content-Range"] == f"bytes 4000-99999/{len(layer)}"
    assert loop.manifests.fetched == [image]  # cached after the first fetch


async def test_only_what_the_session_lists_is_served(loop: Loop) -> None:
    layer = os.urandom(1000)
    image = loop.image(layer)
    other = loop.rig.transfers.publish(os.urandom(1000))  # in the registry, not in the image
    session = loop.session(image)
    for url in (
        loop.url(session, "manifests", "latest"),
        loop.url(session, "manifests", other),
        loop.url(session, "blobs", _digest(layer)),  # before its manifest was asked for
        f"http://{loop.registry.address}/v2/{'0' * 16}/app/x/manifests/{image}",
        f"http://{loop.registry.address}/v2/{session.token}/app/other/manifests/{image}",
        f"http://{loop.registry.address}/v2/{session.token}/app/x/tags/list",
    ):
        async with loop.http.get(url) as resp:
            assert resp.status == 404, url
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    async with loop.http.get(loop.url(session, "blobs", other)) as resp:
        assert resp.status == 404


async def test_an_index_opens_its_children(loop: Loop) -> None:
    child = loop.image(os.urandom(1000))
    index = loop.manifests.add({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{"digest": child, "size": 1, "platform": {"os": "linux"}}],
    })  # fmt: skip
    session = loop.session(index)
    async with loop.http.get(loop.url(session, "manifests", child)) as resp:
        assert resp.status == 404  # not before the index was read
    async with loop.http.get(loop.url(session, "manifests", index)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == INDEX
    async with loop.http.get(loop.url(session, "manifests", child)) as resp:
        assert resp.status == 200


async def test_a_closed_session_answers_until_it_expires(loop: Loop) -> None:
    layer = os.urandom(1000)
    image = loop.image(layer)
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    loop.registry.close_session(session)
    loop.clock[0] += RETIRED_SESSION_S - 1
    async with loop.http.get(loop.url(session, "blobs", _digest(layer))) as resp:
        assert resp.status == 200 and await resp.read() == layer
    loop.clock[0] += 2
    async with loop.http.get(loop.url(session, "blobs", _digest(layer))) as resp:
        assert resp.status == 404


async def test_failures_are_recorded_on_the_session(loop: Loop) -> None:
    layer = os.urandom(1000)
    image = loop.image(layer)
    loop.manifests.refuse = True
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 503
    assert session.failed.is_set() and session.failure is not None
    assert session.failure.reason == UNAUTHORIZED

    loop.manifests.refuse = False
    big = os.urandom(200_000)
    image = loop.image(big)
    loop.rig.cache.cap_bytes = 100_000
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    async with loop.http.get(loop.url(session, "blobs", _digest(big))) as resp:
        assert resp.status == 503
    assert session.failure is not None and session.failure.reason == NO_SPACE


async def test_a_blob_that_turns_out_wrong_never_completes_for_dockerd(loop: Loop) -> None:
    layer = os.urandom(300_000)
    image = loop.image(layer)
    loop.rig.transfers.fault("", "corrupt", after_bytes=len(layer) - 100)  # registry lies
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with loop.http.get(loop.url(session, "blobs", _digest(layer))) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                got += chunk
    assert len(got) < len(layer)
    assert session.failure is not None and "other content" in session.failure.detail


async def test_asking_for_a_layer_fetches_the_layers_above_it_ahead(loop: Loop) -> None:
    layers = [os.urandom(20_000) for _ in range(4)]
    image = loop.image(*layers)
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    async with loop.http.get(loop.url(session, "blobs", _digest(layers[1]))) as resp:
        assert await resp.read() == layers[1]
    above = [_digest(b) for b in layers[2:]]
    await eventually(lambda: all(d in loop.rig.cache for d in above), timeout_s=30)
    # dockerd already has the layer below (it did not ask): it is never fetched
    assert _digest(layers[0]) not in {d for _, d, _ in loop.rig.transfers.requests}


async def test_layers_dockerd_says_it_lacks_are_fetched_ahead(loop: Loop) -> None:
    """dockerd names the layers it will download in its progress (short ids) before its three
    download slots reach them; those are fetched at once, and no other."""
    layers = [os.urandom(20_000) for _ in range(4)]
    image = loop.image(*layers)
    session = loop.session(image)
    async with loop.http.get(loop.url(session, "manifests", image)) as resp:
        assert resp.status == 200
    wanted = [_digest(layers[1]), _digest(layers[3])]
    loop.registry.prefetch(session, [d.removeprefix("sha256:")[:12] for d in wanted])
    await eventually(lambda: all(d in loop.rig.cache for d in wanted), timeout_s=30)
    requested = {d for _, d, _ in loop.rig.transfers.requests}
    assert _digest(layers[0]) not in requested and _digest(layers[2]) not in requested
