"""`LoopbackRegistry`: the read-only registry API this node's dockerd pulls through.

Bound to 127.0.0.1 only (dockerd talks plain HTTP to 127.0.0.0/8 without any configuration,
and nothing off the host can reach it). It serves what a pull by digest needs and nothing
else: `GET|HEAD /v2/`, manifests by digest, blobs by digest. Every repository name starts
with a session token, `127.0.0.1:PORT/<token>/<repository>`: the route opens a session for
one pull (plan, origin repository, credentials, the nodes of the plan that need the image)
and closes it afterwards (it keeps answering a while: dockerd may still finish a layer for
it). An unknown token, a tag, or a digest the session's manifests do not list is `404`.
Manifests come from the cache or the origin registry (verified either way); blobs come from
the `Fetcher` (cache, peers, registry).

A failure the pull cannot recover from (no space, unauthorized, the registry and every peer
unreachable) is recorded on the session, so the route can stop dockerd's pull at once and
report the real reason instead of dockerd's retries and its generic message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from houndd.blobs.cache import BlobCache
from houndd.blobs.fetcher import Fetcher, Restarted, SourceTally
from houndd.blobs.source import BlobContext, BlobWant, SourceError
from houndd.errors import MANIFEST_UNKNOWN, PULL_FAILED, PullError, pull_error
from houndd.image.credentials import RegistryAuth

__all__ = ["LoopbackRegistry", "LoopbackSession", "ManifestSource"]

log = logging.getLogger("houndd.blobs")

LOOPBACK_HOST = "127.0.0.1"
MAX_MANIFEST_BYTES = 4 << 20
MAX_SESSIONS = 4096
"""Caps sessions (one per pull in flight): far above per-node parallelism."""
RETIRED_SESSION_S = 600.0
"""A closed session still answers this long. dockerd shares one layer download between
pulls that need the same layer, under the name of whichever pull asked first, and finishes a
layer in the background after its pull was cancelled: both may outlive that pull's session."""
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.ASCII)
_API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
_INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)


class ManifestSource(Protocol):
    """Where manifests come from (the registry client)."""

    async def manifest(
        self, name: str, digest: str, auth: RegistryAuth | None = None
    ) -> tuple[bytes, str]: ...


@dataclass(eq=False)
class LoopbackSession:
    """One pull through the loopback registry."""

    token: str
    ctx: BlobContext
    repository: str
    manifests: set[str]  # digests dockerd may ask for (the image, then an index's children)
    sizes: dict[str, int] = field(default_factory=dict)  # blobs the manifests list
    layers: list[tuple[str, int]] = field(default_factory=list)  # in manifest order
    failure: PullError | None = None
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    tally: SourceTally = field(default_factory=SourceTally)  # where its blobs came from

    def fail(self, error: PullError) -> None:
        if self.failure is None:
            self.failure = error
            self.failed.set()


def _registry_error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status, headers=_API_HEADERS)


