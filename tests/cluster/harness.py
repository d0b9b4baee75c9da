"""A cluster of Docker hosts on one machine: network namespaces on a private bridge.

Layout of a run `R` with N hosts (all names carry the run id so runs never collide):

    root namespace   bridge hd-R-br  10.213.K.1/24   (the test process reaches every namespace)
    hd-R-reg         eth0 10.213.K.2   docker-registry :5000   (tbf on eth0 = registry egress)
    hd-R-n1 .. nN    eth0 10.213.K.11.. dockerd (+ its managed containerd), houndd :7480
                     root-side veth hd-R-nI carries tbf = the host's ingress

Namespaces get no default route: traffic can only reach the private /24 (and loopback), so a
misconfigured pull fails fast instead of leaving the machine. Processes run under
`nsenter --net=...` (never `ip netns exec`, which remounts /sys and hides dockerd's cgroups).

Every run writes its resource names to `/run/houndd-cluster/R.json` *before* creating them;
`sweep_stale()` (called by `start()`) removes runs whose owner process is gone, runs reusing
our id, and `hd-*` namespaces/links no live run claims. `teardown()` is idempotent and works
on a half-built cluster, because it deletes by name rather than by what `start()` reached.

Plain Python (no pytest): `bench/` and `demo/` use it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from houndd.config import Config
from tests.fixtures.images import push_image
from tests.fixtures.services import Dockerd, Registry, start_dockerd, start_registry

__all__ = [
    "HOUNDD_PORT",
    "REGISTRY_PORT",
    "Cluster",
    "ClusterError",
    "Host",
    "ImageSpec",
    "houndd_missing",
    "sweep_stale",
]

log = logging.getLogger("houndd.tests.cluster")

HOUNDD_PORT = 7480
REGISTRY_PORT = 5000
PREFIX = "hd-"
RUNS_DIR = Path("/run/houndd-cluster")
NETNS_DIR = Path("/var/run/netns")
SUBNET_BASE = "10.213"
REPO_ROOT = Path(__file__).resolve().parents[2]
_RUN_ID = re.compile(r"^[a-z0-9]{1,6}$")
# Unix socket paths are capped at 108 bytes; dockerd's managed containerd puts
# `exec/containerd/containerd.sock.ttrpc` below the daemon's directory.
_MAX_DOCKER_DIR_LEN = 60
_HOUNDD_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
_TOOLS = ("ip", "tc", "iptables", "nsenter")
_LOSS_COMMENT = "hd-loss"
_CUT_COMMENT = "hd-cut"


class ClusterError(RuntimeError):
    """The cluster could not be built or a harness command failed; says what to check."""


@dataclass(frozen=True)
class ImageSpec:
    """A synthetic image to push: `name` is the repository inside the cluster registry."""

    name: str
    size_bytes: int
    tag: str = "latest"
    layers: int = 1
    seed: int = 0


@dataclass
class Host:
    """One Docker host: its namespace, address, dockerd and (when started) houndd."""

    name: str  # n1, n2, ... (also the houndd node_name)
    index: int
    netns: str
    link: str  # root-side veth; its egress is the host's ingress
    address: str
    workdir: Path
    docker_dir: Path
    dockerd: Dockerd | None = None
    houndd_process: subprocess.Popen[bytes] | None = None
    houndd_config: Path | None = None

    @property
    def api_url(self) -> str:
        """The host's houndd HTTP API."""
        return f"http://{self.address}:{HOUNDD_PORT}"

    @property
    def docker_host(self) -> str:
        """`DOCKER_HOST` of the host's dockerd."""
        if self.dockerd is None:
            raise ClusterError(f"{self.name} has no dockerd (cluster started with docker=False?)")
        return self.dockerd.host

    @property
    def houndd_log(self) -> Path:
        return self.workdir / "houndd.log"


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _quiet(argv: Sequence[str]) -> None:
    """Best-effort cleanup command: a missing resource is the expected case, not an error."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(list(argv), capture_output=True, timeout=30, check=False)


def _nsenter(netns: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--"]


def _start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (None if gone): tells pid reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    )
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_netns(netns: str) -> None:
    """SIGKILL what is left in the namespace (it keeps the namespace alive), then delete it."""
    for _ in range(3):
        pids = _netns_pids(netns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _quiet(["ip", "netns", "delete", netns])


def _unmount_under(roots: Iterable[Path]) -> None:
    """Lazily unmount what dockerd left below roots (it shares our mount namespace)."""
    prefixes = [str(r) + "/" for r in roots]
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [
        parts[4].replace("\\040", " ")
        for parts in (line.split() for line in lines)
        if len(parts) > 4 and any((parts[4] + "/").startswith(p) for p in prefixes)
    ]
    for point in sorted(points, key=len, reverse=True):
        _quiet(["umount", "-l", point])


def _rules_with_comment(prefix: Sequence[str], chain: str, comment: str) -> list[list[str]]:
    """`iptables -D` commands for every rule in chain carrying our comment."""
    proc = subprocess.run(
        [*prefix, "iptables", "-S", chain], capture_output=True, text=True, check=False
    )
    deletes = []
    for line in proc.stdout.splitlines():
        args = shlex.split(line)
        if args[:2] != ["-A", chain] or "--comment" not in args:
            continue
        if args[args.index("--comment") + 1] == comment:
            deletes.append([*prefix, "iptables", "-D", chain, *args[2:]])
    return deletes


def _remove_run(state: Mapping[str, Any]) -> None:
    """Delete every resource a run recorded. Safe to call on resources that do not exist."""
    for netns in state.get("netns", []):
        _kill_netns(netns)
    for link in state.get("links", []):
        if Path(f"/sys/class/net/{link}").exists():
            _quiet(["ip", "link", "delete", link])
    if state.get("comment"):
        for rule in _rules_with_comment([], "FORWARD", str(state["comment"])):
            _quiet(rule)
    roots = [Path(d) for d in state.get("dirs", [])]
    _unmount_under(roots)
    for d in state.get("scratch_dirs", []):
        shutil.rmtree(d, ignore_errors=True)


def _load_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _owner_alive(state: Mapping[str, Any]) -> bool:
    pid = state.get("pid")
    return isinstance(pid, int) and _start_time(pid) == state.get("start_time")


def sweep_stale(run_id: str | None = None) -> list[str]:
    """Remove leftovers of crashed runs; return the run ids (or names) removed.

    A run is stale when its owner process is gone, or when it uses `run_id` (the caller is
    about to reuse those names). `hd-*` namespaces and links no live run records are orphans
    of a run that died before writing its state, or whose state was lost; they go too.
    """
    removed: list[str] = []
    # List resources before reading the run files: a run writes its file before creating
    # anything, so whatever we list here is already claimed by a file we are about to read.
    namespaces = [p.name for p in NETNS_DIR.glob(PREFIX + "*")] if NETNS_DIR.exists() else []
    links = [p.name for p in Path("/sys/class/net").glob(PREFIX + "*")]
    claimed: set[str] = set()
    for path in sorted(RUNS_DIR.glob("*.json")) if RUNS_DIR.exists() else []:
        state = _load_state(path)
        if state is None:
            path.unlink(missing_ok=True)
            continue
        if _owner_alive(state) and path.stem != run_id:
            claimed.update(state.get("netns", []))
            claimed.update(state.get("links", []))
            continue
        log.info("sweeping stale cluster run=%s owner_pid=%s", path.stem, state.get("pid"))
        _remove_run(state)
        path.unlink(missing_ok=True)
        removed.append(path.stem)
    for netns in namespaces:
        if netns not in claimed:
            _kill_netns(netns)
            removed.append(netns)
    for link in links:
        if link not in claimed and Path(f"/sys/class/net/{link}").exists():
            _quiet(["ip", "link", "delete", link])
            removed.append(link)
    return removed


def _used_subnets() -> set[int]:
    used: set[int] = set()
    for path in RUNS_DIR.glob("*.json") if RUNS_DIR.exists() else []:
        state = _load_state(path)
        if state is not None and isinstance(state.get("subnet"), int):
            used.add(state["subnet"])
    proc = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    )
    for m in re.finditer(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", proc.stdout):
        used.add(int(m.group(1)))
    return used


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def render_toml(config: Mapping[str, Any]) -> str:
    """A flat houndd config (scalars, lists, one level of tables such as `labels`) as TOML."""
    lines, tables = [], []
    for key, value in config.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


def houndd_missing() -> str | None:
    """Why the houndd daemon cannot run from this tree (None: it imports)."""
    try:
        importlib.import_module("houndd.daemon")
    except ImportError as e:
        return f"houndd daemon does not import yet: {e}"
    return None


def _config_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(Config)}


@dataclass
class _Shaping:
    registry_egress_mbit: float | None
    host_ingress_mbit: dict[str, float | None] = field(default_factory=dict)
    host_egress_mbit: dict[str, float | None] = field(default_factory=dict)


def _tbf(mbit: float) -> list[str]:
    rate_bytes = mbit * 1e6 / 8
    # Burst >= one 64 KiB GSO segment (veths hand tbf whole GSO packets) and >= 10 ms of rate;
    # 100 ms of queue keeps TCP from collapsing on drops without hiding the limit.
    burst = max(65536 + 1514, int(rate_bytes / 100))
    return ["tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "100ms"]


class Cluster:
    """N Docker hosts and a registry in network namespaces; optionally houndd on each host.

    Use as a context manager, or call `start()` and (in a `finally`) `teardown()`.
    Hosts are named `n1`..`nN`; methods take a host name or a `Host`.
    """

    def __init__(
        self,
        n_hosts: int,
        *,
        workdir: str | os.PathLike[str],
        registry_egress_mbit: float | None = None,
        host_ingress_mbit: float | None = None,
        run_id: str | None = None,
        docker: bool = True,
        keep_files: bool = False,
    ) -> None:
        """`docker=False` builds only the network (fast harness self-tests). `keep_files=True`
        keeps the docker data roots and registry storage for inspection after teardown
        (logs and configs are always kept under `workdir`)."""
        if not 1 <= n_hosts <= 200:
            raise ValueError("n_hosts must be 1..200")
        self.run_id = run_id or format(os.getpid(), "x")[-6:]
        if not _RUN_ID.match(self.run_id):
            raise ValueError("run_id must be 1-6 characters of [a-z0-9] (it goes into link names)")
        self.n_hosts = n_hosts
        self.workdir = Path(workdir).resolve() / f"cluster-{self.run_id}"
        self.with_docker = docker
        self.keep_files = keep_files
        self._shaping = _Shaping(registry_egress_mbit)
        self._initial_host_ingress_mbit = host_ingress_mbit
        self.bridge = f"{PREFIX}{self.run_id}-br"
        self.registry_netns = f"{PREFIX}{self.run_id}-reg"
        self.registry_link = self.registry_netns
        self.subnet = -1
        self.registry: Registry | None = None
        self.hosts: list[Host] = []
        self._comment = f"{PREFIX}{self.run_id}"
        self._state_path = RUNS_DIR / f"{self.run_id}.json"
        self._scratch: Path | None = None
        self._started = False
        self._torn_down = False

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def start(self) -> Cluster:
        """Build bridge, namespaces, links, shaping, registry, dockerds; tear down on failure."""
        if self._started:
            raise ClusterError("cluster already started")
        self._started = True
        self._check_environment()
        sweep_stale(self.run_id)
        try:
            self._plan_resources()
            self._build_network()
            if self.with_docker:
                self._start_services()
        except BaseException:
            self.teardown()
            raise
        return self

    def _check_environment(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("the cluster harness needs root (namespaces, bridges, tc)")
        missing = [t for t in _TOOLS if shutil.which(t) is None]
        if missing:
            raise ClusterError(
                f"missing {', '.join(missing)}: install iproute2, iptables, util-linux"
            )

    def _plan_resources(self) -> None:
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        used = _used_subnets()
        free = [k for k in range(256) if k not in used]
        if not free:
            raise ClusterError(f"no free {SUBNET_BASE}.K.0/24 subnet; run sweep_stale()")
        self.subnet = free[0]
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.with_docker and len(str(self.workdir)) + 12 > _MAX_DOCKER_DIR_LEN:
            self._scratch = Path(f"/var/tmp/{PREFIX}{self.run_id}")
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch.mkdir(parents=True)
        docker_base = self._scratch or self.workdir
        for i in range(1, self.n_hosts + 1):
            name = f"n{i}"
            netns = f"{PREFIX}{self.run_id}-{name}"
            wd = self.workdir / name
            wd.mkdir(exist_ok=True)
            self.hosts.append(
                Host(
                    name=name,
                    index=i,
                    netns=netns,
                    link=netns,
                    address=self._address(10 + i),
                    workdir=wd,
                    docker_dir=docker_base / name,
                )
            )
            self._shaping.host_ingress_mbit[name] = self._initial_host_ingress_mbit
        self._write_state()

    def _address(self, last: int) -> str:
        return f"{SUBNET_BASE}.{self.subnet}.{last}"

    @property
    def registry_address(self) -> str:
        """`HOST:PORT` of the registry (the registry part of image references)."""
        return f"{self._address(2)}:{REGISTRY_PORT}"

    @property
    def bridge_address(self) -> str:
        return self._address(1)

    def _write_state(self) -> None:
        state = {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "subnet": self.subnet,
            "netns": [self.registry_netns, *(h.netns for h in self.hosts)],
            "links": [self.registry_link, *(h.link for h in self.hosts), self.bridge],
            "comment": self._comment,
            "dirs": [str(self.workdir), *([str(self._scratch)] if self._scratch else [])],
            "scratch_dirs": [str(self._scratch)] if self._scratch else [],
        }
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_path)

    def _build_network(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0"])
        _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        # With br_netfilter loaded, bridged frames traverse the root FORWARD chain, where a
        # host dockerd may have set policy DROP.
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if nf.exists() and nf.read_text().strip() == "1":
            _run([
                "iptables", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge,
                "-m", "comment", "--comment", self._comment, "-j", "ACCEPT",
            ])  # fmt: skip
        self._add_namespace(self.registry_netns, self.registry_link, self._address(2))
        for h in self.hosts:
            self._add_namespace(h.netns, h.link, h.address)
        self.set_registry_egress(self._shaping.registry_egress_mbit)
        for h in self.hosts:
            self.set_host_ingress(h, self._shaping.host_ingress_mbit[h.name])

    def _add_namespace(self, netns: str, link: str, address: str) -> None:
        _run(["ip", "netns", "add", netns])
        _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns])
        _run(["ip", "link", "set", link, "master", self.bridge, "up"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        # No default route, so multicast (mDNS) needs an explicit one.
        _run(["ip", "-n", netns, "route", "add", "224.0.0.0/4", "dev", "eth0"])

    def _start_services(self) -> None:
        self.registry = start_registry(
            self.workdir / "registry" if self._scratch is None else self._scratch / "registry",
            self._address(2),
            REGISTRY_PORT,
            netns=self.registry_netns,
        )

        def boot(h: Host) -> Dockerd:
            return start_dockerd(
                h.docker_dir,
                netns=h.netns,
                insecure_registries=[self.registry_address],
                name=f"{self.run_id}-{h.name}",
            )

        # dockerd takes seconds to start; start all at once, but keep every one that did
        # start so teardown stops it even if a sibling failed.
        with ThreadPoolExecutor(max_workers=min(8, len(self.hosts))) as pool:
            futures = {h.name: pool.submit(boot, h) for h in self.hosts}
        errors = []
        for h in self.hosts:
            try:
                h.dockerd = futures[h.name].result()
            except Exception as e:
                errors.append(f"{h.name}: {e}")
        if errors:
            raise ClusterError("dockerd failed to start:\n" + "\n".join(errors))

    def teardown(self) -> None:
        """Stop every process, delete namespaces, links, bridge, rules and scratch data.

        Idempotent; never raises for resources that are already gone.
        """
        if self._torn_down or not self._started:
            return
        self._torn_down = True
        for h in self.hosts:
            with contextlib.suppress(Exception):
                self.stop_houndd(h)
        for h in self.hosts:
            if h.dockerd is not None:
                with contextlib.suppress(Exception):
                    h.dockerd.stop()
        if self.registry is not None:
            with contextlib.suppress(Exception):
                self.registry.stop()
        state = _load_state(self._state_path)
        if state is not None:
            self._collect_logs()
            if not self.keep_files:
                self._drop_data()
            _remove_run(
                {**state, "scratch_dirs": [] if self.keep_files else state.get("scratch_dirs", [])}
            )
            self._state_path.unlink(missing_ok=True)

    def _collect_logs(self) -> None:
        if self._scratch is None:
            return
        for path in self._scratch.rglob("*.log"):
            dest = self.workdir / "logs" / path.relative_to(self._scratch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(path, dest)

    def _drop_data(self) -> None:
        _unmount_under([self.workdir, *([self._scratch] if self._scratch else [])])
        for h in self.hosts:
            for sub in ("data", "exec"):
                shutil.rmtree(h.docker_dir / sub, ignore_errors=True)
            shutil.rmtree(h.workdir / "state", ignore_errors=True)
        if self.registry is not None:
            shutil.rmtree(self.registry.workdir / "storage", ignore_errors=True)

    # --- hosts and commands --------------------------------------------------------------

    def host(self, host: str | Host) -> Host:
        """The Host named `host` (n1..nN)."""
        if isinstance(host, Host):
            return host
        for h in self.hosts:
            if h.name == host:
                return h
        raise KeyError(f"no host {host!r}; hosts are {', '.join(h.name for h in self.hosts)}")

    def run_in(
        self, host: str | Host, argv: Sequence[str], *, check: bool = False, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host's network namespace."""
        return _run([*_nsenter(self.host(host).netns), *argv], check=check, timeout=timeout)

    def docker(
        self, host: str | Host, *args: str, check: bool = True, timeout: float = 600.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against the host's own dockerd (which pulls inside the namespace)."""
        return _run(
            ["docker", "-H", self.host(host).docker_host, *args], check=check, timeout=timeout
        )

    def image_digests(self, host: str | Host) -> set[str]:
        """Every `repository@sha256:...` RepoDigest the host's dockerd holds."""
        ids = self.docker(host, "image", "ls", "-q", "--no-trunc").stdout.split()
        if not ids:
            return set()
        out = self.docker(host, "image", "inspect", "--format", "{{json .RepoDigests}}", *set(ids))
        digests: set[str] = set()
        for line in out.stdout.splitlines():
            digests.update(json.loads(line) or [])
        return digests

    def remove_images(self, host: str | Host) -> None:
        """Remove every image (and so every layer) from the host's dockerd."""
        ids = self.docker(host, "image", "ls", "-aq", "--no-trunc").stdout.split()
        if ids:
            self.docker(host, "image", "rm", "-f", *sorted(set(ids)), check=False)
        left = self.docker(host, "image", "ls", "-aq").stdout.split()
        if left:
            raise ClusterError(f"{self.host(host).name}: images left after removal: {left}")

    def image_ref(self, name: str, tag: str = "latest") -> str:
        """The reference hosts pull: `REGISTRY:PORT/name:tag`."""
        return f"{self.registry_address}/{name}:{tag}"

    @property
    def registry_url(self) -> str:
        if self.registry is None:
            raise ClusterError("no registry (cluster started with docker=False?)")
        return self.registry.url

    def push_images(self, specs: Iterable[ImageSpec]) -> dict[str, str]:
        """Push synthetic images to the cluster registry; return {name: manifest digest}.

        Pushed from the root namespace over the bridge, so registry shaping (egress only)
        does not slow the push.
        """
        return {
            s.name: push_image(
                self.registry_url, s.name, s.tag, s.size_bytes, layers=s.layers, seed=s.seed
            )
            for s in specs
        }

    def reachable(self, host: str | Host, address: str, port: int, timeout_s: float = 2.0) -> bool:
        """True if a TCP connection from inside the host's namespace to address:port succeeds."""
        code = (
            "import socket,sys\n"
            f"s=socket.create_connection(({address!r},{port}),timeout={timeout_s})\n"
            "s.close()"
        )
        return (
            self.run_in(host, [sys.executable, "-c", code], timeout=timeout_s + 10).returncode == 0
        )

    def pids(self, host: str | Host) -> list[int]:
        """Every process in the host's namespace (dockerd, containerd, houndd, ...)."""
        return _netns_pids(self.host(host).netns)

    # --- faults and shaping --------------------------------------------------------------

    def link_down(self, host: str | Host) -> None:
        """Cut the host off the bridge (its eth0 loses carrier)."""
        _run(["ip", "link", "set", self.host(host).link, "down"])

    def link_up(self, host: str | Host) -> None:
        """Reconnect the host to the bridge."""
        _run(["ip", "link", "set", self.host(host).link, "up"])

    def cut(self, host: str | Host) -> None:
        """Drop every packet the host sends or receives on eth0 (iptables DROP inside its
        namespace). Unlike `link_down` the link keeps its carrier, as when a switch port or a
        firewall goes wrong: TCP connections hang instead of failing at once. `reconnect`
        undoes it; cutting twice does not stack."""
        ns = _nsenter(self.host(host).netns)
        self.reconnect(host)
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run([
                *ns, "iptables", "-I", chain, flag, "eth0",
                "-m", "comment", "--comment", _CUT_COMMENT, "-j", "DROP",
            ])  # fmt: skip

    def reconnect(self, host: str | Host) -> None:
        """Remove the rules of `cut` (a no-op when the host is not cut)."""
        ns = _nsenter(self.host(host).netns)
        for chain in ("INPUT", "OUTPUT"):
            for rule in _rules_with_comment(ns, chain, _CUT_COMMENT):
                _run(rule)

    def set_loss(self, host_or_all: str | Host, p: float) -> None:
        """Drop a random fraction p of the host's packets in each direction (0 removes loss).

        Uses `iptables -m statistic` inside the namespace (netem is not available here).
        An OUTPUT drop is not silent: the sender's `send`/`sendto` fails with EPERM (asyncio
        datagram transports hand it to `error_received`, zeroconf logs a traceback per drop,
        TCP retransmits); an INPUT drop is. The fault tests accept this approximation.
        """
        if not 0 <= p < 1:
            raise ValueError("loss probability must be in [0, 1)")
        targets = self.hosts if host_or_all == "all" else [self.host(host_or_all)]
        for h in targets:
            ns = _nsenter(h.netns)
            for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
                # One rule per direction, replaced: delete ours, then add. Loopback is spared.
                for rule in _rules_with_comment(ns, chain, _LOSS_COMMENT):
                    _run(rule)
                if p > 0:
                    _run([
                        *ns, "iptables", "-A", chain, flag, "eth0",
                        "-m", "comment", "--comment", _LOSS_COMMENT,
                        "-m", "statistic", "--mode", "random", "--probability", f"{p:.6f}",
                        "-j", "DROP",
                    ])  # fmt: skip

    def set_host_ingress(self, host: str | Host, mbit: float | None) -> None:
        """Shape what the host receives (tbf on the root-side veth); None removes shaping."""
        h = self.host(host)
        self._shaping.host_ingress_mbit[h.name] = mbit
        _quiet(["tc", "qdisc", "del", "dev", h.link, "root"])
        if mbit is not None:
            _run(["tc", "qdisc", "add", "dev", h.link, "root", *_tbf(mbit)])

    def set_registry_egress(self, mbit: float | None) -> None:
        """Shape what the registry sends (tbf on its eth0); None removes shaping."""
        self._shaping.registry_egress_mbit = mbit
        _quiet(["tc", "-n", self.registry_netns, "qdisc", "del", "dev", "eth0", "root"])
        if mbit is not None:
            _run(
                [
                    "tc",
                    "-n",
                    self.registry_netns,
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    *_tbf(mbit),
                ]
            )

    def set_host_egress(self, host: str | Host, mbit: float | None) -> None:
        """Shape what the host sends (tbf on its eth0: its upload, to peers too); None
        removes shaping."""
        h = self.host(host)
        self._shaping.host_egress_mbit[h.name] = mbit
        _quiet(["tc", "-n", h.netns, "qdisc", "del", "dev", "eth0", "root"])
        if mbit is not None:
            _run(["tc", "-n", h.netns, "qdisc", "add", "dev", "eth0", "root", *_tbf(mbit)])

    def registry_tx_bytes(self) -> int:
        """Bytes the registry's interface has sent so far (its eth0 tx counter): what left
        the registry, headers included, whoever asked."""
        proc = _run(["ip", "-n", self.registry_netns, "-j", "-s", "link", "show", "eth0"])
        return int(json.loads(proc.stdout)[0]["stats64"]["tx"]["bytes"])

    @property
    def registry_egress_mbit(self) -> float | None:
        return self._shaping.registry_egress_mbit

    def host_ingress_mbit(self, host: str | Host) -> float | None:
        return self._shaping.host_ingress_mbit[self.host(host).name]

    # --- houndd --------------------------------------------------------------------------

    def houndd_config(
        self, host: str | Host, overrides: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The config a host's houndd runs with (see module docstring), plus overrides."""
        h = self.host(host)
        config: dict[str, Any] = {
            "node_name": h.name,
            "state_dir": str(h.workdir / "state"),
            "bind": h.address,
            "advertise": h.address,
            "port": HOUNDD_PORT,
            "mdns": True,
            "interfaces": [h.address],
            "seeds": [f"{o.address}:{HOUNDD_PORT}" for o in self.hosts if o is not h],
            "cluster_key_file": str(h.workdir / "cluster.key"),
            "preset": "local",
        }
        if h.dockerd is not None:
            config["docker_host"] = h.dockerd.host
        if self.registry is not None:
            config["insecure_registries"] = [self.registry_address]
        config.update(overrides or {})
        # Keys the daemon does not know yet (e.g. insecure_registries before it exists)
        # would make it refuse the file; overrides are the caller's choice and stay.
        known = _config_keys()
        return {k: v for k, v in config.items() if k in known or k in (overrides or {})}

    def _houndd_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "houndd", *args]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env

    def _shared_key(self) -> Path:
        """A cluster key made by `houndd init` itself, so its file format is the daemon's."""
        key = self.workdir / "cluster.key"
        if not key.exists():
            scratch = self.workdir / "keygen"
            proc = subprocess.run(
                self._houndd_argv("init", "--state-dir", str(scratch)),
                capture_output=True, text=True, env=self._env(), timeout=60, check=False,
            )  # fmt: skip
            made = scratch / "cluster.key"
            if proc.returncode != 0 or not made.exists():
                raise ClusterError(
                    f"`houndd init` could not create a cluster key: {proc.stderr.strip()}"
                )
            shutil.copyfile(made, key)
            key.chmod(0o600)
            shutil.rmtree(scratch, ignore_errors=True)
        return key

    def start_houndd(
        self,
        host: str | Host,
        config_overrides: Mapping[str, Any] | None = None,
        *,
        wait_ready: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Write the host's config, `houndd init` it, run the daemon in the host's namespace.

        With wait_ready, returns once `/v1/health` answers (or raises with the log tail).
        """
        h = self.host(host)
        if h.houndd_process is not None and h.houndd_process.poll() is None:
            raise ClusterError(f"houndd already runs on {h.name}")
        config = self.houndd_config(h, config_overrides)
        h.houndd_config = h.workdir / "houndd.toml"
        h.houndd_config.write_text(render_toml(config))
        init = subprocess.run(
            self._houndd_argv(
                "init", "--config", str(h.houndd_config), "--join-key-file", str(self._shared_key())
            ),
            capture_output=True, text=True, env=self._env(), timeout=60, check=False,
        )  # fmt: skip
        if init.returncode != 0:
            raise ClusterError(f"houndd init on {h.name} failed: {init.stderr.strip()}")
        with h.houndd_log.open("ab") as out:
            # nsenter execs the daemon in place (no fork for --net), so this pid is houndd's.
            h.houndd_process = subprocess.Popen(
                [*_nsenter(h.netns), *self._houndd_argv("run", "--config", str(h.houndd_config))],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(), start_new_session=True,
            )  # fmt: skip
        if wait_ready:
            self.wait_houndd_ready(h)
        return h.houndd_process

    def wait_houndd_ready(
        self, host: str | Host, timeout_s: float = _HOUNDD_READY_TIMEOUT_S
    ) -> None:
        """Wait until the host's houndd answers `/v1/health`."""
        h = self.host(host)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = h.houndd_process
            if proc is None or proc.poll() is not None:
                raise ClusterError(
                    f"houndd on {h.name} is not running; log:\n{self.houndd_log_tail(h)}"
                )
            try:
                with urllib.request.urlopen(f"{h.api_url}/v1/health", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # it answers HTTP: the API is up (health may report degraded)
            except OSError:
                time.sleep(0.1)
        raise ClusterError(
            f"houndd on {h.name} did not answer /v1/health; log:\n{self.houndd_log_tail(h)}"
        )

    def houndd_log_tail(self, host: str | Host, lines: int = 40) -> str:
        try:
            text = self.host(host).houndd_log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, host: str | Host, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the host's houndd (SIGKILL crash, SIGSTOP pause, SIGCONT resume)."""
        proc = self.host(host).houndd_process
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"houndd is not running on {self.host(host).name}")
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def stop_houndd(self, host: str | Host) -> int | None:
        """Stop the host's houndd (SIGTERM, SIGKILL after a grace); return its exit code."""
        h = self.host(host)
        proc = h.houndd_process
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused daemon cannot handle SIGTERM
                proc.terminate()
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        h.houndd_process = None
        return proc.returncode

    def houndd(
        self,
        host: str | Host,
        *args: str,
        check: bool = False,
        timeout: float = 600.0,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a houndd client command from inside the host against that host's API.

        `args` start with the subcommand (`status --json`, `submit FILE --wait --json`);
        `--config` (for the key) and `--api` are appended. `capture=False` lets the output
        (live progress) go to our terminal.
        """
        h = self.host(host)
        if h.houndd_config is None:
            h.houndd_config = h.workdir / "houndd.toml"
            h.houndd_config.write_text(render_toml(self.houndd_config(h)))
        argv = [
            *_nsenter(h.netns),
            *self._houndd_argv(*args, "--config", str(h.houndd_config), "--api", h.api_url),
        ]
        proc = subprocess.run(
            argv, capture_output=capture, text=True, env=self._env(), timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"`houndd {' '.join(args)}` on {h.name} exited {proc.returncode}: "
                f"{proc.stderr.strip()}"
            )
        return proc

    def houndd_json(self, host: str | Host, *args: str, timeout: float = 600.0) -> Any:
        """`houndd ... --json` parsed; raises ClusterError if it exits non-zero with no JSON."""
        proc = self.houndd(host, *args, "--json", timeout=timeout)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise ClusterError(
                f"`houndd {' '.join(args)} --json` on {self.host(host).name} exited "
                f"{proc.returncode} without JSON: {proc.stderr.strip()[-2000:]}"
            ) from None

    def coordinator(self, host: str | Host | None = None) -> str | None:
        """Name of the coordinator as `houndd status --json` on host (default n1) reports it."""
        status = self.houndd_json(host or self.hosts[0], "status")
        return _find_coordinator(status)


def _find_coordinator(status: Any) -> str | None:
    """The coordinator's node name in a status document, tolerating the shapes it may take."""
    if not isinstance(status, dict):
        return None
    coord = status.get("coordinator")
    if isinstance(coord, str):
        by_id = {
            m.get("node_id"): m.get("name")
            for m in status.get("members", [])
            if isinstance(m, dict)
        }
        return str(by_id.get(coord, coord))
    if isinstance(coord, dict):
        name = coord.get("name") or coord.get("node_name")
        return str(name) if name else None
    return None
