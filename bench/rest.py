"""At-rest cost: CPU and gossip of an idle cluster.

`--n` real `houndd run` daemons on 127.0.0.1 (`lan` preset, in-memory engine), formed and
idle (no plan running, nobody reading the API). Over `--window` seconds, after `--settle`
seconds for the join's gossip to drain:

- CPU: user + system time of every daemon process (`/proc/PID/stat`), as a share of one core,
  summed over the cluster and per node;
- traffic: bytes on `lo` between the daemons' ports (AF_PACKET, so root): UDP datagrams
  (SWIM, heartbeats, every sealed datagram) and peer TCP (`/v1/peer` requests and replies,
  HTTP headers included), per node per second; and, from each daemon's
  `houndd_peer_sent_bytes_total{type}`, the sealed bytes by message type.

Targets: at most 5% of one core in total, at most 1 kB/s per node.

    sudo .venv/bin/python bench/rest.py [--n 10] [--window 60] [--settle 15]

Writes `bench/results/rest.json` and `bench/results/rest.md`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine  # noqa: E402
from bench.membership import (  # noqa: E402
    Fleet,
    LoopbackCounter,
    fleet,
    load_1m,
    md_table,
    write_results,
)

TARGET_CPU_PCT = 5.0
TARGET_BYTES_PER_NODE_S = 1000.0
TICKS = os.sysconf("SC_CLK_TCK")
METRIC = re.compile(r'^houndd_peer_sent_(messages|bytes)_total\{type="([A-Z_]+)"\} ([0-9.e+]+)$')


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def sent_by_type(f: Fleet) -> dict[str, dict[str, float]]:
    """(messages|bytes) -> type -> total over the cluster, from every daemon's /metrics."""
    out: dict[str, dict[str, float]] = {"messages": {}, "bytes": {}}
    for node in f.nodes.values():
        with urllib.request.urlopen(node.api + "/metrics", timeout=5.0) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            m = METRIC.match(line)
            if m:
                kind, msg_type, value = m.group(1), m.group(2), float(m.group(3))
                out[kind][msg_type] = out[kind].get(msg_type, 0.0) + value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    started = time.time()
    with fleet(args.n, "lan", docker_host="fake://?pull_s=0&size=1000") as f:
        f.wait_formed()
        time.sleep(args.settle)
        coordinator = f.wait_formed()
        pids = {name: node.proc.pid for name, node in f.nodes.items() if node.proc is not None}
        load0 = load_1m()
        before_sent = sent_by_type(f)
        before_cpu = {name: cpu_s(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        with LoopbackCounter(f.ports) as counter:
            time.sleep(args.window)
        window = time.monotonic() - t0
        after_cpu = {name: cpu_s(pid) for name, pid in pids.items()}
        after_sent = sent_by_type(f)
        load1 = load_1m()
        still = f.formed()
    n = args.n
    cpu_pct = {name: (after_cpu[name] - before_cpu[name]) / window * 100 for name in pids}
    total_cpu = sum(cpu_pct.values())
    udp = counter.udp_bytes / n / window
    tcp = counter.tcp_bytes / n / window
    by_type = {
        t: {
            "bytes_per_node_s": (after_sent["bytes"].get(t, 0.0) - before_sent["bytes"].get(t, 0.0))
            / n
            / window,
            "messages_per_node_s": (
                after_sent["messages"].get(t, 0.0) - before_sent["messages"].get(t, 0.0)
            )
            / n
            / window,
        }
        for t in sorted(set(after_sent["bytes"]) | set(before_sent["bytes"]))
    }
    by_type = {t: v for t, v in by_type.items() if v["messages_per_node_s"] > 0}
    data: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "n": n,
        "window_s": window,
        "coordinator": coordinator,
        "still_formed": still,
        "cpu_pct_of_one_core": {"total": total_cpu, "per_node": cpu_pct},
        "udp_bytes_per_node_s": udp,
        "tcp_peer_bytes_per_node_s": tcp,
        "udp_packets_per_node_s": counter.udp_packets / n / window,
        "bytes_per_node_s": udp + tcp,
        "sent_by_type": by_type,
        "load_1m": [load0, load1],
    }
    ok = total_cpu <= TARGET_CPU_PCT and udp + tcp <= TARGET_BYTES_PER_NODE_S
    coord_cpu = cpu_pct.get(coordinator, float("nan"))
    others = sorted(v for k, v in cpu_pct.items() if k != coordinator)
    md = [
        f"# At rest: {n} idle daemons (`lan` preset)\n\n",
        f"{n} `houndd run` on 127.0.0.1, formed, no plan running and nobody reading the API; "
        f"measured over {window:.0f} s after {args.settle:.0f} s to settle.\n\n",
        md_table(
            ["measure", "value", "target"],
            [
                ["CPU, all daemons (% of one core)", total_cpu, f"<= {TARGET_CPU_PCT:.0f}"],
                ["CPU, coordinator (% of one core)", coord_cpu, ""],
                ["CPU, other nodes, median (% of one core)", others[len(others) // 2], ""],
                ["UDP bytes/node/s (sealed datagrams)", udp, ""],
                ["peer TCP bytes/node/s (requests + replies, HTTP headers included)", tcp, ""],
                ["total bytes/node/s", udp + tcp, f"<= {TARGET_BYTES_PER_NODE_S:.0f}"],
                ["UDP packets/node/s", counter.udp_packets / n / window, ""],
            ],
        ),
        "\nSealed bytes sent, by message type (from the daemons' "
        "`houndd_peer_sent_bytes_total`; requests and replies without HTTP headers):\n\n",
        md_table(
            ["type", "messages/node/s", "bytes/node/s", "bytes/message"],
            [
                [
                    t,
                    v["messages_per_node_s"],
                    v["bytes_per_node_s"],
                    v["bytes_per_node_s"] / v["messages_per_node_s"],
                ]
                for t, v in sorted(by_type.items(), key=lambda kv: -kv[1]["bytes_per_node_s"])
            ],
        ),
        f"\nTargets {'met' if ok else 'NOT met'} in this run. 1-min load {load0:.1f} at start, "
        f"{load1:.1f} at end, on {os.cpu_count()} cores shared with other work (the CPU "
        f"figures are the daemons' own CPU time). Command: `{data['command']}`.\n",
    ]
    jpath, mpath = write_results("rest", data, "".join(md))
    print("".join(md))
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
