"""The paper's evaluation data (Hound, JSEE 2023, Tables 4-6), scaled; bounds; measurement.

Shared by `bench/paper.py` and anything else that wants the paper's image mix. No IO at
import time; the cluster itself comes from `tests/cluster/harness.py`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000

# Table 4: (content, size in MB as printed). Two sizes of Tomcat, TensorFlow and PyTorch.
TABLE4: tuple[tuple[str, int], ...] = (
    ("tomcat", 140),
    ("tomcat", 329),
    ("jetty", 225),
    ("django", 267),
    ("gcc", 409),
    ("rust", 543),
    ("ros", 768),
    ("silverpeas", 845),
    ("nuxeo", 910),
    ("mxnet", 1340),
    ("tensorflow", 1520),
    ("tensorflow", 2250),
    ("pytorch", 3390),
    ("pytorch", 4200),
)

# Table 5: request number -> image combination, by paper size in MB (sizes are unique).
TABLE5: dict[int, tuple[int, ...]] = {
    1: (140, 225),
    2: (267, 329),
    3: (409, 543),
    4: (768, 845),
    5: (910, 1340),
    6: (1520, 3390),
    7: (2250, 4200),
    8: (140, 267, 409),
    9: (768, 845, 910),
    10: (1340, 1520, 3390),
}

# Table 6: case -> {request number: how many nodes request it} (10 nodes each).
TABLE6: dict[str, dict[int, int]] = {
    "A": {2: 3, 5: 3, 10: 4},
    "B": {1: 2, 4: 2, 6: 2, 9: 2, 10: 2},
    "C": {r: 1 for r in range(1, 11)},
}


@dataclass(frozen=True)
class PaperImage:
    """One Table 4 image as a synthetic image of `paper_mb / scale` MB."""

    content: str
    paper_mb: int
    size_bytes: int
    layers: int
    seed: int

    @property
    def repository(self) -> str:
        return f"paper/{self.content}"

    @property
    def tag(self) -> str:
        return f"{self.paper_mb}mb"


def catalog(scale: float) -> dict[int, PaperImage]:
    """Table 4 scaled down by `scale`, keyed by paper size in MB.

    Real images of this size have several layers, and dockerd downloads up to three layers
    of one image at once, so big images get more layers. Seeds differ per image: no two
    images share a layer, as in the paper (distinct Docker Hub images).
    """
    out = {}
    for seed, (content, mb) in enumerate(TABLE4, start=1000):
        layers = 1 + (mb >= 300) + (mb >= 1000) + (mb >= 3000)
        out[mb] = PaperImage(content, mb, max(4096, round(mb * MB / scale)), layers, seed)
    return out


@dataclass(frozen=True)
class Scenario:
    """Which node needs which images, and which figure/table it belongs to."""

    figure: str  # fig4 | fig5 | fig6
    label: str  # e.g. "req 7", "case A"
    requests: Mapping[str, tuple[PaperImage, ...]]  # node name -> images

    @property
    def nodes(self) -> list[str]:
        return list(self.requests)


def identical(
    figure: str, request: int, nodes: Sequence[str], images: Mapping[int, PaperImage]
) -> Scenario:
    """Every node requests Table 5 combination `request` (Fig. 4 and Fig. 6)."""
    combo = tuple(images[mb] for mb in TABLE5[request])
    return Scenario(figure, f"req {request}", {n: combo for n in nodes})


def case(name: str, nodes: Sequence[str], images: Mapping[int, PaperImage]) -> Scenario:
    """Table 6 case: node i gets the i-th combination of the expanded case (needs 10 nodes)."""
    wanted = [r for r, count in TABLE6[name].items() for _ in range(count)]
    if len(nodes) < len(wanted):
        raise ValueError(f"case {name} needs {len(wanted)} hosts, have {len(nodes)}")
    return Scenario(
        "fig5",
        f"case {name}",
        {n: tuple(images[mb] for mb in TABLE5[r]) for n, r in zip(nodes, wanted, strict=False)},
    )


def lower_bound_s(
    node_bytes: Mapping[str, int],
    registry_egress_mbit: float | None,
    host_ingress_mbit: float | None,
) -> float | None:
    """Physical lower bound: the registry sends every byte once per node, each node receives
    its own bytes: max(total / registry egress, max over nodes of node bytes / node ingress)."""
    bounds = []
    if registry_egress_mbit:
        bounds.append(sum(node_bytes.values()) / (registry_egress_mbit * 1e6 / 8))
    if host_ingress_mbit:
        bounds.append(max(node_bytes.values(), default=0) / (host_ingress_mbit * 1e6 / 8))
    return max(bounds) if bounds else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])

    def version(argv: list[str]) -> str:
        if shutil.which(argv[0]) is None:
            return "missing"
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        return (
            (out.stdout or out.stderr).strip().splitlines()[0]
            if (out.stdout or out.stderr)
            else "?"
        )

    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "python": sys.version.split()[0],
        "dockerd": version(["dockerd", "--version"]),
        "docker_cli": version(["docker", "--version"]),
        "docker_compose": version(["docker-compose", "version", "--short"]),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# --- resource sampling (Table 7) ----------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _proc_comm(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    if comm.startswith("python"):
        return "houndd"  # the only Python process a host namespace runs
    return comm


def _proc_write_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def loadavg_1m() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class Usage:
    """Resource use over one run: the paper's Table 7 columns."""

    load_idle: float
    load_busy_max: float = 0.0
    load_busy_mean: float = 0.0
    cpu_pct: dict[str, float] = field(default_factory=dict)  # by process kind, 100 = one core
    disk_write_mb_s: float = 0.0
    net_mb_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "load_idle": self.load_idle,
            "load_busy_max": round(self.load_busy_max, 2),
            "load_busy_mean": round(self.load_busy_mean, 2),
            "cpu_pct": {k: round(v, 1) for k, v in self.cpu_pct.items()},
            "disk_write_mb_s": round(self.disk_write_mb_s, 2),
            "net_mb_s": round(self.net_mb_s, 2),
        }


