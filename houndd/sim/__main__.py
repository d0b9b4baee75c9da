"""Replay or sweep simulation seeds: `python -m houndd.sim --seed S [--nodes N] [--count C]`."""

from __future__ import annotations

import argparse
import logging
import sys

from houndd.sim.cluster import Violation, run_seed


def main(argv: list[str] | None = None) -> int:
    """Run seeds; exit 1 on the first property violation."""
    ap = argparse.ArgumentParser(prog="python -m houndd.sim")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(message)s")
    for seed in range(args.seed, args.seed + args.count):
        try:
            res = run_seed(seed, args.nodes)
        except Violation as e:
            print(e, file=sys.stderr)
            return 1
        print(f"seed={seed} nodes={res.nodes} events={res.events} acked={len(res.acked_plans)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
