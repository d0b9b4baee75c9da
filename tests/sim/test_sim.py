"""Seeded simulation: G1-G4 properties over many fault schedules.

`HOUNDD_SIM_SEEDS` sets the number of schedules (default 10,000, run on two processes);
a failure prints the seed and its replay command.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import statistics

import pytest

from houndd.sim import Violation, failover_time, run_seed
from houndd.sim.cluster import Cluster

SEEDS = int(os.environ.get("HOUNDD_SIM_SEEDS", "10000"))
BASE = int(os.environ.get("HOUNDD_SIM_BASE", "0"))


def _chunk(bounds: tuple[int, int]) -> tuple[int, list[str]]:
    logging.disable(logging.WARNING)  # a chaos run logs thousands of expected warnings
    failures: list[str] = []
    ran = 0
    for seed in range(*bounds):
        try:
            run_seed(seed)
        except Violation as e:
            failures.append(str(e))
        ran += 1
    return ran, failures


def test_many_seeded_schedules() -> None:
    workers = 2
    step = max(1, SEEDS // (workers * 8))
    chunks = [(s, min(s + step, BASE + SEEDS)) for s in range(BASE, BASE + SEEDS, step)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        outcomes = pool.map(_chunk, chunks)
    ran = sum(r for r, _ in outcomes)
    failures = [f for _, fs in outcomes for f in fs]
    assert ran == SEEDS
    assert not failures, f"{len(failures)} failing seeds, first ones:\n" + "\n".join(failures[:5])


def test_replay_is_deterministic() -> None:
    a, b = run_seed(1234), run_seed(1234)
    assert (a.events, a.acked_plans, a.coordinators) == (b.events, b.acked_plans, b.coordinators)


def test_without_faults_everything_is_acked_and_done() -> None:
    for seed in range(20):
        res = run_seed(seed, 3, faults=False, fail_rate=0.0, plans=2)
        assert res.acked_plans == ["p0", "p1"]
        assert all(len(c) == 1 for c in res.coordinators.values())


def test_the_checker_catches_a_broken_fence() -> None:
    """The property checks are real: forging a fencing record that accepts two coordinators
    for one term must be reported."""
    cluster = Cluster(7, 3, faults=False)
    cluster.run(until=1.0)
    node = cluster.nodes["n0"]
    rec = node.store.election
    other = next(i for i in cluster.ids if i != rec.accepted)
    node.store.election = type(rec)(rec.term, rec.voted_for, rec.highest_term, other)
    with pytest.raises(Violation, match="two coordinators"):
        cluster._check_fence(node)


def test_failover_time_is_bounded() -> None:
    times = [failover_time(seed, 5) for seed in range(10)]
    # local() timings: coordinator_timeout 0.4 s + election delay <= 0.2 s + detection.
    assert statistics.median(times) < 1.0
    assert min(times) > 0
