"""`houndd init` and `houndd run` as processes: the cluster key is never silently replaced, log
lines cannot be forged through values a client sends, `log_format = "json"` writes one JSON
object per line, and a plan's items say when their node is dead and how long until they fail
as 'node unavailable' (what `--wait` shows)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from houndd.wire.keyring import Keyring
from tests.procs import LocalCluster, http, run_houndd

pytestmark = pytest.mark.processes


houndd = run_houndd


def test_init_refuses_to_replace_a_different_cluster_key_without_force(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = houndd("init", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    key_path = state / "cluster.key"
    mine = key_path.read_bytes()

    other = tmp_path / "other.key"
    Keyring.generate().save(other)
    refused = houndd("init", "--state-dir", str(state), "--join-key-file", str(other))
    assert refused.returncode == 2
    assert "already holds a different cluster key" in refused.stderr and "--force" in refused.stderr
    assert key_path.read_bytes() == mine

    same = tmp_path / "same.key"
    same.write_bytes(mine)
    same.chmod(0o600)
    assert houndd("init", "--state-dir", str(state), "--join-key-file", str(same)).returncode == 0
    assert key_path.read_bytes() == mine

    forced = houndd("init", "--state-dir", str(state), "--join-key-file", str(other), "--force")
    assert forced.returncode == 0, forced.stderr
    assert key_path.read_bytes() == other.read_bytes()
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"


FORGED = "2031-01-01T00:00:00.000Z ERROR   houndd.forged planted by a label value"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_lines_escape_what_clients_send(tmp_path: Path, log_format: str) -> None:
    cluster = LocalCluster(tmp_path)
    node = cluster.add("logs", docker_host="fake://", extra={"log_format": log_format})
    cluster.start("logs")
    try:
        cluster.wait_ready("logs")
        value = f"x\n{FORGED}\r\x1b[2J\x1b]0;title\x07\u2028end"
        status, body = http(
            "PUT", node.api + "/v1/nodes/logs/labels", node.token, {"labels": {"note": value}}
        )
        assert status == 200, body
        cluster.wait_for(lambda: "labels changed" in node.log(), 10, "the label change logged")
    finally:
        cluster.close()
    lines = node.log().splitlines()
    assert not [line for line in lines if line.startswith("2031-01-01")]
    assert "\x1b" not in node.log() and "\u2028" not in node.log()
    changed = next(line for line in lines if "labels changed" in line)
    if log_format == "json":
        for line in lines:
            record = json.loads(line)  # every line is one object
            assert set(record) >= {"ts", "level", "logger", "msg"}
        msg = json.loads(changed)["msg"]
    else:
        msg = changed
    # the value is all there, each control character written as an escape
    assert "note=x\\n" + FORGED + "\\r\\x1b[2J\\x1b]0;title\\x07\\u2028end" in msg


def test_items_of_a_dead_node_say_when_they_will_fail(tmp_path: Path) -> None:
    from tests.fixtures.images import push_image
    from tests.fixtures.services import start_registry

    registry = start_registry(tmp_path / "registry")
    cluster = LocalCluster(tmp_path / "cluster")
    try:
        push_image(registry.url, "dead/app", "1", 20_000, seed=7)
        image = f"{registry.address}/dead/app:1"
        first = cluster.add("alpha", docker_host="fake://?pull_s=30")
        cluster.add("beta", seeds=[f"127.0.0.1:{first.port}"], docker_host="fake://?pull_s=30")
        for name in ("alpha", "beta"):
            cluster.start(name)
            cluster.wait_ready(name)
        cluster.wait_for(lambda: len(cluster.members("alpha")) == 2, 20, "two members")
        cluster.wait_for(lambda: cluster.coordinator("alpha")[0] == "alpha", 20, "coordinator")
        status, accepted = http(
            "POST", first.api + "/v1/plans", first.token,
            {"name": "dead", "targets": [{"images": [image], "nodes": ["beta"]}]},
        )  # fmt: skip
        assert status == 201, accepted

        def row() -> dict[str, object]:
            _, plan = first.get(f"/v1/plans/{accepted['id']}")
            item: dict[str, object] = plan["items"][0]
            return item

        # in flight on beta (30 s pulls), so its death is what keeps the item waiting
        cluster.wait_for(lambda: row()["state"] == "pulling", 30, "beta pulling")
        cluster.signal("beta", signal.SIGKILL)
        timeout = 20.0  # node_return_timeout_s of the local preset

        def dead_row() -> dict[str, object] | None:
            current = row()
            return current if current.get("node_state") == "dead" else None

        dead = cluster.wait_for(dead_row, 30, "beta's item to show its node dead")
        assert dead["state"] in ("pending", "pulling")
        left = dead["unavailable_in_s"]
        assert isinstance(left, float) and 0 <= left <= timeout
    finally:
        cluster.close()
        registry.stop()
