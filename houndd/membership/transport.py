"""How peer bytes move: the `Transport` protocol and the real UDP + HTTP implementation.

Gossip (SWIM probes, piggybacked updates, bus datagrams) rides UDP datagrams; requests that
need an answer (push-pull, plan replication, keyring ops) ride an HTTP POST to the peer's
`/v1/peer` route on the same port number. The transport only moves bytes: it never opens
envelopes. What it does before handing bytes on is cheap and crypto-free: a size cap and a
per-source token bucket, so a flood costs us a dictionary lookup, not a SecretBox open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from houndd.config import Config
from houndd.errors import HounddError
from houndd.membership.member import Address
from houndd.names import is_ip_address
from houndd.wire.fields import host_problem

log = logging.getLogger("houndd.membership")

OnDatagram = Callable[[bytes, Address], None]
"""Called for every datagram that passed the cheap checks: (data, source address)."""
OnRequest = Callable[[bytes, Address], Awaitable[bytes]]
"""Called for every request that passed the cheap checks; returns the reply bytes."""

PEER_PATH = "/v1/peer"
# Peer hostnames (an `advertise` that is a name) resolved at most this often, with this
# timeout, for at most this many names (caps what a gossiped name can cost us).
RESOLVE_CACHE_S = 30.0
RESOLVE_TIMEOUT_S = 1.0
MAX_RESOLVED = 1024
# Distinct source hosts tracked by the rate limiter; the oldest is forgotten beyond this, which
# caps the memory a spoofed-source flood can force.
MAX_RATE_SOURCES = 4096


def address_problem(address: object) -> str | None:
    """None if `address` is a (host, port) a socket can send to: an IP address or RFC 1123
    hostname, and a port in 1..65535."""
    if not isinstance(address, tuple) or len(address) != 2:
        return "expected (host, port)"
    host, port = address
    if not isinstance(host, str) or host_problem(host) is not None:
        return "expected an IP address or hostname"
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return "expected a port in 1..65535"
    return None


class PeerError(HounddError, ConnectionError):
    """A peer could not be reached or refused a request; retry later or check the peer."""


class PeerTimeout(PeerError, TimeoutError):
    """A peer did not answer within the request timeout."""


class RemoteError(PeerError):
    """The peer handled the request and answered with an error (ERROR_REPLY). `reason` is
    its message."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerRejected(PeerError):
    """An incoming request failed a cheap check. `status` is the HTTP status the `/v1/peer`
    route should answer with (413 oversize, 429 rate limited, 503 not serving)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Transport(Protocol):
    """Moves peer bytes; `MemoryTransport` and `UdpHttpTransport` implement it."""

    @property
    def local_address(self) -> Address:
        """The address peers use to reach this node."""
        ...

    async def send(self, to: Address, data: bytes) -> None:
        """Send one datagram; best effort, never raises for an unreachable peer."""
        ...

    async def request(self, to: Address, data: bytes, timeout_s: float) -> bytes:
        """Send a request and return the reply bytes; `PeerError`/`PeerTimeout` on failure."""
        ...

    def serve(self, on_datagram: OnDatagram, on_request: OnRequest) -> None:
        """Start handing incoming datagrams and requests to the callbacks."""
        ...

    async def close(self) -> None:
        """Stop; idempotent."""
        ...


class RateLimiter:
    """Per-source token buckets: `rate_per_s` sustained, bursts up to `burst`.

    Pure apart from the `now` it is given; bounded to `max_sources` buckets (LRU).
    """

    def __init__(self, rate_per_s: float, burst: float, *, max_sources: int = MAX_RATE_SOURCES):
        self._rate = rate_per_s
        self._burst = burst
        self._max = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str, now: float) -> bool:
        """Take one token from `source`'s bucket; False if it is empty."""
        tokens, last = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, peer: Address) -> bytes:
    """The whole reply body, refused beyond `cap` bytes.

    `StreamReader.read(n)` returns whatever has arrived so far (one chunk, about 128 KB on
    loopback), not n bytes: a big SYNC_ITEMS reply read that way is cut short and fails to
    decrypt. Read chunks until the end of the body instead; the cap bounds the memory a
    peer can make us hold, checked on the declared length first and on what arrives.
    """
    if resp.content_length is not None and resp.content_length > cap:
        raise PeerError(
            f"peer {peer[0]}:{peer[1]} sent a reply of {resp.content_length} bytes, "
            f"over max_http_body_bytes ({cap})"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise PeerError(
                f"peer {peer[0]}:{peer[1]} sent a reply over max_http_body_bytes ({cap})"
            )
        chunks.append(chunk)
    return b"".join(chunks)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpHttpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._owner._datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: a peer went away; SWIM notices on its own.
        log.debug("udp error err=%s", exc)


class UdpHttpTransport:
    """UDP datagrams on (bind, port) plus HTTP POST requests to peers' `/v1/peer`.

    The API app serves `/v1/peer` by calling `handle_http(body, source)`. `start()` binds the
    socket (the constructor does no IO); `port=0` picks a free port (tests).
    """

    def __init__(
        self,
        config: Config,
        *,
        advertise_host: str,
        bind: str | None = None,
        port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._bind = config.bind if bind is None else bind
        self._port = config.port if port is None else port
        self._advertise_host = advertise_host
        self._clock = clock
        self._limiter = RateLimiter(config.peer_rate_limit_per_s, config.peer_rate_limit_per_s)
        self._udp: asyncio.DatagramTransport | None = None
        self._session: aiohttp.ClientSession | None = None
        self._on_datagram: OnDatagram | None = None
        self._on_request: OnRequest | None = None
        self._closed = False
        self._send_errors: set[str] = set()
        self._resolved: dict[str, tuple[str, float]] = {}  # host -> (ip or "", valid until)
        self.dropped: Counter[str] = Counter()
        """Datagrams/requests dropped, by reason (oversize, rate before crypto; send_error)."""

    async def start(self) -> None:
        """Bind the UDP socket and create the shared HTTP client session."""
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(self._bind, self._port)
        )
        self._udp = udp
        self._port = int(udp.get_extra_info("sockname")[1])
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.peer_request_timeout_s),
            headers={"Content-Type": "application/octet-stream"},
        )

    @property
    def port(self) -> int:
        """The bound port (the real one after `start()` with port 0)."""
        return self._port

    @property
    def local_address(self) -> Address:
        """(advertise host, port)."""
        return (self._advertise_host, self._port)

    def serve(self, on_datagram: OnDatagram, on_request: OnRequest) -> None:
        """Start delivering to the callbacks."""
        self._on_datagram = on_datagram
        self._on_request = on_request

    def _admit(self, size: int, cap: int, source: str) -> str | None:
        if size > cap:
            return "oversize"
        if not self._limiter.allow(source, self._clock()):
            return "rate"
        return None

    def _datagram(self, data: bytes, source: Address) -> None:
        if self._on_datagram is None or self._closed:
            return
        refused = self._admit(len(data), self._config.max_udp_bytes, source[0])
        if refused is not None:
            self.dropped[refused] += 1
            return
        self._on_datagram(data, source)

    async def handle_http(self, data: bytes, source: Address | None = None) -> bytes:
        """Serve one `/v1/peer` request body; returns the reply body.

        Raises `PeerRejected` (with `.status`) for oversize, rate-limited or not-yet-serving,
        and whatever the request handler raises (`WireError` for unauthenticated bytes: 400).
        """
        if self._on_request is None or self._closed:
            raise PeerRejected(503, "not serving peer requests yet")
        src = source or ("", 0)
        self.admit_http(len(data), src[0])
        return await self._on_request(data, src)

    def admit_http(self, size: int, source: str) -> None:
        """The cheap checks every peer HTTP request passes before any crypto (size cap,
        per-source rate); PeerRejected (413, 429) otherwise. Also for `/v1/peer/blob`."""
        refused = self._admit(size, self._config.max_http_body_bytes, source)
        if refused is not None:
            self.dropped[refused] += 1
            if refused == "oversize":
                raise PeerRejected(413, f"peer request of {size} bytes exceeds the cap")
            raise PeerRejected(429, "too many peer requests from this source")

    async def send(self, to: Address, data: bytes) -> None:
        """Send one datagram (dropped silently if not started or closed). Never raises: an
        address the OS refuses (a NUL in the host, an unroutable one) drops the datagram."""
        if self._udp is None or self._closed:
            return
        # asyncio treats anything but OSError from sendto as fatal and closes the socket (a
        # host with a NUL byte did that to every daemon): refuse such addresses first.
        problem = address_problem(to)
        if problem is not None:
            self._send_failed(to, "bad_address", problem)
            return
        target = await self._resolve(to)
        if target is None:
            return
        try:
            self._udp.sendto(data, target)
        except (OSError, ValueError, TypeError) as e:
            self._send_failed(to, type(e).__name__, str(e))

    async def _resolve(self, to: Address) -> tuple[str, int] | None:
        """An IP address to send to: `sendto` given a hostname would resolve it on the event
        loop, blocking it as long as DNS takes, so names are resolved here, off the loop, with
        a timeout and a bounded cache."""
        host, port = to
        if is_ip_address(host):
            return to
        now = self._clock()
        cached = self._resolved.get(host)
        if cached is not None and cached[1] > now:
            return (cached[0], port) if cached[0] else None
        ip = ""
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_DGRAM
                )
            ip = str(infos[0][4][0]) if infos else ""
        except (OSError, TimeoutError, UnicodeError) as e:
            self._send_failed(to, "resolve", str(e) or type(e).__name__)
        if len(self._resolved) >= MAX_RESOLVED:
            self._resolved.pop(next(iter(self._resolved)))
        self._resolved[host] = (ip, now + RESOLVE_CACHE_S)
        return (ip, port) if ip else None

    def _send_failed(self, to: Address, kind: str, detail: str) -> None:
        self.dropped["send_error"] += 1
        if kind not in self._send_errors:
            self._send_errors.add(kind)
            log.warning("datagram not sent peer=%r error=%s: %s", to, kind, detail)

    async def request(self, to: Address, data: bytes, timeout_s: float) -> bytes:
        """POST `data` to `http://host:port/v1/peer`; the 200 body is the reply."""
        if self._session is None or self._closed:
            raise PeerError("transport is not started")
        problem = address_problem(to)
        if problem is not None:
            raise PeerError(f"peer {to!r} unreachable: {problem}")
        host = f"[{to[0]}]" if ":" in to[0] else to[0]
        url = f"http://{host}:{to[1]}{PEER_PATH}"
        try:
            async with self._session.post(
                url, data=data, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise PeerError(f"peer {to[0]}:{to[1]} answered HTTP {resp.status}")
                return await _read_capped(resp, self._config.max_http_body_bytes, to)
        except TimeoutError:
            raise PeerTimeout(f"peer {to[0]}:{to[1]} did not answer in {timeout_s}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            # ValueError: a URL the host makes invalid; the peer is unreachable all the same.
            raise PeerError(f"peer {to[0]!r}:{to[1]} unreachable: {e}") from None

    async def close(self) -> None:
        """Close the socket and the HTTP session; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._session is not None:
            await self._session.close()
