"""Blob transfer between members: the client that asks a peer, the handler that answers.

Both speak `protocol.py`: a sealed `BLOB_GET` request, an encrypted frame stream back. The
handler authenticates the request with `Wire.open` (cluster key, signature, replay window)
before it looks at anything else, so only members get bytes; it then takes an upload slot
(at most `max_uploads` at once, 503 beyond) and paces its output by the optional upload rate
cap, shared by every upload of the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from houndd.blobs.fetcher import Fetcher, Restarted
from houndd.blobs.protocol import (
    FRAME_PLAIN_BYTES,
    BlobRequest,
    FrameDecoder,
    FrameEncoder,
)
from houndd.blobs.source import BlobContext, BlobWant, SourceError
from houndd.blobs.tree import Source
from houndd.errors import PullError, WireError
from houndd.image.credentials import RegistryAuth
from houndd.wire import MsgType, Wire, WireRefused, schema
from houndd.wire.payloads import decode_payload

__all__ = ["PEER_BLOB_PATH", "PeerBlobServer", "PeerClient", "UploadLimiter"]

log = logging.getLogger("houndd.blobs")

PEER_BLOB_PATH = "/v1/peer/blob"
_PROBLEM = "application/problem+json"

Address = tuple[str, int]


class UploadLimiter:
    """At most `max_uploads` uploads at once and, if `rate_bytes_per_s` > 0, that many bytes
    per second over all of them (a token bucket holding up to 1/4 s of bytes)."""

    def __init__(
        self,
        max_uploads: int,
        rate_bytes_per_s: float = 0.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.max_uploads = max_uploads
        self._sleep = sleep
        self.active = 0
        self._rate = rate_bytes_per_s
        self._burst = max(rate_bytes_per_s / 4, FRAME_PLAIN_BYTES * 2)
        self._tokens = self._burst
        self._stamp = monotonic()
        self._monotonic = monotonic
        self._lock = asyncio.Lock()

    def try_acquire(self) -> bool:
        if self.active >= self.max_uploads:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    async def pace(self, nbytes: int) -> None:
        """Wait until `nbytes` may leave (no-op without a rate cap). FIFO across uploads."""
        if self._rate <= 0:
            return
        async with self._lock:
            now = self._monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= nbytes
            if self._tokens < 0:
                await self._sleep(-self._tokens / self._rate)


def _problem(status: int, title: str, detail: str) -> web.Response:
    return web.json_response(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status=status,
        content_type=_PROBLEM,
    )


class PeerBlobServer:
    """Answers `POST /v1/peer/blob`. `wire_open` is `Wire.open` (authentication and replay);
    `max_request_bytes` caps the sealed request."""

    def __init__(
        self,
        fetcher: Fetcher,
        wire: Wire,
        limiter: UploadLimiter,
        *,
        max_request_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetcher = fetcher
        self._wire = wire
        self._limiter = limiter
        self._max_request_bytes = max_request_bytes
        self._clock = clock

    async def handle(self, request: web.Request) -> web.StreamResponse:
        data = await request.read()
        try:
            env = self._wire.open(data, self._clock(), max_size=self._max_request_bytes)
            if env.type is not MsgType.BLOB_GET:
                raise WireError(f"expected BLOB_GET, got {env.type.name}")
            req = decode_payload(MsgType.BLOB_GET, env.payload)
        except WireRefused as e:
            status = 403 if e.reason in ("unknown_key", "decrypt", "signature", "cluster") else 401
            return _problem(status, "refused", e.reason)
        except WireError as e:
            return _problem(400, "bad request", str(e))
        sender = env.sender
        if not self._limiter.try_acquire():
            return _problem(503, "busy", f"{self._limiter.max_uploads} uploads in progress")
        try:
            return await self._serve(request, req, sender)
        finally:
            self._limiter.release()

    async def _serve(
        self, request: web.Request, req: BlobRequest, sender: str
    ) -> web.StreamResponse:
        auth = RegistryAuth(req.username, req.password) if req.username else None
        want = BlobWant(
            ctx=BlobContext(req.plan, req.name, req.image, tuple(req.nodes), auth),
            digest=req.digest,
            size=req.size,
            chain=(*req.chain, sender),
        )
        try:
            if req.through or self._fetcher.holds(req.digest):
                stream = self._fetcher.open(want, req.offset, reader="peer")
            else:
                return _problem(404, "not held", f"{req.digest} is not complete here")
        except SourceError as e:
            return _problem(409 if e.kind == "loop" else 502, e.kind, e.detail)
        except PullError as e:
            return _problem(502, e.reason, e.detail)

        encoder = FrameEncoder(req.key)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        try:
            await resp.prepare(request)
            async for chunk in stream:
                for frame in encoder.frames(chunk):
                    await self._limiter.pace(len(frame))
                    await resp.write(frame)
            await resp.write(encoder.end())
            await resp.write_eof()
        except (PullError, Restarted) as e:
            # The peer resumes elsewhere: it never got an end frame, so it trusts nothing.
            log.info("blob upload ended early peer=%s digest=%s error=%s", sender, req.digest, e)
            _abort(request)
        except ConnectionResetError:
            pass  # the peer went away: it resumes elsewhere
        finally:
            await stream.aclose()
        return resp


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


class PeerClient:
    """Streams blobs from peers. `address_of(node_id)` gives a member's HTTP address."""

    def __init__(
        self,
        wire: Wire,
        address_of: Callable[[str], Address | None],
        *,
        connect_timeout_s: float,
        scheme: str = "http",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._wire = wire
        self._address_of = address_of
        self._connect_timeout_s = connect_timeout_s
        self._scheme = scheme
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Integrity and secrecy come from the sealed request and the encrypted frames,
            # not from TLS: a self-signed API certificate is fine here.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False), trust_env=False
            )
        return self._session

    def request_for(self, source: Source, want: BlobWant, offset: int, key: bytes) -> BlobRequest:
        auth = want.ctx.auth
        return BlobRequest(
            digest=want.digest,
            size=want.size,
            offset=offset,
            through=source.through,
            plan=want.ctx.plan_id,
            name=want.ctx.name,
            image=want.ctx.image,
            nodes=tuple(want.ctx.nodes),
            chain=tuple(want.chain),
            key=key,
            username=auth.username if auth else "",
            password=auth.password if auth else "",
        )

    async def stream(
        self, source: Source, want: BlobWant, offset: int
    ) -> AsyncGenerator[bytes, None]:
        """The blob from `offset` as `source` (a peer) sends it; SourceError on any failure,
        including a stream that ends without the server's end frame."""
        address = self._address_of(source.node_id)
        if address is None:
            raise SourceError("unreachable", f"{source.node_id} is not a known member")
        key = secrets.token_bytes(32)
        payload = schema.encode(self.request_for(source, want, offset, key))
        body = self._wire.seal(MsgType.BLOB_GET, payload, self._clock())
        url = f"{self._scheme}://{_host(address[0])}:{address[1]}{PEER_BLOB_PATH}"
        decoder = FrameDecoder(key)
        limits = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s)
        try:
            async with self._client().post(url, data=body, timeout=limits) as resp:
                if resp.status != 200:
                    raise _status_error(resp.status, await _detail(resp))
                async for data in resp.content.iter_any():
                    for chunk in decoder.feed(data):
                        yield chunk
        except WireError as e:
            raise SourceError("corrupt", f"{source.node_id}: {e}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise SourceError("unreachable", f"{source.node_id}: {type(e).__name__}") from None
        if not decoder.ended:
            raise SourceError("unreachable", f"{source.node_id}: stream ended without end frame")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _detail(resp: aiohttp.ClientResponse) -> str:
    with contextlib.suppress(aiohttp.ClientError, ValueError, OSError, TimeoutError):
        data: Any = await resp.json(content_type=None)
        if isinstance(data, dict):
            return str(data.get("detail") or data.get("title") or "")[:300]
    return ""


def _status_error(status: int, detail: str) -> SourceError:
    if status == 404:
        return SourceError("not_held", detail)
    if status == 409:
        return SourceError("loop", detail)
    if status == 503:
        return SourceError("busy", detail)
    if status in (400, 401, 403):
        return SourceError("refused", f"HTTP {status}: {detail}")
    return SourceError("upstream", f"HTTP {status}: {detail}")
