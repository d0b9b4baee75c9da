"""Plan lifecycle through the API of an in-process daemon: cancel aborts in-flight pulls, and a
node that knows no coordinator answers 503 with Retry-After after a bounded wait."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from houndd.puller.memory import FakeEngine
from tests.api.harness import RunningDaemon, assert_problem, running_daemon
from tests.fixtures.images import push_image
from tests.fixtures.services import Registry

pytestmark = pytest.mark.docker  # the registry fixture (docker-registry, no dockerd)


@pytest.fixture
def slow_node(tmp_path: Path) -> Iterator[RunningDaemon]:
    engine = FakeEngine(any_image_size=8 << 20, pull_duration_s=30.0, progress_steps=30)
    with running_daemon(tmp_path / "slow", engine=engine, submit_wait_s=0.5) as node:
        node.wait_coordinator()
        yield node


def test_cancel_aborts_in_flight_pulls_and_stops_dispatching(
    slow_node: RunningDaemon, registry: Registry
) -> None:
    images = []
    for i in range(3):
        push_image(registry.url, f"cancel-{i}", "1", 20_000, seed=300 + i)
        images.append(f"{registry.address}/cancel-{i}:1")
    accepted = slow_node.submit(
        {
            "name": "to-cancel",
            "targets": [{"images": images, "all": True}],
            "policy": {"per_node_parallelism": 1},
        }
    )
    plan_id = accepted["id"]
    slow_node.wait_for(lambda: slow_node.engine.active == 1 or None, 10, "one pull in flight")
    resp = slow_node.request("DELETE", f"/v1/plans/{plan_id}")
    assert resp.status_code == 200, resp.text
    final = slow_node.wait_plan(plan_id, timeout=10)
    assert final["state"] == "cancelled"
    states = sorted(i["state"] for i in final["items"])
    assert "done" not in states and set(states) <= {"cancelled", "failed"}
    assert any(i["reason"] == "cancelled" for i in final["items"])
    slow_node.wait_for(lambda: slow_node.engine.active == 0 or None, 5, "the pull aborted")
    time.sleep(1.0)  # nothing else is dispatched after the cancel
    assert slow_node.engine.active == 0
    assert sum(slow_node.engine.pull_counts.values()) == 1


def test_no_coordinator_answers_503_with_retry_after(slow_node: RunningDaemon) -> None:
    core = slow_node.daemon.service.runtime.core
    slow_node.call(lambda: setattr(core, "coordinator", lambda now: None))
    try:
        before = slow_node.get_json("/v1/plans")["plans"]
        started = time.monotonic()
        resp = slow_node.request(
            "POST",
            "/v1/plans",
            json={"name": "x", "action": "prune", "targets": [{"images": [], "all": True}]},
        )
        waited = time.monotonic() - started
        problem = assert_problem(resp, 503)
        assert problem["title"] == "no coordinator"
        assert resp.headers["Retry-After"]
        assert 0.4 <= waited < 5.0  # waited for an election, bounded by submit_wait_s
        assert slow_node.get_json("/v1/plans")["plans"] == before
    finally:
        slow_node.call(lambda: delattr(core, "coordinator"))
    resp = slow_node.request(
        "POST",
        "/v1/plans",
        json={"name": "x", "action": "prune", "targets": [{"images": [], "all": True}]},
    )
    assert resp.status_code == 201, resp.text


def test_housekeeping_forgets_finished_plans_without_pulling_again(
    tmp_path: Path, registry: Registry
) -> None:
    push_image(registry.url, "forget-me", "1", 20_000, seed=501)
    image = f"{registry.address}/forget-me:1"
    engine = FakeEngine(any_image_size=1 << 20, pull_duration_s=0.05)
    with running_daemon(tmp_path / "hk", engine=engine) as node:
        node.wait_coordinator()
        plan_id = node.submit({"name": "hk", "targets": [{"images": [image], "all": True}]})["id"]
        assert node.wait_plan(plan_id)["state"] == "done"
        executor = node.daemon.executor
        assert node.call(lambda: executor.reports(plan_id))
        node.call(node.daemon.service.runtime._forget_finished)
        assert node.call(lambda: executor.reports(plan_id)) == []
        # the replica still knows the item is done: a new coordinator would not pull it again
        core = node.daemon.service.runtime.core
        (item,) = node.call(lambda: list(core.replica.results(plan_id).values()))
        assert item.state.value == "done"
        assert engine.pull_counts and sum(engine.pull_counts.values()) == 1


def test_cancel_of_a_finished_plan_is_refused_and_changes_nothing(
    tmp_path: Path, registry: Registry
) -> None:
    """Issue #9 item 11: cancelling a finished plan marked it `cancelled`. Now: 409 naming
    the plan's state, no cancel record stored, the outcome unchanged."""
    push_image(registry.url, "finished", "1", 20_000, seed=502)
    image = f"{registry.address}/finished:1"
    missing = f"{registry.address}/never-pushed:1"
    engine = FakeEngine(any_image_size=1 << 20, pull_duration_s=0.05)
    with running_daemon(tmp_path / "fin", engine=engine) as node:
        node.wait_coordinator()
        core = node.daemon.service.runtime.core
        done = node.submit({"name": "ok", "targets": [{"images": [image], "all": True}]})["id"]
        failed = node.submit({"name": "ko", "targets": [{"images": [missing], "all": True}]})["id"]
        engine.pull_duration_s = 30.0
        slow = {
            "name": "slow",
            "targets": [{"images": [image], "all": True}],
            "policy": {"pull_policy": "Always"},  # the image is present since `done`
        }
        cancelled = node.submit(slow)["id"]
        node.wait_for(lambda: engine.active == 1 or None, 10, "the slow pull in flight")
        assert node.request("DELETE", f"/v1/plans/{cancelled}").status_code == 200
        finals = {p: node.wait_plan(p)["state"] for p in (done, failed, cancelled)}
        assert finals == {done: "done", failed: "failed", cancelled: "cancelled"}
        for plan_id, state in finals.items():
            had_cancel = node.call(lambda p=plan_id: core.replica.cancelled(p))  # type: ignore[misc]
            resp = node.request("DELETE", f"/v1/plans/{plan_id}")
            problem = assert_problem(resp, 409, field="plan_id")
            assert problem["state"] == state
            assert state in problem["detail"]
            assert node.get_json(f"/v1/plans/{plan_id}")["state"] == state
            # nothing stored: the cancel record is what it was (none for done and failed)
            assert node.call(lambda p=plan_id: core.replica.cancelled(p)) == had_cancel  # type: ignore[misc]
        assert node.call(lambda: core.replica.cancelled(done)) is None
        assert node.call(lambda: core.replica.cancelled(failed)) is None
