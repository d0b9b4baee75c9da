"""`DockerEngine`: the `Engine` protocol over the Docker Engine API (aiodocker)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from houndd.errors import (
    IMAGE_IN_USE,
    MANIFEST_UNKNOWN,
    NO_SPACE,
    PULL_FAILED,
    REGISTRY_UNREACHABLE,
    UNAUTHORIZED,
    EngineUnavailableError,
    PullError,
    pull_error,
)
from houndd.image.credentials import RegistryAuth, credentials_for
from houndd.image.reference import ImageRef, InvalidReference, parse_reference
from houndd.image.trust import RegistryTrust
from houndd.puller.engine import EngineInfo, PruneReport, PullProgress

__all__ = ["DockerEngine", "classify_pull_error"]

log = logging.getLogger("houndd.puller")

# Substrings of dockerd's pull errors (registry client and local store), first match wins.
# The order matters: "manifest unknown" before the generic "not found".
_ERROR_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (NO_SPACE, ("no space left on device", "disk quota exceeded")),
    (
        UNAUTHORIZED,
        (
            "unauthorized",
            "authentication required",
            "no basic auth credentials",
            "denied",
            "forbidden",
            "incorrect username or password",
        ),
    ),
    (
        MANIFEST_UNKNOWN,
        ("manifest unknown", "name unknown", "not found", "does not exist", "no such image"),
    ),
    (
        REGISTRY_UNREACHABLE,
        (
            "connection refused",
            "connection reset",
            "no such host",
            "no route to host",
            "network is unreachable",
            "i/o timeout",
            "tls handshake timeout",
            "context deadline exceeded",
            "unexpected eof",
            "eof",
            "broken pipe",
            "service unavailable",
            "bad gateway",
            "gateway timeout",
            "toomanyrequests",
            "too many requests",
            "timeout",
            "dial tcp",
        ),
    ),
)

_AIODOCKER_CONNECT_FAILED = 900

# The JSON stream's last word on a successful pull.
_PULL_DONE_PREFIXES = ("Status: Downloaded newer image", "Status: Image is up to date")
_LAYER_DONE = frozenset({"Pull complete", "Already exists"})
_DOWNLOADED = frozenset({"Download complete", "Verifying Checksum", "Extracting"})
_WILL_FETCH = frozenset({"Pulling fs layer", "Waiting"})
"""dockerd lacks the layer and queued its download (at most three run at once)."""


def classify_pull_error(message: str) -> PullError:
    """Map a dockerd error message to a `PullError` with a stable reason."""
    low = message.lower()
    for reason, needles in _ERROR_PATTERNS:
        if any(n in low for n in needles):
            return pull_error(reason, message)
    return pull_error(PULL_FAILED, message)


def _parse(ref: str) -> ImageRef:
    try:
        return parse_reference(ref)
    except InvalidReference as e:
        raise PullError(PULL_FAILED, f"invalid reference format: {e}") from None


def _docker_name(ref: ImageRef) -> str:
    """The name dockerd is given: the familiar repository with tag or digest."""
    if ref.digest:
        return f"{ref.familiar_repository}@{ref.digest}"
    return f"{ref.familiar_repository}:{ref.tag}"


class _LayerProgress:
    """Aggregates dockerd's per-layer progress lines into one `PullProgress`."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.current: dict[str, int] = {}
        self.layers: set[str] = set()
        self.done: set[str] = set()
        self.fetching: set[str] = set()

    def feed(self, item: dict[str, Any]) -> bool:
        """Account one stream item; True if the aggregate changed."""
        layer = item.get("id")
        status = str(item.get("status", ""))
        if not isinstance(layer, str) or not layer or status.startswith("Pulling from"):
            return False
        detail = item.get("progressDetail") or {}
        self.layers.add(layer)
        if status in _WILL_FETCH:
            self.fetching.add(layer)
        if status == "Downloading" and isinstance(detail, dict):
            total = int(detail.get("total") or 0)
            if total > 0:
                self.totals[layer] = total
            self.current[layer] = int(detail.get("current") or 0)
        elif status in _DOWNLOADED or status in _LAYER_DONE:
            if layer in self.totals:
                self.current[layer] = self.totals[layer]
            if status in _LAYER_DONE:
                self.done.add(layer)
        return True

    def snapshot(self) -> PullProgress:
        total = sum(self.totals.values())
        done = sum(min(self.current.get(k, 0), t) for k, t in self.totals.items())
        return PullProgress(
            bytes_done=done,
            bytes_total=total,
            layers_done=len(self.done),
            layers_total=len(self.layers),
            fetching=frozenset(self.fetching),
        )


