"""Election at startup with real daemons (issue #9 item 9).

Three daemons started together, mDNS discovery only. Before the join window, each elected
itself alone (electorate 1) before discovery had found the others, so two nodes held term 1
at once until one was contested. Every node's `/v1/health` (coordinator, term) is polled from
the moment it answers: no term may ever show two coordinators.
"""

from __future__ import annotations

import json
import signal
import stat
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.procs import LocalCluster, http

pytestmark = pytest.mark.processes

NAMES = ("j1", "j2", "j3")
WATCH_S = 6.0
START_DEADLINE_S = 60.0


def test_daemons_started_together_never_show_two_coordinators_in_one_term(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path)
    for name in NAMES:
        cluster.add(name, mdns=True)
    try:
        for name in NAMES:
            cluster.start(name)
        coordinators: dict[int, set[str]] = defaultdict(set)
        last: dict[str, tuple[str | None, int]] = {}
        # Watch from the first answer (the API is up before the first election can run) until
        # every daemon has answered for WATCH_S and they agree; a busy machine may take a while
        # to start three Python processes, hence the generous deadline.
        all_up_at: float | None = None
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            for name in NAMES:
                try:
                    status, health = http(
                        "GET", cluster.nodes[name].api + "/v1/health", timeout=1.0
                    )
                except OSError:
                    continue  # not serving yet
                if status != 200:
                    continue
                coordinator, term = health["coordinator"], int(health["term"])
                last[name] = (coordinator, term)
                if coordinator is not None:
                    coordinators[term].add(coordinator)
            if all_up_at is None and set(last) == set(NAMES):
                all_up_at = time.monotonic()
            agreed = len(set(last.values())) == 1 and None not in {c for c, _ in last.values()}
            if all_up_at is not None and time.monotonic() - all_up_at >= WATCH_S and agreed:
                break
            time.sleep(0.05)
        doubled = {term: ids for term, ids in coordinators.items() if len(ids) > 1}
        assert not doubled, f"terms with two coordinators: {doubled}"
        assert set(last) == set(NAMES), f"not every daemon answered: {last}"
        assert len(set(last.values())) == 1, f"no agreement in {START_DEADLINE_S} s: {last}"
        ((coordinator, _),) = set(last.values())
        assert coordinator is not None
    finally:
        cluster.close()


def test_a_restarted_node_without_seeds_rejoins_its_peers_instead_of_electing_itself(
    tmp_path: Path,
) -> None:
    """The first node of a static-seed cluster has no seeds (the others seed to it) and here
    no mDNS. Restarted, it could find nobody; its join window ended, it elected itself alone
    and coordinated a term of its own beside the cluster's coordinator until the others'
    seed retry (30 s here) found it, and a contest moved the cluster to a new term. Now it
    offers the peers it last saw alive (`state_dir/peers.json`) and simply rejoins."""
    slow_retry = {"join_retry_s": 30.0}
    cluster = LocalCluster(tmp_path)
    first = cluster.add("r1", extra=slow_retry)
    seed = [f"127.0.0.1:{first.port}"]
    for name in ("r2", "r3"):
        cluster.add(name, seeds=seed, extra=slow_retry)
    names = ["r1", "r2", "r3"]
    try:
        cluster.start("r1")
        cluster.wait_ready("r1")  # r2 and r3 join through it
        for name in ("r2", "r3"):
            cluster.start(name)
        cluster.wait_for(
            lambda: (
                all(set(cluster.members(n).values()) == {"alive"} for n in names)
                and all(len(cluster.members(n)) == len(names) for n in names)
            ),
            20,
            "membership",
        )
        peers = first.state_dir / "peers.json"
        others = {("127.0.0.1", cluster.nodes[n].port) for n in ("r2", "r3")}
        cluster.wait_for(
            lambda: {tuple(a) for a in json.loads(peers.read_text())} == others,
            15,
            "r1 remembering its peers",
        )
        assert stat.S_IMODE(peers.stat().st_mode) == 0o600

        cluster.signal("r1", signal.SIGKILL)
        assert cluster.nodes["r1"].proc is not None
        cluster.nodes["r1"].proc.wait(10)
        survivors = ["r2", "r3"]

        def agreed() -> tuple[str | None, int] | None:
            views = {cluster.coordinator(n) for n in survivors}
            (view,) = views if len(views) == 1 else (None,)
            return view if view and view[0] not in (None, "r1") else None

        before = cluster.wait_for(agreed, 20, "the survivors agreeing on a coordinator")
        log_offset = len(cluster.nodes["r1"].log())
        cluster.start("r1")
        cluster.wait_ready("r1")
        # Past r1's join window and a few heartbeats: everyone still sees the same coordinator
        # in the same term, r1 included, and r1 never stood for election alone.
        cluster.wait_for(lambda: cluster.coordinator("r1") == before, 10, "r1 following")
        time.sleep(3.0)
        for name in names:
            assert cluster.coordinator(name) == before, name
        after_restart = cluster.nodes["r1"].log()[log_offset:]
        assert "electorate=1" not in after_restart, after_restart[-3000:]
        assert "became coordinator" not in after_restart, after_restart[-3000:]
    finally:
        cluster.close()
