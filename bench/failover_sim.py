"""Failover time in the deterministic simulator (G4, docs/guarantees.md).

For each cluster size, kill a settled coordinator while a plan is running and measure the
simulated seconds until the next coordinator's first dispatch. Uses the `lan()` timings by
default (`--preset local` for the test timings). Not a timed test: a report.

    python bench/failover_sim.py [--seeds 50] [--sizes 2,3,5,10] [--preset lan|local]
"""

from __future__ import annotations

import argparse
import logging
import statistics

from houndd.config import lan, local
from houndd.sim import failover_time


def main() -> None:
    """Print median / p90 / max failover per cluster size."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--sizes", default="2,3,5,10")
    ap.add_argument("--preset", choices=("lan", "local"), default="lan")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    cfg = lan(plan_replicas=2) if args.preset == "lan" else local(plan_replicas=2)
    print(f"preset={args.preset} coordinator_timeout_s={cfg.coordinator_timeout_s}")
    print(f"{'nodes':>5} {'median_s':>9} {'p90_s':>7} {'max_s':>7}  target(G4): median < 3 s")
    for n in (int(x) for x in args.sizes.split(",")):
        times = sorted(failover_time(seed, n, cfg) for seed in range(args.seeds))
        p90 = times[int(len(times) * 0.9) - 1]
        print(f"{n:>5} {statistics.median(times):>9.3f} {p90:>7.3f} {times[-1]:>7.3f}")


if __name__ == "__main__":
    main()
