"""One behaviour, two engines: the same tests against FakeEngine and the real DockerEngine."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from houndd.errors import PullError
from houndd.puller.docker import DockerEngine
from houndd.puller.engine import Engine, PullProgress
from houndd.puller.memory import FakeEngine
from tests.fixtures.images import push_image

MB = 1 << 20


@dataclass
class Backend:
    """An engine plus a way to publish an image in the registry it pulls from."""

    name: str
    engine: Engine
    registry: str  # host[:port] part of references
    publish: Callable[[str, str, int], str]  # (repository, tag, size) -> digest

    def repo(self) -> str:
        return f"{self.registry}/conformance/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["fake", pytest.param("docker", marks=pytest.mark.docker)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "fake":
        fake = FakeEngine()
        # Fake sizes only: FakeEngine's registry is the dict behind add_registry_image.
        yield Backend(
            "fake",
            fake,
            "registry.test:5000",
            lambda repo, tag, size: fake.add_registry_image(f"{repo}:{tag}", size),
        )
        await fake.close()
        return
    dockerd = request.getfixturevalue("dockerd")
    registry = request.getfixturevalue("registry")

    def publish(repo: str, tag: str, size: int) -> str:
        path = repo.split("/", 1)[1]
        return push_image(registry.url, path, tag, size, seed=zlib.crc32(repo.encode()))

    engine = DockerEngine(dockerd.host)
    yield Backend("docker", engine, registry.address, publish)
    await engine.close()


def _collect() -> tuple[list[PullProgress], Callable[[PullProgress], None]]:
    seen: list[PullProgress] = []
    return seen, seen.append


async def test_pull_by_digest_then_tag_makes_image_present(backend: Backend) -> None:
    repo = backend.repo()
    digest = await asyncio.to_thread(backend.publish, repo, "v1", 2 * MB)
    seen, progress = _collect()

    await backend.engine.pull(f"{repo}@{digest}", auth=None, progress=progress)
    assert await backend.engine.has_image(f"{repo}@{digest}") == digest
    assert await backend.engine.has_image(f"{repo}:v1") is None  # not tagged yet

    await backend.engine.tag(f"{repo}@{digest}", f"{repo}:v1")
    assert await backend.engine.has_image(f"{repo}:v1") == digest

    assert seen, "no progress reported"
    last = seen[-1]
    assert last.bytes_total >= 2 * MB
    assert last.bytes_done == last.bytes_total
    assert last.layers_done == last.layers_total >= 1
    done = [p.bytes_done for p in seen]
    assert done == sorted(done), "progress went backwards"


async def test_pull_by_tag(backend: Backend) -> None:
    repo = backend.repo()
    digest = await asyncio.to_thread(backend.publish, repo, "latest", MB)
    await backend.engine.pull(f"{repo}:latest", auth=None, progress=lambda p: None)
    assert await backend.engine.has_image(f"{repo}:latest") == digest
    assert await backend.engine.has_image(f"{repo}@{digest}") == digest


async def test_absent_image_is_none(backend: Backend) -> None:
    repo = backend.repo()
    assert await backend.engine.has_image(f"{repo}:nope") is None
    assert await backend.engine.has_image(f"{repo}@sha256:{'0' * 64}") is None


async def test_missing_manifest_is_permanent_manifest_unknown(backend: Backend) -> None:
    repo = backend.repo()
    await asyncio.to_thread(backend.publish, repo, "exists", MB)
    for ref in (f"{repo}:missing", f"{repo}@sha256:{'a' * 64}", f"{backend.repo()}:v1"):
        with pytest.raises(PullError) as info:
            await backend.engine.pull(ref, auth=None, progress=lambda p: None)
        assert info.value.reason == "manifest unknown", info.value
        assert info.value.transient is False


async def test_remove_last_tag_deletes_image_and_is_idempotent(backend: Backend) -> None:
    repo = backend.repo()
    digest = await asyncio.to_thread(backend.publish, repo, "v1", MB)
    await backend.engine.pull(f"{repo}@{digest}", auth=None, progress=lambda p: None)
    await backend.engine.tag(f"{repo}@{digest}", f"{repo}:v1")
    before = (await backend.engine.info()).images

    await backend.engine.remove(f"{repo}:v1")
    assert await backend.engine.has_image(f"{repo}:v1") is None
    assert await backend.engine.has_image(f"{repo}@{digest}") is None
    assert (await backend.engine.info()).images == before - 1
    await backend.engine.remove(f"{repo}:v1")  # already gone: fine


async def test_prune_deletes_untagged_keeps_tagged(backend: Backend) -> None:
    untagged, tagged = backend.repo(), backend.repo()
    d1 = await asyncio.to_thread(backend.publish, untagged, "v1", MB)
    d2 = await asyncio.to_thread(backend.publish, tagged, "v1", MB)
    await backend.engine.pull(f"{untagged}@{d1}", auth=None, progress=lambda p: None)
    await backend.engine.pull(f"{tagged}@{d2}", auth=None, progress=lambda p: None)
    await backend.engine.tag(f"{tagged}@{d2}", f"{tagged}:v1")

    report = await backend.engine.prune()
    assert report.deleted, report
    assert report.space_reclaimed_bytes >= MB
    assert await backend.engine.has_image(f"{untagged}@{d1}") is None
    assert await backend.engine.has_image(f"{tagged}:v1") == d2


async def test_tag_of_absent_image_fails(backend: Backend) -> None:
    repo = backend.repo()
    with pytest.raises(PullError):
        await backend.engine.tag(f"{repo}:absent", f"{repo}:other")


async def test_info_describes_engine(backend: Backend) -> None:
    info = await backend.engine.info()
    assert info.server_version
    assert info.os
    assert info.images >= 0
    assert info.free_disk_bytes is None or info.free_disk_bytes > 0


async def test_free_disk_is_the_free_disk_info_reports(backend: Backend) -> None:
    before = await backend.engine.free_disk()  # before any info(): asks the engine itself
    info = await backend.engine.info()
    after = await backend.engine.free_disk()
    if info.free_disk_bytes is None:
        assert before is None and after is None
        return
    assert before is not None and after is not None
    # the same disk: other writers may move it a little between the calls
    assert abs(after - info.free_disk_bytes) <= 256 * MB
    assert abs(before - info.free_disk_bytes) <= 256 * MB


async def test_close_is_idempotent(backend: Backend) -> None:
    await backend.engine.info()
    await backend.engine.close()
    await backend.engine.close()
