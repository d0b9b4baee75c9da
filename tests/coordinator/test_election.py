"""Election case tables: timeouts, votes, pre-vote refusal, step-down, 2-node failover."""

from __future__ import annotations

import random

import pytest

from houndd.config import local
from houndd.coordinator.election import MAX_ADOPTED_TERM, Election, ElectionRecord, Role
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

# Pinned timings, so the tables below do not drift with the presets.
CFG = local(
    coordinator_timeout_s=0.4,
    election_timeout_min_s=0.05,
    election_timeout_max_s=0.2,
    heartbeat_interval_s=0.05,
    join_window_s=0.1,  # shorter than the boot wait: the tables below never see it
)


def make(
    node: str = "b", alive: set[str] | None = None, now: float = 0.0, **rec: object
) -> Election:
    e = Election(node, CFG, random.Random(7), now, ElectionRecord(**rec))  # type: ignore[arg-type]
    e.membership(alive if alive is not None else {"a", "c"}, now)
    return e


def sends(actions: list[Action], kind: type) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and isinstance(a.payload, kind)]


def reply(actions: list[Action]) -> VoteReply:
    (r,) = [a for a in actions if isinstance(a, Reply)]
    assert isinstance(r.payload, VoteReply)
    return r.payload


def run_until_candidate(e: Election, start: float, limit: float = 5.0) -> float:
    t = start
    while t < limit and e.role is Role.FOLLOWER:
        e.tick(t)
        t += 0.01
    return t


@pytest.mark.parametrize(
    ("heard_at", "tick_at", "expect_candidate"),
    [
        (0.0, 0.39, False),  # coordinator heard recently: never stand
        (0.0, 0.41, False),  # dead, but the randomized delay has not passed yet
        (0.0, 0.41 + CFG.election_timeout_max_s, True),  # dead and the delay passed
    ],
)
def test_timeouts(heard_at: float, tick_at: float, expect_candidate: bool) -> None:
    e = make(now=0.0)
    e.on_heartbeat("a", Heartbeat(1, "a"), heard_at)
    e.tick(0.41)  # notices the coordinator is dead; schedules the randomized election
    e.tick(tick_at)
    assert (e.role is Role.CANDIDATE) is expect_candidate


def test_boot_waits_a_coordinator_timeout_first() -> None:
    e = make(now=0.0)
    assert e.tick(CFG.coordinator_timeout_s - 0.01) == []
    assert e.role is Role.FOLLOWER


JOIN = CFG.replace(join_window_s=2.0)


def test_no_election_during_the_join_window_then_a_lone_node_coordinates() -> None:
    """Issue #9 item 9: nodes started together each elected themselves alone (electorate 1)
    before discovery had run, so two held term 1 at once."""
    e = Election("b", JOIN, random.Random(7), 0.0, ElectionRecord())
    e.membership(set(), 0.0)  # discovery has found nobody yet
    t = 0.0
    while t < JOIN.join_window_s:
        assert e.tick(t) == []
        assert e.role is Role.FOLLOWER
        assert e.next_wakeup() == JOIN.join_window_s
        t += 0.01
    t = run_until_candidate(e, t)
    assert e.role is Role.COORDINATOR and e.term == 1  # alone after the window: it coordinates
    assert t <= JOIN.join_window_s + JOIN.election_timeout_max_s + 0.02


def test_members_found_during_the_join_window_form_one_electorate() -> None:
    e = Election("b", JOIN, random.Random(7), 0.0, ElectionRecord())
    e.membership(set(), 0.0)
    e.tick(1.0)
    e.membership({"a", "c"}, 1.5)  # discovery found them inside the window
    run_until_candidate(e, 1.5)
    assert e.role is Role.CANDIDATE  # a majority of three is needed, not a vote of one
    assert e.electorate() == {"a", "b", "c"}


def test_a_coordinator_heard_during_the_join_window_is_followed() -> None:
    e = Election("b", JOIN, random.Random(7), 0.0, ElectionRecord())
    e.membership({"a"}, 0.0)
    e.on_heartbeat("a", Heartbeat(1, "a"), 0.5)
    assert e.coordinator(0.6) == "a"
    assert e.on_vote_request("c", VoteRequest(1, "c"), 0.7)[-1] == Reply(
        VoteReply(1, "b", False)
    )  # term 1 has its coordinator


