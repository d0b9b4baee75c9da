"""Deterministic discrete-event simulation of a houndd cluster (NodeCores, network, executors)."""

from houndd.sim.cluster import SimResult, Violation, failover_time, run_seed

__all__ = ["SimResult", "Violation", "failover_time", "run_seed"]
