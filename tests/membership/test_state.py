"""Case tables for the pure SWIM core: fake clock, no sockets, no sleeps."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from houndd.config import local
from houndd.errors import WireError
from houndd.membership.member import Member, MemberState
from houndd.membership.messages import (
    Ack,
    Gossip,
    Nack,
    Ping,
    PingReq,
    PushPull,
    PushPullReply,
    Update,
)
from houndd.membership.state import (
    MAX_REFUTED_INCARNATION,
    Action,
    JoinCandidate,
    MemberTable,
    Received,
    Reply,
    Request,
    Send,
    StateChanged,
    Tick,
    UpdateLocal,
    alive_update,
    dead_update,
    suspect_update,
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
from houndd.wire.payloads import decode_payload
from houndd.wire.types import MsgType

CFG = local()
P = CFG.probe_interval_s


def member(i: int, inc: int = 0, **kw: Any) -> Member:
    return Member(
        node_id=f"id{i}", name=f"node-{i}", host="10.0.0.1", port=7000 + i, incarnation=inc, **kw
    )


def table(n_others: int = 2, *, seed: int = 1, now: float = 0.0) -> MemberTable:
    t = MemberTable(CFG, member(0), random.Random(seed), now)
    state = tuple(member(i) for i in range(1, n_others + 1))
    t.handle(Received("id1", ("10.0.0.1", 7001), PushPullReply(state)), now)
    return t


def gossip(t: MemberTable, updates: list[Update], now: float, sender: str = "id1") -> list[Action]:
    return t.handle(Received(sender, ("10.0.0.1", 7001), Gossip(tuple(updates))), now)


def changes(actions: list[Action]) -> list[tuple[str, MemberState | None, MemberState]]:
    return [(a.member.node_id, a.old, a.new) for a in actions if isinstance(a, StateChanged)]


def sends(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, Send) and isinstance(a.payload, kind)]


def run_probes(
    t: MemberTable, until: float, *, dead: set[str], now: float = 0.0
) -> tuple[float, list[Action]]:
    """Tick the table at its own deadlines; every member not in `dead` acks pings at once."""
    out: list[Action] = []
    while now < until:
        now = min(max(t.next_deadline(), now), until)
        acts = t.handle(Tick(), now)
        out.extend(acts)
        for s in sends(acts, Ping):
            target = s.payload.target
            if target not in dead:
                out.extend(t.handle(Received(target, s.to, Ack(s.payload.seq, ())), now))
        now += 1e-6
    return now, out


def test_new_members_from_gossip_are_alive_and_announced() -> None:
    t = MemberTable(CFG, member(0), random.Random(1), 0.0)
    acts = gossip(t, [alive_update(member(1)), alive_update(member(2))], 0.0)
    assert changes(acts) == [("id1", None, MemberState.ALIVE), ("id2", None, MemberState.ALIVE)]
    assert [m.node_id for m in t.alive()] == ["id0", "id1", "id2"]
    assert t.pending_updates() == 2  # both get re-gossiped


def test_alive_to_suspect_to_dead_without_acks() -> None:
    t = table(2)
    _, acts = run_probes(t, 5.0, dead={"id1"})
    got = [c for c in changes(acts) if c[0] == "id1"]
    assert got == [
        ("id1", MemberState.ALIVE, MemberState.SUSPECT),
        ("id1", MemberState.SUSPECT, MemberState.DEAD),
    ]
    # Probing went through the indirect path before suspecting.
    assert any(s.payload.target == "id1" for s in sends(acts, PingReq))
    assert t.get("id1").state is MemberState.DEAD  # type: ignore[union-attr]
    assert t.get("id2").state is MemberState.ALIVE  # type: ignore[union-attr]


def test_suspect_deadline_matches_the_formula_without_confirmations() -> None:
    t = table(2)
    acts = gossip(t, [suspect_update("id1", 0, "id2")], 10.0)
    assert changes(acts) == [("id1", MemberState.ALIVE, MemberState.SUSPECT)]
    s = t.suspicion("id1")
    assert s is not None
    n = 3
    assert s.min_s == pytest.approx(suspicion_timeout_s(CFG.suspicion_mult, n, P))
    # k = mult - 2 = 2 but only n - 2 = 1 other member could confirm: no shrinking, min timeout.
    assert s.k == 0 and s.deadline == pytest.approx(10.0 + s.min_s)
    assert changes(t.handle(Tick(), s.deadline - 1e-3)) == []
    assert changes(t.handle(Tick(), s.deadline)) == [("id1", MemberState.SUSPECT, MemberState.DEAD)]


@pytest.mark.parametrize(
    ("n", "expected_scale"),
    [(1, 1.0), (5, 1.0), (50, math.log10(51)), (500, math.log10(501))],
)
def test_suspicion_timeout_scales_with_log_n(n: int, expected_scale: float) -> None:
    assert suspicion_timeout_s(4.0, n, 1.0) == pytest.approx(4.0 * expected_scale)
    assert suspicion_timeout_s(4.0, n, 0.1) == pytest.approx(0.4 * expected_scale)


@pytest.mark.parametrize("n", [5, 50, 500])
def test_table_uses_suspicion_timeout_for_its_size(n: int) -> None:
    t = table(n - 1)
    gossip(t, [suspect_update("id1", 0, "id2")], 0.0)
    s = t.suspicion("id1")
    assert s is not None
    expected_min = suspicion_timeout_s(CFG.suspicion_mult, n, P)
    assert s.min_s == pytest.approx(expected_min)
    assert s.max_s == pytest.approx(CFG.suspicion_max_mult * expected_min)
    assert s.k == expected_confirmations(CFG.suspicion_mult, n) == 2
    assert s.timeout_s() == pytest.approx(s.max_s)  # Lifeguard: starts at the maximum


@pytest.mark.parametrize(
    ("confirmations", "expected"),
    [
        ([], 20.0),
        (["b"], 20.0 - 10.0 * math.log(2) / math.log(3)),
        (["b", "c"], 10.0),
        (["b", "c", "d"], 10.0),  # never below the minimum
        (["b", "b"], 20.0 - 10.0 * math.log(2) / math.log(3)),  # repeats do not count
        (["a"], 20.0),  # the first accuser does not confirm itself
    ],
)
def test_lifeguard_timeout_shrinks_with_independent_confirmations(
    confirmations: list[str], expected: float
) -> None:
    s = Suspicion(start=100.0, min_s=10.0, max_s=20.0, k=2, first_accuser="a")
    for c in confirmations:
        s.confirm(c)
    assert s.timeout_s() == pytest.approx(expected)
    assert s.deadline == pytest.approx(100.0 + expected)


def test_confirmations_from_gossip_bring_the_deadline_forward() -> None:
    t = table(9)
    gossip(t, [suspect_update("id1", 0, "id2")], 0.0)
    s = t.suspicion("id1")
    assert s is not None
    first = s.deadline
    gossip(t, [suspect_update("id1", 0, "id3")], 0.1)
    second = s.deadline
    gossip(t, [suspect_update("id1", 0, "id4")], 0.2)
    assert first > second > s.deadline == pytest.approx(s.min_s)
    assert changes(t.handle(Tick(), s.deadline)) == [("id1", MemberState.SUSPECT, MemberState.DEAD)]


def test_refutation_by_higher_incarnation_clears_suspicion() -> None:
    t = table(2)
    gossip(t, [suspect_update("id1", 0, "id2")], 0.0)
    acts = gossip(t, [alive_update(member(1, inc=1))], 0.5)
    assert changes(acts) == [("id1", MemberState.SUSPECT, MemberState.ALIVE)]
    assert t.suspicion("id1") is None
    assert changes(t.handle(Tick(), 100.0)) == []
    assert t.get("id1").incarnation == 1  # type: ignore[union-attr]


def test_a_suspected_node_refutes_with_a_higher_incarnation() -> None:
    t = table(2)
    assert t.local.incarnation == 0
    gossip(t, [suspect_update("id0", 0, "id1")], 0.0)
    assert t.local.incarnation == 1
    assert t.health_score == 1  # Lifeguard: being suspected is a hint we are slow
    # The refutation is piggybacked on the next message we send.
    acts = t.handle(Received("id1", ("10.0.0.1", 7001), Ping(7, "id0", ())), 0.1)
    (ack,) = sends(acts, Ack)
    assert ack.payload.seq == 7
    first = ack.payload.g[0]
    assert (first.kind, first.node_id, first.incarnation) == ("alive", "id0", 1)
    # A dead claim is refuted too; our own "left" is not.
    gossip(t, [dead_update("id0", 1, "id2")], 0.2)
    assert t.local.incarnation == 2


@pytest.mark.parametrize(
    ("update", "why"),
    [
        (suspect_update("id1", 2, "id2"), "suspect at an older incarnation"),
        (alive_update(member(1, inc=3)), "alive at the same incarnation"),
        (alive_update(member(1, inc=1)), "alive at an older incarnation"),
        (dead_update("id1", 2, "id2"), "dead at an older incarnation"),
    ],
)
def test_stale_incarnations_are_ignored(update: Update, why: str) -> None:
    t = table(2)
    gossip(t, [alive_update(member(1, inc=3))], 0.0)
    before = t.get("id1")
    acts = gossip(t, [update], 1.0, sender="id2")
    assert changes(acts) == [], why
    assert t.get("id1") == before, why


def test_dead_member_returns_only_with_a_higher_incarnation() -> None:
    t = table(2)
    gossip(t, [dead_update("id1", 0, "id2")], 0.0)
    assert t.get("id1").state is MemberState.DEAD  # type: ignore[union-attr]
    assert changes(gossip(t, [alive_update(member(1, inc=0))], 1.0)) == []
    assert changes(gossip(t, [alive_update(member(1, inc=1))], 2.0)) == [
        ("id1", MemberState.DEAD, MemberState.ALIVE)
    ]


def test_leaving_member_is_left_not_dead_and_reaped_later() -> None:
    t = table(2)
    acts = gossip(t, [dead_update("id2", 0, "id2")], 0.0)
    assert changes(acts) == [("id2", MemberState.ALIVE, MemberState.LEFT)]
    t.handle(Tick(), CFG.dead_reap_s - 1)
    assert t.get("id2") is not None
    t.handle(Tick(), CFG.dead_reap_s + 1)
    assert t.get("id2") is None


def test_each_update_is_piggybacked_retransmit_limit_times() -> None:
    t = table(3)
    limit = retransmit_limit(CFG.retransmit_mult, 4)
    assert limit == CFG.retransmit_mult * math.ceil(math.log10(5))
    t.handle(UpdateLocal({"labels": {"gpu": "true"}}), 0.0)
    assert t.local.incarnation == 1 and t.local.labels == {"gpu": "true"}
    carried = 0
    for i in range(3 * limit):
        acts = t.handle(Received("id1", ("10.0.0.1", 7001), Ping(i, "id0", ())), 0.0)
        (ack,) = sends(acts, Ack)
        carried += sum(1 for u in ack.payload.g if u.node_id == "id0")
    assert carried == limit


def test_metadata_change_is_reported_as_alive_to_alive() -> None:
    t = table(2)
    acts = gossip(t, [alive_update(member(1, inc=1, labels={"gpu": "true"}))], 0.0)
    assert changes(acts) == [("id1", MemberState.ALIVE, MemberState.ALIVE)]
    assert t.get("id1").labels == {"gpu": "true"}  # type: ignore[union-attr]


def test_indirect_probe_relays_ack_and_nacks_on_silence() -> None:
    t = table(2)
    req = PingReq(42, "id2", "10.0.0.1", 7002, ())
    acts = t.handle(Received("id1", ("10.0.0.1", 7001), req), 0.0)
    (ping,) = sends(acts, Ping)
    assert ping.to == ("10.0.0.1", 7002) and ping.payload.target == "id2"
    acts = t.handle(Received("id2", ping.to, Ack(ping.payload.seq, ())), 0.01)
    (ack,) = sends(acts, Ack)
    assert ack.to == ("10.0.0.1", 7001) and ack.payload.seq == 42
    # Second request, no answer from the target: NACK back after the probe timeout.
    t.handle(Received("id1", ("10.0.0.1", 7001), PingReq(43, "id2", "10.0.0.1", 7002, ())), 1.0)
    acts = t.handle(Tick(), 1.0 + CFG.probe_timeout_s)
    assert [s.payload.seq for s in sends(acts, Nack)] == [43]


def test_ping_for_another_node_id_is_not_acked() -> None:
    t = table(1)
    acts = t.handle(Received("id1", ("10.0.0.1", 7001), Ping(1, "someone-else", ())), 0.0)
    assert sends(acts, Ack) == []


def test_push_pull_replies_with_state_and_treats_remote_dead_as_suspect() -> None:
    t = table(2)
    remote = (member(1).replace(state=MemberState.DEAD), member(5))
    acts = t.handle(Received("id2", ("10.0.0.1", 7002), PushPull(True, remote)), 0.0)
    (reply,) = [a for a in acts if isinstance(a, Reply)]
    assert isinstance(reply.payload, PushPullReply)
    assert {m.node_id for m in reply.payload.members} == {"id0", "id1", "id2"}
    assert sorted(changes(acts)) == sorted(
        [("id1", MemberState.ALIVE, MemberState.SUSPECT), ("id5", None, MemberState.ALIVE)]
    )


def test_join_candidate_requests_push_pull_once_per_retry_interval() -> None:
    t = table(1)
    addr = ("10.0.0.9", 7480)
    (req,) = t.handle(JoinCandidate(addr), 0.0)
    assert isinstance(req, Request) and req.payload.join is True
    assert t.handle(JoinCandidate(addr), CFG.join_retry_s / 2) == []
    assert len(t.handle(JoinCandidate(addr), CFG.join_retry_s)) == 1
    # Known alive members and our own address are never re-joined.
    assert t.handle(JoinCandidate(member(1).address), 100.0) == []
    assert t.handle(JoinCandidate(member(0).address), 100.0) == []


ID = "00000000000000a3"
GOOD = schema.encode(alive_update(member(3).replace(node_id=ID)))


@pytest.mark.parametrize(
    "payload",
    [
        {"g": [{"s": "alive", "id": ID}]},
        {"g": [{**GOOD, "s": "zombie"}]},
        {"g": [{**GOOD, "s": "suspect", "m": None, "inc": -1}]},
        {"g": [{**GOOD, "m": {**GOOD["m"], "extra": 1}}]},
        {"g": [{**GOOD, "m": {**GOOD["m"], "port": 0}}]},
        {"g": [{**GOOD, "m": {**GOOD["m"], "host": "10.0.0.1\x00"}}]},
        {"g": [{**GOOD, "m": {**GOOD["m"], "inc": 1}}]},
        {"g": [{**GOOD, "s": "suspect", "m": None, "inc": 2**64 - 1}]},
        {"g": [{**GOOD, "s": "suspect", "m": None, "id": "not-a-node-id"}]},
        {"g": "nope"},
        {"g": [GOOD] * 257},
    ],
)
def test_malformed_gossip_is_refused_by_the_schema(payload: dict[str, Any]) -> None:
    with pytest.raises(WireError):
        decode_payload(MsgType.GOSSIP, payload)
    assert decode_payload(MsgType.GOSSIP, {"g": [GOOD]}) == Gossip((Update(**_fields(GOOD)),))


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    m = schema.decode(Member, raw["m"])
    return {"kind": "alive", "node_id": ID, "incarnation": 0, "by": ID, "member": m}


def test_same_seed_same_decisions() -> None:
    def trace(seed: int) -> list[Action]:
        t = table(5, seed=seed)
        return run_probes(t, 3.0, dead={"id3"})[1]

    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


def test_a_suspicion_at_an_absurd_incarnation_is_not_followed_past_the_wire_bound() -> None:
    # A cluster-key holder claims we are suspect at 2**64-1: following it would make our
    # refutation unencodable (it crashed the daemon) or refused by every peer.
    t = table(2)
    gossip(t, [suspect_update("id0", 2**64 - 1, "id1")], 0.0)
    assert t.local.incarnation == 0 and t.local.state is MemberState.ALIVE
    gossip(t, [suspect_update("id0", MAX_REFUTED_INCARNATION, "id1")], 0.1)
    assert t.local.incarnation == 0
    gossip(t, [suspect_update("id0", 5, "id1")], 0.2)  # an ordinary one is still refuted
    assert t.local.incarnation == 6
    acts = t.handle(Received("id1", ("10.0.0.1", 7001), Ping(1, "id0", ())), 0.3)
    (ack,) = sends(acts, Ack)
    pack(schema.encode(ack.payload))  # encodable (the old refutation overflowed here)
    assert all(u.incarnation <= MAX_COUNTER for u in ack.payload.g)


def test_member_version_travels_and_records_without_it_are_accepted() -> None:
    m = member(3, version="0.2.0").replace(node_id=ID)
    assert schema.decode(Member, schema.encode(m)) == m
    older = {k: v for k, v in schema.encode(m).items() if k != "ver"}  # gossiped by a 0.1 node
    assert schema.decode(Member, older).version == ""
    with pytest.raises(WireError, match=r"ver"):
        schema.decode(Member, {**schema.encode(m), "ver": "x" * 1000})
    with pytest.raises(WireError, match=r"ver"):
        schema.decode(Member, {**schema.encode(m), "ver": 2})


def test_a_probe_that_fails_after_the_target_came_back_suspects_nobody() -> None:
    """A member that restarts while we probe it (it announces a higher incarnation before
    the probe's deadline) is not suspected for the old incarnation's silence."""
    t = table(1)
    acts = t.handle(Tick(), P * 1.1)  # the probe of id1 starts
    assert sends(acts, Ping)
    gossip(t, [alive_update(member(1, inc=5))], P * 1.2)  # it rejoined, new incarnation
    acts = t.handle(Tick(), P * 2.2)  # the probe's deadline: no ack came
    assert changes(acts) == [] and t.get("id1").state is MemberState.ALIVE  # type: ignore[union-attr]
    # The next probe is of the new incarnation: its silence counts.
    acts = t.handle(Tick(), P * 3.3)
    assert changes(acts) == [("id1", MemberState.ALIVE, MemberState.SUSPECT)]