def _media_type(body: bytes, reported: str) -> tuple[str, dict[str, Any]]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise pull_error(PULL_FAILED, "manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise pull_error(PULL_FAILED, "manifest is not a JSON object")
    media_type = reported or str(doc.get("mediaType") or "")
    if not media_type:
        media_type = (
            "application/vnd.oci.image.index.v1+json"
            if "manifests" in doc
            else "application/vnd.oci.image.manifest.v1+json"
        )
    return media_type, doc


def _descriptors(doc: dict[str, Any], key: str) -> list[tuple[str, int]]:
    out = []
    entries = doc.get(key)
    if isinstance(entries, dict):
        entries = [entries]
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        digest, size = entry.get("digest"), entry.get("size")
        valid = isinstance(digest, str) and _DIGEST.fullmatch(digest) is not None
        if valid and isinstance(size, int) and size >= 0:
            out.append((str(digest), size))
    return out


class LoopbackRegistry:
    """The loopback registry server. Constructor does no IO; `start()` binds."""

    def __init__(
        self,
        fetcher: Fetcher,
        manifests: ManifestSource,
        cache: BlobCache,
        *,
        port: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetcher = fetcher
        self._manifests = manifests
        self._cache = cache
        self._wanted_port = port
        self._monotonic = monotonic
        self._sessions: dict[str, LoopbackSession] = {}
        self._retired: OrderedDict[str, tuple[float, LoopbackSession]] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/v2/", self._base)
        app.router.add_route("HEAD", "/v2/", self._base)
        app.router.add_route("GET", "/v2/{path:.+}", self._dispatch)
        app.router.add_route("HEAD", "/v2/{path:.+}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK_HOST, self._wanted_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._wanted_port
        log.info("loopback registry serving address=%s:%d", LOOPBACK_HOST, self.port)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def address(self) -> str:
        return f"{LOOPBACK_HOST}:{self.port}"

    # --- sessions --------------------------------------------------------------------------

    def open_session(self, ctx: BlobContext, repository: str) -> LoopbackSession:
        """A session for pulling `ctx.image` of `repository` (the path dockerd will use)."""
        if len(self._sessions) >= MAX_SESSIONS:
            raise PullError(PULL_FAILED, "too many pulls through the loopback registry")
        token = secrets.token_hex(8)
        session = LoopbackSession(token, ctx, repository, manifests={ctx.image})
        self._sessions[token] = session
        return session

    def close_session(self, session: LoopbackSession) -> None:
        """The pull is over; the session keeps answering for RETIRED_SESSION_S."""
        if self._sessions.pop(session.token, None) is None:
            return
        self._retired[session.token] = (self._monotonic() + RETIRED_SESSION_S, session)
        while len(self._retired) > MAX_SESSIONS:
            self._retired.popitem(last=False)

    def _session(self, token: str) -> LoopbackSession | None:
        session = self._sessions.get(token)
        if session is not None:
            return session
        now = self._monotonic()
        while self._retired:
            oldest, (expires, _) = next(iter(self._retired.items()))
            if expires > now:
                break
            del self._retired[oldest]
        retired = self._retired.get(token)
        return retired[1] if retired is not None else None

    # --- handlers --------------------------------------------------------------------------

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers=_API_HEADERS)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        name, sep, reference = path.rpartition("/manifests/")
        kind = "manifest"
        if not sep:
            name, sep, reference = path.rpartition("/blobs/")
            kind = "blob"
        if not sep:
            return _registry_error(404, "UNSUPPORTED", "only manifests and blobs by digest")
        token, _, repository = name.partition("/")
        session = self._session(token)
        if session is None or repository != session.repository:
            return _registry_error(404, "NAME_UNKNOWN", "no such pull in progress")
        if not _DIGEST.fullmatch(reference):
            return _registry_error(404, "MANIFEST_UNKNOWN", "only references by sha256 digest")
        if kind == "manifest":
            return await self._manifest(request, session, reference)
        return await self._blob(request, session, reference)

    async def _manifest(
        self, request: web.Request, session: LoopbackSession, digest: str
    ) -> web.Response:
        if digest not in session.manifests:
            return _registry_error(404, "MANIFEST_UNKNOWN", "not part of this pull")
        # A cached manifest names its own media type (Docker's always do; OCI ones without
        # the field are told apart by their content).
        body = self._cache.read_small(digest, MAX_MANIFEST_BYTES)
        reported = ""
        try:
            if body is None:
                body, reported = await self._manifests.manifest(
                    session.ctx.name, digest, session.ctx.auth
                )
                self._cache.put(digest, body)
            media_type, doc = _media_type(body, reported)
        except PullError as e:
            session.fail(e)
            status = 404 if e.reason == MANIFEST_UNKNOWN else 503
            return _registry_error(status, "MANIFEST_UNKNOWN", str(e))
        if media_type in _INDEX_TYPES:
            session.manifests.update(d for d, _ in _descriptors(doc, "manifests"))
        else:
            session.layers = _descriptors(doc, "layers")
            for digest_, size in [*_descriptors(doc, "config"), *session.layers]:
                session.sizes[digest_] = size
        headers = {
            **_API_HEADERS,
            "Docker-Content-Digest": digest,
            "Content-Type": media_type,
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=body, headers=headers)

    async def _blob(
        self, request: web.Request, session: LoopbackSession, digest: str
    ) -> web.StreamResponse:
        size = session.sizes.get(digest)
        if size is None:
            return _registry_error(404, "BLOB_UNKNOWN", "not listed by this pull's manifests")
        headers = {
            **_API_HEADERS,
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        offset, status = 0, 200
        wanted = _RANGE.fullmatch(request.headers.get("Range", "").strip())
        if wanted:
            offset = int(wanted.group(1))
            end = int(wanted.group(2)) if wanted.group(2) else size - 1
            if offset >= size or end != size - 1:
                # dockerd only ever resumes to the end; anything else is not a pull.
                return web.Response(
                    status=416, headers={**headers, "Content-Range": f"bytes */{size}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {offset}-{size - 1}/{size}"
        want = BlobWant(session.ctx, digest, size)
        self._prefetch_after(session, digest)
        try:
            stream = self._fetcher.open(want, offset, reader="dockerd", tally=session.tally)
        except (PullError, SourceError) as e:
            error = e if isinstance(e, PullError) else pull_error(PULL_FAILED, str(e))
            session.fail(error)
            return _registry_error(503, "UNAVAILABLE", str(error))
        log.debug("dockerd blob start digest=%s offset=%d", digest, offset)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = size - offset
        try:
            await resp.prepare(request)
            async for chunk in stream:
                await resp.write(chunk)
            await resp.write_eof()
            log.debug("dockerd blob done digest=%s", digest)
        except PullError as e:
            session.fail(e)
            _abort(request)
        except Restarted as e:
            log.info("blob restarted under dockerd digest=%s detail=%s", digest, e)
            _abort(request)
        except ConnectionResetError:
            pass  # dockerd went away (its pull was cancelled)
        finally:
            await stream.aclose()
        return resp

    def prefetch(self, session: LoopbackSession, short_ids: Iterable[str]) -> None:
        """dockerd said it will download these layers (Docker's short ids: the first 12 hex
        digits of the digest): fetch them now. dockerd downloads three blobs at a time over
        all its pulls, so the layers of the second and third image of a plan would otherwise
        wait for its slots, and the registry's link would carry one image after another."""
        wanted = set(short_ids)
        for digest, size in session.layers:
            if digest.removeprefix("sha256:")[:12] in wanted:
                self._fetcher.prefetch(BlobWant(session.ctx, digest, size), tally=session.tally)

    def _prefetch_after(self, session: LoopbackSession, digest: str) -> None:
        """dockerd asks only for layers it lacks, and it tells layers apart by chain (a layer
        with everything below it). Lacking layer i, it lacks every layer above i too: those
        are fetched now, not when one of dockerd's three download slots frees up."""
        index = next((i for i, (d, _) in enumerate(session.layers) if d == digest), None)
        if index is None:
            return
        for later, size in session.layers[index + 1 :]:
            self._fetcher.prefetch(BlobWant(session.ctx, later, size), tally=session.tally)


def _abort(request: web.Request) -> None:
    # An aborted connection before Content-Length bytes: dockerd can never take the blob as
    # complete.
    transport = request.transport
    if transport is not None:
        transport.abort()
