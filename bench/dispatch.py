"""Dispatch benchmark: submit -> every node has its dispatch (the paper's Table 8 response time).

Real: `--n` `houndd run` processes on 127.0.0.1 (fake engine, long pulls, `lan` preset, a real
`docker-registry` to resolve the tag). One plan = one image on every node, parallelism = N, so
one round of dispatches reaches everyone. Per run, from the client's clock and the daemons'
logs and item timestamps (one machine, one clock):

- `resolve_s`: submit -> the coordinator's core accepted the plan ("plan accepted ...
  copies_needed=": HTTP, target resolution, classification, registry tag -> digest);
- `replicate_s`: -> "plan committed" (`plan_replicas` durable copies);
- `dispatch_s`: -> the last worker's `started_at` (set when it accepted its dispatch);
- `total_s`: submit -> last `started_at`; `first_s`: submit -> first `started_at`;
  `ack_s`: submit -> the client has its 201.

Submissions go to the coordinator (like the paper's master) and, separately, to a follower
(one extra forward hop).

Simulated: `--sim-n` NodeCores in one process (`houndd.sim.cluster.Cluster`, no faults, zero
network delay, lan() timings): CPU time from `submit` to every node having executed its
dispatch: the cost of the pure cores (replication, scheduling, dispatch handling). The
simulator passes payload objects by reference, so every message to or from the coordinator
is also encoded, sealed (signed, encrypted) and opened with real `Wire`s, and that CPU is
counted as the coordinator's: its critical path in a real daemon. And the bare `Scheduler`
for the same plan: construction + `start()`.

    .venv/bin/python bench/dispatch.py [--n 10] [--runs 10] [--sim-n 1000] [--sim-runs 3]

Writes `bench/results/dispatch.json` and `bench/results/dispatch.md`.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.failover import push_images  # noqa: E402
from bench.membership import (  # noqa: E402
    Fleet,
    fleet,
    load_1m,
    log_events,
    md_table,
    summary,
    write_results,
)
from houndd.config import lan  # noqa: E402
from houndd.coordinator.election import Role  # noqa: E402
from houndd.coordinator.messages import Action, Dispatch, Execute, Request  # noqa: E402
from houndd.coordinator.plan import Policy  # noqa: E402
from houndd.coordinator.records import PlanDocument, PlanItem  # noqa: E402
from houndd.coordinator.scheduler import Scheduler  # noqa: E402
from houndd.sim.cluster import Cluster, _Node  # noqa: E402
from houndd.wire import Keyring, NodeIdentity, Wire  # noqa: E402
from houndd.wire.payloads import decode_payload, encode_payload, msg_type_of  # noqa: E402
from tests.fixtures.services import start_registry  # noqa: E402
from tests.procs import http  # noqa: E402

PAPER_TABLE8_MS = (12.7, 21.0)
REAL_KEYS = ("resolve_s", "replicate_s", "dispatch_s", "first_s", "total_s", "ack_s")


# --- real processes --------------------------------------------------------------------------


def real_run(f: Fleet, ref: str, via: str, run: int) -> dict[str, Any]:
    """One submission through `via`; waits until every node accepted its dispatch."""
    coordinator = f.wait_formed()
    plan = {
        "name": f"dispatch-{run}",
        "targets": [{"images": [ref], "all": True}],
        "policy": {"parallelism": len(f.names), "per_node_parallelism": 1},
    }
    load = load_1m()
    t0 = time.time()
    status, body = http("POST", f.nodes[via].api + "/v1/plans", f.cluster.token, plan, timeout=30)
    t_ack = time.time()
    if status != 201:
        raise RuntimeError(f"submit failed: {status} {body}")
    plan_id = body["id"]

    def started() -> list[float] | None:
        st, view = f.nodes[coordinator].get(f"/v1/plans/{plan_id}", timeout=2.0)
        if st != 200:
            return None
        times = [it["started_at"] for it in view["items"]]
        return None if None in times or len(times) != len(f.names) else times

    times: list[float] = f.cluster.wait_for(started, 60, "every node dispatched", 0.05)
    node = f.nodes[coordinator]
    accepted = log_events(node, rf"^plan accepted plan={plan_id} items=\d+ copies_needed", t0)
    committed = log_events(node, rf"^plan committed plan={plan_id} ", t0)
    t_acc = accepted[0][0] if accepted else float("nan")
    t_com = committed[0][0] if committed else float("nan")
    http("DELETE", f.nodes[coordinator].api + f"/v1/plans/{plan_id}", f.cluster.token, timeout=10)
    return {
        "run": run,
        "via": via,
        "coordinator": coordinator,
        "load_1m": load,
        "resolve_s": t_acc - t0,
        "replicate_s": t_com - t_acc,
        "dispatch_s": max(times) - t_com,
        "first_s": min(times) - t0,
        "total_s": max(times) - t0,
        "ack_s": t_ack - t0,
    }


def bench_real(n: int, runs: int, follower_runs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="houndd-bench-dispatch-"))
    registry = start_registry(work / "registry")
    rows: dict[str, list[dict[str, Any]]] = {"coordinator": [], "follower": []}
    try:
        (ref,) = push_images(registry, 1)
        with fleet(n, "lan", docker_host="fake://?pull_s=600&size=1000") as f:
            for kind, count in (("coordinator", runs), ("follower", follower_runs)):
                for run in range(count):
                    coord = f.wait_formed()
                    via = coord if kind == "coordinator" else next(x for x in f.names if x != coord)
                    row = real_run(f, ref, via, run)
                    rows[kind].append(row)
                    print(
                        f"  [real n={n} via {kind}] run {run}: "
                        + " ".join(
                            f"{k.removesuffix('_s')}={row[k] * 1000:.1f}ms" for k in REAL_KEYS
                        )
                        + f" load {row['load_1m']:.1f}",
                        flush=True,
                    )
                    time.sleep(0.5)  # let the cancel's aborts settle before the next plan
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "n": n,
        "runs": rows,
        "summary": {
            kind: {k: summary([r[k] for r in rs]) for k in REAL_KEYS}
            for kind, rs in rows.items()
            if rs
        },
    }


# --- simulation ------------------------------------------------------------------------------


class _DispatchWatch(Cluster):
    """The simulator without faults, recording when each node first executes a dispatch
    (pulls never end), and counting the messages the cores send.

    The stock membership model recomputes every node's view on every boot (O(N^2) per boot,
    O(N^3) to start N nodes); with no faults every node simply sees all others, once.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        keyring = Keyring.generate()
        self._wire_me = Wire(
            cluster_id="bench", keyring=keyring, identity=NodeIdentity.generate(), boot_epoch=1
        )
        self._wire_peer = Wire(
            cluster_id="bench", keyring=keyring, identity=NodeIdentity.generate(), boot_epoch=1
        )
        self.wire_cpu = 0.0  # the watched node's sealing/opening (part of coord_cpu)
        self.wire_bytes: dict[str, int] = {}  # sealed bytes to or from the watched node, by type
        self.executed: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.watched = ""
        self.coord_cpu = 0.0
        self.coord_cpu_at_dispatch = 0.0
        self.coord_by_event: dict[str, tuple[int, float]] = {}  # event -> (calls, CPU s)
        self.coord_by_event_at_dispatch: dict[str, tuple[int, float]] = {}
        self._depth = 0
        self.dispatch_targets: set[str] = set()
        self._quiet_views = True
        super().__init__(*args, **kw)
        self._quiet_views = False
        self._update_views()

    def _update_views(self) -> None:
        if self._quiet_views:
            return
        everyone = set(self.ids)
        names = {i: i for i in self.ids}
        for node in self.nodes.values():
            if node.core is not None:
                self._do(node, node.core.membership(everyone - {node.node_id}, names, self.now))

    def _send(self, src: str, dst: str, payload: Any) -> None:
        kind = msg_type_of(payload).name
        self.sent[kind] = self.sent.get(kind, 0) + 1
        self._wire_cost(src, dst, payload)
        super()._send(src, dst, payload)

    def _replied(self, src: str, dst: str, payload: Any) -> None:
        kind = msg_type_of(payload).name
        self.sent[kind] = self.sent.get(kind, 0) + 1
        self._wire_cost(src, dst, payload)

    def _wire_cost(self, src: str, dst: str, payload: Any) -> None:
        """What the watched node (the coordinator) would spend on this message in a real
        daemon: encoding and sealing what it sends, opening and decoding what it receives.
        The simulator itself passes payload objects by reference."""
        if self.watched not in (src, dst) or src == dst:
            return
        kind, body = encode_payload(payload)
        now = time.time()
        if src == self.watched:
            t = time.process_time()
            data = self._wire_me.seal(*encode_payload(payload), now)
            spent = time.process_time() - t
        else:
            data = self._wire_peer.seal(kind, body, now)
            t = time.process_time()
            env = self._wire_me.open(data, now, max_size=1 << 30)
            decode_payload(env.type, env.payload)
            spent = time.process_time() - t
        self.wire_cpu += spent
        self.coord_cpu += spent
        self.wire_bytes[kind.name] = self.wire_bytes.get(kind.name, 0) + len(data)

    def _execute(self, node: _Node, act: Execute) -> None:
        self.executed.setdefault(node.node_id, time.process_time())

    def _request(self, node: _Node, req: Request) -> None:
        kind = msg_type_of(req.payload).name
        self.sent[kind] = self.sent.get(kind, 0) + 1
        self._wire_cost(node.node_id, req.node_id, req.payload)
        if isinstance(req.payload, Dispatch) and node.node_id == self.watched:
            self.dispatch_targets.add(req.node_id)
            self.coord_cpu_at_dispatch = self.coord_cpu
            self.coord_by_event_at_dispatch = dict(self.coord_by_event)
        super()._request(node, req)

    def watch(self, node: _Node) -> None:
        """Account the CPU time spent inside `node`'s core (the coordinator's critical path)."""
        core = node.core
        assert core is not None
        self.watched = node.node_id
        for name in ("receive", "response", "tick", "request_failed", "submit", "membership"):
            setattr(core, name, self._timed(name, getattr(core, name)))

    def _timed(self, name: str, fn: Callable[..., list[Action]]) -> Callable[..., list[Action]]:
        def timed(*args: Any, **kw: Any) -> list[Action]:
            # receive(sender, payload, ...) and response(token, sender, payload, ...)
            what = name
            if name == "receive":
                what = f"receive {msg_type_of(args[1]).name}"
            elif name == "response":
                what = f"response {msg_type_of(args[2]).name}"
            if self._depth:  # response() calls receive(): count the outermost call only
                return fn(*args, **kw)
            self._depth += 1
            t = time.process_time()
            try:
                return fn(*args, **kw)
            finally:
                self._depth -= 1
                spent = time.process_time() - t
                self.coord_cpu += spent
                calls, total = self.coord_by_event.get(what, (0, 0.0))
                self.coord_by_event[what] = (calls + 1, total + spent)

        return timed


