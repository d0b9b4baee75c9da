"""`Membership`: the async shell around the pure `MemberTable`, and the node's message bus.

It moves bytes and time and nothing else: every incoming datagram or request is opened by the
`Wire` (unauthenticated, replayed or malformed bytes stop there), SWIM messages become events for
the table, and the table's actions become sealed datagrams, push-pull requests and subscriber
callbacks. Other subsystems (election heartbeats, plan replication, dispatch) `register` handlers
for their message types and use `send`, `request` and `broadcast`.

Cluster-wide operations ride the same bus: `keyring_op` (Serf's `keys install|use|remove|list`)
and `set_labels` (forwarded to the node that owns the labels).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from houndd.config import Config
from houndd.errors import HounddError, WireError
from houndd.membership.member import (
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    Address,
    Member,
    MemberState,
)
from houndd.membership.state import (
    Action,
    Event,
    JoinCandidate,
    Leave,
    MemberTable,
    Received,
    Reply,
    Request,
    Send,
    StateChanged,
    SwimMsg,
    Tick,
    UpdateLocal,
)
from houndd.membership.transport import PeerError, RemoteError, Transport
from houndd.wire.codec import Envelope
from houndd.wire.keyring import Keyring
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.membership")

Handler = Callable[[Envelope], Awaitable[tuple[MsgType, dict[str, Any]] | None]]
"""A bus handler: gets the opened envelope; its return value is the reply to a request
(ignored for datagrams); None answers a request with an empty ACK."""
Subscriber = Callable[[Member, MemberState | None, MemberState], None]
"""Called with (member, old state or None when new, new state); ALIVE -> ALIVE is a metadata
change (labels, versions)."""
Target = str | Address
"""A node id, or an address for a peer not (yet) in the table."""
KeyringOp = Literal["install", "use", "remove", "list"]

LABELS_FILE = "labels.json"
# Datagrams waiting for the receive loop; beyond this we drop (UDP semantics) rather than grow.
INBOX_SIZE = 4096
# Bus handlers for datagrams run concurrently up to this many; more are dropped. Caps the
# tasks a burst of authenticated datagrams can pile up behind a slow handler.
MAX_DATAGRAM_HANDLERS = 256
# Distinct sources we warn about once each; beyond this, refusals are only counted.
MAX_WARNED_SOURCES = 1024
_SWIM_DATAGRAMS = frozenset(
    {MsgType.PING, MsgType.PING_REQ, MsgType.ACK, MsgType.NACK, MsgType.GOSSIP}
)


class WireLike(Protocol):
    """What the shell needs from `houndd.wire.Wire`."""

    @property
    def node_id(self) -> str:
        """This node's id (derived from its identity key)."""
        ...

    @property
    def refused(self) -> Counter[str]:
        """Refused incoming messages by reason."""
        ...

    def seal(self, msg_type: MsgType, payload: Mapping[str, Any], now: float) -> bytes:
        """Envelope, sign and encrypt one message."""
        ...

    def open(self, data: bytes, now: float, *, max_size: int) -> Envelope:
        """Authenticate and decode one message; `WireError` on anything wrong."""
        ...


class UnknownMemberError(HounddError, LookupError):
    """No member with that id or name is known; check `houndd status`."""


