"""Pure pieces: dockerd error mapping, layer progress aggregation, Docker config credentials,
FakeEngine failure injection and counters."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from houndd.errors import EngineUnavailable, EngineUnavailableError, PullError, pull_error
from houndd.image.credentials import RegistryAuth, credentials_for
from houndd.puller.docker import DockerEngine, _LayerProgress, classify_pull_error
from houndd.puller.engine import PullProgress
from houndd.puller.memory import FakeEngine


@pytest.mark.parametrize(
    ("message", "reason", "transient"),
    [
        (
            "manifest for 127.0.0.1:5000/a@sha256:ab not found: manifest unknown: manifest unknown",
            "manifest unknown",
            False,
        ),
        (
            "repository 127.0.0.1:5000/nope not found: name unknown: repository name not known",
            "manifest unknown",
            False,
        ),
        ('Head "http://r/v2/a/manifests/1": no basic auth credentials', "unauthorized", False),
        ("unauthorized: authentication required", "unauthorized", False),
        ("pull access denied for x, repository does not exist", "unauthorized", False),
        ("write /var/lib/docker/tmp/x: no space left on device", "no space", False),
        (
            '[0] Get "http://127.0.0.1:1/v2/a/blobs/sha256:1": dial tcp 127.0.0.1:1: '
            "connect: connection refused",
            "registry unreachable",
            True,
        ),
        (
            "read tcp 127.0.0.1:4->127.0.0.1:5: read: connection reset by peer",
            "registry unreachable",
            True,
        ),
        ("unexpected EOF", "registry unreachable", True),
        ('Get "https://r/v2/": net/http: TLS handshake timeout', "registry unreachable", True),
        ("toomanyrequests: You have reached your pull rate limit", "registry unreachable", True),
        ("something nobody expected", "pull failed", False),
    ],
)
def test_classify_pull_error(message: str, reason: str, transient: bool) -> None:
    error = classify_pull_error(message)
    assert (error.reason, error.transient, error.detail) == (reason, transient, message)


def test_engine_unavailable_is_both_pull_error_and_connection_error() -> None:
    error = pull_error("engine unavailable", "socket gone")
    assert isinstance(error, EngineUnavailableError)
    assert isinstance(error, PullError) and isinstance(error, EngineUnavailable)
    assert isinstance(error, ConnectionError)
    assert (error.reason, error.transient) == ("engine unavailable", True)


def test_layer_progress_aggregates_per_layer() -> None:
    agg = _LayerProgress()
    stream: list[dict[str, Any]] = [
        {"status": "Pulling from a/b", "id": "sha256:abc"},
        {"status": "Pulling fs layer", "id": "l1", "progressDetail": {}},
        {"status": "Pulling fs layer", "id": "l2", "progressDetail": {}},
        {"status": "Downloading", "id": "l1", "progressDetail": {"current": 50, "total": 100}},
        {"status": "Downloading", "id": "l2", "progressDetail": {"current": 10, "total": 300}},
        {"status": "Download complete", "id": "l1", "progressDetail": {}},
        {"status": "Extracting", "id": "l1", "progressDetail": {"current": 10, "total": 100}},
        {"status": "Pull complete", "id": "l1", "progressDetail": {}},
    ]
    snapshots = [agg.snapshot() for item in stream if agg.feed(item)]
    assert snapshots[-1] == PullProgress(
        bytes_done=110,
        bytes_total=400,
        layers_done=1,
        layers_total=2,
        fetching=frozenset({"l1", "l2"}),
    )
    agg.feed({"status": "Already exists", "id": "l2"})
    assert agg.snapshot() == PullProgress(400, 400, 2, 2, fetching=frozenset({"l1", "l2"}))
    assert agg.feed({"status": "Digest: sha256:abc"}) is False


def test_layer_progress_names_the_layers_dockerd_will_download() -> None:
    agg = _LayerProgress()
    for status, layer in [
        ("Already exists", "base"),
        ("Pulling fs layer", "l1"),
        ("Pulling fs layer", "l2"),
        ("Waiting", "l3"),
    ]:
        agg.feed({"status": status, "id": layer, "progressDetail": {}})
    assert agg.snapshot().fetching == {"l1", "l2", "l3"}  # not the one it has


def test_registry_auth_repr_hides_password() -> None:
    auth = RegistryAuth("u", "p@ss-w0rd", "reg:5000")
    assert "p@ss-w0rd" not in repr(auth) and "p@ss-w0rd" not in str(auth)
    assert "p@ss-w0rd" not in f"{auth!r} {[auth]}"
    assert auth == RegistryAuth("u", "p@ss-w0rd", "reg:5000")
    assert auth != RegistryAuth("u", "other", "reg:5000")


def _config(tmp_path: Path, auths: dict[str, object]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_credentials_from_docker_config(tmp_path: Path) -> None:
    b64 = base64.b64encode(b"joe:pa:ss").decode()  # passwords may contain ':'
    path = _config(
        tmp_path,
        {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:hubpw").decode()},
            "http://reg.lan:5000": {"auth": b64},
            "other.example.com": {"username": "plain", "password": "pw"},
            "broken.example.com": {"auth": "%%%not-base64"},
        },
    )
    assert credentials_for("reg.lan:5000", path) == RegistryAuth(
        "joe", "pa:ss", "http://reg.lan:5000"
    )
    hub = credentials_for("registry-1.docker.io", path)
    assert hub is not None and (hub.username, hub.password) == ("hub", "hubpw")
    other = credentials_for("other.example.com", path)
    assert other is not None and other.password == "pw"
    assert credentials_for("broken.example.com", path) is None
    assert credentials_for("unknown:1", path) is None
    assert credentials_for("reg.lan:5000", tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert credentials_for("reg.lan:5000", tmp_path / "bad.json") is None


async def test_fake_failure_injection_n_times_then_success() -> None:
    engine = FakeEngine()
    ref = "reg.test/a:1"
    engine.add_registry_image(ref, 10)
    engine.fail(ref, "registry unreachable", times=2)
    for _ in range(2):
        with pytest.raises(PullError) as info:
            await engine.pull(ref, auth=None, progress=lambda p: None)
        assert (info.value.reason, info.value.transient) == ("registry unreachable", True)
    await engine.pull(ref, auth=None, progress=lambda p: None)
    assert engine.pull_counts["reg.test/a:1"] == 3

    engine.fail(ref, "no space")
    for _ in range(3):
        with pytest.raises(PullError) as info:
            await engine.pull(ref, auth=None, progress=lambda p: None)
        assert (info.value.reason, info.value.transient) == ("no space", False)
    engine.clear_failures()
    await engine.pull(ref, auth=None, progress=lambda p: None)


async def test_fake_counts_concurrency_and_uses_bandwidth() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    engine = FakeEngine(sleep=sleep, bandwidth_bytes_per_s=1000, progress_steps=2)
    engine.add_registry_image("reg.test/a:1", 4000)
    engine.add_registry_image("reg.test/b:1", 2000)
    await asyncio.gather(
        engine.pull("reg.test/a:1", auth=None, progress=lambda p: None),
        engine.pull("reg.test/a:1", auth=None, progress=lambda p: None),
        engine.pull("reg.test/b:1", auth=None, progress=lambda p: None),
    )
    assert engine.max_active == 3
    assert engine.max_active_per_ref["reg.test/a:1"] == 2
    assert engine.active == 0
    assert sum(slept) == pytest.approx(4.0 + 4.0 + 2.0)


async def test_docker_engine_constructor_does_no_io_and_reports_unavailable(tmp_path: Path) -> None:
    engine = DockerEngine(f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(EngineUnavailableError):
        await engine.info()
    with pytest.raises(PullError) as info:
        await engine.pull("reg.test/a:1", auth=None, progress=lambda p: None)
    assert (info.value.reason, info.value.transient) == ("engine unavailable", True)
    await engine.close()
    await engine.close()
