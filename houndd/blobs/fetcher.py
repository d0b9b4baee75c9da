"""`Fetcher`: gets each blob into the cache once, and streams it to whoever waits, as it arrives.

One download per digest on this node, whoever asked first (the local dockerd through the
loopback registry, or a peer's pull-through request); everyone else reads the same partial
file. A reader never gets the last byte of a blob before the whole blob verified against its
digest, so a stream of wrong bytes always ends in an error, never in a complete transfer.

A download walks the sources `tree.choose_sources` gives (own tree position: parent first,
registry at the root) and keeps every byte it got when a source fails: the next source is
asked for the rest (HTTP Range), so a peer that dies or stalls mid-blob costs the time to
notice, not the bytes. When the finished blob does not hash to its digest, the peers that
contributed are avoided for the rest of the plan (counted, logged once each), and the blob is
fetched again from scratch without them. Only when the registry is the sole source of wrong
bytes, or no source at all can deliver, does the download fail; readers get its PullError
(the registry's own reason: unauthorized, registry unreachable, ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal

from houndd.blobs.cache import READ_CHUNK_BYTES, BlobCache, DigestMismatch, Partial
from houndd.blobs.source import BlobWant, SourceError, Transfers
from houndd.blobs.tree import Source, choose_sources
from houndd.errors import PULL_FAILED, REGISTRY_UNREACHABLE, HounddError, PullError, pull_error

__all__ = ["BlobStats", "Fetcher", "Restarted", "SourceTally"]

log = logging.getLogger("houndd.blobs")

MAX_PLANS_REMEMBERED = 1000
"""Plans whose avoided peers are remembered; caps memory over the daemon's life."""
MAX_WARNINGS_REMEMBERED = 10_000
MAX_ORIGINS_REMEMBERED = 10_000
"""Downloads whose sources are remembered for a later reader of the same plan (a blob this
node fetched for a peer before its own dockerd asked for it)."""
"""(peer, blob) pairs already warned about; a peer can make us warn about each only once."""
REGISTRY_PATIENCE = 10
"""The registry gets this many stall timeouts before it counts as stalled: it is the source
of last resort, and dockerd pulling directly would wait out a network blip on its TCP
connection too. Peers get one: there is always another source behind them."""
PREFETCH_SLOTS = 8
"""Blobs fetched ahead of dockerd at once per node (dockerd itself takes three at a time)."""
BUSY_BACKOFF_S = 0.05
BUSY_PATIENCE = 3
"""A peer at its upload limit is asked again (backing off from BUSY_BACKOFF_S to 1 s) for up
to this many stall timeouts per download before the next source is tried."""
_RETRIES_AFTER_PROGRESS = 3
"""A source whose connection broke after delivering bytes is asked again (with Range) up to
this many times; one that failed before delivering anything, stalled, or sent impossible bytes
is not asked again in this download."""


class Restarted(HounddError):
    """The bytes a reader already had were wrong; the download started over. The reader's
    client must start over too (dockerd retries the layer; a peer resumes elsewhere)."""


@dataclass
class BlobStats:
    """Counters a node exports as metrics."""

    fetched_bytes: Counter[str] = field(default_factory=Counter)  # by source: registry, peer
    served_bytes: Counter[str] = field(default_factory=Counter)  # by reader: dockerd, peer
    cache_hits: int = 0
    verify_failures: Counter[str] = field(default_factory=Counter)  # by source kind
    source_failures: Counter[str] = field(default_factory=Counter)  # by SourceError kind


class SourceTally:
    """Where the blobs of one pull came from, in bytes by source kind (`registry`, `peer`,
    `cache`). A blob counts once, by how this node got it for the pull's plan: what its
    download took from each source (also when the download ran for a peer of the same plan,
    or ahead of the reader), or `cache` when it was in the cache from before (an earlier plan).
    Two pulls that share one download each count it."""

    def __init__(self) -> None:
        self._blobs: dict[str, Counter[str]] = {}

    def record(self, digest: str, by_kind: Counter[str]) -> None:
        """The first record of a blob stands (a resumed read is the same blob)."""
        self._blobs.setdefault(digest, by_kind)

    def totals(self) -> Counter[str]:
        """Bytes by source kind over every blob recorded so far."""
        out: Counter[str] = Counter()
        for by_kind in self._blobs.values():
            out.update(by_kind)
        return out


