"""Transports: the rate limiter, `MemoryNetwork` fault model, and real UDP + HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from houndd.config import local
from houndd.errors import WireError
from houndd.membership.member import Address
from houndd.membership.memory import MemoryNetwork
from houndd.membership.transport import (
    PEER_PATH,
    PeerError,
    PeerRejected,
    PeerTimeout,
    RateLimiter,
    Transport,
    UdpHttpTransport,
)


def test_rate_limiter_allows_a_burst_then_the_sustained_rate() -> None:
    rl = RateLimiter(rate_per_s=10, burst=5)
    assert [rl.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert rl.allow("b", 0.0)  # per source
    assert not rl.allow("a", 0.05)  # half a token
    assert rl.allow("a", 0.1)
    assert [rl.allow("a", 10.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_rate_limiter_memory_is_bounded() -> None:
    rl = RateLimiter(rate_per_s=1, burst=1, max_sources=100)
    for i in range(1000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rl._buckets) == 100


class Inbox:
    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Address]] = []
        self.event = asyncio.Event()

    def on_datagram(self, data: bytes, source: Address) -> None:
        self.datagrams.append((data, source))
        self.event.set()

    async def on_request(self, data: bytes, source: Address) -> bytes:
        if data == b"bad":
            raise WireError("not authentic")
        if data == b"slow":
            await asyncio.sleep(1.0)
        if data.startswith(b"big:"):
            return BIG_REPLY[: int(data[4:])]
        return b"re:" + data


# Not one repeated byte: a body cut short or reassembled out of order must not compare equal.
BIG_REPLY = random.Random(9).randbytes(1 << 20)


async def test_memory_network_delivers_loses_and_partitions() -> None:
    net = MemoryNetwork(random.Random(1), delay=(0.001, 0.002))
    a, b, c = (net.transport(("h", i)) for i in range(3))
    inbox = Inbox()
    b.serve(inbox.on_datagram, inbox.on_request)
    await a.send(b.local_address, b"one")
    await asyncio.wait_for(inbox.event.wait(), 1.0)
    assert inbox.datagrams == [(b"one", ("h", 0))]
    assert await a.request(b.local_address, b"q", 1.0) == b"re:q"
    with pytest.raises(PeerError, match="HTTP 400"):
        await a.request(b.local_address, b"bad", 1.0)
    with pytest.raises(PeerTimeout):
        await a.request(b.local_address, b"slow", 0.05)
    with pytest.raises(PeerError, match="unreachable"):
        await a.request(c.local_address, b"q", 1.0)  # c serves nothing
    net.partition([[a.local_address], [b.local_address]])
    await a.send(b.local_address, b"cut")
    with pytest.raises(PeerError):
        await a.request(b.local_address, b"q", 1.0)
    net.heal()
    net.loss = 1.0
    await a.send(b.local_address, b"lost")
    await asyncio.sleep(0.02)
    assert [d for d, _ in inbox.datagrams] == [b"one"]
    assert net.stats["cut"] == 1 and net.stats["lost"] == 1
    await b.close()
    with pytest.raises(PeerError):
        await a.request(b.local_address, b"q", 1.0)
    net.transport(("h", 1))  # a closed address can be reused (restart)


async def test_memory_network_keeps_order_without_reorder() -> None:
    net = MemoryNetwork(random.Random(2), delay=(0.0, 0.01), reorder=False)
    a, b = net.transport(("h", 1)), net.transport(("h", 2))
    inbox = Inbox()
    b.serve(inbox.on_datagram, inbox.on_request)
    for i in range(50):
        await a.send(b.local_address, bytes([i]))
    await asyncio.sleep(0.05)
    assert [d[0] for d, _ in inbox.datagrams] == list(range(50))


def free_port() -> int:
    # A port free for both UDP and TCP on loopback (the daemon shares one number for both).
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
        ):
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port")


async def test_udp_http_transport_on_loopback() -> None:
    cfg = local(max_udp_bytes=1000, peer_rate_limit_per_s=20, max_http_body_bytes=2000)
    a = UdpHttpTransport(cfg, advertise_host="127.0.0.1", bind="127.0.0.1", port=0)
    port_b = free_port()
    b = UdpHttpTransport(cfg, advertise_host="127.0.0.1", bind="127.0.0.1", port=port_b)
    await a.start()
    await b.start()
    inbox = Inbox()
    b.serve(inbox.on_datagram, inbox.on_request)

    async def peer_route(request: web.Request) -> web.Response:
        try:
            body = await b.handle_http(await request.read(), (request.remote or "", 0))
        except PeerRejected as e:
            return web.Response(status=e.status)
        except WireError:
            return web.Response(status=400)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_post(PEER_PATH, peer_route)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port_b)
    await site.start()
    try:
        assert b.local_address == ("127.0.0.1", port_b)
        await a.send(b.local_address, b"hello")
        await asyncio.wait_for(inbox.event.wait(), 2.0)
        assert inbox.datagrams == [(b"hello", a.local_address)]
        # Oversize datagrams are dropped before anything else sees them.
        await a.send(b.local_address, b"x" * 1001)
        assert await a.request(b.local_address, b"ping", 2.0) == b"re:ping"
        with pytest.raises(PeerError, match="HTTP 400"):
            await a.request(b.local_address, b"bad", 2.0)
        with pytest.raises(PeerError, match="HTTP 413"):
            await a.request(b.local_address, b"y" * 2001, 2.0)
        with pytest.raises(PeerTimeout):
            await a.request(b.local_address, b"slow", 0.1)
        # Rate limit: a burst of 20 per source, the rest dropped before crypto.
        for i in range(60):
            await a.send(b.local_address, b"flood%d" % i)
        await asyncio.sleep(0.2)
        assert b.dropped["oversize"] >= 2  # one datagram, one request
        assert b.dropped["rate"] >= 30
        assert len(inbox.datagrams) < 30
        with pytest.raises(PeerError, match="unreachable"):
            await a.request(("127.0.0.1", free_port()), b"q", 1.0)
        # An address the OS refuses (a gossiped host with a NUL byte made sendto raise and
        # closed the socket) drops the datagram; the transport keeps working.
        inbox.event.clear()
        await a.send(("127.0.0.1\x00evil", port_b), b"x")
        await a.send(("no-such-host.invalid", port_b), b"x")
        with pytest.raises(PeerError, match="unreachable"):
            await a.request(("127.0.0.1\x00evil", port_b), b"q", 1.0)
        assert a.dropped["send_error"] >= 1
        await a.send(b.local_address, b"still here")
        await asyncio.wait_for(
            _until(lambda: (b"still here", a.local_address) in inbox.datagrams), 2.0
        )
    finally:
        await runner.cleanup()
        await a.close()
        await b.close()
        await b.close()  # idempotent
    await a.send(b.local_address, b"after close")  # no error, nothing sent


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():  # noqa: ASYNC110 - a datagram has no other completion signal here
        await asyncio.sleep(0.01)


# --- one conformance suite for both implementations ------------------------------------------


@contextlib.asynccontextmanager
async def transport_pair(kind: str) -> AsyncIterator[tuple[Transport, Transport, Inbox]]:
    inbox = Inbox()
    if kind == "memory":
        net = MemoryNetwork(random.Random(3), delay=(0.0, 0.001))
        ma, mb = net.transport(("10.1.0.1", 7480)), net.transport(("10.1.0.2", 7480))
        mb.serve(inbox.on_datagram, inbox.on_request)
        try:
            yield ma, mb, inbox
        finally:
            await ma.close()
            await mb.close()
        return
    cfg = local()
    ua = UdpHttpTransport(cfg, advertise_host="127.0.0.1", bind="127.0.0.1", port=0)
    ub = UdpHttpTransport(cfg, advertise_host="127.0.0.1", bind="127.0.0.1", port=free_port())
    await ua.start()
    await ub.start()
    ub.serve(inbox.on_datagram, inbox.on_request)

    async def route(request: web.Request) -> web.Response:
        try:
            return web.Response(body=await ub.handle_http(await request.read()))
        except WireError:
            return web.Response(status=400)

    app = web.Application()
    app.router.add_post(PEER_PATH, route)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ub.port).start()
    try:
        yield ua, ub, inbox
    finally:
        await runner.cleanup()
        await ua.close()
        await ub.close()


@pytest.mark.parametrize("kind", ["memory", "udp"])
async def test_transport_conformance(kind: str) -> None:
    async with transport_pair(kind) as (a, b, inbox):
        await a.send(b.local_address, b"datagram")
        await asyncio.wait_for(inbox.event.wait(), 2.0)
        assert inbox.datagrams == [(b"datagram", a.local_address)]
        assert await a.request(b.local_address, b"q", 2.0) == b"re:q"
        # Issue #9 item 4: replies over ~128 KB came back cut to what had arrived so far.
        for size in (200_000, 900_000):
            reply = await a.request(b.local_address, b"big:%d" % size, 5.0)
            assert reply == BIG_REPLY[:size]
        with pytest.raises(PeerError):
            await a.request(b.local_address, b"bad", 2.0)
        with pytest.raises(PeerTimeout):
            await a.request(b.local_address, b"slow", 0.1)
        await b.close()
        await b.close()
        await a.send(b.local_address, b"to a closed peer")  # best effort: no error
        with pytest.raises(PeerError):
            await a.request(b.local_address, b"q", 1.0)


async def test_udp_http_reply_is_read_whole_up_to_the_cap() -> None:
    """Replies of any size up to max_http_body_bytes arrive whole, however the peer sends
    them (with a Content-Length, or chunked in small pieces); beyond the cap they are refused
    without reading them into memory."""
    cap = 600_000

    async def route(request: web.Request) -> web.StreamResponse:
        how, _, size_text = (await request.read()).decode().partition(":")
        size = int(size_text)
        if how == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for start in range(0, size, 7_000):
                await resp.write(BIG_REPLY[start : min(size, start + 7_000)])
            await resp.write_eof()
            return resp
        return web.Response(body=BIG_REPLY[:size])

    app = web.Application()
    app.router.add_post(PEER_PATH, route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    t = UdpHttpTransport(
        local(max_http_body_bytes=cap), advertise_host="127.0.0.1", bind="127.0.0.1", port=0
    )
    await t.start()
    try:
        for how in ("length", "chunked"):
            for size in (0, 1, 131_072 + 1, 400_000, cap):
                reply = await t.request(("127.0.0.1", port), f"{how}:{size}".encode(), 5.0)
                assert reply == BIG_REPLY[:size], (how, size, len(reply))
            with pytest.raises(PeerError, match="over max_http_body_bytes"):
                await t.request(("127.0.0.1", port), f"{how}:{cap + 1}".encode(), 5.0)
    finally:
        await t.close()
        await runner.cleanup()
