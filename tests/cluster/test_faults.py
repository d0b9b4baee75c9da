"""Faults on the multi-host harness: crash, restart, pause, link loss, packet loss mid-plan.

The fault-injection suite of issue #9: a target that is also the coordinator restarted
mid-plan (mDNS discovery only), a worker restarted mid-pull, a target paused (SIGSTOP) for 8 s,
a target's link cut (iptables DROP) for 10 s. In each the plan must end `done` with no item
failed and every image present at the plan's digest in every host's own dockerd. Next to
them: a coordinator that never returns, a worker that stays away, 10% packet loss.

Four hosts in network namespaces, each with its own dockerd and houndd (`preset = local`),
one registry. The registry's egress is shaped so a plan takes several seconds and a fault can
land while pulls are in flight; the shaping sits on the registry's link, not on the hosts', so
gossip between hosts is not queued behind image bytes (a 100 ms tbf queue would otherwise
delay probes far beyond the local preset's 50 ms probe timeout).

Outcomes are read from the plan status API (`/v1/plans/ID`) and checked against each host's
own dockerd (`Cluster.image_digests`). Every test starts from fresh houndd state and empty
engines, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from houndd.wire.keyring import Keyring, derive_api_token
from tests.cluster.harness import Cluster, ClusterError, ImageSpec
from tests.cluster.marks import HOUNDD_NETNS_MARKS

pytestmark = HOUNDD_NETNS_MARKS

MB = 1_000_000
N_HOSTS = 4
# 4 hosts x 8 MB through 24 Mbit/s (3 MB/s): about 11 s of pulling per plan.
REGISTRY_MBIT = 24.0
IMAGES = (
    ImageSpec("faults/alpha", 3 * MB, layers=2, seed=301),
    ImageSpec("faults/beta", 5 * MB, layers=2, seed=302),
)
FINAL_STATES = ("done", "failed", "cancelled")
PLAN_TIMEOUT_S = 120.0


class Api:
    """Minimal synchronous client for one host's houndd API (from the root namespace)."""

    def __init__(self, cluster: Cluster, host: str) -> None:
        self.url = cluster.host(host).api_url
        key = Keyring.load(cluster.workdir / "cluster.key").primary
        self._token = derive_api_token(key)
        self.timeout_s = 10.0

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={
                "Authorization": f"Bearer {self._token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def get(self, path: str) -> Any:
        return self.request("GET", path)


def _try_get(api: Api, path: str) -> Any | None:
    """GET, or None while the node is unreachable or answers an error."""
    try:
        return api.get(path)
    except (OSError, ValueError):
        return None


def _wait(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _coordinator(view: Mapping[str, Any] | None) -> str | None:
    if not view:
        return None
    coord = view.get("coordinator") or {}
    return coord.get("name") if isinstance(coord, dict) else None


def _alive(view: Mapping[str, Any] | None) -> set[str]:
    members = (view or {}).get("members", [])
    return {m["name"] for m in members if m.get("state") == "alive"}


class Scenario:
    """One test's cluster state: houndd on every host with the given overrides."""

    def __init__(self, cluster: Cluster, digests: Mapping[str, str], overrides: dict[str, Any]):
        self.cluster = cluster
        self.digests = digests
        self.overrides = overrides
        self.names = [h.name for h in cluster.hosts]
        self.api: dict[str, Api] = {}

    def start(self) -> None:
        for name in self.names:
            self.cluster.start_houndd(name, self.overrides, wait_ready=False)
        for name in self.names:
            self.cluster.wait_houndd_ready(name)
        self.api = {name: Api(self.cluster, name) for name in self.names}
        self.wait_converged(self.names)

    def wait_converged(
        self, names: list[str], timeout_s: float = 60.0, *, not_coordinator: str | None = None
    ) -> str:
        """Wait until every named node sees all of them alive and the same coordinator
        (other than `not_coordinator`: right after a kill, survivors still name the dead one)."""

        def agreed() -> str | None:
            coords = set()
            for name in names:
                view = _try_get(self.api[name], "/v1/cluster")
                if view is None or not set(names) <= _alive(view):
                    return None
                coords.add(_coordinator(view))
            if len(coords) != 1 or None in coords or not_coordinator in coords:
                return None
            return coords.pop()

        coord: str = _wait(f"{names} to agree on a coordinator", agreed, timeout_s)
        return coord

    def refs(self) -> list[str]:
        return [self.cluster.image_ref(i.name, i.tag) for i in IMAGES]

    def submit(self, entry: str, nodes: list[str] | None = None) -> str:
        plan = {
            "name": "faults",
            "nodes": {n: self.refs() for n in nodes or self.names},
            "policy": {"parallelism": 10, "per_node_parallelism": 2, "pull_policy": "Always"},
        }
        accepted = self.api[entry].request("POST", "/v1/plans", json.dumps(plan).encode())
        return str(accepted["id"])

    def plan(self, via: str, plan_id: str) -> dict[str, Any] | None:
        view = _try_get(self.api[via], f"/v1/plans/{plan_id}")
        return view if isinstance(view, dict) else None

    def wait_items(
        self, via: str, plan_id: str, pred: Callable[[dict[str, Any]], bool], what: str
    ) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            view = self.plan(via, plan_id) or {}
            return [i for i in view.get("items", []) if pred(i)]

        items: list[dict[str, Any]] = _wait(what, matching, 60.0, 0.1)
        return items

    def wait_final(
        self, via: str, plan_id: str, timeout_s: float = PLAN_TIMEOUT_S
    ) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            view = self.plan(via, plan_id)
            return view if view and view["state"] in FINAL_STATES else None

        try:
            view: dict[str, Any] = _wait(f"plan {plan_id} to end", final, timeout_s, 0.5)
        except AssertionError:
            last = self.plan(via, plan_id)
            raise AssertionError(
                f"plan {plan_id} not final after {timeout_s:.0f} s: "
                f"{json.dumps(last, default=str)[:3000]}\n{via} log:\n"
                f"{self.cluster.houndd_log_tail(via, 60)}"
            ) from None
        return view

    def present(self, node: str, image_ref: str, digest: str) -> bool:
        repo = image_ref.rsplit(":", 1)[0]
        return f"{repo}@{digest}" in self.cluster.image_digests(node)

    def assert_converged(self, view: Mapping[str, Any], nodes: list[str]) -> None:
        """Every item of `nodes` is done at the pushed digest and present in its dockerd."""
        by_node = _items_by_node(view)
        for node in nodes:
            items = by_node[node]
            assert len(items) == len(IMAGES), f"{node}: {items}"
            for item in items:
                assert item["state"] == "done", f"{node} {item['image']}: {item}"
                name = item["image"].split("/", 1)[1].rsplit(":", 1)[0]
                assert item["digest"] == self.digests[name], item
                assert self.present(node, item["image"], item["digest"]), (
                    f"{node}: {item['image']}@{item['digest']} is not in its dockerd; "
                    f"it holds {sorted(self.cluster.image_digests(node))}"
                )

    def worker(self, coordinator: str, *, not_: str | None = None) -> str:
        return next(n for n in self.names if n not in (coordinator, not_))


def _items_by_node(view: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for item in view.get("items", []):
        out.setdefault(item["node"], []).append(item)
    return out


def _clear_images(cluster: Cluster) -> None:
    """Empty every engine. A pull a killed houndd started goes on in dockerd; wait it out."""
    for h in cluster.hosts:
        deadline = time.monotonic() + 60
        while True:
            try:
                cluster.remove_images(h)
                break
            except ClusterError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(N_HOSTS, workdir=tmp_path_factory.mktemp("faults")) as c:
        yield c


@pytest.fixture(scope="module")
def digests(cluster: Cluster) -> dict[str, str]:
    return cluster.push_images(IMAGES)


@pytest.fixture
def make_scenario(
    cluster: Cluster, digests: dict[str, str]
) -> Iterator[Callable[[dict[str, Any]], Scenario]]:
    """Start houndd everywhere with overrides, on fresh state and empty engines; undo faults."""

    def make(overrides: dict[str, Any]) -> Scenario:
        s = Scenario(cluster, digests, overrides)
        s.start()
        return s

    _clear_images(cluster)
    for h in cluster.hosts:
        shutil.rmtree(h.workdir / "state", ignore_errors=True)
    cluster.set_registry_egress(REGISTRY_MBIT)
    try:
        yield make
    finally:
        cluster.set_loss("all", 0)
        for h in cluster.hosts:
            cluster.link_up(h)
            cluster.reconnect(h)
            cluster.stop_houndd(h)
        cluster.set_registry_egress(None)


def _pulling(node: str) -> Callable[[dict[str, Any]], bool]:
    return lambda i: i["node"] == node and i["state"] == "pulling"


def _worker_mid_pull(
    make_scenario: Callable[..., Scenario], overrides: dict[str, Any]
) -> tuple[Scenario, str, str, str]:
    """Start houndd everywhere, submit through one worker and wait until another worker (the
    victim) pulls: returns (scenario, victim, entry, plan id)."""
    s = make_scenario(overrides)
    coordinator = s.wait_converged(s.names)
    victim = s.worker(coordinator)
    entry = s.worker(coordinator, not_=victim)
    plan_id = s.submit(entry)
    s.wait_items(entry, plan_id, _pulling(victim), f"a pull on {victim}")
    return s, victim, entry, plan_id


def _assert_done_everywhere(s: Scenario, via: str, plan_id: str) -> None:
    """The plan ends `done`, no item failed, every image is in every host's dockerd."""
    view = s.wait_final(via, plan_id)
    not_done = [i for i in view["items"] if i["state"] != "done"]
    assert not not_done, f"plan {view['state']}; items not done: {not_done}"
    assert view["state"] == "done"
    s.assert_converged(view, s.names)


def test_coordinator_target_restarts_mid_plan(make_scenario: Callable[..., Scenario]) -> None:
    """Issue #9 item 1 as reported: mDNS discovery only, the plan submitted through a
    non-coordinator, the coordinator (itself a target) SIGKILLed 1.5 s into the plan and
    restarted 5 s later. Its dispatches are refused while it is down; that must not spend
    its items' retries."""
    s = make_scenario({"seeds": [], "preset": "lan"})
    coordinator = s.wait_converged(s.names)
    entry = s.worker(coordinator)
    submitted = time.monotonic()
    plan_id = s.submit(entry)
    s.wait_items(entry, plan_id, _pulling(coordinator), f"a pull on {coordinator}")
    time.sleep(max(0.0, submitted + 1.5 - time.monotonic()))
    s.cluster.kill(coordinator, signal.SIGKILL)
    time.sleep(5.0)
    s.cluster.start_houndd(coordinator, s.overrides)
    _assert_done_everywhere(s, entry, plan_id)


def test_target_paused_then_resumed(make_scenario: Callable[..., Scenario]) -> None:
    s, victim, entry, plan_id = _worker_mid_pull(make_scenario, {})
    s.cluster.kill(victim, signal.SIGSTOP)  # requests to it hang; SWIM declares it dead
    time.sleep(8.0)
    s.cluster.kill(victim, signal.SIGCONT)
    _assert_done_everywhere(s, entry, plan_id)


def test_coordinator_sigkill_mid_plan(make_scenario: Callable[..., Scenario]) -> None:
    s = make_scenario({"node_return_timeout_s": 6.0})
    coordinator = s.wait_converged(s.names)
    entry = s.worker(coordinator)
    plan_id = s.submit(entry)
    # Kill once pulls are under way on a node other than the coordinator, so the plan is
    # genuinely mid-flight (dispatched, not finished) when its coordinator disappears.
    s.wait_items(entry, plan_id, _pulling(entry), f"a pull on {entry}")
    killed_at = time.monotonic()
    s.cluster.kill(coordinator, signal.SIGKILL)

    survivors = [n for n in s.names if n != coordinator]
    new_coordinator = s.wait_converged(survivors, timeout_s=30, not_coordinator=coordinator)
    takeover_s = time.monotonic() - killed_at

    view = s.wait_final(entry, plan_id)
    s.assert_converged(view, survivors)
    # The dead coordinator was a target too: its items are done (if they finished before the
    # kill) or failed with the named reason, never left pulling.
    for item in _items_by_node(view)[coordinator]:
        assert item["final"], item
        assert item["state"] == "done" or item["reason"] == "node unavailable", item
    assert view["coordinator"] == new_coordinator
    assert takeover_s < 30


def test_link_cut_mid_plan_then_back(make_scenario: Callable[..., Scenario]) -> None:
    s, victim, entry, plan_id = _worker_mid_pull(make_scenario, {})
    s.cluster.cut(victim)
    # Long enough for SWIM to declare the victim dead (and the victim everyone else, so it
    # may elect itself alone), shorter than node_return_timeout_s (20 s): it must come back,
    # rejoin under one coordinator and finish, its interrupted registry download included.
    time.sleep(10.0)
    s.cluster.reconnect(victim)
    _assert_done_everywhere(s, entry, plan_id)


def test_worker_sigkill_returns_and_is_retried(make_scenario: Callable[..., Scenario]) -> None:
    s, victim, entry, plan_id = _worker_mid_pull(make_scenario, {})
    s.cluster.kill(victim, signal.SIGKILL)
    time.sleep(3.0)
    s.cluster.start_houndd(victim, s.overrides)
    _assert_done_everywhere(s, entry, plan_id)


def test_worker_sigkill_stays_away_fails_named(make_scenario: Callable[..., Scenario]) -> None:
    return_timeout_s = 5.0
    s, victim, entry, plan_id = _worker_mid_pull(
        make_scenario, {"node_return_timeout_s": return_timeout_s}
    )
    s.cluster.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    view = s.wait_final(entry, plan_id)
    elapsed = time.monotonic() - killed_at

    survivors = [n for n in s.names if n != victim]
    s.assert_converged(view, survivors)
    assert view["state"] == "failed"
    victim_items = _items_by_node(view)[victim]
    failed = [i for i in victim_items if i["state"] == "failed"]
    assert failed, f"the killed worker's items all ended done: {victim_items}"
    for item in failed:
        assert item["reason"] == "node unavailable", item
        assert item["final"], item
    # The verdict waits for node_return_timeout_s after the node is declared dead.
    assert elapsed >= return_timeout_s, f"failed after {elapsed:.1f} s"


def test_ten_percent_packet_loss(make_scenario: Callable[..., Scenario]) -> None:
    s = make_scenario({})
    coordinator = s.wait_converged(s.names)
    entry = s.worker(coordinator)
    s.cluster.set_loss("all", 0.10)
    s.api[entry].timeout_s = 60.0
    submit_started = time.monotonic()
    plan_id = s.submit(entry)
    submit_s = time.monotonic() - submit_started

    dead_seen: list[tuple[str, str, float]] = []
    started = time.monotonic()

    def observe() -> None:
        for observer, api in s.api.items():
            view = _try_get(api, "/v1/cluster")
            for m in (view or {}).get("members", []):
                if m.get("state") == "dead":
                    dead_seen.append((observer, m["name"], time.monotonic() - started))

    def final() -> dict[str, Any] | None:
        observe()
        view = s.plan(entry, plan_id)
        return view if view and view["state"] in FINAL_STATES else None

    view = _wait(f"plan {plan_id} under 10% loss", final, PLAN_TIMEOUT_S, 0.5)
    # Keep watching a while after the plan: false deaths come from probes, not pulls.
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        observe()
        time.sleep(0.5)
    s.cluster.set_loss("all", 0)

    print(f"submit under 10% loss took {submit_s:.1f} s")
    assert not dead_seen, f"healthy nodes declared dead (observer, member, t): {dead_seen[:20]}"
    s.assert_converged(view, s.names)
    assert view["state"] == "done"