def sim_run(n: int, seed: int, drain_budget_s: float) -> dict[str, Any]:
    """Form an N-node simulated cluster, submit one plan for all, time until all dispatched.

    Times are CPU seconds of this process (`time.process_time`): the machine is shared, and
    the simulation is single-threaded and does no IO, so CPU time is its cost.
    """
    image = "registry.local:5000/bench/img:1"
    digest = "sha256:" + "ab" * 32
    ids = [f"{i:016x}" for i in range(n)]  # the simulator's node ids (wire_ids)
    items = tuple(PlanItem(nid, image, digest, 1000) for nid in ids)
    # The bare scheduler for the same plan, before the simulation fills the heap (and after
    # the previous run's garbage is gone: a gen-2 collection would dominate the number).
    gc.collect()
    t1 = time.process_time()
    work = [(i.node_id, i.image, i.digest, i.size_bytes) for i in items]
    sched = Scheduler(work, Policy(parallelism=n, per_node_parallelism=1), rng=random.Random(seed))
    acts = sched.start(0.0)
    sched_s = time.process_time() - t1

    t_build = time.process_time()
    c = _DispatchWatch(seed, n, config=lan(plan_replicas=2), faults=False, plans=0, loss=0.0,
                       fail_rate=0.0, wire_ids=True)  # fmt: skip
    c.delay = (0.0, 0.0)  # no network: only the cores' own cost is measured

    def coordinator() -> _Node | None:
        coords = [x for x in c.nodes.values() if x.core and x.core.role is Role.COORDINATOR]
        if len(coords) != 1:
            return None
        cid = coords[0].node_id
        agreed = all(x.core and x.core.coordinator(c.now) == cid for x in c.nodes.values())
        return coords[0] if agreed else None

    coord = None
    while coord is None and c.now < 60:
        c.run(until=c.now + 0.5)
        coord = coordinator()
    if coord is None or coord.core is None:
        raise RuntimeError(f"no coordinator after {c.now:.1f} s simulated")
    formed_cpu = time.process_time() - t_build
    assert c.ids == ids
    # The simulator holds every node's state in one heap; a real node holds one. Keep the
    # cyclic GC from rescanning the formed cluster on every collection.
    gc.collect()
    gc.freeze()
    c.watch(coord)
    doc = PlanDocument(
        {
            "name": "dispatch",
            "targets": [{"images": [image], "all": True}],
            "policy": {"parallelism": n, "per_node_parallelism": 1},
        }
    )
    sim_t0 = c.now
    c.sent.clear()
    t0 = time.process_time()
    c._do(coord, coord.core.submit("p-dispatch", doc, items, c.now, "p-dispatch"))
    while len(c.executed) < n and c.now < sim_t0 + 30:
        c.run(until=c.now + 0.001)
    t_all = time.process_time()
    if len(c.executed) < n:
        raise RuntimeError(f"only {len(c.executed)} of {n} nodes dispatched")
    sent_at_dispatch = dict(c.sent)
    # Then the "pulling" results: worker -> coordinator -> every alive member (bounded effort).
    while c._q and c._q[0][0] <= c.now and time.process_time() - t_all < drain_budget_s:
        _, _, fn = heapq.heappop(c._q)  # Cluster.run() without a stop: one event at a time
        c.events += 1
        fn()
    drained = not (c._q and c._q[0][0] <= c.now)
    t_drain = time.process_time()
    gc.unfreeze()
    return {
        "n": n,
        "seed": seed,
        "form_cpu_s": formed_cpu,
        "submit_to_all_cpu_s": t_all - t0,
        "submit_to_first_cpu_s": min(c.executed.values()) - t0,
        "submit_to_all_sim_s": c.now - sim_t0,
        "coordinator_cpu_to_last_dispatch_s": c.coord_cpu_at_dispatch,
        "coordinator_dispatch_requests": len(c.dispatch_targets),
        "coordinator_cpu_total_s": c.coord_cpu,
        "coordinator_wire_cpu_s": c.wire_cpu,
        "coordinator_wire_bytes": dict(c.wire_bytes),
        "coordinator_cpu_to_last_dispatch_by_event": {
            k: {"calls": calls, "cpu_s": round(cpu, 4)}
            for k, (calls, cpu) in sorted(
                c.coord_by_event_at_dispatch.items(), key=lambda kv: -kv[1][1]
            )
        },
        "messages_until_all_dispatched": sent_at_dispatch,
        "pulling_fanout_cpu_s": t_drain - t_all,
        "pulling_fanout_drained": drained,
        "messages_total": dict(c.sent),
        "scheduler_start_s": sched_s,
        "scheduler_dispatches": len(acts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="real daemons")
    parser.add_argument("--runs", type=int, default=10, help="submissions to the coordinator")
    parser.add_argument("--follower-runs", type=int, default=5, help="submissions to a follower")
    parser.add_argument("--sim-n", default="1000,10000", help="simulated nodes, comma separated")
    parser.add_argument("--sim-runs", type=int, default=3)
    parser.add_argument(
        "--drain-budget", type=float, default=120.0, help="CPU s for result fan-out"
    )
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    args = parser.parse_args()
    started = time.time()
    data: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "paper_table8_ms": PAPER_TABLE8_MS,
    }
    md = ["# Dispatch benchmark: submit -> every node dispatched\n"]
    if not args.skip_real:
        print(f"real: n={args.n} runs={args.runs}+{args.follower_runs} preset=lan", flush=True)
        real = bench_real(args.n, args.runs, args.follower_runs)
        data["real"] = real
        loads = [r["load_1m"] for rs in real["runs"].values() for r in rs]
        md.append(
            f"\n## {args.n} real daemons on 127.0.0.1 (fake engine, lan preset)\n\n"
            "Milliseconds; median (p90) over runs. The paper's master answers in "
            f"{PAPER_TABLE8_MS[0]}-{PAPER_TABLE8_MS[1]} ms (Table 8).\n\n"
        )
        rows = []
        for kind, s in real["summary"].items():
            rows.append(
                [kind, s["total_s"].get("n", 0)]
                + [
                    f"{s[k].get('median', float('nan')) * 1000:.1f} "
                    f"({s[k].get('p90', float('nan')) * 1000:.1f})"
                    for k in REAL_KEYS
                ]
            )
        md.append(
            md_table(
                [
                    "submitted to",
                    "runs",
                    "resolve",
                    "replicate",
                    "dispatch",
                    "first node",
                    "all nodes (total)",
                    "client ack",
                ],
                rows,
            )
        )
        md.append(
            "\nresolve = submit -> plan accepted by the coordinator's core (HTTP, forward, "
            "target resolution, registry digest); replicate = -> plan committed on "
            "`plan_replicas` copies; dispatch = -> last worker accepted its dispatch. Times from "
            "daemon logs (ms stamps) and item `started_at`; one machine, one clock. "
            f"1-min load during runs {min(loads):.1f}-{max(loads):.1f} on "
            f"{os.cpu_count()} cores (shared with other work).\n"
        )
    if not args.skip_sim:
        data["simulation"] = {}
        for sim_n in (int(n) for n in str(args.sim_n).split(",")):
            # Every node of a 10,000-node run is simulated in this one process: one run each
            # beyond 1,000 nodes keeps the benchmark within minutes.
            runs = args.sim_runs if sim_n <= 1000 else 1
            print(f"simulation: n={sim_n} runs={runs}", flush=True)
            sim = []
            for seed in range(runs):
                r = sim_run(sim_n, seed, args.drain_budget)
                sim.append(r)
                fan = r["messages_total"].get("RESULTS", 0)
                print(
                    f"  [sim n={sim_n} seed={seed}] submit->all "
                    f"{r['submit_to_all_cpu_s'] * 1000:.1f}ms CPU (first "
                    f"{r['submit_to_first_cpu_s'] * 1000:.1f}ms, simulated "
                    f"{r['submit_to_all_sim_s'] * 1000:.1f}ms); coordinator CPU to its last of "
                    f"{r['coordinator_dispatch_requests']} dispatch requests "
                    f"{r['coordinator_cpu_to_last_dispatch_s'] * 1000:.1f}ms; messages "
                    f"{r['messages_until_all_dispatched']}; then 'pulling' result fan-out "
                    f"{r['pulling_fanout_cpu_s']:.1f}s CPU, {fan} RESULTS messages "
                    f"(drained={r['pulling_fanout_drained']}); scheduler start "
                    f"{r['scheduler_start_s'] * 1000:.2f}ms for {r['scheduler_dispatches']} "
                    f"dispatches; forming {r['form_cpu_s']:.1f}s CPU",
                    flush=True,
                )
            data["simulation"][str(sim_n)] = sim
            s_all = summary([r["submit_to_all_cpu_s"] for r in sim])
            s_first = summary([r["submit_to_first_cpu_s"] for r in sim])
            s_sched = summary([r["scheduler_start_s"] for r in sim])
            s_fan = summary([r["pulling_fanout_cpu_s"] for r in sim])
            s_coord = summary([r["coordinator_cpu_to_last_dispatch_s"] for r in sim])
            last = sim[-1]
            md.append(
                f"\n## {sim_n} simulated nodes (NodeCores in one process, zero network delay)\n\n"
                + md_table(
                    ["measure", "runs", "median ms", "max ms"],
                    [
                        [
                            "coordinator's own CPU: submit -> its last dispatch request emitted",
                            s_coord["n"],
                            s_coord["median"] * 1000,
                            s_coord["max"] * 1000,
                        ],
                        [
                            "submit -> every node executed its dispatch (CPU of all nodes, summed)",
                            s_all["n"],
                            s_all["median"] * 1000,
                            s_all["max"] * 1000,
                        ],
                        [
                            "submit -> first node executed (CPU of all nodes, summed)",
                            s_first["n"],
                            s_first["median"] * 1000,
                            s_first["max"] * 1000,
                        ],
                        [
                            "bare Scheduler: build + start()",
                            s_sched["n"],
                            s_sched["median"] * 1000,
                            s_sched["max"] * 1000,
                        ],
                        [
                            "then: the N 'pulling' results fanned out to everyone (CPU)",
                            s_fan["n"],
                            s_fan["median"] * 1000,
                            s_fan["max"] * 1000,
                        ],
                    ],
                )
                + "\nCPU time of this single-threaded process (the machine is shared; CPU "
                "time is the cores' own cost), no sockets; the coordinator's messages are also "
                "encoded, sealed and opened with real `Wire`s, counted as its CPU. In a real "
                "cluster the nodes work in parallel: the coordinator's own CPU is the critical "
                "path (plus one worker's dispatch handling); the summed rows are every node's "
                "work added up in one process. "
                "Messages sent until every "
                f"node was dispatched (last seed): `{last['messages_until_all_dispatched']}`; "
                f"all messages including the result fan-out: `{last['messages_total']}` "
                f"(fan-out drained: {last['pulling_fanout_drained']}).\n"
            )
    data["wall_s"] = time.time() - started
    md.append(f"\nCommand: `{data['command']}`; {data['wall_s']:.0f} s.\n")
    jpath, mpath = write_results("dispatch", data, "".join(md))
    print("".join(md))
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
