"""Discrete-event simulation of many `MemberTable`s over a lossy simulated network.

No asyncio and no wall clock: events sit in a heap ordered by simulated time, so hundreds of
nodes and minutes of protocol time run in well under a second of real time, and every run is
reproducible from its seed. Used by the membership tests and `bench/membership.py`.

Datagrams can be lost, delayed, duplicated (and so reordered by their random delays); requests
(push-pull, which rides HTTP/TCP in the daemon) are delayed but not lost. Crashed nodes and
partitioned links drop everything.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from houndd.config import Config, lan
from houndd.membership.member import Address, Member, MemberState
from houndd.membership.messages import SwimPayload
from houndd.membership.state import (
    Action,
    Event,
    JoinCandidate,
    MemberTable,
    Received,
    Reply,
    Request,
    Send,
    StateChanged,
    Tick,
)
from houndd.wire.codec import pack, unpack
from houndd.wire.payloads import decode_payload, encode_payload

P = TypeVar("P", bound=SwimPayload)


@dataclass(frozen=True)
class Change:
    """One `StateChanged` as observed by node `observer` at simulated time `time`."""

    time: float
    observer: str
    node_id: str
    old: MemberState | None
    new: MemberState


@dataclass
class _Node:
    table: MemberTable
    up: bool = True
    tick_at: float = float("inf")
    bytes_sent: int = 0
    messages_sent: int = 0


class Simulation:
    """`n` nodes named `node-<i>` at addresses `("10.0.<i/256>.<i%256>", 7480)`.

    `loss`, `duplicate` are datagram probabilities; `delay` a (low, high) one-way delay in
    seconds. `encode=True` round-trips every payload through the wire schema and msgpack
    (realistic byte counts; catches payloads peers would refuse) at some speed cost.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        config: Config | None = None,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.0005, 0.005),
        encode: bool = False,
    ) -> None:
        self.config = config or lan()
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.encode = encode
        self.now = 0.0
        self.changes: list[Change] = []
        self._heap: list[tuple[float, int, str, int, Any]] = []
        self._seq = 0
        self._groups: dict[int, int] | None = None
        self.nodes: list[_Node] = []
        self._by_address: dict[Address, int] = {}
        self._by_id: dict[str, int] = {}
        for i in range(n):
            member = Member(
                node_id=f"{i:016x}",
                name=f"node-{i}",
                host=f"10.0.{i // 256}.{i % 256}",
                port=7480,
                labels={"rack": str(i % 4)},
                kernel="6.1.0",
                os="Debian GNU/Linux 12",
                docker_version="24.0.7",
                free_disk_bytes=100 << 30,
            )
            table = MemberTable(self.config, member, random.Random(self.rng.random()), 0.0)
            self.nodes.append(_Node(table))
            self._by_address[member.address] = i
            self._by_id[member.node_id] = i
            self._schedule_tick(i)

    # --- control ---

    def node_id(self, i: int) -> str:
        """The node id of node `i`."""
        return self.nodes[i].table.local.node_id

    def join_all(self, seed_node: int = 0, *, spread_s: float = 1.0) -> None:
        """Every other node joins through `seed_node` at a random time in `[now, now+spread_s]`."""
        address = self.nodes[seed_node].table.local.address
        for i in range(len(self.nodes)):
            if i != seed_node:
                self._push(
                    self.now + self.rng.uniform(0, spread_s), "event", i, JoinCandidate(address)
                )

    def crash(self, i: int) -> None:
        """Node `i` stops: it sends nothing and receives nothing from now on."""
        self.nodes[i].up = False

    def partition(self, groups: Iterable[Iterable[int]]) -> None:
        """Only nodes in the same group can talk; nodes in no group are isolated."""
        self._groups = {}
        for g, members in enumerate(groups):
            for i in members:
                self._groups[i] = g

    def heal(self) -> None:
        """Undo `partition`."""
        self._groups = None

    def run_until(
        self, t: float, *, stop: Callable[[], bool] | None = None, check_every_s: float = 0.25
    ) -> None:
        """Process events up to simulated time `t`, or until `stop()` is true (checked every
        `check_every_s` of simulated time: properties are O(N^2), events are many)."""
        next_check = self.now
        while self._heap and self._heap[0][0] <= t:
            time, _, kind, i, data = heapq.heappop(self._heap)
            self.now = time
            node = self.nodes[i]
            if not node.up:
                continue
            if kind == "tick":
                if time != node.tick_at:
                    continue  # superseded by an earlier tick
                node.tick_at = float("inf")
                self._handle(i, Tick())
            elif kind == "request":
                event, requester = data
                self._handle(i, event, reply_to=requester)
            else:
                self._handle(i, data)
            if stop is not None and self.now >= next_check:
                if stop():
                    return
                next_check = self.now + check_every_s
        self.now = max(self.now, t)

    # --- properties ---

    def view(self, i: int) -> dict[str, MemberState]:
        """Node `i`'s belief: node id -> state."""
        return {m.node_id: m.state for m in self.nodes[i].table.members()}

    def converged(self, up_only: bool = True) -> bool:
        """Every up node sees every up node alive."""
        up = [i for i, n in enumerate(self.nodes) if n.up or not up_only]
        ids = {self.node_id(i) for i in up}
        alive = MemberState.ALIVE
        for i in up:
            table = self.nodes[i].table
            if any(table.state_of(x) is not alive for x in ids):
                return False
        return True

    def pending_updates(self) -> int:
        """Gossip updates still queued for retransmission on up nodes."""
        return sum(n.table.pending_updates() for n in self.nodes if n.up)

    def bytes_sent(self) -> int:
        """Total payload bytes of datagrams and requests sent (needs `encode=True`)."""
        return sum(n.bytes_sent for n in self.nodes)

    def messages_sent(self) -> int:
        """Total datagrams and requests sent."""
        return sum(n.messages_sent for n in self.nodes)

    # --- machinery ---

    def _push(self, t: float, kind: str, node: int, data: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, node, data))

    def _schedule_tick(self, i: int) -> None:
        node = self.nodes[i]
        t = max(self.now, node.table.next_deadline())
        if t < node.tick_at:
            node.tick_at = t
            self._push(t, "tick", i)

    def _linked(self, a: int, b: int) -> bool:
        if self._groups is None:
            return True
        ga, gb = self._groups.get(a), self._groups.get(b)
        return ga is not None and ga == gb

    def _handle(self, i: int, event: Event, reply_to: int | None = None) -> None:
        node = self.nodes[i]
        actions = node.table.handle(event, self.now)
        self._carry_out(i, actions, reply_to)
        self._schedule_tick(i)

    def _wire(self, i: int, payload: P) -> P:
        node = self.nodes[i]
        node.messages_sent += 1
        if not self.encode:
            return payload
        msg_type, body = encode_payload(payload)
        data = pack(body)
        node.bytes_sent += len(data)
        decoded: P = decode_payload(msg_type, unpack(data, len(data)))
        return decoded

    def _carry_out(self, i: int, actions: list[Action], reply_to: int | None) -> None:
        me = self.nodes[i].table.local
        for a in actions:
            if isinstance(a, StateChanged):
                self.changes.append(Change(self.now, me.node_id, a.member.node_id, a.old, a.new))
            elif isinstance(a, Send):
                payload = self._wire(i, a.payload)
                to = self._by_address.get(a.to)
                if to is None or not self._linked(i, to):
                    continue
                copies = 2 if self.rng.random() < self.duplicate else 1
                for _ in range(copies):
                    if self.rng.random() < self.loss:
                        continue
                    ev = Received(me.node_id, me.address, payload)
                    self._push(self.now + self.rng.uniform(*self.delay), "event", to, ev)
            elif isinstance(a, Request):
                payload = self._wire(i, a.payload)
                to = self._by_address.get(a.to)
                if to is None or not self._linked(i, to):
                    continue
                ev = Received(me.node_id, me.address, payload)
                self._push(self.now + self.rng.uniform(*self.delay), "request", to, (ev, i))
            elif isinstance(a, Reply) and reply_to is not None:
                payload = self._wire(i, a.payload)
                if not self._linked(i, reply_to):
                    continue
                ev = Received(me.node_id, me.address, payload)
                self._push(self.now + self.rng.uniform(*self.delay), "event", reply_to, ev)
