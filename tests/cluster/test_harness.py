"""The multi-host harness: namespaces, per-host dockerd, registry, shaping, faults, teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from houndd.config import load
from tests.cluster.harness import (
    HOUNDD_PORT,
    NETNS_DIR,
    REGISTRY_PORT,
    RUNS_DIR,
    Cluster,
    ImageSpec,
    houndd_missing,
    render_toml,
    sweep_stale,
)
from tests.cluster.marks import NETNS_MARKS

pytestmark = NETNS_MARKS

MB = 1_000_000


def _resources(run_id: str) -> list[str]:
    """Namespaces and links of a run that still exist."""
    prefix = f"hd-{run_id}-"
    names = [p.name for p in Path("/sys/class/net").glob(prefix + "*")]
    if NETNS_DIR.exists():
        names += [f"netns:{p.name}" for p in NETNS_DIR.glob(prefix + "*")]
    return names


def _timed_pull(cluster: Cluster, host: str, ref: str) -> float:
    start = time.monotonic()
    cluster.docker(host, "pull", "-q", ref)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(3, workdir=tmp_path_factory.mktemp("cluster")) as c:
        yield c


def test_hosts_pull_through_their_own_dockerd(cluster: Cluster) -> None:
    digest = cluster.push_images([ImageSpec("harness/small", 2 * MB, seed=11)])["harness/small"]
    ref = cluster.image_ref("harness/small")
    want = f"{cluster.registry_address}/harness/small@{digest}"

    cluster.docker("n1", "pull", ref)
    assert want in cluster.image_digests("n1")
    # Each host has its own engine: n1's pull put nothing on n2.
    assert want not in cluster.image_digests("n2")

    for host in ("n2", "n3"):
        cluster.docker(host, "pull", ref)
        assert want in cluster.image_digests(host)

    cluster.remove_images("n3")
    assert cluster.image_digests("n3") == set()


def test_hosts_reach_only_the_private_subnet(cluster: Cluster) -> None:
    registry_host = cluster.registry_address.split(":")[0]
    assert cluster.reachable("n1", registry_host, REGISTRY_PORT)
    # No default route inside a host: nothing outside the bridge's /24 is routable.
    routes = cluster.run_in("n1", ["ip", "route", "show"], check=True).stdout
    assert "default" not in routes
    assert f"{cluster.bridge_address.rsplit('.', 1)[0]}.0/24" in routes


def test_host_ingress_shaping_limits_throughput(cluster: Cluster) -> None:
    cluster.push_images([ImageSpec("harness/eight", 8 * MB, seed=12)])
    ref = cluster.image_ref("harness/eight")
    cluster.set_host_ingress("n1", 16)
    try:
        shaped = _timed_pull(cluster, "n1", ref)
    finally:
        cluster.set_host_ingress("n1", None)
    unshaped = _timed_pull(cluster, "n2", ref)
    # 8 MB at 16 Mbit/s is 4 s on the wire; unshaped veths move it in well under a second.
    assert shaped >= 3.5, f"shaped pull took {shaped:.2f}s"
    assert shaped < 15, f"shaped pull took {shaped:.2f}s: shaping is far stricter than asked"
    assert unshaped < shaped / 2, f"unshaped {unshaped:.2f}s vs shaped {shaped:.2f}s"
    assert cluster.host_ingress_mbit("n1") is None


def test_registry_egress_is_shared_by_all_hosts(cluster: Cluster) -> None:
    cluster.push_images([ImageSpec("harness/four", 4 * MB, seed=13)])
    ref = cluster.image_ref("harness/four")
    cluster.set_registry_egress(16)
    try:
        with ThreadPoolExecutor(2) as pool:
            times = list(pool.map(lambda h: _timed_pull(cluster, h, ref), ["n2", "n3"]))
    finally:
        cluster.set_registry_egress(None)
    # Two hosts x 4 MB through one 16 Mbit/s registry link: the last finishes after >= 4 s.
    assert max(times) >= 3.5, f"pull times {times}"
    assert cluster.registry_egress_mbit is None


def test_link_down_cuts_the_host_off_and_link_up_restores_it(cluster: Cluster) -> None:
    registry_host = cluster.registry_address.split(":")[0]
    cluster.push_images([ImageSpec("harness/link", 1 * MB, seed=14)])
    ref = cluster.image_ref("harness/link")
    cluster.link_down("n3")
    try:
        assert not cluster.reachable("n3", registry_host, REGISTRY_PORT, timeout_s=1.0)
        failed = cluster.docker("n3", "pull", ref, check=False, timeout=120)
        assert failed.returncode != 0
        assert cluster.reachable("n2", registry_host, REGISTRY_PORT)  # only n3 is cut off
    finally:
        cluster.link_up("n3")
    assert cluster.reachable("n3", registry_host, REGISTRY_PORT)
    cluster.docker("n3", "pull", ref)


def test_cut_drops_everything_until_reconnect(cluster: Cluster) -> None:
    registry_host = cluster.registry_address.split(":")[0]
    cluster.cut("n3")
    try:
        cluster.cut("n3")  # does not stack: one reconnect undoes it
        assert not cluster.reachable("n3", registry_host, REGISTRY_PORT, timeout_s=1.0)
        assert cluster.reachable("n2", registry_host, REGISTRY_PORT)  # only n3 is cut off
    finally:
        cluster.reconnect("n3")
    assert cluster.reachable("n3", registry_host, REGISTRY_PORT)
    rules = cluster.run_in("n3", ["iptables", "-S"], check=True).stdout
    assert "hd-cut" not in rules


def test_set_loss_installs_and_removes_drop_rules(cluster: Cluster) -> None:
    def loss_rules(host: str) -> list[str]:
        out = cluster.run_in(host, ["iptables", "-S"], check=True).stdout
        return [line for line in out.splitlines() if "hd-loss" in line]

    cluster.set_loss("all", 0.25)
    try:
        for host in ("n1", "n2", "n3"):
            rules = loss_rules(host)
            assert len(rules) == 2 and all("--probability 0.25" in r for r in rules), rules
        cluster.set_loss("n2", 0.5)  # replaces, does not stack
        assert len(loss_rules("n2")) == 2
        assert all("0.5" in r for r in loss_rules("n2"))
    finally:
        cluster.set_loss("all", 0)
    assert all(loss_rules(h) == [] for h in ("n1", "n2", "n3"))


def test_houndd_config_is_valid_for_the_daemon(cluster: Cluster) -> None:
    text = render_toml(cluster.houndd_config("n2", {"labels": {"zone": "b"}}))
    data = tomllib.loads(text)
    assert data["node_name"] == "n2"
    assert data["bind"] == data["advertise"] == cluster.host("n2").address
    assert data["interfaces"] == [cluster.host("n2").address]
    assert sorted(data["seeds"]) == sorted(
        f"{cluster.host(h).address}:{HOUNDD_PORT}" for h in ("n1", "n3")
    )
    assert data["docker_host"] == cluster.host("n2").docker_host
    path = cluster.host("n2").workdir / "check.toml"
    path.write_text(text)
    config = load(path, env={})  # the daemon's own loader accepts every key we write
    assert config.preset == "local"
    assert config.port == HOUNDD_PORT
    assert dict(config.labels) == {"zone": "b"}


@pytest.mark.skipif(houndd_missing() is not None, reason=str(houndd_missing()))
def test_houndd_runs_in_every_host_and_sees_the_others(cluster: Cluster) -> None:
    try:
        for h in cluster.hosts:
            cluster.start_houndd(h)
        deadline = time.monotonic() + 30
        names: set[str] = set()
        while time.monotonic() < deadline:
            status = cluster.houndd_json("n2", "status")
            members = status.get("members", []) if isinstance(status, dict) else []
            names = {m.get("name") for m in members if m.get("state") == "alive"}
            if names >= {"n1", "n2", "n3"}:
                break
            time.sleep(0.5)
        assert names >= {"n1", "n2", "n3"}, cluster.houndd_log_tail("n2")
    finally:
        for h in cluster.hosts:
            cluster.stop_houndd(h)


def test_teardown_leaves_nothing_behind(tmp_path: Path) -> None:
    c = Cluster(2, workdir=tmp_path, run_id=f"td{os.getpid() % 1000}")
    with c:
        pids = [p for h in c.hosts for p in c.pids(h)]
        assert pids, "dockerd and containerd run inside the host namespaces"
        assert _resources(c.run_id)
    assert _resources(c.run_id) == []
    assert not (RUNS_DIR / f"{c.run_id}.json").exists()
    assert all(not Path(f"/proc/{p}").exists() for p in pids), "a process outlived teardown"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
    c.teardown()  # idempotent


def test_sweep_removes_a_crashed_run(tmp_path: Path) -> None:
    run_id = f"cr{os.getpid() % 1000}"
    # A run whose process dies without tearing down, leaving a process in its namespace.
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tests.cluster.harness import Cluster
        c = Cluster(2, workdir={str(tmp_path)!r}, run_id={run_id!r}, docker=False).start()
        p = subprocess.Popen(["nsenter", "--net=/var/run/netns/" + c.hosts[0].netns,
                              "sleep", "300"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid, flush=True)
        os._exit(0)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    orphan = int(out.stdout.split()[0])
    assert Path(f"/proc/{orphan}").exists()
    assert _resources(run_id)
    state = json.loads((RUNS_DIR / f"{run_id}.json").read_text())

    removed = sweep_stale()

    assert run_id in removed
    assert _resources(run_id) == []
    assert not (RUNS_DIR / f"{run_id}.json").exists()
    assert not any(f"10.213.{state['subnet']}." in a for a in _root_addresses())
    time.sleep(0.2)
    assert not _alive(orphan)


def _root_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_demo_runs_up_to_houndd(capsys: pytest.CaptureFixture[str]) -> None:
    from demo.cluster_demo import main  # a script, imported only here

    assert main(["--hosts", "3", "--no-houndd"]) == 0
    out = capsys.readouterr().out
    assert "image-a: n1, n3" in out  # Table 2's classification of Table 1's first rows
    assert "image-d: n2, n3" in out
    assert "tearing down" in out
