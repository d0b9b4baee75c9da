"""Membership benchmark: failure detection time and gossip traffic, simulated and real.

Simulated (the pure SWIM core of N nodes over the discrete-event network, lan() timings, no
sockets), over several seeded runs:

- detection time after a crash: first node to declare it dead, and the last one (median);
- gossip traffic per node per second in steady state: payload bytes as encoded, plus the real
  per-message overhead of the sealed wire envelope (measured once with a real `Wire`).

Real (N `houndd run` processes on 127.0.0.1, fake engine, `lan` and `local` presets): SIGKILL
one node, read from the survivors' logs when each marked it suspect and dead; and, with nobody
polling the API, count on `lo` (AF_PACKET, so root) the UDP gossip bytes between the daemons'
ports and the TCP bytes of peer requests (push-pull sync, anti-entropy).

    sudo .venv/bin/python bench/membership.py [--n 200] [--runs 2] [--real-n 5] [--real-runs 7]

Writes `bench/results/membership.json` and `bench/results/membership.md`. `simulate(n, seed)`
is the hook for other harnesses; `Fleet` (real daemons that have formed one cluster) is shared
with `bench/failover.py` and `bench/dispatch.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from houndd.config import lan, local  # noqa: E402
from houndd.membership.member import MemberState  # noqa: E402
from houndd.membership.sim import Simulation  # noqa: E402
from tests.procs import LocalCluster, Node  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"

STEADY_WINDOW_S = 30.0
MAX_CONVERGE_S = 120.0


def envelope_overhead_bytes() -> int:
    """Bytes a sealed envelope adds to a payload (signature, certificate, nonce, MAC, header)."""
    from houndd.wire import Keyring, MsgType, NodeIdentity, Wire

    wire = Wire(
        cluster_id="bench",
        keyring=Keyring.generate(),
        identity=NodeIdentity.generate(),
        boot_epoch=1,
    )
    return len(wire.seal(MsgType.PING, {}, time.time())) - 1  # msgpack {} is one byte


def simulate(
    n: int, seed: int, *, loss: float = 0.0, overhead: int | None = None
) -> dict[str, Any]:
    """One run: join N nodes, measure steady-state traffic, crash one, time its detection."""
    config = lan()
    started = time.perf_counter()
    sim = Simulation(n, seed, config=config, loss=loss, encode=True)
    sim.join_all()
    sim.run_until(MAX_CONVERGE_S, stop=sim.converged, check_every_s=0.5)
    converge_s = sim.now if sim.converged() else float("nan")

    # Steady state starts once the join's updates have all been retransmitted.
    sim.run_until(
        sim.now + MAX_CONVERGE_S, stop=lambda: sim.pending_updates() == 0, check_every_s=0.5
    )
    # The window spans one full push-pull period (scaled with N like memberlist's), so the
    # periodic full-state syncs are counted, not just probes.
    window_s = max(STEADY_WINDOW_S, 1.1 * sim.nodes[0].table.push_pull_interval_s())
    bytes0, msgs0, t0 = sim.bytes_sent(), sim.messages_sent(), sim.now
    sim.run_until(t0 + window_s)
    payload = sim.bytes_sent() - bytes0
    messages = sim.messages_sent() - msgs0
    per_msg = envelope_overhead_bytes() if overhead is None else overhead
    node_s = n * window_s

    victim = n // 2
    victim_id = sim.node_id(victim)
    crash_at = sim.now
    sim.crash(victim)
    seen: dict[str, float] = {}
    scanned = 0

    def all_marked() -> bool:
        nonlocal scanned
        for c in sim.changes[scanned:]:
            if c.node_id == victim_id and c.new is MemberState.DEAD:
                seen.setdefault(c.observer, c.time)
        scanned = len(sim.changes)
        return len(seen) >= n - 1

    sim.run_until(crash_at + 120.0, stop=all_marked, check_every_s=0.1)
    all_marked()
    return {
        "n": n,
        "seed": seed,
        "converge_s": converge_s,
        "messages_per_node_s": messages / node_s,
        "payload_bytes_per_node_s": payload / node_s,
        "wire_bytes_per_node_s": (payload + messages * per_msg) / node_s,
        "first_detection_s": (min(seen.values()) - crash_at) if seen else float("nan"),
        "all_detected_s": (max(seen.values()) - crash_at) if len(seen) >= n - 1 else float("nan"),
        "detected_by": len(seen),
        "wall_s": time.perf_counter() - started,
    }


# --- shared by the real-process benchmarks ---------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (\w+)\s+(\S+) (.*)$")


def log_time(stamp: str) -> float:
    """Epoch seconds of a `KeyValueFormatter` timestamp (UTC, millisecond resolution)."""
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def log_events(node: Node, pattern: str, after: float = 0.0) -> list[tuple[float, str]]:
    """(time, message) of the node's log lines whose message matches `pattern`, after `after`.

    Log stamps have millisecond resolution; `after` is compared with 1 ms of slack.
    """
    rx = re.compile(pattern)
    out = []
    for line in node.log().splitlines():
        m = LOG_LINE.match(line)
        if m and rx.search(m.group(4)):
            t = log_time(m.group(1))
            if t >= after - 0.001:
                out.append((t, m.group(4)))
    return out


def load_1m() -> float:
    """The 1-minute load average: other work on this machine disturbs timings."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (p99 of 20 values is the maximum: no interpolation to hide it)."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return float("nan")
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    """min, median, p90, p99, max and count of the finite values."""
    data = [v for v in values if not math.isnan(v)]
    if not data:
        return {"n": 0}
    return {
        "n": len(data),
        "min": min(data),
        "median": statistics.median(data),
        "p90": quantile(data, 0.90),
        "p99": quantile(data, 0.99),
        "max": max(data),
    }


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """bench/results/<name>.json and .md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jpath, mpath = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Fleet:
    """N real daemons on 127.0.0.1 that seed each other (any one can die and come back).

    Every node lists every other node as a seed, so a restarted node rejoins even when the
    first one is down. `docker_host` defaults to a fake engine; `registries` are passed as
    `insecure_registries` (loopback ones are plain HTTP anyway).
    """

    n: int
    preset: str
    root: Path
    docker_host: str = "fake://?pull_s=600&size=1000"
    log_level: str = "INFO"
    cluster: LocalCluster = field(init=False)
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.cluster = LocalCluster(self.root)
        self.names = [f"n{i + 1}" for i in range(self.n)]
        extra = {"preset": self.preset, "log_level": self.log_level}
        for name in self.names:
            self.cluster.add(name, docker_host=self.docker_host, extra=extra)
        ports = {name: node.port for name, node in self.cluster.nodes.items()}
        for name, node in self.cluster.nodes.items():
            seeds = [f"127.0.0.1:{p}" for other, p in ports.items() if other != name]
            text = node.config_path.read_text()
            text = re.sub(r"(?m)^seeds = .*$", "seeds = " + json.dumps(seeds), text)
            node.config_path.write_text(text)

    @property
    def nodes(self) -> dict[str, Node]:
        return self.cluster.nodes

    @property
    def ports(self) -> set[int]:
        return {node.port for node in self.nodes.values()}

    def start(self, timeout_s: float = 120.0) -> None:
        for name in self.names:
            self.cluster.start(name)
        for name in self.names:
            self.cluster.wait_ready(name, timeout=60)
        self.wait_formed(timeout_s)

    def alive_names(self) -> list[str]:
        return [n for n in self.names if self.nodes[n].alive()]

    def formed(self) -> str | None:
        """The coordinator's name once every running node sees all running nodes alive and
        agrees on one coordinator; else None."""
        running = self.alive_names()
        coords = set()
        for name in running:
            status, body = self.nodes[name].get("/v1/cluster", timeout=2.0)
            if status != 200:
                return None
            states = {m["name"]: m["state"] for m in body["members"]}
            if any(states.get(other) != "alive" for other in running):
                return None
            coords.add((body["coordinator"] or {}).get("name"))
        if len(coords) == 1 and None not in coords:
            return str(coords.pop())
        return None

    def wait_formed(self, timeout_s: float = 120.0) -> str:
        result: str = self.cluster.wait_for(self.formed, timeout_s, "cluster formed", 0.1)
        return result

    def kill(self, name: str) -> float:
        """SIGKILL; returns the wall-clock time just before the signal."""
        node = self.nodes[name]
        assert node.proc is not None
        t = time.time()
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        return t

    def restart(self, name: str) -> None:
        self.cluster.start(name)
        self.cluster.wait_ready(name, timeout=60)

    def close(self) -> None:
        self.cluster.close()


@contextlib.contextmanager
def fleet(n: int, preset: str, **kw: Any) -> Iterator[Fleet]:
    """A started `Fleet` in a temporary directory, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"houndd-bench-{preset}-{n}-"))
    f = Fleet(n, preset, root, **kw)
    try:
        f.start()
        yield f
    finally:
        f.close()
        if not os.environ.get("HOUNDD_BENCH_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


# --- real processes: detection and traffic ---------------------------------------------------


class LoopbackCounter:
    """Counts packets between the daemons' ports on `lo` (AF_PACKET: needs root).

    Loopback shows every packet twice (outgoing and incoming): only incoming ones count.
    UDP: both ports are daemon ports (gossip). TCP: one side is a daemon port (peer HTTP
    requests; nobody else talks to the daemons while counting).
    """

    PACKET_OUTGOING = 4

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.udp_bytes = self.udp_packets = self.tcp_bytes = 0
        self.udp_bytes_from: dict[int, int] = dict.fromkeys(ports, 0)  # by sender port
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0800))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lo-counter", daemon=True)

    def __enter__(self) -> LoopbackCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] == self.PACKET_OUTGOING or len(frame) < 14 + 20:
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            proto = ip[9]
            sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
            if proto == 17 and sport in self.ports and dport in self.ports:
                self.udp_packets += 1
                self.udp_bytes += total - ihl - 8  # the sealed envelope
                self.udp_bytes_from[sport] += total - ihl - 8
            elif proto == 6 and (sport in self.ports or dport in self.ports):
                doff = (ip[ihl + 12] >> 4) * 4
                self.tcp_bytes += total - ihl - doff