class Membership:
    """Membership of this node in the cluster, plus the peer message bus.

    The constructor does no IO. `run()` serves until cancelled; the daemon runs it in its
    TaskGroup and may call `leave()` first for a graceful departure.
    """

    def __init__(
        self,
        config: Config,
        wire: WireLike,
        transport: Transport,
        local: Member,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self._config = config
        self._wire = wire
        self._transport = transport
        self._clock = clock
        # The table runs on a monotonic clock: a wall-clock step (NTP) must neither stall
        # probing nor expire every suspicion at once. The wire needs wall time (timestamps).
        self._mono = monotonic
        self._keyring = keyring
        self._table = MemberTable(config, local, rng or random.Random(), monotonic())
        self._handlers: dict[MsgType, Handler] = {
            MsgType.KEYRING_OP: self._on_keyring_op,
            MsgType.LABELS_SET: self._on_labels_set,
        }
        self._subscribers: list[Subscriber] = []
        self._inbox: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue(INBOX_SIZE)
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._running_handlers = 0
        self._warned: set[str] = set()
        self.dropped: Counter[str] = Counter()
        """Messages dropped by the shell, by reason (inbox_full, handlers_busy, no_handler)."""

    # --- queries ---

    @property
    def local(self) -> Member:
        """This node's own record."""
        return self._export(self._table.local)

    @property
    def table(self) -> MemberTable:
        """The pure core (read-only use: stats, suspicion timers)."""
        return self._table

    def members(self) -> list[Member]:
        """Every known member (any state), this node included."""
        return [self._export(m) for m in self._table.members()]

    def alive(self) -> list[Member]:
        """Alive members, this node included."""
        return [self._export(m) for m in self._table.alive()]

    def get(self, node_id: str) -> Member | None:
        """The member with this id, if known."""
        m = self._table.get(node_id)
        return None if m is None else self._export(m)

    def _export(self, m: Member) -> Member:
        """`last_heard` moved from the table's monotonic clock to wall-clock seconds."""
        return m.replace(last_heard=self._clock() - (self._mono() - m.last_heard))

    def by_name(self, name: str) -> Member | None:
        """The member with this name, preferring an alive one (names can be reused)."""
        found = [self._export(m) for m in self._table.members() if m.name == name]
        found.sort(key=lambda m: (m.state is not MemberState.ALIVE, -m.incarnation))
        return found[0] if found else None

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(member, old, new)` on every state change."""
        self._subscribers.append(callback)

    def register(self, msg_type: MsgType, handler: Handler) -> None:
        """Handle incoming `msg_type` datagrams and requests with `handler`."""
        if msg_type in _SWIM_DATAGRAMS or msg_type in (MsgType.PUSH_PULL, MsgType.PUSH_PULL_REPLY):
            raise ValueError(f"{msg_type.name} is membership's own message type")
        self._handlers[msg_type] = handler

    # --- lifecycle ---

    async def run(self) -> None:
        """Serve until cancelled: receive loop and the SWIM timer loop (probe, gossip,
        push-pull; the table jitters each of them)."""
        persisted = await asyncio.to_thread(load_labels, self._config.state_path)
        if persisted is not None and persisted != self.local.labels:
            self.update_local(labels=persisted)
        self._transport.serve(self._on_datagram, self._on_request)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._receive_loop())
                tg.create_task(self._timer_loop())
        finally:
            self._tg = None

    async def leave(self, timeout_s: float = 0.5) -> None:
        """Announce a graceful departure so peers mark us left instead of suspecting us."""
        await self._apply(self._handle(Leave()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                # One more gossip round carries the announcement to more members.
                while self._table.pending_updates():
                    await self._apply(self._handle(Tick()))
                    await asyncio.sleep(self._config.gossip_interval_s)

    # --- membership operations ---

    async def join(self, addresses: Iterable[Address]) -> int:
        """Push-pull with each address; returns how many answered (authenticated)."""
        results: list[bool] = []

        async def one(address: Address) -> None:
            payload = self._table.state_payload(join=True)
            results.append(await self._push_pull(address, payload))

        async with asyncio.TaskGroup() as tg:
            for address in set(addresses):
                if address != self._transport.local_address:
                    tg.create_task(one(address))
        return sum(results)

    def add_candidate(self, address: Address) -> None:
        """A hint from discovery: join `address` unless it is known or was tried recently."""
        if self._tg is None:
            return
        actions = self._handle(JoinCandidate(address))
        if actions:
            self._tg.create_task(self._apply(actions))

    def update_local(self, **fields: Any) -> None:
        """Change this node's metadata (labels, docker_version, free_disk_bytes, kernel, os);
        bumps its incarnation and gossips it."""
        self._handle(UpdateLocal(fields))
        self._wake.set()

    # --- the bus ---

    async def send(self, target: Target, msg_type: MsgType, payload: Mapping[str, Any]) -> None:
        """Send one sealed datagram (best effort) to a node id or address."""
        address, _ = self._resolve(target)
        data = self._wire.seal(msg_type, payload, self._clock())
        if address == self._transport.local_address:
            self._on_datagram(data, address)
            return
        if len(data) > self._config.max_udp_bytes:
            # Too big for one datagram (a plan with hundreds of items): the same sealed bytes
            # travel as a peer request instead, still best effort, without holding the caller.
            if self._tg is not None:
                self._tg.create_task(self._send_as_request(address, data))
            return
        await self._transport.send(address, data)

    async def _send_as_request(self, address: Address, data: bytes) -> None:
        try:
            await self._transport.request(address, data, self._config.peer_request_timeout_s)
        except HounddError as e:
            log.debug("oversize datagram not delivered peer=%s:%d error=%s", *address, e)

    async def broadcast(self, msg_type: MsgType, payload: Mapping[str, Any]) -> int:
        """Send one datagram to every other alive member; returns how many."""
        data = self._wire.seal(msg_type, payload, self._clock())
        peers = [m for m in self.alive() if m.node_id != self.local.node_id]
        for m in peers:
            await self._transport.send(m.address, data)
        return len(peers)

    async def request(
        self,
        target: Target,
        msg_type: MsgType,
        payload: Mapping[str, Any],
        timeout_s: float | None = None,
    ) -> Envelope:
        """Send a request and return the authenticated reply envelope.

        Raises `PeerTimeout`, `PeerError` (unreachable, refused, reply not authentic or from
        another node), `RemoteError` (the peer answered ERROR_REPLY), `UnknownMemberError`.
        """
        address, expect = self._resolve(target)
        timeout = timeout_s if timeout_s is not None else self._config.peer_request_timeout_s
        data = self._wire.seal(msg_type, payload, self._clock())
        peer = expect or f"{address[0]}:{address[1]}"
        if address == self._transport.local_address:
            raw = await asyncio.wait_for(self._on_request(data, address), timeout)
        else:
            raw = await self._transport.request(address, data, timeout)
        try:
            env = self._wire.open(raw, self._clock(), max_size=self._config.max_http_body_bytes)
        except WireError as e:
            raise PeerError(f"peer {peer}: reply refused: {e}") from None
        if expect is not None and env.sender != expect:
            raise PeerError(f"peer {peer}: reply came from node {env.sender}")
        if env.type is MsgType.ERROR_REPLY:
            reason = env.payload.get("error") if isinstance(env.payload, dict) else None
            raise RemoteError(peer, str(reason or "unspecified error"))
        return env

    # --- cluster-wide operations ---

    async def keyring_op(self, op: KeyringOp, key: bytes | None) -> dict[str, str | None]:
        """Apply a keyring operation on every alive member, this node last.

        Returns node name -> None (done) or the error. Removing the primary key is refused
        before anything is sent.
        """
        if op not in ("install", "use", "remove", "list"):
            raise ValueError(f"unknown keyring op {op!r}")
        if op != "list" and key is None:
            raise ValueError(f"keyring op {op} needs a key")
        if op == "remove" and self._keyring is not None and key == self._keyring.primary:
            raise KeyringOpError("refusing to remove the primary key; `use` another key first")
        replies = await self._keyring_all(op, key)
        return {name: err for name, (err, _) in replies.items()}

    async def keyring_fingerprints(self) -> dict[str, str | list[str]]:
        """Per node name: fingerprints of its installed keys (primary first), or the error.
        Keys themselves never leave a node in a reply."""
        replies = await self._keyring_all("list", None)
        return {name: (err if err is not None else fps) for name, (err, fps) in replies.items()}

    async def set_labels(self, node_name: str, labels: Mapping[str, str | None]) -> dict[str, str]:
        """Set (None: remove) labels of the node called `node_name`; that node persists and
        gossips them. Returns its resulting labels."""
        _check_label_changes(labels)
        member = self.by_name(node_name)
        if member is None:
            raise UnknownMemberError(f"no member named {node_name!r}; see `houndd status`")
        if member.node_id == self.local.node_id:
            return await self._apply_labels(labels)
        env = await self.request(member.node_id, MsgType.LABELS_SET, {"labels": dict(labels)})
        result = env.payload.get("labels") if isinstance(env.payload, dict) else None
        if not isinstance(result, dict):
            raise PeerError(f"peer {node_name}: malformed labels reply")
        return {str(k): str(v) for k, v in result.items()}

    # --- internals: the table ---

    def _handle(self, event: Event) -> list[Action]:
        return self._table.handle(event, self._mono())

    async def _apply(self, actions: list[Action]) -> Reply | None:
        reply = None
        for a in actions:
            if isinstance(a, Send):
                data = self._wire.seal(MsgType(a.msg), a.payload, self._clock())
                await self._transport.send(a.to, data)
            elif isinstance(a, Request):
                if self._tg is not None:
                    self._tg.create_task(self._push_pull(a.to, a.payload))
            elif isinstance(a, Reply):
                reply = a
            elif isinstance(a, StateChanged):
                self._notify(a)
        return reply

    def _notify(self, change: StateChanged) -> None:
        m = self._export(change.member)
        old = change.old.value if change.old else "none"
        log.info(
            "member state peer=%s id=%s addr=%s:%d old=%s new=%s inc=%d",
            m.name, m.node_id, m.host, m.port, old, change.new.value, m.incarnation,
        )  # fmt: skip
        for callback in list(self._subscribers):
            try:
                callback(m, change.old, change.new)
            except Exception:
                # A subscriber's bug must not stop failure detection for everyone else.
                log.exception("membership subscriber failed callback=%r", callback)

    async def _push_pull(self, address: Address, payload: dict[str, Any]) -> bool:
        try:
            env = await self.request(address, MsgType.PUSH_PULL, payload)
        except PeerError as e:
            log.debug("push-pull failed addr=%s:%d err=%s", address[0], address[1], e)
            return False
        if env.sender == self._wire.node_id:
            return False  # a seed list naming this very node: not a join
        if env.type is not MsgType.PUSH_PULL_REPLY or not isinstance(env.payload, dict):
            log.debug("push-pull: unexpected reply type=%s", env.type.name)
            return False
        try:
            actions = self._handle(
                Received(env.sender, address, SwimMsg.PUSH_PULL_REPLY, env.payload)
            )
        except WireError as e:
            self._warn_once(
                f"{address[0]}:pp", "malformed push-pull reply peer=%s err=%s", env.sender, e
            )
            return False
        await self._apply(actions)
        self._wake.set()
        return True

    async def _timer_loop(self) -> None:
        while True:
            await self._apply(self._handle(Tick()))
            delay = self._table.next_deadline() - self._mono()
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    # --- internals: incoming bytes ---

    def _on_datagram(self, data: bytes, source: Address) -> None:
        try:
            self._inbox.put_nowait((data, source))
        except asyncio.QueueFull:
            self.dropped["inbox_full"] += 1

    async def _receive_loop(self) -> None:
        while True:
            data, source = await self._inbox.get()
            await self._datagram(data, source)

    async def _datagram(self, data: bytes, source: Address) -> None:
        now = self._clock()
        try:
            env = self._wire.open(data, now, max_size=self._config.max_udp_bytes)
        except WireError as e:
            self._refused(source, e)
            return
        if env.type in _SWIM_DATAGRAMS:
            if env.sender == self.local.node_id:
                return
            try:
                actions = self._table.handle(
                    Received(env.sender, source, SwimMsg(env.type), env.payload), self._mono()
                )
            except WireError as e:
                self._warn_once(
                    source[0],
                    "malformed gossip peer=%s type=%s err=%s",
                    env.sender,
                    env.type.name,
                    e,
                )
                return
            await self._apply(actions)
            self._wake.set()
            return
        handler = self._handlers.get(env.type)
        if handler is None or self._tg is None:
            self.dropped["no_handler"] += 1
            return
        if self._running_handlers >= MAX_DATAGRAM_HANDLERS:
            self.dropped["handlers_busy"] += 1
            self._warn_once(
                "handlers", "bus handlers busy; dropping datagrams type=%s", env.type.name
            )
            return
        self._running_handlers += 1
        self._tg.create_task(self._run_handler(handler, env))

    async def _run_handler(self, handler: Handler, env: Envelope) -> None:
        try:
            reply = await handler(env)
            if reply is not None:
                # A reply to a datagram travels back as a datagram (e.g. a vote for a vote
                # request): the sender is a member, or the reply is best-effort lost.
                with contextlib.suppress(UnknownMemberError):
                    await self.send(env.sender, reply[0], reply[1])
        except HounddError as e:
            log.warning("bus handler refused type=%s peer=%s err=%s", env.type.name, env.sender, e)
        except Exception:
            log.exception("bus handler failed type=%s peer=%s", env.type.name, env.sender)
        finally:
            self._running_handlers -= 1

    async def _on_request(self, data: bytes, source: Address) -> bytes:
        now = self._clock()
        try:
            env = self._wire.open(data, now, max_size=self._config.max_http_body_bytes)
        except WireError as e:
            self._refused(source, e)
            raise
        if env.type is MsgType.PUSH_PULL:
            # May raise WireError for a malformed state: the route answers 400.
            actions = self._table.handle(
                Received(env.sender, source, SwimMsg.PUSH_PULL, env.payload), self._mono()
            )
            reply = await self._apply(actions)
            self._wake.set()
            assert reply is not None  # the table always answers a push-pull
            return self._wire.seal(MsgType(reply.msg), reply.payload, self._clock())
        handler = self._handlers.get(env.type)
        if handler is None:
            return self._error_reply(f"no handler for message type {env.type.name}")
        try:
            result = await handler(env)
        except HounddError as e:
            return self._error_reply(str(e))
        except Exception:
            log.exception("bus request handler failed type=%s peer=%s", env.type.name, env.sender)
            return self._error_reply("internal error; see the peer's log")
        if result is None:
            return self._wire.seal(MsgType.ACK, {}, self._clock())
        msg_type, payload = result
        return self._wire.seal(msg_type, payload, self._clock())

    def _error_reply(self, message: str) -> bytes:
        return self._wire.seal(MsgType.ERROR_REPLY, {"error": message}, self._clock())

    def _refused(self, source: Address, err: WireError) -> None:
        self._warn_once(source[0], "refused peer message source=%s err=%s", source[0], err)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key in self._warned:
            log.debug(msg, *args)
            return
        if len(self._warned) < MAX_WARNED_SOURCES:
            self._warned.add(key)
        log.warning(msg, *args)

    def _resolve(self, target: Target) -> tuple[Address, str | None]:
        if isinstance(target, tuple):
            return target, None
        member = self._table.get(target)
        if member is None:
            raise UnknownMemberError(f"no member with id {target!r}; see `houndd status`")
        return member.address, member.node_id

    # --- internals: keyring and labels ---

    async def _keyring_all(
        self, op: KeyringOp, key: bytes | None
    ) -> dict[str, tuple[str | None, list[str]]]:
        results: dict[str, tuple[str | None, list[str]]] = {}
        me = self.local

        async def remote(m: Member) -> None:
            try:
                env = await self.request(m.node_id, MsgType.KEYRING_OP, {"op": op, "key": key})
                results[m.name] = _keyring_reply(env.payload)
            except PeerError as e:
                results[m.name] = (str(e), [])

        # Peers first, this node last: for `use`, peers switch while we can still read their
        # replies under either key; for `remove`, we keep the key until they dropped it.
        async with asyncio.TaskGroup() as tg:
            for m in self.alive():
                if m.node_id != me.node_id:
                    tg.create_task(remote(m))
        results[me.name] = _keyring_reply(await self._keyring_local(op, key))
        return results

    async def _keyring_local(self, op: str, key: bytes | None) -> dict[str, Any]:
        if self._keyring is None:
            return {"error": "this node has no keyring configured", "keys": []}
        try:
            if op == "install" and key is not None:
                self._keyring.install(key)
            elif op == "use" and key is not None:
                self._keyring.use(key)
            elif op == "remove" and key is not None:
                self._keyring.remove(key)
            elif op != "list":
                return {"error": f"bad keyring op {op!r}", "keys": []}
            if op != "list":
                await asyncio.to_thread(self._keyring.save, self._config.cluster_key_path)
        except (HounddError, OSError) as e:
            return {"error": str(e), "keys": []}
        log.info("keyring op=%s applied", op)
        return {"error": None, "keys": [key_fingerprint(k) for k in self._keyring.list()]}

    async def _on_keyring_op(self, env: Envelope) -> tuple[MsgType, dict[str, Any]]:
        p = env.payload
        if not isinstance(p, dict) or set(p) != {"op", "key"}:
            raise WireError("keyring op: expected keys op, key")
        op, key = p["op"], p["key"]
        if op not in ("install", "use", "remove", "list") or not (
            key is None or isinstance(key, bytes)
        ):
            raise WireError("keyring op: bad op or key")
        return MsgType.KEYRING_REPLY, await self._keyring_local(op, key)

    async def _apply_labels(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        labels = dict(self.local.labels)
        for k, v in changes.items():
            if v is None:
                labels.pop(k, None)
            else:
                labels[k] = v
        if len(labels) > MAX_LABELS:
            raise LabelError(f"a node carries at most {MAX_LABELS} labels")
        await asyncio.to_thread(save_labels, self._config.state_path, labels)
        self.update_local(labels=labels)
        log.info("labels changed labels=%s", ",".join(f"{k}={v}" for k, v in labels.items()))
        return labels

    async def _on_labels_set(self, env: Envelope) -> tuple[MsgType, dict[str, Any]]:
        p = env.payload
        if not isinstance(p, dict) or set(p) != {"labels"} or not isinstance(p["labels"], dict):
            raise WireError("labels set: expected {labels: map}")
        changes: dict[str, str | None] = p["labels"]
        _check_label_changes(changes)
        return MsgType.LABELS_REPLY, {"labels": await self._apply_labels(changes)}


class KeyringOpError(HounddError, ValueError):
    """A cluster keyring operation was refused before it was sent."""


class LabelError(HounddError, ValueError):
    """Invalid label key or value; keys are 1..128 chars, values up to 256 chars."""


def key_fingerprint(key: bytes) -> str:
    """A public, non-reversible name for a cluster key (for `houndd keys list`)."""
    return hashlib.blake2b(key, digest_size=8, person=b"houndd-keyfp").hexdigest()


def _keyring_reply(payload: object) -> tuple[str | None, list[str]]:
    if not isinstance(payload, dict):
        return ("malformed keyring reply", [])
    err, keys = payload.get("error"), payload.get("keys")
    if err is not None and not isinstance(err, str):
        return ("malformed keyring reply", [])
    fps = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    return (err, fps)


def _check_label_changes(labels: Mapping[str, object]) -> None:
    if len(labels) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels per change")
    for k, v in labels.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_LABEL_KEY_CHARS:
            raise LabelError(f"label key {k!r}: expected 1..{MAX_LABEL_KEY_CHARS} characters")
        if v is not None and (not isinstance(v, str) or len(v) > MAX_LABEL_VALUE_CHARS):
            raise LabelError(f"label {k}: expected a string of at most {MAX_LABEL_VALUE_CHARS}")


def load_labels(state_dir: Path) -> dict[str, str] | None:
    """Labels persisted by `set_labels` (the full set), or None if never set."""
    path = state_dir / LABELS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable labels file path=%s err=%s", path, e)
        return None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        log.warning("ignoring malformed labels file path=%s", path)
        return None
    return data


def save_labels(state_dir: Path, labels: Mapping[str, str]) -> None:
    """Write `state_dir/labels.json` atomically (0644: labels are not secret)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".labels.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(labels), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, state_dir / LABELS_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
