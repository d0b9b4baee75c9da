"""An in-process `Daemon` on 127.0.0.1, run on an event loop of its own in a thread.

Tests talk to it over real HTTP from the test thread (plain `requests`, and schemathesis,
which is synchronous), so the daemon's loop must not be the test's loop. Anything that reads
daemon state runs on the daemon's loop through `RunningDaemon.call` (the daemon is not
thread-safe, and SQLite objects stay on the loop thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests

from houndd import config as houndd_config
from houndd.daemon import Daemon
from houndd.errors import PullError
from houndd.image.credentials import RegistryAuth
from houndd.image.reference import parse_reference
from houndd.image.registry import Resolved
from houndd.puller.memory import FakeEngine
from houndd.wire import Keyring, derive_api_token
from tests.procs import free_port

T = TypeVar("T")

PROBLEM_JSON = "application/problem+json"
START_TIMEOUT_S = 20.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


class LoopbackOnlyRegistry:
    """Wraps the daemon's registry client: references to any host but loopback fail as
    "registry unreachable" without a single packet leaving the machine. Fuzzed plans name
    arbitrary images (`docker.io/library/x`), and tests must not talk to the internet."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.refused: list[str] = []

    async def resolve(self, ref: str, auth: RegistryAuth | None = None) -> Resolved:
        """Delegate for loopback registries; refuse everything else."""
        try:
            host = parse_reference(ref).domain.rsplit(":", 1)[0]
        except ValueError:
            host = ""
        if host not in LOOPBACK_HOSTS:
            self.refused.append(ref)
            raise PullError("registry unreachable", "tests only reach loopback", transient=True)
        result: Resolved = await self._inner.resolve(ref, auth)
        return result

    async def close(self) -> None:
        """Close the wrapped client."""
        await self._inner.close()


@dataclass
class RunningDaemon:
    """Handle on a daemon running in its own thread."""

    daemon: Daemon
    engine: FakeEngine
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    base: str
    token: str
    state_dir: Path
    registry: LoopbackOnlyRegistry
    http: requests.Session = field(default_factory=requests.Session)
    error: list[BaseException] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.daemon.name

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token if token is not None else self.token}"}

    def request(
        self, method: str, path: str, *, token: str | None = "", **kw: Any
    ) -> requests.Response:
        """HTTP to the daemon; `token=""` sends the right token, `None` sends none."""
        headers = dict(kw.pop("headers", {}) or {})
        if token is not None:
            headers.update(self.headers(token or None))
        return self.http.request(method, self.base + path, headers=headers, timeout=10, **kw)

    def get_json(self, path: str) -> Any:
        resp = self.request("GET", path)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the daemon's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a sync function on the daemon's loop (to read its state safely)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def wait_for(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    def wait_coordinator(self, timeout: float = 10.0) -> None:
        """A single node elects itself; submissions answer 503 until it has."""
        self.wait_for(
            lambda: self.get_json("/v1/health")["coordinator"] == self.daemon.wire.node_id,
            timeout,
            "the node to become coordinator",
        )

    def submit(self, plan: dict[str, Any]) -> dict[str, Any]:
        resp = self.request("POST", "/v1/plans", json=plan)
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def wait_plan(self, plan_id: str, timeout: float = 20.0) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            view: dict[str, Any] = self.get_json(f"/v1/plans/{plan_id}")
            return view if view["state"] in ("done", "failed", "cancelled") else None

        return self.wait_for(final, timeout, f"plan {plan_id} to finish")

    def stop(self) -> None:
        """Orderly shutdown; re-raises whatever ended the daemon's loop early. Idempotent."""
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self.loop.call_soon_threadsafe(self.daemon.request_stop, "test done")
            self.thread.join(START_TIMEOUT_S)
        self.http.close()
        assert not self.thread.is_alive(), "daemon did not stop"
        if self.error:
            raise self.error[0]


def start_daemon(
    state_dir: Path,
    *,
    name: str = "api-node",
    engine: FakeEngine | None = None,
    keyring: Keyring | None = None,
    **overrides: Any,
) -> RunningDaemon:
    """Start a daemon (`local()` timings, no mDNS, loopback only). Alone unless `seeds` are
    given; daemons that should form a cluster share one `keyring`."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = state_dir / "cluster.key"
    keyring = keyring or Keyring.generate()
    keyring.save(key_path)
    settings: dict[str, Any] = {
        "node_name": name,
        "state_dir": str(state_dir),
        "bind": "127.0.0.1",
        "advertise": "127.0.0.1",
        "port": free_port(),
        "mdns": False,
        "interfaces": ("127.0.0.1",),
        "docker_host": "fake://",
    }
    config = houndd_config.local(**{**settings, **overrides})
    engine = engine or FakeEngine(any_image_size=4 << 20, pull_duration_s=0.2, progress_steps=4)
    started = threading.Event()
    holder: dict[str, Any] = {}
    errors: list[BaseException] = []

    async def main() -> None:
        daemon = Daemon(config, engine=engine)
        holder["daemon"] = daemon
        holder["loop"] = asyncio.get_running_loop()
        runner = asyncio.create_task(daemon.run())
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            guard = LoopbackOnlyRegistry(daemon.service.submission.registry)
            daemon.service.submission.registry = guard
            holder["registry"] = guard
        else:
            ready.cancel()
        started.set()
        await runner

    def thread_main() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # handed to the test thread by stop()
            errors.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=thread_main, name=f"daemon-{name}", daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT_S) or "registry" not in holder:
        thread.join(1.0)
        raise RuntimeError(f"daemon {name} did not start: {errors!r}")
    http = requests.Session()
    http.trust_env = False  # a proxy from the environment must not see loopback test traffic
    return RunningDaemon(
        daemon=holder["daemon"],
        engine=engine,
        loop=holder["loop"],
        thread=thread,
        base=f"http://127.0.0.1:{config.port}",
        token=derive_api_token(keyring.primary),
        state_dir=state_dir,
        registry=holder["registry"],
        http=http,
        error=errors,
    )


@contextlib.contextmanager
def running_daemon(state_dir: Path, **kw: Any) -> Iterator[RunningDaemon]:
    node = start_daemon(state_dir, **kw)
    try:
        yield node
    finally:
        node.stop()


def assert_problem(
    resp: requests.Response, status: int, *, field: str | None = None
) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and this `field`, if given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].split(";")[0] == PROBLEM_JSON, resp.headers
    body: dict[str, Any] = json.loads(resp.text)
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def scrape(node: RunningDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`/metrics` (anonymous) as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = node.request("GET", "/metrics", token=None)
    assert resp.status_code == 200, resp.text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """One sample's value; KeyError names what is missing."""
    key = (name, tuple(sorted(labels.items())))
    if key not in metrics:
        raise KeyError(f"no sample {name}{labels or ''} in /metrics")
    return metrics[key]