def real_detection(n: int, preset: str, runs: int, window_s: float) -> dict[str, Any]:
    """Detection after SIGKILL, and steady-state traffic, for `n` real daemons."""
    rows: list[dict[str, Any]] = []
    traffic: dict[str, Any] = {}
    with fleet(n, preset) as f:
        time.sleep(3.0)  # let the join's updates drain before counting steady-state traffic
        load0 = load_1m()
        with LoopbackCounter(f.ports) as counter:
            time.sleep(window_s)
        traffic = {
            "window_s": window_s,
            "load_1m": load0,
            "udp_msgs_per_node_s": counter.udp_packets / n / window_s,
            "udp_bytes_per_node_s": counter.udp_bytes / n / window_s,
            "tcp_peer_bytes_per_node_s": counter.tcp_bytes / n / window_s,
            # The coordinator also sends election heartbeats over the gossip socket.
            "udp_sent_bytes_per_s_busiest": max(counter.udp_bytes_from.values()) / window_s,
            "udp_sent_bytes_per_s_median": statistics.median(counter.udp_bytes_from.values())
            / window_s,
        }
        print(
            f"  [{preset} n={n}] steady state over {window_s:.0f}s: "
            f"{traffic['udp_msgs_per_node_s']:.1f} gossip msgs/node/s, "
            f"{traffic['udp_bytes_per_node_s']:.0f} UDP B/node/s, "
            f"{traffic['tcp_peer_bytes_per_node_s']:.0f} peer TCP B/node/s (load {load0:.1f})",
            flush=True,
        )
        for run in range(runs):
            victim = f.names[1 + run % (n - 1)]  # never the same twice in a row
            survivors = [x for x in f.names if x != victim]
            load = load_1m()
            t_kill = f.kill(victim)
            pattern = rf"member state peer={victim} .* new=dead"

            def all_dead(
                pattern: str = pattern, t_kill: float = t_kill, survivors: list[str] = survivors
            ) -> bool:
                return all(log_events(f.nodes[s], pattern, t_kill) for s in survivors)

            f.cluster.wait_for(all_dead, 120, f"{victim} dead everywhere", 0.1)
            suspect = [
                log_events(f.nodes[s], rf"member state peer={victim} .* new=suspect", t_kill)
                for s in survivors
            ]
            dead = [log_events(f.nodes[s], pattern, t_kill)[0][0] - t_kill for s in survivors]
            first_suspect = min((ev[0][0] for ev in suspect if ev), default=float("nan"))
            row = {
                "run": run,
                "victim": victim,
                "load_1m": load,
                "first_suspect_s": first_suspect - t_kill,
                "first_dead_s": min(dead),
                "all_dead_s": max(dead),
            }
            rows.append(row)
            print(
                f"  [{preset} n={n}] run {run}: suspect {row['first_suspect_s']:.3f}s, "
                f"dead first {row['first_dead_s']:.3f}s all {row['all_dead_s']:.3f}s "
                f"(load {load:.1f})",
                flush=True,
            )
            f.restart(victim)
            f.wait_formed()
    cfg = lan() if preset == "lan" else local()
    return {
        "n": n,
        "preset": preset,
        "probe_interval_s": cfg.probe_interval_s,
        "suspicion_mult": cfg.suspicion_mult,
        "runs": rows,
        "first_suspect_s": summary([r["first_suspect_s"] for r in rows]),
        "first_dead_s": summary([r["first_dead_s"] for r in rows]),
        "all_dead_s": summary([r["all_dead_s"] for r in rows]),
        "traffic": traffic,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="simulated nodes")
    parser.add_argument("--runs", type=int, default=2, help="simulated runs (seeds)")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--real-n", type=int, default=5)
    parser.add_argument("--real-runs", type=int, default=7, help="kills per preset")
    parser.add_argument("--window", type=float, default=10.0, help="traffic window, seconds")
    parser.add_argument("--skip-sim", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    started = time.time()
    data: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "load_1m_start": load_1m(),
    }
    md = ["# Membership benchmark\n"]

    if not args.skip_real:
        real = []
        for preset in ("lan", "local"):
            print(f"real processes: N={args.real_n} preset={preset} runs={args.real_runs}")
            real.append(real_detection(args.real_n, preset, args.real_runs, args.window))
        data["real"] = real
        md.append(
            f"\n## {args.real_n} real daemons on 127.0.0.1 (SIGKILL, times from the survivors' "
            "logs, ms resolution)\n\n"
        )
        rows = []
        for r in real:
            for key in ("first_suspect_s", "first_dead_s", "all_dead_s"):
                s = r[key]
                rows.append(
                    [r["preset"], key.removesuffix("_s").replace("_", " "), s.get("n", 0),
                     s.get("median", float("nan")), s.get("p90", float("nan")),
                     s.get("min", float("nan")), s.get("max", float("nan"))]
                )  # fmt: skip
        md.append(
            md_table(["preset", "detection", "runs", "median s", "p90 s", "min s", "max s"], rows)
        )
        md.append(
            "\nSteady-state traffic (no API polling; counted on `lo`). UDP is everything "
            "between the daemons' gossip sockets: SWIM probes, acks, piggybacked updates, and the "
            "coordinator's election heartbeats (which is why one node sends more). Bytes are "
            "sealed envelopes (UDP payload). Peer TCP is `/v1/peer` (push-pull sync, "
            "anti-entropy), both directions, headers excluded.\n\n"
        )
        md.append(
            md_table(
                [
                    "preset",
                    "gossip msgs/node/s",
                    "UDP bytes/node/s",
                    "sent B/s: median node",
                    "sent B/s: busiest (coordinator)",
                    "peer TCP bytes/node/s",
                    "load",
                ],
                [
                    [
                        r["preset"],
                        r["traffic"]["udp_msgs_per_node_s"],
                        r["traffic"]["udp_bytes_per_node_s"],
                        r["traffic"]["udp_sent_bytes_per_s_median"],
                        r["traffic"]["udp_sent_bytes_per_s_busiest"],
                        r["traffic"]["tcp_peer_bytes_per_node_s"],
                        r["traffic"]["load_1m"],
                    ]
                    for r in real
                ],
            )
        )

    if not args.skip_sim:
        overhead = envelope_overhead_bytes()
        cfg = lan()
        print(
            f"simulation: N={args.n} runs={args.runs} loss={args.loss} "
            f"probe_interval={cfg.probe_interval_s}s gossip_interval={cfg.gossip_interval_s}s "
            f"envelope_overhead={overhead}B"
        )
        sim_rows: list[dict[str, Any]] = []
        for seed in range(args.runs):
            r = simulate(args.n, seed, loss=args.loss, overhead=overhead)
            sim_rows.append(r)
            print(
                f"  seed={seed} converge={r['converge_s']:.1f}s"
                f" first_detect={r['first_detection_s']:.2f}s all_detect={r['all_detected_s']:.2f}s"
                f" msgs/node/s={r['messages_per_node_s']:.2f}"
                f" bytes/node/s={r['wire_bytes_per_node_s']:.0f}"
                f" (payload {r['payload_bytes_per_node_s']:.0f}) wall={r['wall_s']:.1f}s",
                flush=True,
            )

        def med(key: str) -> float:
            return float(statistics.median(r[key] for r in sim_rows))

        print(
            f"median over {len(sim_rows)} runs (simulated time):"
            f" detection first={med('first_detection_s'):.2f}s all={med('all_detected_s'):.2f}s;"
            f" gossip {med('wire_bytes_per_node_s'):.0f} B/node/s"
            f" ({med('messages_per_node_s'):.2f} msgs/node/s,"
            f" payload {med('payload_bytes_per_node_s'):.0f} B)"
        )
        data["simulation"] = {"n": args.n, "loss": args.loss, "envelope_overhead_bytes": overhead,
                              "runs": sim_rows}  # fmt: skip
        md.append(
            f"\n## {args.n} simulated nodes (pure SWIM core, lan() timings, simulated time, "
            f"loss {args.loss})\n\n"
        )
        md.append(
            md_table(
                [
                    "seeds",
                    "converge s",
                    "first dead s",
                    "all dead s",
                    "msgs/node/s",
                    "wire bytes/node/s",
                    "payload bytes/node/s",
                ],
                [
                    [
                        len(sim_rows),
                        med("converge_s"),
                        med("first_detection_s"),
                        med("all_detected_s"),
                        med("messages_per_node_s"),
                        med("wire_bytes_per_node_s"),
                        med("payload_bytes_per_node_s"),
                    ]
                ],
            )
        )
        md.append(
            f"\nMedians over seeds; wire bytes add the sealed envelope's {overhead} B per "
            "message (measured with a real `Wire`) to the msgpack payload.\n"
        )

    data["load_1m_end"] = load_1m()
    data["wall_s"] = time.time() - started
    md.append(
        f"\nMachine: {os.cpu_count()} cores; 1-min load {data['load_1m_start']:.1f} at start, "
        f"{data['load_1m_end']:.1f} at end (other work shared the machine). "
        f"Command: `{data['command']}`.\n"
    )
    jpath, mpath = write_results("membership", data, "".join(md))
    print(f"wrote {jpath} and {mpath} in {data['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
