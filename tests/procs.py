"""Real `houndd run` daemons as subprocesses on 127.0.0.1, for process-level tests.

Each daemon gets its own state directory, a free port (TCP and UDP), the shared cluster key
and the `local` preset. Everything is stopped by `LocalCluster.close()` (idempotent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from houndd.wire.keyring import Keyring, derive_api_token

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def run_houndd(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m houndd ARGS` with no HOUNDD_* variables from the caller's environment
    (plus `env`), output captured as text."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "houndd", *args],
        capture_output=True, text=True, env=full, timeout=timeout, check=False,
    )  # fmt: skip


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
    timeout: float = 5.0,
    *,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """A tiny synchronous JSON client (tests only; the real client is houndd.client)."""
    data = None
    headers = {}
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, raw.decode(errors="replace")


@dataclass
class Node:
    name: str
    port: int
    state_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        return http("GET", self.api + path, self.token, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalCluster:
    """N daemons on loopback sharing one cluster key."""

    root: Path
    key_path: Path = field(init=False)
    nodes: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_path = self.root / "cluster.key"
        if not self.key_path.exists():
            Keyring.generate().save(self.key_path)
        self.token = derive_api_token(Keyring.load(self.key_path).primary)

    def add(
        self,
        name: str,
        *,
        mdns: bool = False,
        seeds: Iterable[str] = (),
        docker_host: str = "unix:///nonexistent/docker.sock",
        extra: Mapping[str, Any] | None = None,
        key_path: Path | None = None,
    ) -> Node:
        port = free_port()
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = key_path or self.key_path
        dest = state / "cluster.key"
        shutil.copyfile(key, dest)
        os.chmod(dest, 0o600)
        settings: dict[str, Any] = {
            "node_name": name,
            "state_dir": str(state),
            "bind": "127.0.0.1",
            "port": port,
            "preset": "local",
            "mdns": mdns,
            "interfaces": ["127.0.0.1"],
            "seeds": list(seeds),
            "docker_host": docker_host,
            "log_level": "DEBUG",
        }
        settings.update(extra or {})
        config_path = state / "houndd.toml"
        config_path.write_text(_toml(settings))
        node = Node(name, port, state, config_path, state / "houndd.log")
        node.token = derive_api_token(Keyring.load(dest).primary)
        self.nodes[name] = node
        return node

    def start(self, name: str) -> Node:
        node = self.nodes[name]
        log = node.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "houndd", "run", "--config", str(node.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        return node

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.alive():
                raise AssertionError(f"{name} exited early:\n{node.log()[-3000:]}")
            with contextlib.suppress(OSError):
                status, _ = http("GET", node.api + "/v1/health", timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{name} not ready in {timeout}s:\n{node.log()[-3000:]}")

    def signal(self, name: str, sig: int) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        node = self.nodes[name]
        if node.proc is None:
            return None
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.terminate()
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        return node.proc.returncode

    def close(self) -> None:
        for name in list(self.nodes):
            self.stop(name)

    def wait_for(self, predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, AssertionError, KeyError, TypeError):
                last = predicate()
                if last:
                    return last
            time.sleep(interval)
        logs = "\n".join(f"--- {n}\n{nd.log()[-2000:]}" for n, nd in self.nodes.items())
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; last={last!r}\n{logs}"
        )

    def start_all(self, names: list[str], timeout: float = 20.0) -> None:
        """Start the named nodes, wait until each answers, sees all of them alive, and a
        coordinator is known."""
        for name in names:
            self.start(name)
        for name in names:
            self.wait_ready(name)
        self.wait_for(
            lambda: all(
                set(self.members(n).values()) == {"alive"} and len(self.members(n)) == len(names)
                for n in names
            ),
            timeout,
            "membership",
        )
        self.wait_for(lambda: self.coordinator(names[0])[0] is not None, timeout, "a coordinator")

    def members(self, name: str) -> dict[str, str]:
        """name -> state, as `name` sees the cluster."""
        status, body = self.nodes[name].get("/v1/cluster", timeout=2.0)
        assert status == 200, body
        return {m["name"]: m["state"] for m in body["members"]}

    def coordinator(self, name: str) -> tuple[str | None, int]:
        status, body = self.nodes[name].get("/v1/cluster", timeout=2.0)
        assert status == 200, body
        return body["coordinator"]["name"], int(body["term"])


def start_seeded(
    root: Path,
    names: Iterable[str],
    *,
    docker_host: str,
    extra: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
) -> LocalCluster:
    """Daemons joined through the first one as seed, started, ready and all seeing each
    other alive (everything is stopped again if that fails)."""
    cluster = LocalCluster(root)
    names = list(names)
    first: Node | None = None
    for name in names:
        node = cluster.add(
            name,
            seeds=[f"127.0.0.1:{first.port}"] if first else [],
            docker_host=docker_host,
            extra=extra,
        )
        first = first or node
    try:
        for name in names:
            cluster.start(name)
        for name in names:
            cluster.wait_ready(name)
        cluster.wait_for(
            lambda: all(
                set(cluster.members(n)) == set(names)
                and set(cluster.members(n).values()) == {"alive"}
                for n in names
            ),
            timeout,
            "full membership",
        )
    except BaseException:
        cluster.close()
        raise
    return cluster


def _toml(settings: Mapping[str, Any]) -> str:
    lines = []
    tables = []
    for k, v in settings.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    for k, table in tables:
        lines.append(f"[{k}]")
        lines.extend(f"{tk} = {json.dumps(tv)}" for tk, tv in table.items())
    return "\n".join(lines) + "\n"