class Sampler:
    """Samples every `interval_s` (the paper: 1 s) in a thread it owns and joins on stop().

    `pids()` returns the processes to watch (those in the scenario's host namespaces);
    `rx_bytes()` the bytes the hosts received so far (root-side veth tx counters).
    """

    def __init__(self, pids: Any, rx_bytes: Any, interval_s: float = 1.0) -> None:
        self._pids = pids
        self._rx_bytes = rx_bytes
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._loads: list[float] = []
        self._cpu: dict[int, tuple[str, int, int]] = {}  # pid -> (kind, first, last ticks)
        self._writes: dict[int, tuple[int, int]] = {}
        self._start = 0.0
        self._rx0 = 0
        self.usage = Usage(load_idle=loadavg_1m())

    def __enter__(self) -> Sampler:
        self._start = time.monotonic()
        self._rx0 = self._rx_bytes()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        elapsed = max(1e-6, time.monotonic() - self._start)
        u = self.usage
        u.load_busy_max = max(self._loads, default=u.load_idle)
        u.load_busy_mean = sum(self._loads) / len(self._loads) if self._loads else u.load_idle
        cpu: dict[str, float] = {}
        for kind, first, last in self._cpu.values():
            cpu[kind] = cpu.get(kind, 0.0) + (last - first) / _TICK / elapsed * 100
        u.cpu_pct = cpu
        u.disk_write_mb_s = sum(b - a for a, b in self._writes.values()) / MB / elapsed
        u.net_mb_s = (self._rx_bytes() - self._rx0) / MB / elapsed

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        self._loads.append(loadavg_1m())
        for pid in self._pids():
            ticks = _proc_cpu_ticks(pid)
            if ticks is None:
                continue
            kind, first, _ = self._cpu.get(pid, (_proc_comm(pid), ticks, ticks))
            self._cpu[pid] = (kind, first, ticks)
            written = _proc_write_bytes(pid)
            w0, _ = self._writes.get(pid, (written, written))
            self._writes[pid] = (w0, written)


def link_tx_bytes(links: Sequence[str]) -> int:
    """Bytes sent by root-side veths so far: what the hosts behind them received."""
    total = 0
    for link in links:
        with contextlib.suppress(OSError):  # a link deleted under us counts as 0
            total += int(Path(f"/sys/class/net/{link}/statistics/tx_bytes").read_text())
    return total


# --- running things -------------------------------------------------------------------------


def run_parallel(jobs: Sequence[Callable[[], None]]) -> None:
    """Run jobs at once in threads; re-raise the first failure after all finished."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(j) for j in jobs]
    for f in futures:
        f.result()


@contextlib.contextmanager
def scratch_dir(path: Path | None, prefix: str) -> Iterator[Path]:
    """`path` (created), or a temporary directory under /var/tmp removed afterwards (short:
    the cluster's dockerd sockets live below it)."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix, dir="/var/tmp") as d:
        yield Path(d)


def houndd_converged(cluster: Any, wanted: set[str], timeout_s: float = 90.0) -> bool:
    """Wait until n1 sees every host in `wanted` alive and knows a coordinator (`cluster` is
    a tests.cluster.harness.Cluster); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError):  # ClusterError: n1 not answering yet
            status = cluster.houndd_json("n1", "status")
            alive = {m.get("name") for m in status.get("members", []) if m.get("state") == "alive"}
            if alive >= wanted and cluster.coordinator("n1"):
                return True
        time.sleep(0.5)
    return False
