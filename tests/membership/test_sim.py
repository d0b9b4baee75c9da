"""Many pure cores over a simulated lossy network (discrete events, no asyncio).

Each property runs over several seeds; a failure names the seed so it can be replayed with
`Simulation(n, seed, ...)`.
"""

from __future__ import annotations

import pytest

from houndd.config import lan
from houndd.membership.member import MemberState
from houndd.membership.sim import Simulation
from houndd.membership.suspicion import suspicion_timeout_s

CFG = lan()


def dead_marks(sim: Simulation, node_id: str) -> dict[str, float]:
    """observer -> first time it marked `node_id` dead."""
    out: dict[str, float] = {}
    for c in sim.changes:
        if c.node_id == node_id and c.new is MemberState.DEAD:
            out.setdefault(c.observer, c.time)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_fifty_nodes_converge_to_the_full_member_list(seed: int) -> None:
    sim = Simulation(50, seed)
    sim.join_all()
    sim.run_until(30.0, stop=sim.converged)
    assert sim.converged(), f"seed={seed}: not converged by t=30s"
    for i in range(50):
        assert len(sim.view(i)) == 50, f"seed={seed}: node {i} sees {len(sim.view(i))} members"


@pytest.mark.parametrize("seed", range(3))
def test_after_a_crash_every_other_node_marks_it_dead(seed: int) -> None:
    sim = Simulation(50, seed)
    sim.join_all()
    sim.run_until(30.0, stop=sim.converged)
    assert sim.converged(), f"seed={seed}"
    victim = sim.node_id(17)
    crash_at = sim.now
    sim.crash(17)
    # Bound: a few probe rounds to notice, at most the maximum suspicion timeout, then gossip.
    max_suspicion = CFG.suspicion_max_mult * suspicion_timeout_s(
        CFG.suspicion_mult, 50, CFG.probe_interval_s
    )
    deadline = crash_at + 5 * CFG.probe_interval_s + max_suspicion + 5.0
    sim.run_until(deadline, stop=lambda: len(dead_marks(sim, victim)) == 49)
    marks = dead_marks(sim, victim)
    missing = [i for i in range(50) if i != 17 and sim.node_id(i) not in marks]
    assert not missing, f"seed={seed}: nodes {missing} did not mark the crashed node dead"
    assert all(t > crash_at for t in marks.values()), f"seed={seed}"
    # Nobody else died on the way.
    others = [c for c in sim.changes if c.new is MemberState.DEAD and c.node_id != victim]
    assert not others, f"seed={seed}: healthy nodes declared dead: {others[:3]}"


@pytest.mark.parametrize("seed", range(32))
def test_ten_percent_loss_never_kills_a_healthy_node(seed: int) -> None:
    sim = Simulation(20, seed, loss=0.10, duplicate=0.02)
    sim.join_all()
    sim.run_until(30.0)
    dead = [c for c in sim.changes if c.new in (MemberState.DEAD, MemberState.LEFT)]
    assert not dead, f"seed={seed}: healthy nodes declared dead: {dead[:3]}"
    suspicions = sum(1 for c in sim.changes if c.new is MemberState.SUSPECT)
    assert suspicions > 0, f"seed={seed}: loss never even caused a suspicion; the test is too weak"


def test_partition_then_heal_reconverges_through_rejoin() -> None:
    seed = 3
    sim = Simulation(12, seed)
    sim.join_all()
    sim.run_until(20.0)
    assert sim.converged(), f"seed={seed}"
    sim.partition([range(6), range(6, 12)])
    sim.run_until(60.0)
    view = sim.view(0)
    assert all(view[sim.node_id(i)] is MemberState.DEAD for i in range(6, 12)), f"seed={seed}"
    sim.heal()
    # Discovery keeps offering seeds; a dead member's address is joinable again.
    sim.join_all(seed_node=6)
    sim.run_until(90.0, stop=sim.converged)
    assert sim.converged(), f"seed={seed}: no reconvergence after heal"
