"""The pure SWIM core: `MemberTable.handle(event, now) -> list[Action]`.

No IO, no asyncio, no clock: the caller passes `now` and a seeded `random.Random`, and carries
out the returned actions (send a datagram, make a request, reply, notify subscribers). The same
table runs inside the async `Membership` shell and inside the discrete-event simulation.

Protocol (memberlist/Lifeguard model):

- one probe per probe interval, randomized round-robin over the other members: PING, and after
  the probe timeout PING_REQ to `indirect_probes` others, who PING the target and relay its ACK
  (or send NACK when they hear nothing, which tells us our own network is fine);
- no ACK by the end of the interval: the target becomes suspect; suspicion timers follow
  `suspicion.Suspicion` (Lifeguard), a suspect that hears of it refutes with a higher incarnation;
- every state change is an update piggybacked on outgoing messages and on gossip rounds, each
  sent `retransmit_limit` times;
- periodic push-pull: a full state exchange with one random member (also how nodes join).

Messages are the typed payloads of `houndd.membership.messages` (Ping, PingReq, Ack, Nack,
Gossip, PushPull, PushPullReply), already decoded and bounded by the wire schema; the gossip
unit is `Update`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from houndd.config import Config
from houndd.membership.member import Address, Member, MemberState
from houndd.membership.messages import (
    MAX_UPDATES_PER_MESSAGE,
    Ack,
    Gossip,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullReply,
    SwimPayload,
    Update,
)
from houndd.membership.suspicion import (
    Suspicion,
    expected_confirmations,
    retransmit_limit,
    suspicion_timeout_s,
)
from houndd.wire import schema
from houndd.wire.codec import pack
from houndd.wire.fields import MAX_COUNTER

log = logging.getLogger("houndd.membership")

# Lifeguard local health: our probe interval and timeout stretch by (1 + score) while we look
# like the slow one (missed NACKs, having to refute). The cap bounds the slowdown to 9x.
MAX_HEALTH_SCORE = 8
# Caps on what a peer can make us hold (per message: see houndd.membership.messages).
MAX_MEMBERS = 8192
MAX_RELAYS = 1024
MAX_JOIN_ATTEMPTS = 1024
# Refutations never go past this: a million local metadata changes of headroom below the
# wire's bound on incarnations.
MAX_REFUTED_INCARNATION = MAX_COUNTER - 2**20
# Push-pull with N members costs O(N) per exchange; above this size the interval grows with
# log2(N) like memberlist's pushPullScale so total sync traffic stays roughly flat.
PUSH_PULL_SCALE_THRESHOLD = 32
# Default piggyback budget per datagram: keeps a sealed gossip packet near one Ethernet MTU.
DEFAULT_PIGGYBACK_BYTES = 1024


_ACTIVE = frozenset({MemberState.ALIVE, MemberState.SUSPECT})


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed: run probes, timers, gossip rounds and push-pull when they are due."""


@dataclass(frozen=True)
class Received:
    """An authenticated SWIM message from node `sender`, which came from `source`.

    Push-pull requests arrive this way too; their answer is a `Reply` action.
    """

    sender: str
    source: Address
    payload: SwimPayload


@dataclass(frozen=True)
class JoinCandidate:
    """A possible peer address (seed, mDNS); joined by an authenticated push-pull."""

    address: Address


@dataclass(frozen=True)
class UpdateLocal:
    """Change this node's own metadata (labels, docker_version, free_disk_bytes, ...)."""

    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Leave:
    """This node is shutting down on purpose: announce it so peers mark it left, not dead."""


