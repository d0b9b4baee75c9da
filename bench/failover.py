"""Failover benchmark: SIGKILL of the coordinator -> first dispatch of the new coordinator.

Real `houndd run` processes on 127.0.0.1 with the `lan` preset (G4 in docs/guarantees.md:
"LAN timings"), the fake engine with long pulls, a real `docker-registry` for tag resolution. Per
run: submit a plan (every node x `--images` images, one image per node at a time, so most items
are still pending), wait until every node pulls, SIGKILL the coordinator, then measure

- `election_s`: first "election started" line on a survivor (the coordinator seen dead);
- `takeover_s`: the new coordinator's "coordinating term=T" line, logged in the same step
  that emits its dispatches (Scheduler.restore + start);
- `first_dispatch_s`: the first survivor whose own item changed in its own plan view after the
  kill (a new item went pending -> pulling, or a running one was re-dispatched under a new
  attempt). Survivors are polled every ~`--poll` s, so this is an upper bound within one poll
  round of the true time. This is the number G4 states (median under 3 s).

Then the plan is cancelled, the victim restarted and the cluster re-formed before the next run.

    .venv/bin/python bench/failover.py [--sizes 3,5] [--runs 20]

Writes `bench/results/failover.json` and `bench/results/failover.md`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.membership import (  # noqa: E402
    fleet,
    load_1m,
    log_events,
    md_table,
    summary,
    write_results,
)
from houndd.config import lan  # noqa: E402
from tests.fixtures.images import push_image  # noqa: E402
from tests.fixtures.services import Registry, start_registry  # noqa: E402
from tests.procs import http  # noqa: E402

TARGET_MEDIAN_S = 3.0


def push_images(registry: Registry, count: int) -> list[str]:
    """`count` tiny distinct images; returns their references."""
    refs = []
    for i in range(count):
        push_image(registry.url, f"bench/img{i}", "1", 4096, seed=i)
        refs.append(f"{registry.address}/bench/img{i}:1")
    return refs


def item_marks(body: dict[str, Any], node: str) -> dict[str, tuple[str, int, Any]]:
    """image -> (state, attempt, started_at) of `node`'s own items in a plan view."""
    return {
        it["image"]: (it["state"], int(it["attempt"]), it["started_at"])
        for it in body["items"]
        if it["node"] == node
    }


def one_run(f: Any, refs: list[str], poll_s: float, run: int) -> dict[str, Any]:
    """Submit, wait until every node pulls, kill the coordinator, time the failover."""
    victim = f.wait_formed()
    via = next(n for n in f.names if n != victim)
    survivors = [n for n in f.names if n != victim]
    plan = {
        "name": f"failover-{run}",
        "targets": [{"images": refs, "all": True}],
        "policy": {"parallelism": len(f.names), "per_node_parallelism": 1},
    }
    status, body = http("POST", f.nodes[via].api + "/v1/plans", f.cluster.token, plan, timeout=30)
    if status != 201:
        raise RuntimeError(f"submit failed: {status} {body}")
    plan_id = body["id"]

    def all_pulling() -> bool:
        for name in f.names:
            st, view = f.nodes[name].get(f"/v1/plans/{plan_id}", timeout=2.0)
            if st != 200 or "pulling" not in {m[0] for m in item_marks(view, name).values()}:
                return False
        return True

    f.cluster.wait_for(all_pulling, 60, "every node pulling", 0.1)
    before = {}
    for name in survivors:
        _, view = f.nodes[name].get(f"/v1/plans/{plan_id}", timeout=2.0)
        before[name] = item_marks(view, name)
    load = load_1m()
    t_kill = f.kill(victim)

    first_dispatch = float("nan")
    seen_on = ""
    deadline = time.time() + 60
    while time.time() < deadline and seen_on == "":
        round_start = time.time()
        for name in survivors:
            try:
                st, view = f.nodes[name].get(f"/v1/plans/{plan_id}", timeout=2.0)
            except OSError:
                continue
            t_seen = time.time()
            if st == 200 and item_marks(view, name) != before[name]:
                first_dispatch, seen_on = t_seen - t_kill, name
                break
        time.sleep(max(0.0, poll_s - (time.time() - round_start)))

    new_coord = f.wait_formed(60)
    took = log_events(f.nodes[new_coord], r"^coordinating term=\d+ open_plans=[1-9]", t_kill)
    elections = [
        ev[0][0]
        for ev in (log_events(f.nodes[s], r"^election started term=", t_kill) for s in survivors)
        if ev
    ]
    # New pulls that started after the kill (worker clock = this machine's clock).
    _, view = f.nodes[new_coord].get(f"/v1/plans/{plan_id}", timeout=5.0)
    new_starts = [
        it["started_at"]
        for it in view["items"]
        if it["started_at"] is not None and it["started_at"] > t_kill
    ]
    row = {
        "run": run,
        "victim": victim,
        "new_coordinator": new_coord,
        "load_1m": load,
        "election_s": (min(elections) - t_kill) if elections else float("nan"),
        "takeover_s": (took[0][0] - t_kill) if took else float("nan"),
        "first_dispatch_s": first_dispatch,
        "first_dispatch_seen_on": seen_on,
        "first_new_pull_s": (min(new_starts) - t_kill) if new_starts else float("nan"),
    }
    http("DELETE", f.nodes[new_coord].api + f"/v1/plans/{plan_id}", f.cluster.token, timeout=10)
    f.restart(victim)
    f.wait_formed(120)
    return row


