"""Term-numbered coordinator election with fencing: a pure state machine.

Availability first (docs/guarantees.md): no quorum of the configured cluster is needed, only a
majority of the members the candidate currently sees alive, so a two-node cluster fails over to
the survivor and both sides of a partition keep warming images.

Persisted state (`ElectionRecord`): the current `term`, the vote cast in it (`voted_for`), and the
fencing record: the highest coordinator term accepted (`highest_term`) and the coordinator
accepted for it (`accepted`). Every method returns a list of actions; whenever that state
changes the list starts with `Persist(ElectionRecord)`, and the shell must make it durable before
carrying out any later action of the same list (a vote reply, a heartbeat). That ordering is what
makes "one vote per node per term" and "the accepted term never decreases" survive crashes.

Rules:

- Join window: no node stands before `join_window_s` has passed since its first discovery
  round (`discovery_round_done`; since its start if nobody calls it), so discovery can find the
  other members first; without it, nodes started together each saw an electorate of one and
  several held term 1 at once. A lone node still becomes coordinator after it.
- Pre-vote: a follower becomes a candidate only after it has itself heard no heartbeat from the
  accepted coordinator for `coordinator_timeout_s` (or its membership view has that coordinator
  dead), and then only after a randomized delay in [election_timeout_min_s,
  election_timeout_max_s]. A voter refuses (without adopting the candidate's term) while it hears
  a live coordinator other than the candidate, so a flapping node cannot depose a healthy one.
- One vote per node per term; a voter also refuses terms <= its fencing term (a coordinator
  already exists for that term).
- Electorate: the members the candidate sees alive plus itself, minus the coordinator it has seen
  dead. A strict majority of that set wins.
- Higher term wins whenever two meet. A message from a lower term is refused and answered with
  `Fenced(highest_term, accepted)` so a stale coordinator steps down at once.
- Two coordinators with the same term (possible only after a partition in which each side
  elected one) meet: the one with the smaller node id steps down; the larger one starts an
  election for a new term at once. Followers of the smaller one fence the larger one for that
  term, so the larger one must move to a new term for everyone to accept it.
- Fencing (`admit`): a coordinator message is accepted if its term is higher than the fencing
  term (adopted and persisted), or equal with the same coordinator. A refusal answers the
  sender with FENCED, which the shell counts.
- Terms above `MAX_ADOPTED_TERM` are ignored: adopting one would leave no room for the next
  elections below the wire's bound, so a single message from a buggy or hostile key holder
  could otherwise wedge every later election.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from enum import Enum, StrEnum

from houndd.config import Config
from houndd.coordinator.messages import (
    Action,
    Fenced,
    Heartbeat,
    Persist,
    Reply,
    Send,
    VoteReply,
    VoteRequest,
)
from houndd.wire.fields import MAX_COUNTER

log = logging.getLogger("houndd.coordinator")

MAX_ADOPTED_TERM = MAX_COUNTER - 2**20
"""The highest term a node adopts from a peer: a million elections of room below the bound
every peer checks terms against."""


class Role(StrEnum):
    """What this node currently is in the election."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    COORDINATOR = "coordinator"


@dataclass(frozen=True, slots=True)
class ElectionRecord:
    """The durable part of the election state."""

    term: int = 0
    voted_for: str | None = None
    highest_term: int = 0
    accepted: str | None = None


class Verdict(Enum):
    """Outcome of a fencing check."""

    ACCEPT = "accept"
    STALE = "stale"  # term lower than the fencing term
    OTHER = "other"  # same term, another coordinator was accepted for it