Event = Tick | Received | JoinCandidate | UpdateLocal | Leave


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send one datagram."""

    to: Address
    payload: SwimPayload


@dataclass(frozen=True)
class Request:
    """Send a request and feed the reply back as `Received` (used for push-pull)."""

    to: Address
    payload: PushPull


@dataclass(frozen=True)
class Reply:
    """Answer the request that is being handled."""

    payload: PushPullReply


@dataclass(frozen=True)
class StateChanged:
    """`member` moved from `old` (None: newly known) to `new`.

    `old == new == ALIVE` means an alive member's metadata (labels, versions) changed.
    """

    member: Member
    old: MemberState | None
    new: MemberState


Action = Send | Request | Reply | StateChanged


# --- updates (the gossip unit) -------------------------------------------------------------


def alive_update(member: Member) -> Update:
    """The gossip update saying `member` is alive at its incarnation."""
    m = member.replace(state=MemberState.ALIVE)
    return Update("alive", m.node_id, m.incarnation, m.node_id, m)


def suspect_update(node_id: str, incarnation: int, by: str) -> Update:
    """The gossip update saying `by` suspects `node_id` at `incarnation`."""
    return Update("suspect", node_id, incarnation, by, None)


def dead_update(node_id: str, incarnation: int, by: str) -> Update:
    """The gossip update saying `by` declared `node_id` dead (left, if `by == node_id`)."""
    return Update("dead", node_id, incarnation, by, None)


# --- internal state -----------------------------------------------------------------------


@dataclass
class _Probe:
    seq: int
    target: str
    incarnation: int  # the target's when the probe started
    started: float
    indirect_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass
class _Relay:
    requester: Address
    requester_seq: int
    deadline: float


@dataclass
class _Pending:
    update: Update
    size: int
    order: int
    transmits: int = 0


@dataclass
class _Stats:
    """Counters for tests, the benchmark and /metrics."""

    probes: int = 0
    probe_failures: int = 0
    refutations: int = 0
    ignored_stale: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class MemberTable:
    """SWIM membership as a pure state machine. See the module docstring.

    `handle(event, now)` is the only mutator; queries (`members()`, `get()`, `local`,
    `next_deadline()`) never change state. Timings come from `config`; randomness only from
    `rng`, so a seeded run is reproducible.
    """

    def __init__(
        self,
        config: Config,
        local: Member,
        rng: random.Random,
        now: float,
        *,
        max_piggyback_bytes: int = DEFAULT_PIGGYBACK_BYTES,
    ) -> None:
        self._config = config
        self._rng = rng
        self._local_id = local.node_id
        self._members: dict[str, Member] = {}
        self._active = 0  # members alive or suspect; kept in step by _put
        self._put(local.replace(state=MemberState.ALIVE, last_heard=now))
        # last_heard lives apart from the frozen records: it changes on every message, and
        # rebuilding a Member per datagram was the simulation's hottest path.
        self._heard: dict[str, float] = {}
        self._max_piggyback = max_piggyback_bytes
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._dead_since: dict[str, float] = {}
        self._queue: dict[str, _Pending] = {}
        self._order = 0
        self._seq = rng.randrange(1 << 30)
        self._health = 0
        self._join_tried: dict[Address, float] = {}
        self.stats = _Stats()
        # Staggered first rounds: identical hosts booting together must not probe in lockstep.
        self._next_probe_at = now + rng.uniform(0, config.probe_interval_s)
        self._next_gossip_at = now + rng.uniform(0, config.gossip_interval_s)
        self._next_push_pull_at = now + self._push_pull_interval() * rng.uniform(0.5, 1.0)

    # --- queries ---

    @property
    def local(self) -> Member:
        """This node's own record."""
        return self._members[self._local_id]

    def get(self, node_id: str) -> Member | None:
        """The member with this id, if known (any state)."""
        m = self._members.get(node_id)
        return None if m is None else self._view(m)

    def state_of(self, node_id: str) -> MemberState | None:
        """The state of `node_id`, if known (cheap: no copy)."""
        m = self._members.get(node_id)
        return None if m is None else m.state

    def members(self) -> list[Member]:
        """Every known member, this node included, sorted by name then id."""
        ms = sorted(self._members.values(), key=lambda m: (m.name, m.node_id))
        return [self._view(m) for m in ms]

    def _view(self, m: Member) -> Member:
        heard = self._heard.get(m.node_id)
        return m if heard is None or heard == m.last_heard else m.replace(last_heard=heard)

    def _put(self, m: Member) -> None:
        old = self._members.get(m.node_id)
        if old is not None and old.state in _ACTIVE:
            self._active -= 1
        if m.state in _ACTIVE:
            self._active += 1
        self._members[m.node_id] = m

    def alive(self) -> list[Member]:
        """Members currently alive, this node included."""
        return [m for m in self.members() if m.state is MemberState.ALIVE]

    def suspicion(self, node_id: str) -> Suspicion | None:
        """The running suspicion timer for `node_id`, if it is suspect."""
        return self._suspicions.get(node_id)

    @property
    def health_score(self) -> int:
        """Lifeguard local health: 0 is healthy; probing slows by (1 + score)."""
        return self._health

    def num_active(self) -> int:
        """Members alive or suspect, this node included (the N of the timing formulas)."""
        return self._active

    def pending_updates(self) -> int:
        """Updates still waiting to be retransmitted."""
        return len(self._queue)

    def next_deadline(self) -> float:
        """The earliest time at which `Tick` has something to do."""
        times = [self._next_probe_at, self._next_push_pull_at]
        if self.pending_updates():
            # Piggyback-only gossip rounds have nothing to carry at rest: no timer for them.
            times.append(self._next_gossip_at)
        if self._probe is not None:
            times.append(self._probe.deadline)
            if not self._probe.indirect_sent:
                times.append(self._probe.indirect_at)
        times.extend(r.deadline for r in self._relays.values())
        times.extend(s.deadline for s in self._suspicions.values())
        return min(times)

    def state_payload(self, *, join: bool) -> PushPull:
        """Our full state for a push-pull request."""
        return PushPull(join, self._state())

    def state_reply(self) -> PushPullReply:
        """Our full state, answering a push-pull."""
        return PushPullReply(self._state())

    def _state(self) -> tuple[Member, ...]:
        return tuple(self._members.values())

    # --- the one mutator ---

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event; return what the caller must do."""
        out: list[Action] = []
        if isinstance(event, Tick):
            self._tick(now, out)
        elif isinstance(event, Received):
            self._received(event, now, out)
        elif isinstance(event, JoinCandidate):
            self._join_candidate(event.address, now, out)
        elif isinstance(event, UpdateLocal):
            self._update_local(event.fields)
        elif isinstance(event, Leave):
            self._leave(out)
        return out

    # --- timers ---

    def _tick(self, now: float, out: list[Action]) -> None:
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.indirect_at:
            self._send_indirect(probe, out)
        if probe is not None and now >= probe.deadline:
            self._probe_failed(probe, now, out)
        if now >= self._next_probe_at:
            if self._probe is not None:
                self._probe_failed(self._probe, now, out)
            self._start_probe(now, out)
        for seq in [s for s, r in self._relays.items() if now >= r.deadline]:
            relay = self._relays.pop(seq)
            # Lifeguard NACK: tells the requester that we are reachable but the target is
            # not, so it does not blame its own network.
            out.append(Send(relay.requester, Nack(relay.requester_seq, self._piggyback())))
        for node_id in [n for n, s in self._suspicions.items() if now >= s.deadline]:
            member = self._members[node_id]
            self._apply_dead(node_id, member.incarnation, self._local_id, now, out)
        if now >= self._next_gossip_at and self.pending_updates():
            self._next_gossip_at = now + self._config.gossip_interval_s * self._rng.uniform(
                0.9, 1.1
            )
            self._gossip(out)
        if now >= self._next_push_pull_at:
            self._next_push_pull_at = now + self._push_pull_interval() * self._rng.uniform(0.9, 1.1)
            peers = self._peers(states=(MemberState.ALIVE,))
            if peers:
                peer = self._rng.choice(peers)
                out.append(Request(peer.address, self.state_payload(join=False)))
        self._reap(now)

    def _scaled(self, seconds: float) -> float:
        return seconds * (1 + self._health)

    def push_pull_interval_s(self) -> float:
        """The current push-pull period: the configured one, stretched above 32 members."""
        return self._push_pull_interval()

    def _push_pull_interval(self) -> float:
        n = self.num_active()
        base = self._config.push_pull_interval_s
        if n <= PUSH_PULL_SCALE_THRESHOLD:
            return base
        return base * (math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1)

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node_id = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(node_id)
                if m is not None and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                    return m
            # End of the round: a fresh random order each round keeps detection time bounded
            # (every member is probed once per N intervals) without synchronizing prober pairs.
            self._probe_order = [
                n
                for n, m in self._members.items()
                if n != self._local_id and m.state in (MemberState.ALIVE, MemberState.SUSPECT)
            ]
            self._rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _start_probe(self, now: float, out: list[Action]) -> None:
        interval = self._scaled(self._config.probe_interval_s)
        self._next_probe_at = now + interval * self._rng.uniform(0.95, 1.05)
        target = self._next_target()
        if target is None:
            return
        self._seq += 1
        self._probe = _Probe(
            seq=self._seq,
            target=target.node_id,
            incarnation=target.incarnation,
            started=now,
            indirect_at=now + self._scaled(self._config.probe_timeout_s),
            deadline=self._next_probe_at,
        )
        self.stats.probes += 1
        extra = []
        if target.state is MemberState.SUSPECT:
            # Lifeguard buddy system: tell the suspect directly so it can refute at once.
            extra.append(suspect_update(target.node_id, target.incarnation, self._local_id))
        ping = Ping(self._seq, target.node_id, self._piggyback(extra))
        out.append(Send(target.address, ping))

    def _send_indirect(self, probe: _Probe, out: list[Action]) -> None:
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None:
            return
        helpers = [m for m in self._peers(states=(MemberState.ALIVE,)) if m.node_id != probe.target]
        chosen = self._rng.sample(helpers, min(self._config.indirect_probes, len(helpers)))
        probe.expected_nacks = len(chosen)
        for helper in chosen:
            req = PingReq(probe.seq, target.node_id, target.host, target.port, self._piggyback())
            out.append(Send(helper.address, req))

    def _probe_failed(self, probe: _Probe, now: float, out: list[Action]) -> None:
        self._probe = None
        self.stats.probe_failures += 1
        if probe.nacks < probe.expected_nacks:
            # Helpers we could not hear from: the problem may be on our side.
            self._health = min(MAX_HEALTH_SCORE, self._health + 1)
        target = self._members.get(probe.target)
        if target is None or target.state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return
        if target.incarnation > probe.incarnation:
            # It announced itself anew while we waited (it restarted, or refuted): the
            # silence was the old incarnation's, and says nothing of the new one.
            return
        # On a member already suspect this is our independent confirmation (Lifeguard).
        self._apply_suspect(target.node_id, target.incarnation, self._local_id, now, out)

    def _gossip(self, out: list[Action]) -> None:
        if not self._queue:
            return
        peers = self._peers(states=(MemberState.ALIVE, MemberState.SUSPECT))
        for peer in self._rng.sample(peers, min(self._config.gossip_fanout, len(peers))):
            updates = self._piggyback()
            if not updates:
                break
            out.append(Send(peer.address, Gossip(updates)))

    def _reap(self, now: float) -> None:
        for node_id in [
            n for n, t in self._dead_since.items() if now - t >= self._config.dead_reap_s
        ]:
            del self._dead_since[node_id]
            self._members.pop(node_id, None)
            self._heard.pop(node_id, None)
            self._queue.pop(node_id, None)

    def _peers(self, *, states: tuple[MemberState, ...]) -> list[Member]:
        return [m for n, m in self._members.items() if n != self._local_id and m.state in states]

    # --- dissemination ---

    def _enqueue(self, node_id: str, update: Update) -> None:
        # One pending update per member: a newer one makes the older one pointless.
        self._order += 1
        size = len(pack(schema.encode(update)))
        self._queue[node_id] = _Pending(update=update, size=size, order=self._order)

    def _piggyback(self, extra: Iterable[Update] = ()) -> tuple[Update, ...]:
        """`extra` plus as many pending updates as fit, least-sent and newest first."""
        g = list(extra)
        budget = self._max_piggyback
        if self._queue:
            limit = retransmit_limit(self._config.retransmit_mult, self.num_active())
            ranked = sorted(self._queue.items(), key=lambda kv: (kv[1].transmits, -kv[1].order))
            for node_id, pending in ranked:
                if pending.size > budget:
                    continue
                budget -= pending.size
                g.append(pending.update)
                pending.transmits += 1
                if pending.transmits >= limit:
                    del self._queue[node_id]
                if len(g) >= MAX_UPDATES_PER_MESSAGE:
                    break
        return tuple(g)

    # --- receiving ---

    def _received(self, ev: Received, now: float, out: list[Action]) -> None:
        payload = ev.payload
        sender = self._members.get(ev.sender)
        if sender is not None and ev.sender != self._local_id:
            self._heard[ev.sender] = now
        if isinstance(payload, PushPull | PushPullReply):
            if isinstance(payload, PushPull):
                # Answer with our state as it was, then merge: the joiner learns everyone.
                out.append(Reply(self.state_reply()))
            self._merge(payload.members, now, out)
            return
        for update in payload.g:
            self._apply_update(update, now, out)
        if isinstance(payload, Ping):
            if payload.target != self._local_id:
                return  # meant for whoever used to have our address
            out.append(Send(ev.source, Ack(payload.seq, self._piggyback())))
        elif isinstance(payload, PingReq):
            self._relay(ev.source, payload, now, out)
        elif isinstance(payload, Ack):
            probe = self._probe
            if probe is not None and payload.seq == probe.seq:
                self._probe = None
                self._health = max(0, self._health - 1)
            elif payload.seq in self._relays:
                relay = self._relays.pop(payload.seq)
                ack = Ack(relay.requester_seq, self._piggyback())
                out.append(Send(relay.requester, ack))
        elif (
            isinstance(payload, Nack) and self._probe is not None and payload.seq == self._probe.seq
        ):
            self._probe.nacks += 1

    def _relay(self, requester: Address, req: PingReq, now: float, out: list[Action]) -> None:
        if len(self._relays) >= MAX_RELAYS:
            return
        self._seq += 1
        self._relays[self._seq] = _Relay(
            requester=requester,
            requester_seq=req.seq,
            deadline=now + self._config.probe_timeout_s,
        )
        ping = Ping(self._seq, req.target, self._piggyback())
        out.append(Send((req.host, req.port), ping))

    def _merge(self, members: Iterable[Member], now: float, out: list[Action]) -> None:
        for m in members:
            if m.state is MemberState.ALIVE:
                self._apply_alive(m, now, out)
            elif m.state is MemberState.SUSPECT:
                if m.node_id not in self._members:
                    self._apply_alive(m.replace(state=MemberState.ALIVE), now, out)
                self._apply_suspect(m.node_id, m.incarnation, self._local_id, now, out)
            elif m.state is MemberState.LEFT:
                self._apply_dead(m.node_id, m.incarnation, m.node_id, now, out)
            else:
                # memberlist's rule: a remote "dead" is only a suspicion here, so one node's
                # stale view cannot kill a member we can still reach; our own timer decides.
                self._apply_suspect(m.node_id, m.incarnation, self._local_id, now, out)

    def _apply_update(self, u: Update, now: float, out: list[Action]) -> None:
        if u.kind == "alive":
            assert u.member is not None  # guaranteed by Update.__post_init__
            self._apply_alive(u.member, now, out)
        elif u.kind == "suspect":
            self._apply_suspect(u.node_id, u.incarnation, u.by, now, out)
        else:
            self._apply_dead(u.node_id, u.incarnation, u.by, now, out)

    # --- the SWIM rules ---

    def _refute(self, incarnation: int) -> None:
        local = self.local
        new_inc = max(local.incarnation, incarnation) + 1
        if new_inc > MAX_REFUTED_INCARNATION:
            # Only a buggy or hostile peer claims an incarnation of ours this high. Following
            # it would leave no room for our own updates before the wire bound, past which
            # every peer refuses our record: stay suspected by the liar instead.
            log.warning("refutation skipped: incarnation out of range inc=%d", incarnation)
            return
        self._put(local.replace(incarnation=new_inc, state=MemberState.ALIVE))
        self._enqueue(self._local_id, alive_update(self.local))
        self.stats.refutations += 1
        # Being suspected is a hint that we are the slow one (Lifeguard local health).
        self._health = min(MAX_HEALTH_SCORE, self._health + 1)

    def _apply_alive(self, m: Member, now: float, out: list[Action]) -> None:
        if m.node_id == self._local_id:
            local = self.local
            if m.incarnation < local.incarnation or (
                m.incarnation == local.incarnation and m.same_metadata(local)
            ):
                return
            # Someone holds a view of us at least as new as ours that differs (we restarted
            # and lost our incarnation): claim a newer one.
            self._refute(m.incarnation)
            return
        cur = self._members.get(m.node_id)
        if cur is None:
            if len(self._members) >= MAX_MEMBERS:
                return
            new = m.replace(state=MemberState.ALIVE, last_heard=now)
            self._put(new)
            # A random slot in the current round: a new member is probed within one round.
            pos = self._rng.randint(self._probe_index, len(self._probe_order))
            self._probe_order.insert(pos, m.node_id)
            self._enqueue(m.node_id, alive_update(new))
            out.append(StateChanged(self._view(new), None, MemberState.ALIVE))
            return
        if m.incarnation <= cur.incarnation:
            self.stats.ignored_stale += 1
            return
        new = m.replace(state=MemberState.ALIVE, last_heard=max(cur.last_heard, now))
        self._put(new)
        self._suspicions.pop(m.node_id, None)
        self._dead_since.pop(m.node_id, None)
        self._enqueue(m.node_id, alive_update(new))
        if cur.state is not MemberState.ALIVE:
            if m.node_id not in self._probe_order[self._probe_index :]:
                self._probe_order.append(m.node_id)
            out.append(StateChanged(self._view(new), cur.state, MemberState.ALIVE))
        elif not new.same_metadata(cur):
            out.append(StateChanged(self._view(new), MemberState.ALIVE, MemberState.ALIVE))

    def _apply_suspect(
        self, node_id: str, inc: int, by: str, now: float, out: list[Action]
    ) -> None:
        if node_id == self._local_id:
            if inc >= self.local.incarnation:
                self._refute(inc)
            return
        cur = self._members.get(node_id)
        if cur is None:
            return
        if inc < cur.incarnation:
            self.stats.ignored_stale += 1
            return
        if cur.state is MemberState.SUSPECT:
            susp = self._suspicions.get(node_id)
            if inc > cur.incarnation:
                self._put(cur.replace(incarnation=inc))
            if susp is not None and susp.confirm(by):
                # Re-gossip so others can count the confirmation too.
                self._enqueue(node_id, suspect_update(node_id, inc, by))
            return
        if cur.state is not MemberState.ALIVE:
            return  # dead or left: only a newer alive brings it back
        new = cur.replace(state=MemberState.SUSPECT, incarnation=inc)
        self._put(new)
        n = self.num_active()
        min_s = suspicion_timeout_s(self._config.suspicion_mult, n, self._config.probe_interval_s)
        self._suspicions[node_id] = Suspicion(
            start=now,
            min_s=min_s,
            max_s=self._config.suspicion_max_mult * min_s,
            k=expected_confirmations(self._config.suspicion_mult, n),
            first_accuser=by,
        )
        self._enqueue(node_id, suspect_update(node_id, inc, by))
        out.append(StateChanged(self._view(new), MemberState.ALIVE, MemberState.SUSPECT))

    def _apply_dead(self, node_id: str, inc: int, by: str, now: float, out: list[Action]) -> None:
        if node_id == self._local_id:
            if by != self._local_id and inc >= self.local.incarnation:
                self._refute(inc)
            return
        cur = self._members.get(node_id)
        if cur is None:
            return
        if inc < cur.incarnation:
            self.stats.ignored_stale += 1
            return
        if cur.state in (MemberState.DEAD, MemberState.LEFT):
            return
        state = MemberState.LEFT if by == node_id else MemberState.DEAD
        new = cur.replace(state=state, incarnation=inc)
        self._put(new)
        self._suspicions.pop(node_id, None)
        self._dead_since[node_id] = now
        self._enqueue(node_id, dead_update(node_id, inc, by))
        out.append(StateChanged(self._view(new), cur.state, state))

    # --- local operations ---

    def _join_candidate(self, address: Address, now: float, out: list[Action]) -> None:
        if address == self.local.address:
            return
        for m in self._members.values():
            if m.address == address and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                return
        last = self._join_tried.get(address)
        if last is not None and now - last < self._config.join_retry_s:
            return
        if len(self._join_tried) >= MAX_JOIN_ATTEMPTS:
            oldest = min(self._join_tried, key=self._join_tried.__getitem__)
            del self._join_tried[oldest]
        self._join_tried[address] = now
        out.append(Request(address, self.state_payload(join=True)))

    def _update_local(self, fields: Mapping[str, Any]) -> None:
        allowed = {
            "labels",
            "kernel",
            "os",
            "docker_version",
            "free_disk_bytes",
            "host",
            "port",
            "name",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"update_local: not local metadata: {sorted(unknown)}")
        local = self.local
        changes = dict(fields)
        if "labels" in changes:
            changes["labels"] = dict(changes["labels"])
        self._put(local.replace(**changes, incarnation=local.incarnation + 1))
        self._enqueue(self._local_id, alive_update(self.local))

    def _leave(self, out: list[Action]) -> None:
        local = self.local
        self._put(local.replace(state=MemberState.LEFT))
        update = dead_update(self._local_id, local.incarnation, self._local_id)
        self._enqueue(self._local_id, update)
        peers = self._peers(states=(MemberState.ALIVE, MemberState.SUSPECT))
        fanout = max(self._config.gossip_fanout, self._config.indirect_probes)
        for peer in self._rng.sample(peers, min(fanout, len(peers))):
            out.append(Send(peer.address, Gossip((update,))))
