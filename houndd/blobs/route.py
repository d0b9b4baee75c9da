"""`LoopbackRoute`: a pull whose bytes come through the loopback registry, leaving the image
exactly as a direct `docker pull` of its digest leaves it.

1. Open a loopback session and have dockerd pull `127.0.0.1:PORT/<token>/<repository>@D`:
   every manifest and blob comes through houndd (cache, peers, registry), verified.
2. Pull `<repository>@D` from the origin registry. The image is present, so dockerd only asks
   the origin for the manifest (`GET /v2/`, `HEAD` of the manifest) and records the origin's
   `repository@D` in RepoDigests: same image ID, same RepoDigests as a direct pull.
3. Remove the loopback name, so nothing rewritten stays visible. The executor then tags
   `<repository>:<tag>` as it does for any pull.

dockerd downloads three blobs at a time over all its pulls; as soon as its progress names the
layers it lacks ("Pulling fs layer", "Waiting"), houndd fetches them all
(`LoopbackRegistry.prefetch`), so a plan's images arrive together instead of one after another.

Progress carries where the blobs came from (`ByteSources`: registry, peers, this node's cache,
from the session's `SourceTally`), the last report once every blob is counted.

If the origin cannot be reached in step 2, the item fails with "registry unreachable" like a
direct pull would (retried by the plan's policy), and the loopback name is removed all the
same; the blobs stay in houndd's cache, so the retry moves no bytes again. A "done" item
therefore always means a result identical to a direct pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from houndd.blobs.fetcher import SourceTally
from houndd.blobs.loopback import LoopbackRegistry
from houndd.blobs.source import BlobContext
from houndd.errors import PullError, pull_error
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import ImageRef, InvalidReference, parse_reference
from houndd.puller.engine import ByteSources, Engine, PullProgress

__all__ = ["LoopbackRoute"]

log = logging.getLogger("houndd.blobs")


class LoopbackRoute:
    """The executor's `PullRoute` when blob sharing is on."""

    def __init__(
        self,
        engine: Engine,
        loopback: LoopbackRegistry,
        *,
        on_pull: Callable[[], None] | None = None,
    ) -> None:
        """`on_pull` is called once per pull (metrics), whatever the engine calls it takes."""
        self._engine = engine
        self._loopback = loopback
        self._on_pull = on_pull

    async def pull(
        self,
        image: ImageRef,
        digest: str,
        *,
        auth: RegistryAuth | None,
        plan_id: str,
        nodes: Sequence[str],
        progress: Callable[[PullProgress], None],
    ) -> None:
        if self._on_pull is not None:
            self._on_pull()
        origin = f"{image.familiar_repository}@{digest}"
        ctx = BlobContext(
            plan_id=plan_id,
            name=f"{image.registry}/{image.repository}",
            image=digest,
            nodes=tuple(nodes),
            auth=auth,
        )
        session = self._loopback.open_session(ctx, image.repository)
        local = f"{self._loopback.address}/{session.token}/{image.repository}@{digest}"
        try:
            parse_reference(local)
        except InvalidReference:
            # The token made the name too long for Docker: pull directly instead.
            self._loopback.close_session(session)
            await self._engine.pull(origin, auth=auth, progress=progress)
            return
        last = PullProgress(0, 0, 0, 0)
        asked: set[str] = set()

        def relay(p: PullProgress) -> None:
            nonlocal last
            if not p.fetching <= asked:
                self._loopback.prefetch(session, p.fetching - asked)
                asked.update(p.fetching)
            last = replace(p, sources=_sources(session.tally))
            progress(last)

        try:
            await self._through_loopback(local, session.failed, relay)
        except PullError:
            if session.failure is not None:
                raise session.failure from None
            raise
        else:
            if session.failure is not None:
                raise session.failure
            try:
                await self._engine.pull(origin, auth=auth, progress=_ignore)
            except PullError as e:
                raise pull_error(
                    e.reason,
                    f"blobs arrived but {image.registry} did not confirm the manifest: {e.detail}",
                ) from None
            progress(replace(last, sources=_sources(session.tally)))  # every blob is counted now
        finally:
            self._loopback.close_session(session)
            with contextlib.suppress(PullError):
                await self._engine.remove(local)

    async def _through_loopback(
        self, local: str, failed: asyncio.Event, progress: Callable[[PullProgress], None]
    ) -> None:
        """dockerd's pull of the loopback name, stopped as soon as the session failed (the
        caller then raises the session's failure)."""
        pull = asyncio.ensure_future(self._engine.pull(local, auth=None, progress=progress))
        waiter = asyncio.ensure_future(failed.wait())
        try:
            await asyncio.wait({pull, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not pull.done():
                pull.cancel()  # closing the stream aborts dockerd's pull
                await asyncio.wait({pull})
        if not pull.cancelled():
            pull.result()


def _ignore(_: PullProgress) -> None:
    pass


def _sources(tally: SourceTally) -> ByteSources:
    by_kind = tally.totals()
    return ByteSources(registry=by_kind["registry"], peers=by_kind["peer"], cache=by_kind["cache"])