def test_the_join_window_waits_for_the_first_discovery_round() -> None:
    e = Election("b", JOIN, random.Random(7), 0.0, ElectionRecord())
    e.wait_for_discovery()  # the daemon's discovery has not run yet (mDNS takes ~1 s to start)
    e.membership(set(), 0.0)
    assert run_until_candidate(e, 0.0, limit=10.0) >= 10.0  # nothing without discovery
    assert e.role is Role.FOLLOWER
    e.discovery_round_done(10.0)
    e.discovery_round_done(11.0)  # only the first round counts
    assert e.next_wakeup() == 10.0 + JOIN.join_window_s
    assert e.tick(10.0 + JOIN.join_window_s - 0.01) == []
    run_until_candidate(e, 10.0 + JOIN.join_window_s, limit=20.0)
    assert e.role is Role.COORDINATOR


def test_candidacy_persists_before_requesting_votes() -> None:
    e = make(now=0.0)
    t = run_until_candidate(e, 0.0)
    assert e.role is Role.CANDIDATE and e.term == 1 and e.voted_for == "b"
    assert t >= CFG.coordinator_timeout_s + CFG.election_timeout_min_s
    e2 = make(now=0.0)
    acts: list[Action] = []
    t = 0.0
    while not acts or not sends(acts, VoteRequest):
        acts = e2.tick(t)
        t += 0.01
    assert isinstance(acts[0], Persist) and acts[0].records == (ElectionRecord(1, "b", 0, None),)
    assert {s.node_id for s in sends(acts, VoteRequest)} == {"a", "c"}


def test_one_vote_per_term() -> None:
    e = make(now=0.0)
    first = e.on_vote_request("a", VoteRequest(3, "a"), 1.0)
    assert isinstance(first[0], Persist) and first[0].records[0].voted_for == "a"
    assert reply(first).granted
    assert reply(e.on_vote_request("a", VoteRequest(3, "a"), 1.0)).granted  # idempotent retry
    assert not reply(e.on_vote_request("c", VoteRequest(3, "c"), 1.0)).granted
    assert reply(e.on_vote_request("c", VoteRequest(4, "c"), 1.0)).granted  # new term, new vote
    assert not reply(e.on_vote_request("a", VoteRequest(2, "a"), 1.0)).granted  # stale term


def test_pre_vote_refusal_while_coordinator_heard() -> None:
    e = make(now=0.0)
    e.on_heartbeat("a", Heartbeat(1, "a"), 0.5)
    acts = e.on_vote_request("c", VoteRequest(5, "c"), 0.6)
    assert not reply(acts).granted
    assert e.term == 1  # the flapping candidate's term is not even adopted
    assert not any(isinstance(a, Persist) for a in acts)
    # Once the coordinator is dead to this node, the vote is granted.
    assert reply(
        e.on_vote_request("c", VoteRequest(5, "c"), 0.5 + CFG.coordinator_timeout_s)
    ).granted


def test_pre_vote_uses_membership_too() -> None:
    e = make(now=0.0)
    e.on_heartbeat("a", Heartbeat(1, "a"), 0.5)
    e.membership({"c"}, 0.55)  # the failure detector says the coordinator is dead
    assert reply(e.on_vote_request("c", VoteRequest(2, "c"), 0.6)).granted


def test_vote_refused_for_a_term_that_already_has_a_coordinator() -> None:
    e = make(now=0.0)
    e.on_heartbeat("a", Heartbeat(3, "a"), 0.1)
    assert not reply(e.on_vote_request("c", VoteRequest(3, "c"), 5.0)).granted


def test_majority_of_seen_electorate_wins_and_heartbeats() -> None:
    e = make("b", alive={"a", "c", "d"}, now=0.0)
    e.on_heartbeat("d", Heartbeat(1, "d"), 0.0)
    e.membership({"a", "c"}, 0.1)  # coordinator d seen dead: electorate {a, b, c}
    run_until_candidate(e, 0.1)
    assert e.electorate() == frozenset({"a", "b", "c"})
    acts = e.on_vote_reply("a", VoteReply(e.term, "a", True), 1.0)
    assert e.role is Role.COORDINATOR and e.highest_term == e.term and e.accepted == "b"
    assert isinstance(acts[0], Persist)
    assert {s.node_id for s in sends(acts, Heartbeat)} == {"a", "c"}
    hb = e.tick(1.0 + CFG.heartbeat_interval_s)
    assert len(sends(hb, Heartbeat)) == 2


def test_no_win_without_majority() -> None:
    e = make("b", alive={"a", "c", "d", "e"}, now=0.0)
    run_until_candidate(e, 0.0)
    e.on_vote_reply("a", VoteReply(e.term, "a", True), 1.0)
    assert e.role is Role.CANDIDATE  # 2 of 5
    e.on_vote_reply("c", VoteReply(e.term, "c", False), 1.0)
    assert e.role is Role.CANDIDATE
    e.on_vote_reply("d", VoteReply(e.term, "d", True), 1.0)
    assert e.role is Role.COORDINATOR  # 3 of 5


