"""`Bus`: the node's peer message bus over one `Transport`.

Every message in or out crosses it. Outgoing payloads (the registered dataclasses of
`houndd.wire.payloads`) are encoded and sealed by the `Wire`; incoming bytes are opened by the
`Wire` (unauthenticated, replayed or malformed bytes stop there) and their payload decoded by
the one schema function, `decode_payload`, so a handler only ever sees a typed, bounded payload.
Subsystems `register` one handler per `MsgType` and use `send`, `request` and `broadcast`.

Nothing a peer sends may stop the daemon: a handler that raises is counted (by message type),
logged once per (type, error class), and the message dropped; a request gets an ERROR_REPLY.
Sending never raises for a peer that cannot be reached or an address the OS refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from houndd.config import Config
from houndd.errors import HounddError, WireError
from houndd.membership.member import Address
from houndd.membership.messages import CertNeeded, ErrorReply, Receipt
from houndd.membership.transport import PeerError, PeerTimeout, RemoteError, Transport
from houndd.wire.codec import Envelope
from houndd.wire.payloads import decode_payload, encode_payload, msg_type_of
from houndd.wire.types import CertUnknown, MsgType

log = logging.getLogger("houndd.membership")

R = TypeVar("R")


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """An authenticated message: node id of the signer, its type, the decoded payload, and
    the address it came from (for an HTTP request: the peer's IP and port 0)."""

    sender: str
    type: MsgType
    payload: Any
    source: Address


Handler = Callable[[Message], Awaitable[object | None]]
"""A bus handler; its return value (a payload) answers a request, or goes back as a datagram
to the sender of a datagram; None answers a request with a RECEIPT."""
Target = str | Address
"""A node id, or an address for a peer not (yet) a member."""
Resolver = Callable[[str], Address | None]
"""Node id -> address of a known member."""

# Datagrams waiting for the receive loop; beyond this we drop (UDP semantics) rather than grow.
INBOX_SIZE = 4096
# Bus handlers for datagrams run concurrently up to this many; more are dropped. Caps the
# tasks a burst of authenticated datagrams can pile up behind a slow handler.
MAX_DATAGRAM_HANDLERS = 256
# Distinct (kind, key) pairs we warn about once each; beyond this, only counted.
MAX_WARNED = 1024
CERT_ASK_S = 1.0
"""A member is asked for its certificate at most this often (CERT_NEEDED)."""
MAX_CERT_ASKED = 4096
"""Members whose last CERT_NEEDED time is remembered."""


class WireLike(Protocol):
    """What the bus needs from `houndd.wire.Wire`."""

    @property
    def node_id(self) -> str:
        """This node's id (derived from its identity key)."""
        ...

    @property
    def refused(self) -> Counter[str]:
        """Refused incoming messages by reason."""
        ...

    def seal(
        self, msg_type: MsgType, payload: Mapping[str, Any], now: float, *, to: Any = None
    ) -> bytes:
        """Envelope, sign and encrypt one message (`to`: a datagram's destination, which
        may get a reference to our certificate instead of the certificate)."""
        ...

    def resend_cert(self, to: Any) -> None:
        """The next datagram to `to` carries our certificate in full."""
        ...

    def open(self, data: bytes, now: float, *, max_size: int) -> Envelope:
        """Authenticate and decode one message; `WireError` on anything wrong."""
        ...


class UnknownMemberError(HounddError, LookupError):
    """No member with that id or name is known; check `houndd status`."""


class Bus:
    """Sealed, typed peer messages over a transport. The constructor does no IO; `run()`
    serves until cancelled."""

    def __init__(
        self,
        config: Config,
        wire: WireLike,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
        on_handler_error: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._wire = wire
        self._transport = transport
        self._clock = clock  # wall time: envelope timestamps leave the process
        self._on_handler_error = on_handler_error
        self._resolve: Resolver = lambda node_id: None
        self._handlers: dict[MsgType, tuple[Handler, bool]] = {}
        self._inbox: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue(INBOX_SIZE)
        self._tg: asyncio.TaskGroup | None = None
        self._running_handlers = 0
        self._warned: set[tuple[str, str]] = set()
        self.dropped: Counter[str] = Counter()
        """Messages dropped by the bus, by reason (inbox_full, handlers_busy, no_handler,
        payload, unsendable)."""
        self.handler_errors: Counter[str] = Counter()
        """Handler exceptions by message type name."""
        self.sent: Counter[str] = Counter()
        """Messages sent (datagrams, requests, replies), by message type name."""
        self.sent_bytes: Counter[str] = Counter()
        """Sealed bytes sent, by message type name."""
        self._cert_asked: dict[str, float] = {}
        self._boots: dict[str, int] = {}  # node id -> the boot epoch it last sent
        self._handlers[MsgType.CERT_NEEDED] = (self._on_cert_needed, True)

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self._wire.node_id

    @property
    def local_address(self) -> Address:
        """The address peers reach this node at."""
        return self._transport.local_address

    def route_with(self, resolve: Resolver) -> None:
        """Use `resolve` to find the address of a node id (membership provides it)."""
        self._resolve = resolve

    def register(self, msg_type: MsgType, handler: Handler, *, inline: bool = False) -> None:
        """Handle incoming `msg_type` datagrams and requests with `handler`. An `inline`
        handler runs in the receive loop, in arrival order (SWIM); others run as tasks."""
        if msg_type in self._handlers:
            raise ValueError(f"{msg_type.name} already has a handler")
        self._handlers[msg_type] = (handler, inline)

    # --- lifecycle ---

    async def run(self) -> None:
        """Serve until cancelled."""
        self._transport.serve(self._on_datagram, self._on_request)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                while True:
                    data, source = await self._inbox.get()
                    await self._datagram(data, source)
        finally:
            self._tg = None

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run `coro` in the bus's task group, guarded like a handler (closed if not running)."""
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(self.guard(coro, what, ""))

    # --- sending ---

    async def send(self, target: Target, payload: object) -> None:
        """Send one sealed datagram (best effort) to a node id or address."""
        address, _ = self._address(target)
        data = self._seal(payload, to=address)
        if data is None:
            return
        self._count(payload, len(data))
        if address == self._transport.local_address:
            self._on_datagram(data, address)
            return
        if len(data) > self._config.max_udp_bytes:
            # Too big for one datagram (a plan with hundreds of items): it travels as a peer
            # request instead, still best effort, without holding the caller. Requests carry
            # the signing certificate itself (a receiver that lacks it could not ask).
            data = self._seal(payload)
            if data is None:
                return
            self.spawn(self._send_as_request(address, data), "oversize datagram")
            return
        await self._transport.send(address, data)

    async def broadcast(self, addresses: Iterable[Address], payload: object) -> int:
        """Send one datagram to each address; returns how many."""
        data = self._seal(payload)
        if data is None:
            return 0
        count = 0
        for address in addresses:
            await self._transport.send(address, data)
            count += 1
        self._count(payload, len(data), count)
        return count

    async def _send_as_request(self, address: Address, data: bytes) -> None:
        try:
            await self._transport.request(address, data, self._config.peer_request_timeout_s)
        except HounddError as e:
            log.debug("oversize datagram not delivered peer=%s:%d error=%s", *address, e)

    async def request(
        self, target: Target, payload: object, timeout_s: float | None = None
    ) -> Message:
        """Send a request and return the authenticated reply (its payload decoded).

        Raises `PeerTimeout`, `PeerError` (unreachable, refused, reply not authentic, from
        another node or not a valid payload), `RemoteError` (the peer answered ERROR_REPLY),
        `UnknownMemberError`.
        """
        address, expect = self._address(target)
        timeout = timeout_s if timeout_s is not None else self._config.peer_request_timeout_s
        data = self._seal(payload)
        peer = expect or f"{address[0]}:{address[1]}"
        if data is None:
            raise PeerError(f"peer {peer}: the request could not be encoded; see the log")
        self._count(payload, len(data))
        if address == self._transport.local_address:
            try:
                async with asyncio.timeout(timeout):
                    raw = await self._on_request(data, address)
            except TimeoutError:
                raise PeerTimeout(f"peer {peer} (this node) did not answer in {timeout}s") from None
        else:
            raw = await self._transport.request(address, data, timeout)
        try:
            env = self._open(raw, self._config.max_http_body_bytes, address)
        except WireError as e:
            raise PeerError(f"peer {peer}: reply refused: {e}") from None
        if expect is not None and env.sender != expect:
            raise PeerError(f"peer {peer}: reply came from node {env.sender}")
        if isinstance(env.payload, ErrorReply):
            raise RemoteError(peer, env.payload.error)
        return env

    async def request_typed(
        self, target: Target, payload: object, reply: type[R], timeout_s: float | None = None
    ) -> R:
        """`request`, expecting a reply of class `reply` (anything else is a `PeerError`)."""
        env = await self.request(target, payload, timeout_s)
        if not isinstance(env.payload, reply):
            raise PeerError(f"peer {env.sender}: unexpected reply {env.type.name}")
        return env.payload

    # --- receiving ---

    def _on_datagram(self, data: bytes, source: Address) -> None:
        try:
            self._inbox.put_nowait((data, source))
        except asyncio.QueueFull:
            self.dropped["inbox_full"] += 1

    async def _datagram(self, data: bytes, source: Address) -> None:
        try:
            env = self._open(data, self._config.max_udp_bytes, source)
        except CertUnknown as e:
            await self._ask_cert(e, source)
            return
        except WireError:
            return
        registered = self._handlers.get(env.type)
        if registered is None:
            self.dropped["no_handler"] += 1
            return
        handler, inline = registered
        if inline:
            await self.guard(self._answer_datagram(handler, env), env.type.name, env.sender)
            return
        if self._tg is None:
            self.dropped["no_handler"] += 1
            return
        if self._running_handlers >= MAX_DATAGRAM_HANDLERS:
            self.dropped["handlers_busy"] += 1
            self._warn_once(
                ("busy", ""), "bus handlers busy; dropping datagrams type=%s", env.type.name
            )
            return
        self._running_handlers += 1
        self._tg.create_task(self._run_handler(handler, env))

    async def _run_handler(self, handler: Handler, env: Message) -> None:
        try:
            await self.guard(self._answer_datagram(handler, env), env.type.name, env.sender)
        finally:
            self._running_handlers -= 1

    async def _answer_datagram(self, handler: Handler, env: Message) -> None:
        reply = await handler(env)
        if reply is not None:
            # A reply to a datagram travels back as a datagram (e.g. a vote for a vote
            # request): the sender is a member, or the reply is best-effort lost.
            with contextlib.suppress(UnknownMemberError):
                await self.send(env.sender, reply)

    async def _ask_cert(self, refused: CertUnknown, source: Address) -> None:
        """Ask a member for the certificate its datagram named. The claim is not
        authenticated: only a member whose known address sent it is asked, and at most once
        per CERT_ASK_S, so a forged reference cannot make us send anything elsewhere."""
        node_id = refused.node_id
        address = self._resolve(node_id)
        now = time.monotonic()
        if address is None or address[0] != source[0] or address[1] != source[1]:
            return
        if now - self._cert_asked.get(node_id, -CERT_ASK_S) < CERT_ASK_S:
            return
        self._cert_asked[node_id] = now
        if len(self._cert_asked) > MAX_CERT_ASKED:
            self._cert_asked.pop(next(iter(self._cert_asked)))
        # In full: it may not hold ours either (we restarted).
        data = self._seal(CertNeeded(refused.generation), to=None)
        if data is not None:
            self._count(CertNeeded(refused.generation), len(data))
            await self._transport.send(address, data)

    async def _on_cert_needed(self, msg: Message) -> None:
        address = self._resolve(msg.sender)
        for to in {msg.source, address}:
            if to is not None:
                self._wire.resend_cert(to)

    async def guard(self, coro: Awaitable[None], what: str, peer: str = "") -> None:
        """Await `coro`; an exception (but not cancellation) is counted as a handler error of
        `what`, logged once per (what, error class), and dropped."""
        try:
            await coro
        except HounddError as e:
            self._warn_once(
                (what, type(e).__name__),
                "bus handler refused type=%s peer=%s err=%s",
                what,
                peer,
                e,
            )
        except Exception as e:
            self._count_error(what, e, peer)

    def _count_error(self, what: str, error: Exception, peer: str) -> None:
        self.handler_errors[what] += 1
        if self._on_handler_error is not None:
            self._on_handler_error(what)
        key = (what, type(error).__name__)
        if key in self._warned:
            log.debug("peer handler failed type=%s peer=%s error=%r", what, peer, error)
            return
        if len(self._warned) < MAX_WARNED:
            self._warned.add(key)
        log.error(
            "peer handler failed; message dropped type=%s peer=%s error=%s",
            what,
            peer,
            type(error).__name__,
            exc_info=error,
        )

    async def _on_request(self, data: bytes, source: Address) -> bytes:
        env = self._open(data, self._config.max_http_body_bytes, source)
        registered = self._handlers.get(env.type)
        if registered is None:
            return self._reply(ErrorReply(f"no handler for message type {env.type.name}"))
        handler, _ = registered
        try:
            result = await handler(env)
        except HounddError as e:
            return self._reply(ErrorReply(str(e)[:1024]))
        except Exception as e:
            self._count_error(env.type.name, e, env.sender)
            return self._reply(ErrorReply("internal error; see the peer's log"))
        return self._reply(Receipt() if result is None else result)

    # --- internals ---

    def _open(self, data: bytes, max_size: int, source: Address) -> Message:
        """Authenticate and decode; a refusal is warned about once per source, then raised."""
        try:
            env = self._wire.open(data, self._clock(), max_size=max_size)
            try:
                payload = decode_payload(env.type, env.payload)
            except WireError:
                self.dropped["payload"] += 1
                raise
        except CertUnknown:
            raise  # expected after a restart or a lost datagram: the bus asks for it
        except WireError as e:
            key = ("refused", str(source[0]))
            self._warn_once(key, "refused peer message source=%s err=%s", source[0], e)
            raise
        self._note_boot(env.sender, env.boot_epoch, source)
        return Message(env.sender, env.type, payload, source)

    def _note_boot(self, sender: str, boot_epoch: int, source: Address) -> None:
        """A member that restarted (a higher boot epoch) holds none of the certificates it
        was sent: our next datagrams to it carry ours in full, so that it never refuses our
        probes and suspects nobody for it."""
        known = self._boots.get(sender)
        if known == boot_epoch:
            return
        self._boots[sender] = boot_epoch
        if len(self._boots) > MAX_CERT_ASKED:
            self._boots.pop(next(iter(self._boots)))
        if known is not None and boot_epoch > known:
            for to in {source, self._resolve(sender)}:
                if to is not None:
                    self._wire.resend_cert(to)

    def _seal(self, payload: object, *, to: Address | None = None) -> bytes | None:
        """Encode and seal, or None if the payload cannot go on the wire (a bug of ours: it
        is counted and logged, never raised into the caller's loop). `to`: the destination
        of a datagram (it may get a reference to our certificate instead of a copy)."""
        try:
            msg_type, body = encode_payload(payload)
            return self._wire.seal(msg_type, body, self._clock(), to=to)
        except (TypeError, ValueError, OverflowError) as e:
            self.dropped["unsendable"] += 1
            self._count_error(type(payload).__name__, e, "")
            return None

    def _reply(self, payload: object) -> bytes:
        data = self._seal(payload)
        if data is None:
            payload = ErrorReply("the reply could not be encoded; see the peer's log")
            data = self._seal(payload)
        assert data is not None  # an ErrorReply always encodes
        self._count(payload, len(data))
        return data

    def _count(self, payload: object, size: int, copies: int = 1) -> None:
        kind = msg_type_of(payload).name
        self.sent[kind] += copies
        self.sent_bytes[kind] += size * copies

    def _address(self, target: Target) -> tuple[Address, str | None]:
        if isinstance(target, tuple):
            return target, None
        address = self._resolve(target)
        if address is None:
            raise UnknownMemberError(f"no member with id {target!r}; see `houndd status`")
        return address, target

    def _warn_once(self, key: tuple[str, str], msg: str, *args: object) -> None:
        if key in self._warned:
            log.debug(msg, *args)
            return
        if len(self._warned) < MAX_WARNED:
            self._warned.add(key)
        log.warning(msg, *args)
