"""An in-process network for asyncio tests: `MemoryNetwork` and its `MemoryTransport`s.

Datagrams can be lost, delayed, duplicated and reordered under a seeded RNG; links can be cut by
`partition(groups)`. Requests behave like HTTP over TCP: delayed, never lost, but failing fast
with `PeerError` when the peer is gone or cut off, and with the status a real `/v1/peer` route
would answer when the peer's handler refuses the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, deque
from collections.abc import Iterable

from houndd.errors import WireError
from houndd.membership.member import Address
from houndd.membership.transport import (
    OnDatagram,
    OnRequest,
    PeerError,
    PeerRejected,
    PeerTimeout,
)

log = logging.getLogger("houndd.membership")


class MemoryNetwork:
    """The shared medium. `delay` is a (low, high) one-way delay in seconds.

    With `reorder=False` datagrams on one link arrive in the order they were sent even when
    their delays differ (like a single switch path).
    """

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        duplicate: float = 0.0,
        reorder: bool = True,
        max_datagram_bytes: int = 65536,
    ) -> None:
        self.rng = rng or random.Random(0)
        self.loss = loss
        self.delay = delay
        self.duplicate = duplicate
        self.reorder = reorder
        self.max_datagram_bytes = max_datagram_bytes
        self._endpoints: dict[Address, MemoryTransport] = {}
        self._groups: dict[Address, int] | None = None
        self._last_arrival: dict[tuple[Address, Address], float] = {}
        self._fifo: dict[tuple[Address, Address], deque[bytes]] = {}
        self.stats: Counter[str] = Counter()
        """sent, delivered, lost, cut, duplicated, requests."""

    def transport(self, address: Address) -> MemoryTransport:
        """A new endpoint at `address` (which must be free)."""
        existing = self._endpoints.get(address)
        if existing is not None and not existing.closed:
            raise ValueError(f"address {address} is already in use on this network")
        t = MemoryTransport(self, address)
        self._endpoints[address] = t
        return t

    def partition(self, groups: Iterable[Iterable[Address]]) -> None:
        """Only endpoints in the same group reach each other; others are isolated."""
        self._groups = {}
        for i, group in enumerate(groups):
            for address in group:
                self._groups[address] = i

    def heal(self) -> None:
        """Reconnect everything."""
        self._groups = None

    def linked(self, a: Address, b: Address) -> bool:
        """Whether `a` and `b` can currently talk."""
        if self._groups is None:
            return True
        ga = self._groups.get(a)
        return ga is not None and ga == self._groups.get(b)

    def _endpoint(self, address: Address) -> MemoryTransport | None:
        t = self._endpoints.get(address)
        return t if t is not None and not t.closed else None

    def _delay(self) -> float:
        lo, hi = self.delay
        return self.rng.uniform(lo, hi) if hi > 0 else 0.0

    def _send(self, src: Address, to: Address, data: bytes) -> None:
        self.stats["sent"] += 1
        if len(data) > self.max_datagram_bytes:
            self.stats["oversize"] += 1
            return
        if not self.linked(src, to):
            self.stats["cut"] += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        loop = asyncio.get_running_loop()
        for _ in range(copies):
            if self.rng.random() < self.loss:
                self.stats["lost"] += 1
                continue
            arrival = loop.time() + self._delay()
            if self.reorder:
                loop.call_at(arrival, self._deliver, src, to, data)
                continue
            # FIFO per link: each timer delivers whatever is at the head of the link's queue,
            # so order holds even when timers with equal deadlines fire in any order.
            link = (src, to)
            arrival = max(arrival, self._last_arrival.get(link, 0.0))
            self._last_arrival[link] = arrival
            self._fifo.setdefault(link, deque()).append(data)
            loop.call_at(arrival, self._deliver_head, link)

    def _deliver_head(self, link: tuple[Address, Address]) -> None:
        queue = self._fifo[link]
        data = queue.popleft()
        if not queue:
            del self._fifo[link]
        self._deliver(link[0], link[1], data)

    def _deliver(self, src: Address, to: Address, data: bytes) -> None:
        target = self._endpoint(to)
        if target is None or target.on_datagram is None or not self.linked(src, to):
            return
        self.stats["delivered"] += 1
        target.on_datagram(data, src)

    async def _request(self, src: Address, to: Address, data: bytes, timeout_s: float) -> bytes:
        self.stats["requests"] += 1
        peer = f"{to[0]}:{to[1]}"
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.sleep(self._delay())
                target = self._endpoint(to)
                if target is None or target.on_request is None or not self.linked(src, to):
                    raise PeerError(f"peer {peer} unreachable: connection refused")
                try:
                    reply = await target.on_request(data, src)
                except WireError:
                    raise PeerError(f"peer {peer} answered HTTP 400") from None
                except PeerRejected as e:
                    raise PeerError(f"peer {peer} answered HTTP {e.status}") from None
                await asyncio.sleep(self._delay())
                if not self.linked(src, to):
                    raise PeerError(f"peer {peer} unreachable: connection reset")
                return reply
        except TimeoutError:
            raise PeerTimeout(f"peer {peer} did not answer in {timeout_s}s") from None


class MemoryTransport:
    """One endpoint of a `MemoryNetwork`; implements `Transport`."""

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self._network = network
        self._address = address
        self.on_datagram: OnDatagram | None = None
        self.on_request: OnRequest | None = None
        self.closed = False

    @property
    def local_address(self) -> Address:
        """This endpoint's address."""
        return self._address

    def serve(self, on_datagram: OnDatagram, on_request: OnRequest) -> None:
        """Start delivering to the callbacks."""
        self.on_datagram = on_datagram
        self.on_request = on_request

    async def send(self, to: Address, data: bytes) -> None:
        """Best-effort datagram through the network's fault model."""
        if not self.closed:
            self._network._send(self._address, to, data)

    async def request(self, to: Address, data: bytes, timeout_s: float) -> bytes:
        """Request/reply, like an HTTP POST to the peer's `/v1/peer`."""
        if self.closed:
            raise PeerError("transport is closed")
        return await self._network._request(self._address, to, data, timeout_s)

    async def close(self) -> None:
        """Stop sending and receiving; idempotent. The address can then be reused (a restart)."""
        self.closed = True