class DockerEngine:
    """`Engine` over the Docker Engine API at `docker_host` (`unix:///...` or `tcp://...`).

    The constructor does no IO; the connection opens on first use. Credentials for a pull
    come from the caller or, failing that, from the Docker config file (`docker_config_path`,
    default `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`); they go to dockerd in
    the X-Registry-Auth header and are never logged.
    """

    def __init__(self, docker_host: str, *, docker_config_path: str | Path | None = None) -> None:
        self.docker_host = docker_host
        self._docker_config_path = docker_config_path
        self._docker: aiodocker.Docker | None = None
        self._root: str | None = None  # DockerRootDir, as dockerd last reported it

    def _error(self, e: aiodocker.DockerError, *, classify: bool = False) -> PullError:
        # aiodocker reports "cannot connect to the engine" as a DockerError with status 900.
        if e.status == _AIODOCKER_CONNECT_FAILED:
            return EngineUnavailableError(f"{self.docker_host}: {e.message}")
        return classify_pull_error(e.message) if classify else pull_error(PULL_FAILED, e.message)

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.docker_host)
        return self._docker

    async def info(self) -> EngineInfo:
        """See `Engine.info`."""
        try:
            data = await self._client().system.info()
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None
        except aiodocker.DockerError as e:
            raise self._error(e) from None
        self._root = str(data.get("DockerRootDir", ""))
        return EngineInfo(
            server_version=str(data.get("ServerVersion", "")),
            kernel=str(data.get("KernelVersion", "")),
            os=str(data.get("OperatingSystem", "")),
            free_disk_bytes=self._free_disk(self._root),
            images=int(data.get("Images", 0)),
            registry_trust=RegistryTrust.from_docker_info(data),
        )

    async def free_disk(self) -> int | None:
        """See `Engine.free_disk`: statvfs of the root dir dockerd last reported. `/info`
        walks dockerd's state (10 ms idle, tens of ms on a busy host), so it is asked only
        until it has answered once; every `info()` (the daemon's engine refresh) updates it."""
        if self._root is None:
            await self.info()
        return self._free_disk(self._root or "")

    def _free_disk(self, root: str) -> int | None:
        # Only meaningful when dockerd's disk is ours: a local socket and a visible root dir.
        if not self.docker_host.startswith("unix://") or not root or not os.path.isdir(root):
            return None
        st = os.statvfs(root)
        return st.f_bavail * st.f_frsize

    async def _inspect(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._client().images.inspect(name)
            return result
        except aiodocker.DockerError as e:
            if e.status == 404:
                return None
            raise self._error(e) from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None

    async def has_image(self, ref: str) -> str | None:
        """See `Engine.has_image`."""
        parsed = _parse(ref)
        data = await self._inspect(_docker_name(parsed))
        if data is None:
            return None
        for repo_digest in data.get("RepoDigests") or []:
            try:
                other = parse_reference(repo_digest)
            except InvalidReference:
                continue
            same_repo = (other.registry, other.repository) == (parsed.registry, parsed.repository)
            if same_repo and (parsed.digest is None or other.digest == parsed.digest):
                return other.digest
        if parsed.digest is not None:
            # dockerd resolves `repo@digest` by digest alone; insist on this repository.
            return None
        image_id = data.get("Id")
        return str(image_id) if image_id else None

    async def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | None,
        progress: Callable[[PullProgress], None],
    ) -> None:
        """See `Engine.pull`. Cancelling it closes the stream, which aborts dockerd's pull."""
        parsed = _parse(ref)
        name = _docker_name(parsed)
        if auth is None:
            auth = credentials_for(parsed.registry, self._docker_config_path)
        auth_header: dict[str, str] | None = None
        if auth is not None:
            auth_header = {
                "username": auth.username,
                "password": auth.password,
                "serveraddress": auth.server or parsed.domain,
            }
        log.debug("pull start ref=%s with_auth=%s", name, auth is not None)
        layers = _LayerProgress()
        finished = False
        try:
            # `name` embeds the tag or digest, so no separate `tag` parameter is sent.
            stream = self._client().images.pull(name, auth=auth_header, stream=True)
            async for item in stream:
                status = str(item.get("status", ""))
                if status.startswith(_PULL_DONE_PREFIXES):
                    finished = True
                if layers.feed(item):
                    progress(layers.snapshot())
        except aiodocker.DockerError as e:
            raise self._error(e, classify=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None
        if not finished:
            # aiodocker ends the stream quietly when dockerd drops the connection.
            raise EngineUnavailableError(f"{self.docker_host}: pull stream ended early")
        log.debug("pull done ref=%s layers=%d", name, len(layers.layers))

    async def tag(self, source: str, target: str) -> None:
        """See `Engine.tag`."""
        src = _docker_name(_parse(source))
        dst = _parse(target)
        try:
            await self._client().images.tag(src, dst.familiar_repository, tag=dst.tag)
        except aiodocker.DockerError as e:
            raise self._error(e, classify=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """See `Engine.remove`."""
        name = _docker_name(_parse(ref))
        try:
            await self._client().images.delete(name, force=force)
        except aiodocker.DockerError as e:
            if e.status == 404:
                return
            if e.status == 409:
                raise pull_error(IMAGE_IN_USE, e.message) from None
            raise self._error(e) from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None

    async def prune(self) -> PruneReport:
        """See `Engine.prune`."""
        try:
            data = await self._client().images.prune(filters={"dangling": ["true"]})
        except aiodocker.DockerError as e:
            raise self._error(e) from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineUnavailableError(f"{self.docker_host}: {e}") from None
        deleted = [
            str(entry["Deleted"])
            for entry in data.get("ImagesDeleted") or []
            if isinstance(entry, dict) and entry.get("Deleted")
        ]
        return PruneReport(
            deleted=deleted, space_reclaimed_bytes=int(data.get("SpaceReclaimed") or 0)
        )

    async def close(self) -> None:
        """See `Engine.close`."""
        docker, self._docker = self._docker, None
        if docker is not None:
            await docker.close()
