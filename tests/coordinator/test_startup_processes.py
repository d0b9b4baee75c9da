"""Election at startup with real daemons (issue #9 item 9).

Three daemons started together, mDNS discovery only. Before the join window, each elected
itself alone (electorate 1) before discovery had found the others, so two nodes held term 1
at once until one was contested. Every node's `/v1/health` (coordinator, term) is polled from
the moment it answers: no term may ever show two coordinators.
"""

from __future__ import annotations

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