def test_two_node_failover_to_the_survivor() -> None:
    e = make("b", alive={"a"}, now=0.0)
    e.on_heartbeat("a", Heartbeat(1, "a"), 0.0)
    e.membership(set(), 0.2)  # a died
    t = run_until_candidate(e, 0.2)
    assert e.role is Role.COORDINATOR and e.term == 2  # electorate {b}: wins alone
    assert t < 0.2 + CFG.election_timeout_max_s + 0.02
    # Heartbeat silence alone (membership still says alive) also excludes the old coordinator.
    f = make("b", alive={"a"}, now=0.0)
    f.on_heartbeat("a", Heartbeat(1, "a"), 0.0)
    run_until_candidate(f, 0.0)
    assert f.role is Role.COORDINATOR


@pytest.mark.parametrize("role_setup", ["candidate", "coordinator"])
def test_step_down_on_higher_term(role_setup: str) -> None:
    e = make("b", alive=set(), now=0.0)  # alone: wins with its own vote
    run_until_candidate(e, 0.0)
    if role_setup == "candidate":
        e = make("b", alive={"a", "c"}, now=0.0)
        run_until_candidate(e, 0.0)
        assert e.role is Role.CANDIDATE
    else:
        assert e.role is Role.COORDINATOR
    acts = e.on_heartbeat("c", Heartbeat(e.term + 5, "c"), 2.0)
    assert e.role is Role.FOLLOWER and e.highest_term == e.term and e.accepted == "c"
    assert isinstance(acts[0], Persist)


def test_fencing_refuses_lower_terms_and_other_coordinators() -> None:
    e = make(now=0.0)
    acts, ok = e.admit(5, "a", 0.1)
    assert ok and isinstance(acts[0], Persist)
    assert e.admit(5, "a", 0.2) == ([], True)
    acts, ok = e.admit(4, "c", 0.3)
    assert not ok and sends(acts, Fenced)[0].payload == Fenced(5, "a")
    acts, ok = e.admit(5, "c", 0.3)
    assert not ok and sends(acts, Fenced)[0].payload == Fenced(5, "a")
    assert e.highest_term == 5 and e.accepted == "a"


def test_stale_coordinator_steps_down_when_fenced() -> None:
    e = make("b", alive=set(), now=0.0)
    run_until_candidate(e, 0.0)
    assert e.role is Role.COORDINATOR
    e.on_fenced("a", Fenced(e.term + 2, "c"), 1.0)
    assert e.role is Role.FOLLOWER and e.term >= 3


@pytest.mark.parametrize(
    ("me", "other", "expect"), [("b", "c", Role.FOLLOWER), ("c", "b", Role.CANDIDATE)]
)
def test_same_term_coordinators_meet(me: str, other: str, expect: Role) -> None:
    """Smaller id steps down; larger id moves to a new term so everyone can accept it."""
    e = make(me, alive=set(), now=0.0)  # each won term 1 alone, in its own partition
    run_until_candidate(e, 0.0)
    assert e.role is Role.COORDINATOR and e.term == 1
    e.membership({other, "z"}, 1.0)
    e.on_heartbeat(other, Heartbeat(1, other), 1.0)
    assert e.role is expect
    if expect is Role.CANDIDATE:
        assert e.term == 2


def test_terms_without_room_for_another_election_are_ignored() -> None:
    # One heartbeat at the wire's bound used to be adopted; every later election then needed a
    # term peers refuse, and the cluster never had a coordinator again.
    e = make("b", now=0.0)
    assert e.on_heartbeat("a", Heartbeat(MAX_ADOPTED_TERM + 1, "a"), 0.1) == []
    assert e.admit(MAX_ADOPTED_TERM + 1, "a", 0.1) == ([], False)
    assert e.on_vote_request("a", VoteRequest(MAX_ADOPTED_TERM + 1, "a"), 0.1) == []
    assert e.on_fenced("a", Fenced(MAX_ADOPTED_TERM + 1, "a"), 0.1) == []
    assert e.on_vote_reply("a", VoteReply(MAX_ADOPTED_TERM + 1, "a", True), 0.1) == []
    assert e.term == 0 and e.highest_term == 0
    acts = e.on_heartbeat("a", Heartbeat(MAX_ADOPTED_TERM, "a"), 0.2)
    assert isinstance(acts[0], Persist) and e.highest_term == MAX_ADOPTED_TERM