@dataclass(eq=False)
class _Download:
    want: BlobWant
    partial: Partial
    plans: set[str]
    tallies: list[SourceTally] = field(default_factory=list)  # told where the bytes came from
    state: Literal["running", "done", "failed"] = "running"
    verified: bool = False  # every byte is in the partial file and matched the digest
    error: PullError | None = None
    generation: int = 0
    source: Source | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    contributors: Counter[Source] = field(default_factory=Counter)  # bytes this generation

    @property
    def digest(self) -> str:
        return self.want.digest

    @property
    def size(self) -> int:
        return self.want.size

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class Fetcher:
    """Blobs for this node and its peers. `run()` must be running for downloads to start.

    `usable(node_id)` says whether a peer is up (alive or suspect); `monotonic` paces stall
    detection only.
    """

    def __init__(
        self,
        cache: BlobCache,
        transfers: Transfers,
        *,
        node_id: str,
        fanout: int,
        stall_timeout_s: float,
        usable: Callable[[str], bool],
        stats: BlobStats | None = None,
    ) -> None:
        self.cache = cache
        self.node_id = node_id
        self.stats = stats or BlobStats()
        self._transfers = transfers
        self._fanout = fanout
        self._stall_s = stall_timeout_s
        self._usable = usable
        self._downloads: dict[str, _Download] = {}
        self._avoid: OrderedDict[str, set[str]] = OrderedDict()
        self._warned: set[tuple[str, str]] = set()
        # digest -> (plans it was downloaded for, bytes by source kind), newest last
        self._origins: OrderedDict[str, tuple[frozenset[str], Counter[str]]] = OrderedDict()
        self._prefetching: set[str] = set()
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_SLOTS)
        self._tg: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Run downloads until cancelled (cancelling aborts them and their partial files)."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                await asyncio.Event().wait()
            finally:
                self._tg = None

    # --- public ----------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Downloads in progress."""
        return len(self._downloads)

    def holds(self, digest: str) -> bool:
        """True if the blob is complete in the cache."""
        return digest in self.cache

    def avoided(self, plan_id: str) -> set[str]:
        """Peers that served wrong bytes during `plan_id`."""
        return set(self._avoid.get(plan_id, ()))

    def downloading(self, digest: str) -> Source | None:
        """The source a running download of `digest` currently reads from."""
        dl = self._downloads.get(digest)
        return dl.source if dl is not None else None

    def open(
        self,
        want: BlobWant,
        offset: int = 0,
        *,
        reader: str = "dockerd",
        tally: SourceTally | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes from `offset`, from the cache or as its download proceeds.

        Starts the download if none runs. Raises right away (not when read): PullError "no
        space" if the cache cannot take the blob; SourceError "loop" if the running
        download reads from a node in `want.chain`. While reading: the download's PullError,
        or `Restarted`. `tally` learns where the blob's bytes came from.
        """
        if want.digest in self.cache:
            self.stats.cache_hits += 1
            if tally is not None:
                tally.record(want.digest, self._cached_origin(want))
            return self._counted(self.cache.read(want.digest, offset), reader)
        dl = self._downloads.get(want.digest)
        if dl is None:
            dl = self._start(want)
        else:
            if dl.size != want.size:
                raise PullError(
                    PULL_FAILED, f"blob {want.digest} is {dl.size} bytes here, not {want.size}"
                )
            if dl.source is not None and dl.source.node_id in want.chain:
                raise SourceError("loop", f"{want.digest} is being fetched from {dl.source}")
            dl.plans.add(want.ctx.plan_id)
        self._tell(dl, tally)
        return self._counted(self._read(dl, offset), reader)

    def prefetch(self, want: BlobWant, *, tally: SourceTally | None = None) -> None:
        """Fetch a blob nobody reads yet, because a reader will want it soon (the later
        layers of an image dockerd is pulling). Best effort: a failure is left for the
        reader to meet; at most PREFETCH_SLOTS run at once. `tally` learns where the bytes
        came from (a blob already in the cache is counted when its reader comes)."""
        digest = want.digest
        if self._tg is None or digest in self.cache:
            return
        running = self._downloads.get(digest)
        if running is not None:
            self._tell(running, tally)
            return
        if digest in self._prefetching:
            return
        self._prefetching.add(digest)
        self._tg.create_task(self._prefetch(want, tally))

    async def _prefetch(self, want: BlobWant, tally: SourceTally | None) -> None:
        try:
            async with self._prefetch_slots:
                if want.digest in self.cache or want.digest in self._downloads:
                    return
                try:
                    dl = self._start(want)
                except PullError as e:  # e.g. no space: the reader will meet it by name
                    log.debug("prefetch skipped digest=%s reason=%s", want.digest, e.reason)
                    return
                self._tell(dl, tally)
                while not (dl.verified or dl.failed):
                    await dl.changed.wait()
        finally:
            self._prefetching.discard(want.digest)

    def _cached_origin(self, want: BlobWant) -> Counter[str]:
        """Where a blob complete in the cache came from, as its reader in `want`'s plan
        counts it: its download's sources if that ran for the same plan, else `cache`."""
        origin = self._origins.get(want.digest)
        if origin is not None and want.ctx.plan_id in origin[0]:
            return origin[1]
        return Counter(cache=want.size)

    @staticmethod
    def _tell(dl: _Download, tally: SourceTally | None) -> None:
        if tally is None:
            return
        if dl.verified:  # the sources are final already
            tally.record(dl.digest, _by_kind(dl.contributors))
        elif all(t is not tally for t in dl.tallies):
            dl.tallies.append(tally)

    # --- reading ---------------------------------------------------------------------------

    async def _counted(
        self, stream: AsyncGenerator[bytes, None], reader: str
    ) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in stream:
                self.stats.served_bytes[reader] += len(chunk)
                yield chunk
        finally:
            await stream.aclose()

    async def _read(self, dl: _Download, offset: int) -> AsyncGenerator[bytes, None]:
        if dl.done:
            async for chunk in self.cache.read(dl.digest, offset):
                yield chunk
            return
        if dl.failed:
            assert dl.error is not None
            raise dl.error
        try:
            # The fd stays valid when the partial file is renamed into the cache at the end.
            fd = os.open(dl.partial.path, os.O_RDONLY)
        except FileNotFoundError:
            # Renamed (or removed) while we got here: the download is finishing right now.
            while not (dl.done or dl.failed):
                await dl.changed.wait()
            async for chunk in self._read(dl, offset):
                yield chunk
            return
        try:
            generation = dl.generation
            pos = offset
            while True:
                if dl.generation != generation:
                    raise Restarted(f"blob {dl.digest}: wrong bytes from a peer, fetching again")
                if dl.failed and not dl.verified:
                    assert dl.error is not None
                    raise dl.error
                # Hold back the last byte until the blob verified: no reader ever completes
                # a blob that turns out wrong. (Verified bytes are served even if storing
                # the blob in the cache fails afterwards: they are right.)
                limit = dl.size if dl.verified else min(dl.partial.written, dl.size - 1)
                if pos < limit:
                    chunk = os.pread(fd, min(READ_CHUNK_BYTES, limit - pos), pos)
                    if not chunk:
                        raise PullError(PULL_FAILED, f"blob {dl.digest} shorter on disk")
                    pos += len(chunk)
                    yield chunk
                    continue
                if dl.verified:
                    return
                await dl.changed.wait()
        finally:
            os.close(fd)

    # --- downloading -----------------------------------------------------------------------

    def _start(self, want: BlobWant) -> _Download:
        if self._tg is None:
            raise PullError(PULL_FAILED, "blob fetcher is not running")
        partial = self.cache.begin(want.digest, want.size)  # may raise "no space"
        dl = _Download(want=want, partial=partial, plans={want.ctx.plan_id})
        self._downloads[want.digest] = dl
        self._tg.create_task(self._download(dl))
        return dl

    async def _download(self, dl: _Download) -> None:
        log.debug(
            "blob download start digest=%s size=%d plan=%s", dl.digest, dl.size, dl.want.ctx.plan_id
        )
        try:
            await self._fill(dl)
            dl.state = "done"
            log.debug(
                "blob download done digest=%s sources=%s",
                dl.digest,
                ",".join(f"{s}={n}" for s, n in dl.contributors.items()),
            )
        except PullError as e:
            dl.state, dl.error = "failed", e
            log.warning("blob failed digest=%s reason=%s detail=%s", dl.digest, e.reason, e.detail)
            dl.partial.abort()
        except asyncio.CancelledError:
            dl.state = "failed"
            dl.error = pull_error(PULL_FAILED, "blob download stopped")
            dl.partial.abort()
            raise
        except Exception as e:
            # A bug here must fail this blob, not the fetcher and every download with it.
            log.exception("blob download failed unexpectedly digest=%s", dl.digest)
            dl.state = "failed"
            dl.error = pull_error(PULL_FAILED, f"internal error: {type(e).__name__}")
            dl.partial.abort()
        finally:
            if self._downloads.get(dl.digest) is dl:
                del self._downloads[dl.digest]
            dl.notify()

    async def _fill(self, dl: _Download) -> None:
        """Fill the partial file from sources until it verifies; commit it."""
        failures: Counter[Source] = Counter()
        dead: set[Source] = set()
        last_error: PullError | None = None
        busy_waited_s, backoff_s = 0.0, BUSY_BACKOFF_S
        while True:
            while dl.partial.written < dl.size:
                source = self._next_source(dl, dead)
                if source is None:
                    raise last_error or pull_error(
                        REGISTRY_UNREACHABLE, f"no source could deliver blob {dl.digest}"
                    )
                before = dl.partial.written
                try:
                    await self._copy(dl, source)
                except SourceError as e:
                    self.stats.source_failures[e.kind] += 1
                    if e.kind == "busy" and busy_waited_s < self._stall_s * BUSY_PATIENCE:
                        # Its uploads free up as they finish; asking elsewhere would mean
                        # the registry sends the blob again.
                        await asyncio.sleep(backoff_s)
                        busy_waited_s += backoff_s
                        backoff_s = min(2 * backoff_s, 1.0)
                        continue
                    failures[source] += 1
                    progressed = dl.partial.written > before
                    # A stalled peer would most likely stall again: move on at once.
                    hopeless = not progressed or e.kind == "corrupt"
                    hopeless |= e.kind == "stalled" and not source.is_registry
                    if hopeless or failures[source] >= _RETRIES_AFTER_PROGRESS:
                        dead.add(source)
                    if e.error is not None:
                        last_error = e.error
                        if not e.error.transient and source.is_registry:
                            raise e.error from None  # unauthorized, unknown: no use retrying
                    log.info(
                        "blob source failed digest=%s source=%s offset=%d error=%s",
                        dl.digest,
                        source,
                        dl.partial.written,
                        e,
                    )
                finally:
                    dl.source = None
            try:
                dl.partial.verify()
            except DigestMismatch:
                self._blame(dl)
                dead.clear()
                failures.clear()
                dl.partial.reset()
                dl.generation += 1
                dl.contributors.clear()
                dl.notify()
                continue
            # Readers may finish now; the fsync and rename into the cache follow.
            dl.verified = True
            by_kind = _by_kind(dl.contributors)
            for tally in dl.tallies:
                tally.record(dl.digest, by_kind)
            self._origins[dl.digest] = (frozenset(dl.plans), by_kind)
            self._origins.move_to_end(dl.digest)
            while len(self._origins) > MAX_ORIGINS_REMEMBERED:
                self._origins.popitem(last=False)
            dl.notify()
            await dl.partial.commit()
            return

    def _next_source(self, dl: _Download, dead: set[Source]) -> Source | None:
        exclude = set(dl.want.chain) | {s.node_id for s in dead if not s.is_registry}
        for plan in dl.plans:
            exclude |= self._avoid.get(plan, set())
        sources = choose_sources(
            dl.digest,
            dl.want.ctx.nodes,
            self.node_id,
            fanout=self._fanout,
            usable=self._usable,
            exclude=exclude,
        )
        return next((s for s in sources if s not in dead), None)

    async def _copy(self, dl: _Download, source: Source) -> None:
        """Append what `source` sends from the current offset; SourceError when it stops
        short, stalls, or sends more than the blob's size."""
        dl.source = source
        kind = "registry" if source.is_registry else "peer"
        stall_s = self._stall_s * (REGISTRY_PATIENCE if source.is_registry else 1)
        stream = self._transfers.open(source, dl.want, dl.partial.written)
        try:
            while dl.partial.written < dl.size:
                try:
                    async with asyncio.timeout(stall_s):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise SourceError("stalled", f"no bytes for {stall_s} s") from None
                if dl.partial.written + len(chunk) > dl.size:
                    raise SourceError("corrupt", f"more than {dl.size} bytes")
                dl.partial.write(chunk)
                dl.contributors[source] += len(chunk)
                self.stats.fetched_bytes[kind] += len(chunk)
                dl.notify()
        finally:
            await stream.aclose()
        if dl.partial.written < dl.size:
            raise SourceError("unreachable", f"stream ended at {dl.partial.written} of {dl.size}")

    def _blame(self, dl: _Download) -> None:
        """The blob did not verify: every peer that sent bytes of it is avoided."""
        if all(s.is_registry for s in dl.contributors):
            self.stats.verify_failures["registry"] += 1
            raise pull_error(PULL_FAILED, f"registry sent blob {dl.digest} with other content")
        for source in dl.contributors:
            if source.is_registry:
                continue
            self.stats.verify_failures["peer"] += 1
            for plan in dl.plans:
                self._avoid.setdefault(plan, set()).add(source.node_id)
                self._avoid.move_to_end(plan)
            while len(self._avoid) > MAX_PLANS_REMEMBERED:
                self._avoid.popitem(last=False)
            if (source.node_id, dl.digest) not in self._warned:
                if len(self._warned) >= MAX_WARNINGS_REMEMBERED:
                    self._warned.clear()
                self._warned.add((source.node_id, dl.digest))
                log.warning(
                    "peer sent wrong bytes, avoiding it for the plan peer=%s digest=%s plans=%s",
                    source.node_id,
                    dl.digest,
                    ",".join(sorted(dl.plans)),
                )


def _by_kind(contributors: Counter[Source]) -> Counter[str]:
    out: Counter[str] = Counter()
    for source, n in contributors.items():
        out["registry" if source.is_registry else "peer"] += n
    return out
