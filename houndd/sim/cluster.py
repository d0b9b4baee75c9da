"""A seeded discrete-event simulator of N `NodeCore`s.

Everything random comes from one `random.Random(seed)`, so a seed replays exactly:
`python -m houndd.sim --seed S --nodes N`. The model:

- network: per-message loss, duplication and delay (random delays reorder messages);
  partitions split the nodes into groups and heal; requests either get their reply or, after
  `peer_request_timeout_s`, a `request_failed`;
- nodes: crash (all state not persisted through `Persist` is lost; the executor's running
  pulls die) and restart; pause (SIGSTOP-like: nothing in or out, timers frozen) and resume;
- failure detector: each node's view of who is alive follows the real topology after a
  random detection delay;
- executors: pulls take a random time and fail transiently with some probability.

Faults happen during the first part of the run; then everything heals and the run continues
until every plan should have converged. Properties are checked as the run goes (`Violation`).
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from houndd.config import Config, local
from houndd.coordinator.election import Role
from houndd.coordinator.memory import MemoryStore
from houndd.coordinator.messages import (
    AbortLocal,
    AckClient,
    Action,
    Dispatch,
    Execute,
    Persist,
    Reply,
    Request,
    Send,
)
from houndd.coordinator.node import ExecutorReport, NodeCore
from houndd.coordinator.records import AbortRecord, PlanDocument, PlanItem
from houndd.coordinator.results import ItemResult, ItemState


class Violation(AssertionError):
    """A property of the guarantees G1-G4 (docs/guarantees.md) did not hold."""


@dataclass
class SimResult:
    """Outcome of one seeded run."""

    seed: int
    nodes: int
    events: int
    acked_plans: list[str]
    coordinators: dict[int, list[str]]
    end_time: float


@dataclass
class _Node:
    node_id: str
    store: MemoryStore = field(default_factory=MemoryStore)
    core: NodeCore | None = None
    up: bool = True
    paused: bool = False
    life: int = 0  # incarnation: events of an earlier life are dropped
    wake_at: float | None = None
    running: dict[tuple[str, str], int] = field(default_factory=dict)  # (plan, image) -> life
    pulled: set[tuple[str, str]] = field(default_factory=set)  # images on disk, per plan
    # Plans this node tombstoned: an aborted plan was told not to run, so a plan id that
    # comes back acknowledged (a client retried it elsewhere) may pull again here.
    tombstoned: set[str] = field(default_factory=set)
    fence: dict[int, str] = field(default_factory=dict)  # term -> accepted coordinator, ever
    highest: int = 0
    last_tick: float = -1.0
    ticks_now: int = 0


def sim_config() -> Config:
    """Tens-of-milliseconds timings, pinned so a seed replays the same whatever the presets."""
    return local(
        plan_replicas=2,
        heartbeat_interval_s=0.05,
        coordinator_timeout_s=0.4,
        election_timeout_min_s=0.05,
        election_timeout_max_s=0.2,
        join_window_s=0.4,
        anti_entropy_interval_s=0.3,
        anti_entropy_idle_s=1.5,
        peer_request_timeout_s=2.0,
    )


class Cluster:
    """One simulated run. Build, then `run()`."""

    def __init__(
        self,
        seed: int,
        n: int,
        *,
        config: Config | None = None,
        faults: bool = True,
        fault_window_s: float = 2.0,
        settle_s: float = 12.0,
        plans: int = 2,
        loss: float | None = None,
        fail_rate: float | None = None,
        pull_s: tuple[float, float] = (0.02, 0.5),
        wire_ids: bool = False,
    ) -> None:
        """`wire_ids`: node ids as on the wire (16 hex digits) instead of n0, n1, ..., for
        benchmarks that encode the messages."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.cfg = config or sim_config()
        self.now = 0.0
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.events = 0
        self.ids = [f"{i:016x}" if wire_ids else f"n{i}" for i in range(n)]
        self.nodes = {i: _Node(i) for i in self.ids}
        self.group: dict[str, int] = dict.fromkeys(self.ids, 0)
        r = self.rng
        self.loss = r.choice([0.0, 0.0, 0.02, 0.1]) if loss is None and faults else (loss or 0.0)
        self.dup = r.choice([0.0, 0.05]) if faults else 0.0
        self.delay = (0.0005, r.choice([0.002, 0.01, 0.03]))
        self.fail_rate = r.choice([0.0, 0.1, 0.3]) if fail_rate is None else fail_rate
        self.fd_delay = (0.05, 0.3)
        self.pull_s = pull_s
        self.faults = faults
        self.fault_end = fault_window_s if faults else 0.0
        self.end = self.fault_end + settle_s
        self.topology_at: list[float] = [0.0]
        self.wins: dict[int, list[tuple[str, float]]] = {}
        self.acked: dict[str, float] = {}
        self.submitted: dict[str, tuple[PlanDocument, tuple[PlanItem, ...]]] = {}
        self.cancelled: set[str] = set()
        self._plans = plans
        self.first_dispatch_after: float | None = None
        self.first_dispatch_at: float | None = None
        for node in self.nodes.values():
            self._boot(node)
        self._schedule_workload()
        if faults:
            self._schedule_faults()
        self.at(self.fault_end, self._heal_all)

    # --- event queue -----------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Schedule `fn` at time `t`."""
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, fn))

    def run(self, until: float | None = None) -> None:
        """Process events up to `until` (default: the end of the run)."""
        stop = self.end if until is None else until
        while self._q and self._q[0][0] <= stop:
            t, _, fn = heapq.heappop(self._q)
            self.now = t
            self.events += 1
            fn()
        self.now = stop

    # --- nodes -----------------------------------------------------------------------------------

    def _boot(self, node: _Node) -> None:
        node.life += 1
        node.up, node.paused = True, False
        node.running.clear()
        node.core = NodeCore(
            node.node_id,
            self.cfg,
            random.Random(self.rng.random()),
            self.now,
            node.store.load(),
            scheduler_options={
                "backoff_base_s": 0.05,
                "backoff_cap_s": 0.5,
                "timeout_slack_s": 0.5,
                "node_down_timeout_s": 3.0,
            },
        )
        self._check_fence(node)
        self._update_views()
        self._wake(node)

    def _wake(self, node: _Node) -> None:
        if node.core is None or not node.up or node.paused:
            return
        t = max(node.core.next_wakeup(), self.now)
        if node.wake_at is not None and node.wake_at <= t:
            return
        node.wake_at = t
        life = node.life
        self.at(t, lambda: self._tick(node, life, t))

    def _tick(self, node: _Node, life: int, t: float) -> None:
        if node.life != life or node.wake_at != t:
            return
        node.wake_at = None
        node.ticks_now = node.ticks_now + 1 if node.last_tick == t else 0
        node.last_tick = t
        if node.ticks_now > 1000:
            raise Violation(f"{node.node_id} busy-loops at t={t}: next_wakeup() does not advance")
        if self._live(node):
            assert node.core is not None
            self._do(node, node.core.tick(self.now))
            self._wake(node)

    def _live(self, node: _Node) -> bool:
        return node.up and not node.paused and node.core is not None

    # --- actions ---------------------------------------------------------------------------------

    def _do(
        self, node: _Node, actions: list[Action], reply_to: Callable[[Reply], None] | None = None
    ) -> None:
        core = node.core
        assert core is not None
        for act in actions:
            if isinstance(act, Persist):
                node.store.apply(act)
                self._check_fence(node)
                node.tombstoned.update(r.plan_id for r in act.records if isinstance(r, AbortRecord))
            elif isinstance(act, Send):
                self._send(node.node_id, act.node_id, act.payload)
            elif isinstance(act, Request):
                self._request(node, act)
            elif isinstance(act, Reply):
                if reply_to is not None:
                    reply_to(act)
            elif isinstance(act, Execute):
                self._note_dispatch()  # a coordinator dispatching to itself
                self._execute(node, act)
            elif isinstance(act, AbortLocal):
                for image in act.images:
                    node.running.pop((act.plan_id, image), None)
            elif isinstance(act, AckClient) and act.ok:
                self.acked.setdefault(act.client_ref, self.now)
        if core.election.role is Role.COORDINATOR:
            if core.plans_running():
                # Took over open work: its dispatches (remote, local, or deduped because the
                # coordinator itself is still pulling) went out in this very step.
                self._note_dispatch()
            wins = self.wins.setdefault(core.term, [])
            if node.node_id not in [w for w, _ in wins]:
                wins.append((node.node_id, self.now))
                self._check_one_coordinator(core.term)
        self._wake(node)

    def _connected(self, a: str, b: str) -> bool:
        na, nb = self.nodes[a], self.nodes[b]
        return self._live(na) and self._live(nb) and self.group[a] == self.group[b]

    def _deliver_delay(self) -> float:
        return self.rng.uniform(*self.delay)

    def _send(self, src: str, dst: str, payload: Any) -> None:
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                continue
            target = self.nodes[dst]
            life = target.life

            def deliver(target: _Node = target, life: int = life) -> None:
                if target.life != life or not self._connected(src, dst):
                    return
                assert target.core is not None
                acts = target.core.receive(src, payload, self.now)
                self._do(target, acts, lambda r: self._send(dst, src, r.payload))

            self.at(self.now + self._deliver_delay(), deliver)

    def _request(self, node: _Node, req: Request) -> None:
        src, dst, life = node.node_id, req.node_id, node.life
        state = {"done": False}

        def fail() -> None:
            if state["done"] or node.life != life or not self._live(node):
                return
            state["done"] = True
            assert node.core is not None
            self._do(node, node.core.request_failed(req.token, self.now))

        def answer(r: Reply) -> None:
            self._replied(dst, src, r.payload)
            if self.rng.random() < self.loss:
                return

            def back() -> None:
                if state["done"] or node.life != life or not self._connected(src, dst):
                    return
                state["done"] = True
                assert node.core is not None
                self._do(node, node.core.response(req.token, dst, r.payload, self.now))

            self.at(self.now + self._deliver_delay(), back)

        target = self.nodes[dst]
        tlife = target.life

        def deliver() -> None:
            if target.life != tlife or not self._connected(src, dst):
                return
            assert target.core is not None
            self._do(target, target.core.receive(src, req.payload, self.now), answer)

        if self.rng.random() >= self.loss:
            self.at(self.now + self._deliver_delay(), deliver)
        self.at(self.now + self.cfg.peer_request_timeout_s, fail)
        if isinstance(req.payload, Dispatch):
            self._note_dispatch()

    def _replied(self, src: str, dst: str, payload: Any) -> None:
        """A request's reply leaves `src` for `dst` (a hook for benchmarks that count)."""

    def _note_dispatch(self) -> None:
        after = self.first_dispatch_after
        if after is not None and self.first_dispatch_at is None and self.now >= after:
            self.first_dispatch_at = self.now

    def _execute(self, node: _Node, act: Execute) -> None:
        for item in act.items:
            key = (act.plan_id, item.image)
            if key in node.running:
                raise Violation(f"{node.node_id} executes {key} while it is already running")
            if key in node.pulled and act.plan_id not in node.tombstoned:
                raise Violation(f"{node.node_id} executes {key} again after it was pulled")
            node.running[key] = node.life
            duration = self.rng.uniform(*self.pull_s)
            ok = self.rng.random() >= self.fail_rate
            life, attempt, digest = node.life, item.attempt, item.digest

            def finish(
                key: tuple[str, str] = key,
                ok: bool = ok,
                life: int = life,
                attempt: int = attempt,
                digest: str = digest,
            ) -> None:
                if node.life != life or node.running.get(key) != life:
                    return
                if node.paused:
                    self.at(self.now + 0.05, finish)  # the pull resumes when the process does
                    return
                del node.running[key]
                if ok:
                    node.pulled.add(key)
                    res = ItemResult(ItemState.DONE, attempt, digest, 10, 10, finished_at=self.now)
                else:
                    res = ItemResult(
                        ItemState.FAILED,
                        attempt,
                        digest,
                        reason="registry unreachable",
                        transient=True,
                        finished_at=self.now,
                    )
                assert node.core is not None
                self._do(
                    node, node.core.executor_report(ExecutorReport(key[0], key[1], res), self.now)
                )

            self.at(self.now + duration, finish)

    # --- membership model ------------------------------------------------------------------------

    def _update_views(self) -> None:
        self.topology_at.append(self.now)
        for node in self.nodes.values():
            life = node.life

            def update(node: _Node = node, life: int = life) -> None:
                if node.life != life or not self._live(node):
                    return
                alive = {
                    i for i in self.ids if i != node.node_id and self._connected(node.node_id, i)
                }
                assert node.core is not None
                self._do(node, node.core.membership(alive, {i: i for i in self.ids}, self.now))

            self.at(self.now + self.rng.uniform(*self.fd_delay), update)

    # --- faults and workload ---------------------------------------------------------------------

    def crash(self, nid: str) -> None:
        """Kill a node: only its store survives."""
        node = self.nodes[nid]
        if not node.up:
            return
        node.up, node.core, node.wake_at = False, None, None
        node.running.clear()
        node.life += 1
        self._update_views()

    def restart(self, nid: str) -> None:
        """Start a crashed node from its store."""
        node = self.nodes[nid]
        if not node.up:
            self._boot(node)

    def pause(self, nid: str) -> None:
        """SIGSTOP."""
        node = self.nodes[nid]
        if node.up and not node.paused:
            node.paused = True
            node.wake_at = None
            self._update_views()

    def resume(self, nid: str) -> None:
        """SIGCONT."""
        node = self.nodes[nid]
        if node.up and node.paused:
            node.paused = False
            self._update_views()
            self._wake(node)

    def partition(self, groups: list[list[str]]) -> None:
        """Split the network into groups."""
        for g, members in enumerate(groups):
            for nid in members:
                self.group[nid] = g
        self._update_views()

    def _heal_all(self) -> None:
        for nid in self.ids:
            self.restart(nid)
            self.resume(nid)
        self.loss, self.dup = 0.0, 0.0
        self.group = dict.fromkeys(self.ids, 0)
        self._update_views()

    def _schedule_faults(self) -> None:
        r = self.rng
        for _ in range(r.randint(1, 4)):
            t = r.uniform(0.3, self.fault_end - 0.2)
            nid = r.choice(self.ids)
            kind = r.choice(["crash", "pause", "partition", "partition"])
            if kind == "crash":
                self.at(t, functools.partial(self.crash, nid))
                if r.random() < 0.7:
                    self.at(t + r.uniform(0.1, 1.5), functools.partial(self.restart, nid))
            elif kind == "pause":
                self.at(t, functools.partial(self.pause, nid))
                self.at(t + r.uniform(0.1, 1.5), functools.partial(self.resume, nid))
            else:
                shuffled = self.ids[:]
                r.shuffle(shuffled)
                cut = r.randint(1, len(shuffled) - 1) if len(shuffled) > 1 else 1
                groups = [shuffled[:cut], shuffled[cut:]]
                self.at(t, functools.partial(self.partition, groups))
                self.at(t + r.uniform(0.2, 1.5), lambda: self.partition([self.ids]))

    def _schedule_workload(self) -> None:
        r = self.rng
        for k in range(self._plans):
            pid = f"p{k}"
            images = [f"img{j}:1" for j in range(r.randint(1, 3))]
            targets = [nid for nid in self.ids if r.random() < 0.8] or [self.ids[0]]
            items = tuple(
                PlanItem(nid, img, f"sha256:{k}{j}", r.randint(1, 100))
                for nid in targets
                for j, img in enumerate(images)
            )
            doc = PlanDocument(
                {
                    "name": pid,
                    "nodes": {nid: images for nid in targets},
                    "policy": {"retries": 5, "timeout": "2s", "parallelism": 3},
                }
            )
            self.submitted[pid] = (doc, items)
            self.at(
                r.uniform(0.5, max(0.6, self.fault_end)), functools.partial(self._submit, pid, 0)
            )
            if r.random() < 0.1:
                self.at(r.uniform(1.0, self.fault_end + 1.0), functools.partial(self._cancel, pid))

    def _submit(self, pid: str, tries: int) -> None:
        if pid in self.acked or tries > 40:
            return
        doc, items = self.submitted[pid]
        coords = [
            n
            for n in self.nodes.values()
            if self._live(n) and n.core is not None and n.core.role is Role.COORDINATOR
        ]
        if coords:
            node = self.rng.choice(coords)
            assert node.core is not None
            self._do(node, node.core.submit(pid, doc, items, self.now, pid))
        # a client retries until acknowledged (same plan id: idempotent)
        self.at(self.now + 0.5, lambda: self._submit(pid, tries + 1))

    def _cancel(self, pid: str) -> None:
        live = [n for n in self.nodes.values() if self._live(n)]
        if not live:
            return
        node = self.rng.choice(live)
        assert node.core is not None
        if node.core.replica.plan(pid) is not None:
            self.cancelled.add(pid)
            self._do(node, node.core.cancel(pid, self.now))

    # --- properties ------------------------------------------------------------------------------

    def _check_fence(self, node: _Node) -> None:
        rec = node.store.election
        if rec.highest_term < node.highest:
            raise Violation(
                f"{node.node_id}: accepted term went down {node.highest} -> {rec.highest_term}"
            )
        node.highest = rec.highest_term
        if rec.accepted is not None:
            prev = node.fence.setdefault(rec.highest_term, rec.accepted)
            if prev != rec.accepted:
                raise Violation(
                    f"{node.node_id} accepted two coordinators for term {rec.highest_term}: "
                    f"{prev} and {rec.accepted}"
                )

    def _check_one_coordinator(self, term: int) -> None:
        wins = self.wins[term]
        if len(wins) < 2:
            return
        (a, ta), (b, tb) = wins[0], wins[-1]
        # Two winners of one term are allowed only if the topology or the views were moving
        # (partition, crash, pause, detection delay) around the elections.
        window = (
            self.cfg.coordinator_timeout_s + self.fd_delay[1] + self.cfg.election_timeout_max_s * 2
        )
        unsettled = any(min(ta, tb) - window <= t <= max(ta, tb) for t in self.topology_at)
        if not unsettled:
            raise Violation(f"two coordinators for term {term} in a settled cluster: {a}, {b}")

    def run_to_convergence(self) -> None:
        """Run past the healing point until the cluster converged (or the run's end)."""
        self.run(until=self.fault_end + self.cfg.coordinator_timeout_s)
        while self.now < self.end:
            self.run(until=self.now + 0.25)
            try:
                self.check_end()
            except Violation:
                continue
            return

    def check_end(self) -> None:
        """Convergence properties, once everything healed and the run ended."""
        cores = [n.core for n in self.nodes.values() if n.core is not None]
        coords = [c for c in cores if c.role is Role.COORDINATOR]
        if len(coords) != 1:
            raise Violation(
                f"{len(coords)} coordinators after healing: {[c.node_id for c in coords]}"
            )
        self._check_plans_kept(cores, coords[0])
        self._check_converged(cores, coords[0])

    def _check_plans_kept(self, cores: list[NodeCore], coord: NodeCore) -> None:
        """G1: every acknowledged plan is held by the coordinator; the rest were aborted."""
        for pid in self.submitted:
            # The client retries until acknowledged; only a plan aborted (never acknowledged)
            # may stay unacknowledged.
            if pid not in self.acked and not coord.replica.is_aborted(pid):
                raise Violation(f"plan {pid} neither acknowledged nor aborted")
        for pid, at in self.acked.items():
            if coord.replica.plan(pid) is None:
                raise Violation(
                    f"acknowledged plan {pid} (at {at:.3f}) not held by the coordinator "
                    f"{coord.node_id}"
                )

    def _check_converged(self, cores: list[NodeCore], coord: NodeCore) -> None:
        """G2: every open plan finished, every holder agrees with the coordinator and every
        target with the coordinator about its own items, and "done" means pulled."""
        truth = coord.replica
        for core in cores:
            for rec in core.replica.plans():
                if core.replica.cancelled(rec.plan_id):
                    continue
                left = core.replica.remaining(rec.plan_id)
                if left:
                    raise Violation(
                        f"plan {rec.plan_id} not converged on {core.node_id}: {left[:3]}"
                    )
            for pid, value in core.replica.digest().items():
                if value.startswith("p"):
                    expected = truth.projection(pid, core.node_id)
                else:
                    expected = truth.entry(pid)
                if expected is not None and value != expected:
                    raise Violation(
                        f"{core.node_id} disagrees with the coordinator about {pid}: "
                        f"{value} != {expected}"
                    )
        for pid in self.acked:
            if pid in self.cancelled:
                continue
            for (node, image), res in truth.results(pid).items():
                if res.state is ItemState.DONE and (pid, image) not in self.nodes[node].pulled:
                    raise Violation(f"{pid} {node} {image} done but never pulled")


