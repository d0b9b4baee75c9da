"""Five real `houndd run` processes on 127.0.0.1: discovery, failure detection, restart,
foreign clusters and cluster-wide key rotation."""

from __future__ import annotations

import base64
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from houndd.config import local
from houndd.wire.keyring import Keyring, derive_api_token, generate_key
from tests.procs import LocalCluster, http

pytestmark = pytest.mark.processes

NAMES = [f"n{i}" for i in range(1, 6)]


def _all_see_all(cluster: LocalCluster, names: list[str]) -> bool:
    for name in names:
        seen = cluster.members(name)
        if any(seen.get(other) != "alive" for other in names):
            return False
    return True


@pytest.fixture
def five_mdns(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path)
    for name in NAMES:
        cluster.add(name, mdns=True)
    try:
        for name in NAMES:
            cluster.start(name)
        for name in NAMES:
            cluster.wait_ready(name)
        yield cluster
    finally:
        cluster.close()


def test_five_daemons_find_each_other_over_mdns_within_5s(five_mdns: LocalCluster) -> None:
    started = time.monotonic()
    five_mdns.wait_for(lambda: _all_see_all(five_mdns, NAMES), 5.0, "full membership via mDNS")
    assert time.monotonic() - started < 5.0


def test_seeds_only_without_mdns(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    first = cluster.add(NAMES[0])
    for name in NAMES[1:]:
        cluster.add(name, seeds=[f"127.0.0.1:{first.port}"])
    try:
        for name in NAMES:
            cluster.start(name)
        for name in NAMES:
            cluster.wait_ready(name)
        cluster.wait_for(lambda: _all_see_all(cluster, NAMES), 5.0, "full membership via seeds")
    finally:
        cluster.close()


def test_sigkill_is_detected_and_restart_comes_back_with_higher_incarnation(
    five_mdns: LocalCluster,
) -> None:
    cluster = five_mdns
    cluster.wait_for(lambda: _all_see_all(cluster, NAMES), 5.0, "full membership")
    status, body = cluster.nodes["n1"].get("/v1/nodes/n5")
    assert status == 200
    before = body["incarnation"]

    cfg = local()
    # SWIM bound: a probe round to reach n5, the probe timeout, then the (Lifeguard) suspicion
    # timeout at its maximum; generous slack for a loaded 2-core CI machine.
    limit = (
        5 * (cfg.probe_interval_s + cfg.probe_timeout_s)
        + cfg.suspicion_max_mult * (cfg.suspicion_mult * cfg.probe_interval_s)
        + 3.0
    )
    cluster.signal("n5", signal.SIGKILL)
    killed = time.monotonic()
    others = NAMES[:-1]
    cluster.wait_for(
        lambda: all(cluster.members(n).get("n5") == "dead" for n in others),
        limit,
        "n5 marked dead by everyone",
    )
    assert time.monotonic() - killed < limit
    # nobody else was harmed
    assert all(cluster.members(n)[o] == "alive" for n in others for o in others)

    cluster.start("n5")
    cluster.wait_ready("n5")
    cluster.wait_for(
        lambda: all(cluster.members(n).get("n5") == "alive" for n in others),
        10.0,
        "n5 alive again",
    )
    status, body = cluster.nodes["n1"].get("/v1/nodes/n5")
    assert body["incarnation"] > before


def test_foreign_cluster_key_is_never_listed_and_counted_refused(five_mdns: LocalCluster) -> None:
    cluster = five_mdns
    cluster.wait_for(lambda: _all_see_all(cluster, NAMES), 5.0, "full membership")
    foreign_key = cluster.root / "foreign.key"
    Keyring.generate().save(foreign_key)
    cluster.add(
        "intruder", mdns=True, key_path=foreign_key, seeds=[f"127.0.0.1:{cluster.nodes['n1'].port}"]
    )
    cluster.start("intruder")
    cluster.wait_ready("intruder")

    def refused_total() -> float:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        text = opener.open(cluster.nodes["n1"].api + "/metrics", timeout=2).read().decode()
        total = 0.0
        for line in text.splitlines():
            match = re.match(
                r'houndd_peer_messages_refused_total\{reason="(\w+)"\} ([0-9.e+]+)', line
            )
            if match:
                total += float(match.group(2))
        return total

    cluster.wait_for(lambda: refused_total() > 0, 8.0, "refused packets from the intruder")
    time.sleep(2.0)  # several more probe and join rounds
    for name in NAMES:
        assert "intruder" not in cluster.members(name)
    intruder = cluster.nodes["intruder"]
    status, body = http(
        "GET", intruder.api + "/v1/cluster", derive_api_token(Keyring.load(foreign_key).primary)
    )
    assert status == 200
    assert [m["name"] for m in body["members"]] == ["intruder"]


def test_key_rotation_across_five_loses_no_member(five_mdns: LocalCluster) -> None:
    cluster = five_mdns
    cluster.wait_for(lambda: _all_see_all(cluster, NAMES), 5.0, "full membership")
    api, token = cluster.nodes["n2"].api, cluster.token
    old = Keyring.load(cluster.key_path).primary
    new = generate_key()
    new_b64 = base64.b64encode(new).decode()

    status, body = http("POST", api + "/v1/keys", token, {"op": "install", "key": new_b64})
    assert status == 200, body
    assert set(body["nodes"]) == set(NAMES) and not any(
        r.get("error") for r in body["nodes"].values()
    )

    status, body = http("POST", api + "/v1/keys", token, {"op": "use", "key": new_b64})
    assert status == 200 and not any(r.get("error") for r in body["nodes"].values()), body
    time.sleep(1.0)
    assert _all_see_all(cluster, NAMES)

    # the old key is no longer primary anywhere, so removing it works everywhere
    new_token = derive_api_token(new)
    old_b64 = base64.b64encode(old).decode()
    status, body = http("POST", api + "/v1/keys", new_token, {"op": "remove", "key": old_b64})
    assert status == 200 and not any(r.get("error") for r in body["nodes"].values()), body

    # removing the primary is refused
    status, body = http("POST", api + "/v1/keys", new_token, {"op": "remove", "key": new_b64})
    assert status >= 400 or any(r.get("error") for r in body["nodes"].values())

    # tokens derive from installed keys: the old one is gone everywhere
    status, _ = http("GET", api + "/v1/cluster", token)
    assert status == 401
    for node in cluster.nodes.values():
        node.token = new_token
    time.sleep(1.5)  # several probe rounds under the new key only
    cluster.wait_for(lambda: _all_see_all(cluster, NAMES), 5.0, "membership after rotation")
    for name in NAMES:
        ring = Keyring.load(cluster.nodes[name].state_dir / "cluster.key")
        assert ring.primary == new and old not in ring.list()
        assert os.stat(cluster.nodes[name].state_dir / "cluster.key").st_mode & 0o777 == 0o600
