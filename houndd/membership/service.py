"""`Membership`: the async shell around the pure `MemberTable`.

It moves bytes and time and nothing else: SWIM messages arrive from the `Bus` (opened,
authenticated and decoded there) and become events for the table; the table's actions become
sealed datagrams, push-pull requests and subscriber callbacks. The table runs on a monotonic
clock; only `last_heard`, when shown, is converted to wall-clock seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from houndd.config import Config
from houndd.errors import HounddError
from houndd.membership.bus import Bus, Message
from houndd.membership.member import Address, Member, MemberState
from houndd.membership.messages import PushPull, PushPullReply
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
    Tick,
    UpdateLocal,
)
from houndd.membership.transport import PeerError
from houndd.wire import schema
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.membership")

Subscriber = Callable[[Member, MemberState | None, MemberState], None]
"""Called with (member, old state or None when new, new state); ALIVE -> ALIVE is a metadata
change (labels, versions)."""

_SWIM_DATAGRAMS = (MsgType.PING, MsgType.PING_REQ, MsgType.ACK, MsgType.NACK, MsgType.GOSSIP)


def check_member(member: Member) -> None:
    """Raise ValueError (naming the field) if peers would refuse this record on the wire."""
    try:
        schema.decode(Member, schema.encode(member))
    except schema.SchemaError as e:
        raise ValueError(f"local member record: {e}") from None


class Membership:
    """Membership of this node in the cluster. The constructor does no IO. `run()` serves
    until cancelled; the daemon runs it (and the bus) in its TaskGroup and may call `leave()`
    first for a graceful departure."""

    def __init__(
        self,
        config: Config,
        bus: Bus,
        local: Member,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        check_member(local)
        self._config = config
        self._bus = bus
        self._clock = clock
        # The table runs on a monotonic clock: a wall-clock step (NTP) must neither stall
        # probing nor expire every suspicion at once.
        self._mono = monotonic
        self._table = MemberTable(config, local, rng or random.Random(), monotonic())
        self._subscribers: list[Subscriber] = []
        self._wake = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        bus.route_with(self._address_of)
        for msg_type in _SWIM_DATAGRAMS:
            bus.register(msg_type, self._on_swim, inline=True)
        bus.register(MsgType.PUSH_PULL, self._on_push_pull, inline=True)

    # --- queries ---

    @property
    def local(self) -> Member:
        """This node's own record."""
        return self._export(self._table.local)

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

    def by_name(self, name: str) -> Member | None:
        """The member with this name, preferring an alive one (names can be reused)."""
        found = [self._export(m) for m in self._table.members() if m.name == name]
        found.sort(key=lambda m: (m.state is not MemberState.ALIVE, -m.incarnation))
        return found[0] if found else None

    def subscribe(self, callback: Subscriber) -> None:
        """Call `callback(member, old, new)` on every state change."""
        self._subscribers.append(callback)

    def _export(self, m: Member) -> Member:
        """`last_heard` moved from the table's monotonic clock to wall-clock seconds."""
        return m.replace(last_heard=self._clock() - (self._mono() - m.last_heard))

    def _address_of(self, node_id: str) -> Address | None:
        member = self._table.get(node_id)
        return None if member is None else member.address

    # --- lifecycle ---

    async def run(self) -> None:
        """The SWIM timer loop (probe, gossip, push-pull; the table jitters each of them),
        until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                while True:
                    await self._apply(self._handle(Tick()))
                    delay = self._table.next_deadline() - self._mono()
                    self._wake.clear()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await self._wake.wait()
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
            results.append(await self._push_pull(address, self._table.state_payload(join=True)))

        async with asyncio.TaskGroup() as tg:
            for address in set(addresses):
                if address != self._bus.local_address:
                    tg.create_task(one(address))
        return sum(results)

    def add_candidate(self, address: Address) -> bool:
        """A hint from discovery: join `address` unless it is known or was tried recently.
        False if there was nothing to do (an alive member's address, or tried just now)."""
        if self._tg is None:
            return True
        actions = self._handle(JoinCandidate(address))
        if actions:
            self._tg.create_task(self._apply(actions))
        return bool(actions)

    def update_local(self, **fields: Any) -> None:
        """Change this node's metadata (labels, docker_version, free_disk_bytes, kernel, os);
        bumps its incarnation and gossips it. ValueError if peers would refuse the result.
        Subscribers hear of it as of a peer's metadata change (old state == new state)."""
        check_member(self._table.local.replace(**fields))
        self._handle(UpdateLocal(fields))
        self._wake.set()
        local = self._table.local
        self._notify(StateChanged(local, local.state, local.state))

    # --- internals ---

    def _handle(self, event: Event) -> list[Action]:
        return self._table.handle(event, self._mono())

    async def _on_swim(self, msg: Message) -> None:
        if msg.sender == self._bus.node_id:
            return
        await self._apply(self._handle(Received(msg.sender, msg.source, msg.payload)))
        self._wake.set()

    async def _on_push_pull(self, msg: Message) -> PushPullReply:
        reply = await self._apply(self._handle(Received(msg.sender, msg.source, msg.payload)))
        self._wake.set()
        assert reply is not None  # the table always answers a push-pull
        return reply.payload

    async def _apply(self, actions: list[Action]) -> Reply | None:
        reply = None
        for a in actions:
            if isinstance(a, Send):
                await self._bus.send(a.to, a.payload)
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

    async def _push_pull(self, address: Address, payload: PushPull) -> bool:
        try:
            env = await self._bus.request(address, payload)
        except PeerError as e:
            log.debug("push-pull failed addr=%s:%d err=%s", address[0], address[1], e)
            return False
        if env.sender == self._bus.node_id:
            return False  # a seed list naming this very node: not a join
        if not isinstance(env.payload, PushPullReply):
            log.debug("push-pull: unexpected reply type=%s", env.type.name)
            return False
        try:
            actions = self._handle(Received(env.sender, address, env.payload))
            await self._apply(actions)
        except HounddError as e:
            log.info("push-pull reply refused peer=%s err=%s", env.sender, e)
            return False
        self._wake.set()
        return True