def default_nodes(seed: int) -> int:
    """Cluster size of a seed: 2-4 nodes, 2-5 for every fourth seed (keeps CI fast)."""
    return random.Random(seed).randint(2, 5 if seed % 4 == 0 else 4)


def run_seed(seed: int, n: int | None = None, **kw: Any) -> SimResult:
    """Run one seeded schedule and check every property; raises Violation with a replay line."""
    nodes = n if n is not None else default_nodes(seed)
    kw.setdefault("plans", 1 + seed % 2)
    cluster = Cluster(seed, nodes, **kw)
    try:
        cluster.run_to_convergence()
        cluster.check_end()
    except Violation as e:
        raise Violation(
            f"seed {seed}: {e}\n  replay: python -m houndd.sim --seed {seed} --nodes {nodes}"
        ) from None
    coords = {t: [w for w, _ in ws] for t, ws in cluster.wins.items()}
    return SimResult(seed, nodes, cluster.events, sorted(cluster.acked), coords, cluster.now)


def failover_time(seed: int, n: int, config: Config | None = None) -> float:
    """Seconds from killing a settled coordinator to the next coordinator's first dispatch.

    A plan with long pulls is running when the coordinator is killed, so the new coordinator
    has open work to resume.
    """
    cfg = config or sim_config()
    cluster = Cluster(
        seed,
        n,
        config=cfg,
        faults=False,
        plans=0,
        fail_rate=0.0,
        loss=0.0,
        settle_s=60.0,
        pull_s=(20.0, 40.0),  # long pulls: the plan is still running at the kill
    )
    cluster.run(until=cfg.coordinator_timeout_s * 4)
    coord = next(
        nid
        for nid, node in cluster.nodes.items()
        if node.core is not None and node.core.role is Role.COORDINATOR
    )
    images = [f"big{j}:1" for j in range(8)]
    items = tuple(
        PlanItem(nid, img, f"sha256:{j}", 100)
        for nid in cluster.ids
        for j, img in enumerate(images)
    )
    doc = PlanDocument(
        {
            "name": "failover",
            "nodes": {nid: images for nid in cluster.ids},
            "policy": {"timeout": "1h", "parallelism": 1, "per_node_parallelism": 1},
        }
    )
    cluster.submitted["f"] = (doc, items)
    cluster._submit("f", 0)
    cluster.run(until=cluster.now + cfg.coordinator_timeout_s)
    kill_at = cluster.now
    cluster.crash(coord)
    cluster.first_dispatch_after = kill_at
    while cluster.first_dispatch_at is None and cluster._q and cluster.now < kill_at + 60:
        cluster.run(until=cluster.now + cfg.heartbeat_interval_s)
    if cluster.first_dispatch_at is None:
        raise Violation(f"seed {seed}: no dispatch after the coordinator was killed")
    return cluster.first_dispatch_at - kill_at
