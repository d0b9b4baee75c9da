"""A plan that is slow to parse must not stall the daemon: two real `houndd run` processes (the
in-memory engine), a 1 MiB YAML plan that takes seconds to parse, submitted to the
coordinator. While it parses, both nodes keep answering, heartbeats keep flowing (the other
node never loses the coordinator: no election, the term stays), and the plan is refused
naming its field.

Parsed on the event loop, this document froze the coordinator for over ten seconds; the other
node declared it dead and elected itself.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import http, start_seeded

pytestmark = pytest.mark.processes

# Within the 1 MiB cap; half a million one-character flow scalars: seconds of parser work even
# for libyaml, and the plan is invalid only once parsed (500 images per target).
SLOW_PLAN = "name: slow\ntargets:\n  - all: true\n    images: [" + ",".join("a" * 500_000) + "]\n"


def test_a_slow_plan_does_not_stall_gossip_or_heartbeats(tmp_path: Path) -> None:
    names = ["s1", "s2"]
    cluster = start_seeded(tmp_path, names, docker_host="fake://?pull_s=0&size=1000")
    try:
        cluster.wait_for(lambda: cluster.coordinator("s1")[0], 20, "a coordinator")
        leader, term = cluster.coordinator("s1")
        cluster.wait_for(lambda: cluster.coordinator("s2") == (leader, term), 20, "agreement")
        node = cluster.nodes[leader]
        answer: dict[str, Any] = {}

        def submit() -> None:
            answer["reply"] = http(
                "POST",
                node.api + "/v1/plans",
                node.token,
                SLOW_PLAN.encode(),
                timeout=120,
                content_type="application/yaml",
            )

        submitter = threading.Thread(target=submit)
        submitter.start()
        views: list[tuple[str, str | None, int]] = []
        gaps: list[float] = []
        last = time.monotonic()
        while submitter.is_alive():
            for name in names:
                # a frozen loop would not answer within the timeout: that raises here
                status, cl = cluster.nodes[name].get("/v1/cluster", timeout=5.0)
                assert status == 200, cl
                views.append((name, cl["coordinator"]["name"], int(cl["term"])))
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            time.sleep(0.05)
        submitter.join()

        status, body = answer["reply"]
        assert status == 400, body
        assert body["field"] == "targets[0].images" and "too many entries" in body["detail"], body
        assert len(views) >= 2 * len(names), "the submission ended before it was observed"
        assert {(c, t) for _, c, t in views} == {(leader, term)}, views
        for name in names:
            assert cluster.coordinator(name) == (leader, term)
        print(f"polls={len(gaps)} longest gap between answers={max(gaps):.2f}s")
    finally:
        cluster.close()
