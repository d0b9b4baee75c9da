"""The real-Docker fixtures themselves: failing loudly without binaries, deterministic images."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import pytest

from tests.fixtures import docker as docker_plugin
from tests.fixtures.images import (
    RegistryHTTPError,
    delete_image,
    make_layer,
    push_image,
    push_image_detailed,
)
from tests.fixtures.services import Dockerd, Registry, start_registry


def test_missing_binaries_fail_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(docker_plugin.SKIP_ENV, raising=False)
    monkeypatch.setattr(docker_plugin, "missing_binaries", lambda **kw: ["dockerd"])
    with pytest.raises(pytest.fail.Exception, match=r"bash \.ci/services\.sh install"):
        docker_plugin._require()


def test_explicit_opt_out_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(docker_plugin.SKIP_ENV, "1")
    monkeypatch.setattr(docker_plugin, "missing_binaries", lambda **kw: ["dockerd"])
    with pytest.raises(pytest.skip.Exception):
        docker_plugin._require()


def test_make_layer_is_a_deterministic_tar() -> None:
    layer = make_layer(10_000, seed=3)
    assert layer == make_layer(10_000, seed=3) != make_layer(10_000, seed=4)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        (member,) = tar.getmembers()
        assert member.size == 10_000


@pytest.mark.docker
def test_push_is_deterministic_and_shares_base_layers(registry: Registry, dockerd: Dockerd) -> None:
    repo = f"fixtures/{uuid.uuid4().hex[:8]}"
    base = make_layer(50_000, seed=1)
    kw = {"layers": 2, "base_layers": [base]}
    first = push_image_detailed(registry.url, repo, "a", 100_000, seed=5, **kw)  # type: ignore[arg-type]
    again = push_image_detailed(registry.url, repo, "b", 100_000, seed=5, **kw)  # type: ignore[arg-type]
    other = push_image(registry.url, repo, "c", 100_000, seed=6, **kw)  # type: ignore[arg-type]
    assert first.digest == again.digest != other
    assert len(first.layer_digests) == 3 and first.layer_sizes[0] == len(base)

    # dockerd can run nothing here (no runtime images), but it accepts and stores the image.
    ref = f"{registry.address}/{repo}:a"
    dockerd.docker("pull", ref)
    inspected = dockerd.docker("image", "inspect", "--format", "{{.Os}}/{{.Architecture}}", ref)
    assert inspected.stdout.strip() == "linux/amd64"

    delete_image(registry.url, repo, "c")
    with pytest.raises(RegistryHTTPError) as info:
        delete_image(registry.url, repo, "c")
    assert info.value.status == 404


@pytest.mark.docker
def test_registry_stop_is_idempotent_and_restart_keeps_storage(
    tmp_path: Path, registry: Registry
) -> None:
    # `registry` is requested for its binary check / HOUNDD_SKIP_DOCKER handling; this test
    # needs a registry of its own to stop and restart.
    reg = start_registry(tmp_path / "reg", htpasswd=("u", "p"))
    try:
        digest = push_image(reg.url, "keep/me", "1", 10_000, seed=8, auth=("u", "p"))
        with pytest.raises(RegistryHTTPError) as info:
            push_image(reg.url, "keep/me", "2", 10_000, seed=8, auth=("u", "wrong"))
        assert info.value.status == 401
        reg.stop()
        reg.stop()
        assert reg.process.poll() is not None
        reg.restart()
        assert push_image(reg.url, "keep/me", "1", 10_000, seed=8, auth=("u", "p")) == digest
    finally:
        reg.stop()