class Election:
    """The election state machine of one node. Pure: `now` passed in, randomness injected."""

    def __init__(
        self,
        node_id: str,
        config: Config,
        rng: random.Random,
        now: float,
        record: ElectionRecord | None = None,
    ) -> None:
        self.node_id = node_id
        self._cfg = config
        self._rng = rng
        rec = record or ElectionRecord()
        self.term = max(rec.term, rec.highest_term)
        self.voted_for = rec.voted_for if rec.term == self.term else None
        self.highest_term = rec.highest_term
        self.accepted = rec.accepted
        self.role = Role.FOLLOWER
        # After a (re)start, wait a full coordinator timeout before standing: an existing
        # coordinator gets its chance to be heard first.
        self._heard_at = now
        self._joined_at = now + config.join_window_s
        self._alive: set[str] | None = None
        self._election_at: float | None = None
        self._next_heartbeat_at = now
        self._votes: set[str] = set()
        self._electorate: frozenset[str] = frozenset()

    # --- queries ---------------------------------------------------------------------------

    @property
    def record(self) -> ElectionRecord:
        """The state to persist."""
        return ElectionRecord(self.term, self.voted_for, self.highest_term, self.accepted)

    @property
    def is_coordinator(self) -> bool:
        """True while this node acts as coordinator."""
        return self.role is Role.COORDINATOR

    def coordinator(self, now: float) -> str | None:
        """The coordinator this node currently hears (itself included), or None."""
        return self.accepted if self.coordinator_live(now) else None

    def coordinator_live(self, now: float) -> bool:
        """Whether the accepted coordinator is alive from this node's point of view."""
        if self.role is Role.COORDINATOR:
            return True
        if self.accepted is None or now >= self._heard_at + self._cfg.coordinator_timeout_s:
            return False
        return self.accepted == self.node_id or self._alive is None or self.accepted in self._alive

    def _pre_vote_ok(self, now: float) -> bool:
        """May this follower stand? Only once it has itself seen the coordinator dead, and
        not during the join window."""
        if now < self._joined_at or self.coordinator_live(now):
            return False
        dead_in_view = (
            self.accepted not in (None, self.node_id)
            and self._alive is not None
            and self.accepted not in self._alive
        )
        return dead_in_view or now >= self._heard_at + self._cfg.coordinator_timeout_s

    def electorate(self) -> frozenset[str]:
        """Members that vote in an election started now (see the module docstring)."""
        members = set(self._alive or ()) | {self.node_id}
        if self.accepted is not None and self.accepted != self.node_id:
            members.discard(self.accepted)
        return frozenset(members)

    def next_wakeup(self) -> float | None:
        """The earliest time `tick` has something to do (None: only on events)."""
        if self.role is Role.COORDINATOR:
            return self._next_heartbeat_at
        if self._election_at is not None:
            return self._election_at
        return max(self._heard_at + self._cfg.coordinator_timeout_s, self._joined_at)

    # --- events ----------------------------------------------------------------------------

    def wait_for_discovery(self) -> None:
        """Hold every election until `discovery_round_done`: mDNS alone takes about a second
        to start, so a window counted from the process start could end before discovery ran."""
        self._joined_at = math.inf

    def discovery_round_done(self, now: float) -> None:
        """Discovery has run once (mDNS up, seeds tried): the join window counts from here."""
        if self._joined_at == math.inf:
            self._joined_at = now + self._cfg.join_window_s

    def membership(self, alive: set[str], now: float) -> list[Action]:
        """The failure detector's view changed: `alive` are the other members seen alive."""
        self._alive = set(alive) - {self.node_id}
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: heartbeat, or stand for election when the coordinator is gone."""
        if self.role is Role.COORDINATOR:
            if now < self._next_heartbeat_at:
                return []
            self._next_heartbeat_at = now + self._cfg.heartbeat_interval_s
            return self._heartbeats()
        if self.role is Role.FOLLOWER and not self._pre_vote_ok(now):
            self._election_at = None
            return []
        if self._election_at is None:
            self._election_at = now + self._election_delay()
        if now < self._election_at:
            return []
        return self._stand(now)

    def on_heartbeat(self, sender: str, hb: Heartbeat, now: float) -> list[Action]:
        """A coordinator announced itself."""
        if sender != hb.coordinator or sender == self.node_id or hb.term > MAX_ADOPTED_TERM:
            return []
        actions, _ = self._admit(hb.term, hb.coordinator, now)
        return actions

    def admit(self, term: int, coordinator: str, now: float) -> tuple[list[Action], bool]:
        """Fencing check for any coordinator-originated message; True if it may be acted on.

        On False the actions include a `Fenced` notice to the sender; on a newly adopted term
        they start with `Persist`, which must be durable before the message is acted on.
        """
        if coordinator == self.node_id:
            # Our own message echoed back (e.g. by anti-entropy): fine only in our own term.
            ok = self.role is Role.COORDINATOR and term == self.term
            return [], ok
        if term > MAX_ADOPTED_TERM:
            return [], False
        return self._admit(term, coordinator, now)

    def on_fenced(self, sender: str, notice: Fenced, now: float) -> list[Action]:
        """Someone refused our coordinator message and told us its fencing record."""
        if notice.term > MAX_ADOPTED_TERM:
            return []
        if notice.term > self.highest_term:
            actions: list[Action] = []
            if notice.term > self.term:
                self.term, self.voted_for = notice.term, None
                actions.append(self._persist())
            if self.role is not Role.FOLLOWER:
                self._step_down(now, f"fenced by {sender} at term {notice.term}")
            return actions
        if (
            notice.term == self.term
            and self.role is Role.COORDINATOR
            and notice.coordinator != self.node_id
        ):
            return self._contested(notice.coordinator, now)
        return []

    def on_vote_request(self, sender: str, req: VoteRequest, now: float) -> list[Action]:
        """A candidate asks for our vote. The actions end with the `Reply`."""
        if req.candidate != sender or sender == self.node_id or req.term > MAX_ADOPTED_TERM:
            return []
        refuse: list[Action] = [Reply(VoteReply(self.term, self.node_id, False))]
        if req.term <= self.highest_term or req.term < self.term:
            return refuse
        if self.coordinator_live(now) and self.accepted != sender:
            # Pre-vote refusal: a live coordinator is heard; do not even adopt the term.
            return refuse
        actions: list[Action] = []
        if req.term > self.term:
            self.term, self.voted_for = req.term, None
            if self.role is not Role.FOLLOWER:
                self._step_down(now, f"vote request from {sender} for term {req.term}")
        granted = self.voted_for in (None, sender)
        if granted:
            self.voted_for = sender
            # Give the candidate time to win before we stand ourselves.
            self._election_at = now + self._election_delay()
        actions.append(self._persist())
        actions.append(Reply(VoteReply(self.term, self.node_id, granted)))
        return actions

    def on_vote_reply(self, sender: str, reply: VoteReply, now: float) -> list[Action]:
        """A voter answered."""
        if reply.voter != sender or reply.term > MAX_ADOPTED_TERM:
            return []
        if reply.term > self.term:
            self.term, self.voted_for = reply.term, None
            if self.role is not Role.FOLLOWER:
                self._step_down(now, f"{sender} is at term {reply.term}")
            return [self._persist()]
        if self.role is not Role.CANDIDATE or reply.term != self.term or not reply.granted:
            return []
        self._votes.add(sender)
        return self._maybe_win(now)

    # --- internals ---------------------------------------------------------------------------

    def _admit(self, term: int, coordinator: str, now: float) -> tuple[list[Action], bool]:
        verdict = self._verdict(term, coordinator)
        if verdict is Verdict.ACCEPT:
            actions: list[Action] = []
            if term > self.highest_term:
                if self.role is not Role.FOLLOWER:
                    self._step_down(now, f"{coordinator} coordinates term {term}")
                if term > self.term:
                    self.term, self.voted_for = term, None
                self.highest_term, self.accepted = term, coordinator
                actions.append(self._persist())
                log.info("coordinator accepted coordinator=%s term=%d", coordinator, term)
            elif self.role is Role.CANDIDATE:
                self._step_down(now, f"{coordinator} still coordinates term {term}")
            self._heard_at = now
            self._election_at = None
            return actions, True
        if verdict is Verdict.OTHER and self.role is Role.COORDINATOR:
            return self._contested(coordinator, now), False
        notice = Fenced(self.highest_term, self.accepted or "")
        return [Send(coordinator, notice)], False

    def _verdict(self, term: int, coordinator: str) -> Verdict:
        if term > self.highest_term:
            return Verdict.ACCEPT
        if term < self.highest_term:
            return Verdict.STALE
        return Verdict.ACCEPT if coordinator == self.accepted else Verdict.OTHER

    def _contested(self, other: str, now: float) -> list[Action]:
        """Another coordinator holds our term: smaller id steps down, larger re-elects."""
        if self.node_id < other:
            self._step_down(now, f"{other} also coordinates term {self.term}")
            return []
        log.warning("coordinator term contested other=%s term=%d", other, self.term)
        return self._stand(now)

    def _stand(self, now: float) -> list[Action]:
        self.role = Role.CANDIDATE
        self.term = max(self.term, self.highest_term) + 1
        self.voted_for = self.node_id
        self._votes = {self.node_id}
        self._electorate = self.electorate()
        self._election_at = now + self._election_delay()
        log.info("election started term=%d electorate=%d", self.term, len(self._electorate))
        actions: list[Action] = [self._persist()]
        request = VoteRequest(self.term, self.node_id)
        actions.extend(Send(n, request) for n in sorted(self._electorate - {self.node_id}))
        actions.extend(self._maybe_win(now))
        return actions

    def _maybe_win(self, now: float) -> list[Action]:
        if len(self._votes & self._electorate) * 2 <= len(self._electorate):
            return []
        self.role = Role.COORDINATOR
        self.highest_term, self.accepted = self.term, self.node_id
        self._heard_at = now
        self._election_at = None
        self._next_heartbeat_at = now + self._cfg.heartbeat_interval_s
        log.info("became coordinator term=%d votes=%d", self.term, len(self._votes))
        return [self._persist(), *self._heartbeats()]

    def _step_down(self, now: float, why: str) -> None:
        if self.role is Role.COORDINATOR:
            log.info("coordinator stepping down term=%d reason=%s", self.term, why)
        self.role = Role.FOLLOWER
        self._votes = set()
        self._heard_at = now
        self._election_at = None

    def _heartbeats(self) -> list[Action]:
        hb = Heartbeat(self.term, self.node_id)
        return [Send(n, hb) for n in sorted(self._alive or ())]

    def _election_delay(self) -> float:
        return self._rng.uniform(self._cfg.election_timeout_min_s, self._cfg.election_timeout_max_s)

    def _persist(self) -> Persist:
        return Persist((self.record,))
