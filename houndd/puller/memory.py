"""`FakeEngine`: an in-memory `Engine` for tests and simulation.

A fake registry (images with sizes, optional credentials) and a fake local image store.
Pull time comes from a fixed duration or a bandwidth, spent through an injectable `sleep`
(a simulation passes its virtual clock's sleep). Failures are injected per reference.
Counters record how many pulls ran at once, overall and per reference, so scheduler and
executor tests can assert parallelism bounds and deduplication.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from houndd.errors import (
    MANIFEST_UNKNOWN,
    PULL_FAILED,
    TRANSIENT_REASONS,
    UNAUTHORIZED,
    PullError,
    pull_error,
)
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import ImageRef, InvalidReference, parse_reference
from houndd.puller.engine import EngineInfo, PruneReport, PullProgress

__all__ = ["FakeEngine", "FakeImage"]

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class FakeImage:
    """An image in the fake registry."""

    digest: str
    size_bytes: int
    layers: int = 1
    auth: RegistryAuth | None = field(default=None, repr=False)  # required credentials


@dataclass
class _Failure:
    reason: str
    transient: bool
    times: int | None  # None: fails forever
    detail: str


@dataclass
class _LocalImage:
    digest: str
    size_bytes: int
    names: set[str]  # "repo:tag" and "repo@digest" (canonical forms)


def _key(ref: ImageRef) -> str:
    """Canonical name of a reference in the fake stores: `domain/repo:tag` or `...@digest`."""
    base = f"{ref.domain}/{ref.repository}"
    return f"{base}@{ref.digest}" if ref.digest else f"{base}:{ref.tag}"


def _parse(ref: str) -> ImageRef:
    try:
        return parse_reference(ref)
    except InvalidReference as e:
        raise PullError(PULL_FAILED, f"invalid reference format: {e}") from None


class FakeEngine:
    """In-memory `Engine`. See the module docstring."""

    def __init__(
        self,
        *,
        sleep: Sleep = asyncio.sleep,
        pull_duration_s: float = 0.0,
        bandwidth_bytes_per_s: float | None = None,
        progress_steps: int = 4,
        free_disk_bytes: int | None = 100 << 30,
        server_version: str = "fake-1.0",
        any_image_size: int | None = None,
    ) -> None:
        self._sleep = sleep
        self.pull_duration_s = pull_duration_s
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.progress_steps = max(1, progress_steps)
        self.free_disk_bytes = free_disk_bytes
        self.server_version = server_version
        self.any_image_size = any_image_size
        """When set, a reference missing from the fake registry is served as an image of this
        size (a daemon running `docker_host = "fake://"` pulls whatever a plan names)."""
        self._registry: dict[str, FakeImage] = {}
        self._local: dict[str, _LocalImage] = {}  # digest -> image
        self._failures: dict[str, _Failure] = {}
        self.closed = False
        # Observations for tests.
        self.pulls: list[str] = []  # every pull call, in order
        self.pull_counts: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.active_per_ref: Counter[str] = Counter()
        self.max_active_per_ref: Counter[str] = Counter()

    # --- the fake registry ------------------------------------------------------------------

    def add_registry_image(
        self,
        ref: str,
        size_bytes: int,
        *,
        digest: str | None = None,
        layers: int = 1,
        auth: RegistryAuth | None = None,
    ) -> str:
        """Publish `ref` (`repo:tag`) in the fake registry; return its digest.

        The digest defaults to a hash of the reference and size. `auth`: pulls must present
        these credentials.
        """
        parsed = _parse(ref)
        if digest is None:
            digest = "sha256:" + hashlib.sha256(f"{_key(parsed)}/{size_bytes}".encode()).hexdigest()
        image = FakeImage(digest=digest, size_bytes=size_bytes, layers=max(1, layers), auth=auth)
        self._registry[_key(parsed)] = image
        self._registry[_key(parsed.with_digest(digest))] = image
        return digest

    def remove_registry_image(self, ref: str) -> None:
        """Unpublish a tag or digest from the fake registry."""
        self._registry.pop(_key(_parse(ref)), None)

    def fail(
        self,
        ref: str,
        reason: str,
        *,
        times: int | None = None,
        transient: bool | None = None,
        detail: str = "injected",
    ) -> None:
        """Make pulls of `ref` fail with `reason`: `times` times, then succeed (None: always).

        `transient` defaults to what the reason implies.
        """
        self._failures[_key(_parse(ref))] = _Failure(
            reason=reason,
            transient=reason in TRANSIENT_REASONS if transient is None else transient,
            times=times,
            detail=detail,
        )

    def clear_failures(self) -> None:
        """Forget all injected failures."""
        self._failures.clear()

    def preload(self, ref: str, size_bytes: int = 0) -> str:
        """Make `ref` present locally without a pull (as if pulled earlier); return its digest."""
        parsed = _parse(ref)
        image = self._registry.get(_key(parsed))
        digest = parsed.digest or (image.digest if image else None)
        if digest is None:
            digest = "sha256:" + hashlib.sha256(_key(parsed).encode()).hexdigest()
        self._store(parsed, digest, image.size_bytes if image else size_bytes)
        return digest

    def local_names(self) -> set[str]:
        """Every local name (canonical `domain/repo:tag` and `domain/repo@digest`)."""
        return {n for img in self._local.values() for n in img.names}

    # --- Engine -------------------------------------------------------------------------------

    async def info(self) -> EngineInfo:
        """See `Engine.info`."""
        self._check_open()
        return EngineInfo(
            server_version=self.server_version,
            kernel="fake",
            os="FakeOS",
            free_disk_bytes=self.free_disk_bytes,
            images=len(self._local),
        )

    async def free_disk(self) -> int | None:
        """See `Engine.free_disk`."""
        self._check_open()
        return self.free_disk_bytes

    async def has_image(self, ref: str) -> str | None:
        """See `Engine.has_image`."""
        self._check_open()
        found = self._find_local(_parse(ref))
        return found.digest if found else None

    async def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | None,
        progress: Callable[[PullProgress], None],
    ) -> None:
        """See `Engine.pull`: takes `pull_duration_s` or size / bandwidth of `sleep` time."""
        self._check_open()
        parsed = _parse(ref)
        key = _key(parsed)
        self.pulls.append(key)
        self.pull_counts[key] += 1
        self.active += 1
        self.active_per_ref[key] += 1
        self.max_active = max(self.max_active, self.active)
        self.max_active_per_ref[key] = max(self.max_active_per_ref[key], self.active_per_ref[key])
        try:
            await self._sleep(0)  # a real pull always yields: keep interleavings realistic
            failure = self._failures.get(key)
            if failure is not None and failure.times != 0:
                if failure.times is not None:
                    failure.times -= 1
                raise PullError(failure.reason, failure.detail, transient=failure.transient)
            image = self._registry.get(key)
            if image is None and self.any_image_size is not None:
                digest = parsed.digest or "sha256:" + hashlib.sha256(key.encode()).hexdigest()
                image = FakeImage(digest, self.any_image_size)
            if image is None:
                raise pull_error(MANIFEST_UNKNOWN, f"manifest for {ref} not found")
            if image.auth is not None and (
                auth is None
                or (auth.username, auth.password) != (image.auth.username, image.auth.password)
            ):
                raise pull_error(UNAUTHORIZED, "authentication required")
            await self._transfer(image, progress)
            self._store(parsed, image.digest, image.size_bytes)
        finally:
            self.active -= 1
            self.active_per_ref[key] -= 1

    async def tag(self, source: str, target: str) -> None:
        """See `Engine.tag`."""
        self._check_open()
        image = self._find_local(_parse(source))
        if image is None:
            raise pull_error(MANIFEST_UNKNOWN, f"no such image: {source}")
        dst = _parse(target)
        for other in self._local.values():
            other.names.discard(_key(dst))
        image.names.add(_key(dst))

    async def remove(self, ref: str, *, force: bool = False) -> None:
        """See `Engine.remove`."""
        self._check_open()
        parsed = _parse(ref)
        image = self._find_local(parsed)
        if image is None:
            return
        image.names.discard(_key(parsed))
        if not any("@" not in n for n in image.names):
            # Like docker: removing the last tag deletes the image and its digest names.
            del self._local[image.digest]

    async def prune(self) -> PruneReport:
        """See `Engine.prune`: deletes images without any tag."""
        self._check_open()
        deleted: list[str] = []
        reclaimed = 0
        for digest, image in list(self._local.items()):
            if not any("@" not in n for n in image.names):
                deleted.append(digest)
                reclaimed += image.size_bytes
                del self._local[digest]
        return PruneReport(deleted=deleted, space_reclaimed_bytes=reclaimed)

    async def close(self) -> None:
        """See `Engine.close`."""
        self.closed = True

    # --- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise pull_error("engine unavailable", "engine closed")

    async def _transfer(self, image: FakeImage, progress: Callable[[PullProgress], None]) -> None:
        duration = self.pull_duration_s
        if self.bandwidth_bytes_per_s:
            duration = max(duration, image.size_bytes / self.bandwidth_bytes_per_s)
        total, steps = image.size_bytes, self.progress_steps
        progress(PullProgress(0, total, 0, image.layers))
        for i in range(1, steps + 1):
            if duration > 0:
                await self._sleep(duration / steps)
            progress(
                PullProgress(total * i // steps, total, image.layers * i // steps, image.layers)
            )

    def _find_local(self, ref: ImageRef) -> _LocalImage | None:
        key = _key(ref)
        for image in self._local.values():
            if key in image.names:
                return image
        return None

    def _store(self, ref: ImageRef, digest: str, size_bytes: int) -> None:
        image = self._local.get(digest)
        if image is None:
            image = self._local[digest] = _LocalImage(digest, size_bytes, set())
        image.names.add(_key(ref.with_digest(digest)))
        if ref.digest is None:
            for other in self._local.values():
                other.names.discard(_key(ref))
            image.names.add(_key(ref))