def bench_size(n: int, runs: int, refs: list[str], poll_s: float, pull_s: float) -> dict[str, Any]:
    """All runs for one cluster size on one fleet."""
    rows = []
    with fleet(n, "lan", docker_host=f"fake://?pull_s={pull_s}&size=1000") as f:
        for run in range(runs):
            row = one_run(f, refs, poll_s, run)
            rows.append(row)
            print(
                f"  [n={n}] run {run:2d}: election {row['election_s']:.3f}s "
                f"takeover {row['takeover_s']:.3f}s first dispatch "
                f"{row['first_dispatch_s']:.3f}s (seen on {row['first_dispatch_seen_on']}) "
                f"first new pull {row['first_new_pull_s']:.3f}s "
                f"{row['victim']}->{row['new_coordinator']} load {row['load_1m']:.1f}",
                flush=True,
            )
    return {
        "n": n,
        "runs": rows,
        **{
            k: summary([r[k] for r in rows])
            for k in ("election_s", "takeover_s", "first_dispatch_s", "first_new_pull_s")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,5", help="cluster sizes, comma separated")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=4, help="images per node")
    parser.add_argument("--pull-s", type=float, default=600.0, help="fake pull duration")
    parser.add_argument("--poll", type=float, default=0.05, help="survivor poll period, s")
    args = parser.parse_args()
    started = time.time()
    cfg = lan()
    work = Path(tempfile.mkdtemp(prefix="houndd-bench-failover-"))
    registry = start_registry(work / "registry")
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    try:
        refs = push_images(registry, args.images)
        for n in sizes:
            print(f"failover: n={n} runs={args.runs} preset=lan", flush=True)
            results.append(bench_size(n, args.runs, refs, args.poll, args.pull_s))
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    data: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "preset": "lan",
        "timings": {
            k: getattr(cfg, k)
            for k in (
                "probe_interval_s",
                "heartbeat_interval_s",
                "coordinator_timeout_s",
                "election_timeout_min_s",
                "election_timeout_max_s",
            )
        },
        "target_median_s": TARGET_MEDIAN_S,
        "sizes": results,
        "wall_s": time.time() - started,
    }
    rows = []
    verdicts = []
    for r in results:
        for key, label in (
            ("election_s", "election started (coordinator seen dead)"),
            ("takeover_s", "new coordinator takes over (dispatches emitted)"),
            ("first_dispatch_s", "first dispatch seen at a worker (G4)"),
        ):
            s = r[key]
            rows.append(
                [r["n"], label, s.get("n", 0), s.get("median", float("nan")),
                 s.get("p90", float("nan")), s.get("p99", float("nan")),
                 s.get("max", float("nan"))]
            )  # fmt: skip
        med = r["first_dispatch_s"].get("median", float("nan"))
        verdicts.append(
            f"- {r['n']} nodes: median {med:.3f} s -> "
            + ("**met**" if med < TARGET_MEDIAN_S else "**NOT met**")
        )
    loads = [row["load_1m"] for r in results for row in r["runs"]]
    md = (
        "# Failover benchmark (lan preset)\n\n"
        "Time from SIGKILL of the coordinator, real daemons on 127.0.0.1, fake engine "
        f"(pulls of {args.pull_s:.0f} s), {args.images} images per node, one at a time per node. "
        f"Survivors polled every {args.poll * 1000:.0f} ms (first dispatch is an upper bound "
        "within one poll round). p99 is nearest-rank (of 20 runs: the maximum).\n\n"
        + md_table(["nodes", "event", "runs", "median s", "p90 s", "p99 s", "max s"], rows)
        + f"\nG4 target (docs/guarantees.md): median under {TARGET_MEDIAN_S:.0f} s.\n\n"
        + "\n".join(verdicts)
        + "\n\nLAN timings: "
        + ", ".join(f"{k}={v}" for k, v in data["timings"].items())
        + f".\n\nMachine: {os.cpu_count()} cores; 1-min load during runs "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} (shared with other work). "
        f"Command: `{data['command']}`; {data['wall_s']:.0f} s.\n"
    )
    jpath, mpath = write_results("failover", data, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
