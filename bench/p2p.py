"""Blob sharing benchmark: N hosts each needing the same images, registry slower than hosts.

Hosts are network namespaces with their own dockerd (tests/cluster/harness.py), the registry
in its own namespace. Links are shaped in both directions so peers cannot cheat physics: the
registry's egress (tbf on its eth0), each host's download (tbf on the bridge side of its
veth) and each host's upload (tbf on its eth0). Every method runs in the same run, on the
same cluster, from cold (images removed, houndd restarted on empty state):

  all-at-once   every host runs `docker pull` of every image at once
  houndd-off    houndd with `p2p = false`: dockerd pulls from the registry
  houndd-p2p    houndd with blob sharing (the default)

Reported per method: wall seconds (houndd: `houndd submit --wait`, CLI start-up included),
bytes the registry's interface sent (tx counter, headers included) over the unique blob
bytes, and two bounds: registry-only (every host's bytes through the registry link) and
one-copy (max(unique bytes / registry rate, bytes per host / host rate), the best any
sharing scheme can do, per-hop latency not included).

    sudo .venv/bin/python bench/p2p.py                         # 4 hosts, ~35 MB, ~3 min
    sudo .venv/bin/python bench/p2p.py --hosts 4,10 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from bench.common import (  # noqa: E402
    Sampler,
    houndd_converged,
    machine,
    run_parallel,
    scratch_dir,
)
from tests.cluster.harness import Cluster, ClusterError, houndd_missing  # noqa: E402
from tests.fixtures.images import PushedImage, push_image_detailed  # noqa: E402

log = logging.getLogger("houndd.bench")

MB = 1_000_000
METHODS = ("all-at-once", "houndd-off", "houndd-p2p")
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# About 35 MB in all, in the layer counts real images of these sizes have.
DEFAULT_IMAGES = (("p2p/app", 16, 3), ("p2p/runtime", 12, 2), ("p2p/tools", 7, 2))


class BenchError(RuntimeError):
    """A run did not complete (a pull failed or an image is missing afterwards)."""


class P2PBench:
    """One cluster of `n` hosts, the pushed images, and the measurements on them."""

    def __init__(
        self, cluster: Cluster, pushed: Sequence[PushedImage], args: argparse.Namespace
    ) -> None:
        self.cluster = cluster
        self.pushed = list(pushed)
        self.args = args
        self.refs = [cluster.image_ref(p.repository, p.tag) for p in pushed]
        self.unique_bytes = sum(p.size_bytes for p in pushed)

    # --- cold start ------------------------------------------------------------------------

    def reset(self) -> None:
        """No houndd, no images, no blob caches: every method starts cold."""
        for h in self.cluster.hosts:
            self.cluster.stop_houndd(h)
            shutil.rmtree(h.workdir / "state", ignore_errors=True)
        run_parallel([lambda h=h: self.cluster.remove_images(h) for h in self.cluster.hosts])
        time.sleep(self.args.settle_s)  # let dockerd finish deleting layers

    def start_houndd(self, p2p: bool) -> None:
        overrides = {"preset": self.args.preset, "p2p": p2p, "log_level": self.args.log_level}
        for h in self.cluster.hosts:
            self.cluster.start_houndd(h, overrides, wait_ready=False)
        for h in self.cluster.hosts:
            self.cluster.wait_houndd_ready(h)
        if houndd_converged(self.cluster, {h.name for h in self.cluster.hosts}):
            return
        raise BenchError(f"houndd did not converge; n1 log:\n{self.cluster.houndd_log_tail('n1')}")

    # --- methods ---------------------------------------------------------------------------

    def all_at_once(self) -> float:
        def pull(host: str, ref: str) -> Callable[[], None]:
            def job() -> None:
                proc = self.cluster.docker(host, "pull", "-q", ref, check=False)
                if proc.returncode != 0:
                    raise BenchError(f"docker pull {ref} on {host}: {proc.stderr.strip()}")

            return job

        start = time.monotonic()
        run_parallel([pull(h.name, ref) for h in self.cluster.hosts for ref in self.refs])
        return time.monotonic() - start

    def houndd(self, report: dict[str, Any]) -> float:
        coordinator = self.cluster.coordinator("n1")
        entry = next(h.name for h in self.cluster.hosts if h.name != coordinator)
        plan = {
            "name": "bench-p2p",
            "targets": [{"images": self.refs, "all": True}],
            "policy": {"parallelism": 100, "per_node_parallelism": 3, "pull_policy": "Always"},
        }
        path = self.cluster.workdir / "plan.yaml"
        path.write_text(yaml.safe_dump(plan, sort_keys=False))
        start = time.monotonic()
        proc = self.cluster.houndd(entry, "submit", str(path), "--wait", "--json", timeout=3600)
        elapsed = time.monotonic() - start
        with contextlib.suppress(ValueError):
            report["plan_state"] = json.loads(proc.stdout).get("state")
        if proc.returncode != 0:
            raise BenchError(f"houndd submit exited {proc.returncode}: {proc.stderr[-800:]}")
        return elapsed

    # --- one measurement -------------------------------------------------------------------

    def missing(self) -> list[str]:
        out = []
        for h in self.cluster.hosts:
            held = self.cluster.image_digests(h)
            out += [
                f"{h.name}:{p.repository}"
                for p in self.pushed
                if f"{self.cluster.registry_address}/{p.repository}@{p.digest}" not in held
            ]
        return out

    def measure(self, method: str, repeat: int) -> dict[str, Any]:
        self.reset()
        if method.startswith("houndd"):
            self.start_houndd(p2p=method == "houndd-p2p")
        record: dict[str, Any] = {
            "method": method,
            "hosts": len(self.cluster.hosts),
            "repeat": repeat,
        }
        links = [h.link for h in self.cluster.hosts]
        sent0, rx0 = self.cluster.registry_tx_bytes(), _tx(links)
        # CPU by process kind (houndd, dockerd, containerd, ...): on a small machine the
        # hosts' CPU, not the network, can be what a fast method waits for.
        sampler = Sampler(
            pids=lambda: [p for h in self.cluster.hosts for p in self.cluster.pids(h)],
            rx_bytes=lambda: _tx(links),
            interval_s=0.5,
        )
        try:
            with sampler:
                seconds = self.all_at_once() if method == "all-at-once" else self.houndd(record)
            record["seconds"] = round(seconds, 3)
            record["missing"] = self.missing()
            record["ok"] = not record["missing"]
        except (BenchError, ClusterError) as e:
            record.update(seconds=None, ok=False, error=str(e)[-1000:])
        record["usage"] = sampler.usage.as_dict()
        record["registry_sent_bytes"] = self.cluster.registry_tx_bytes() - sent0
        record["hosts_received_bytes"] = _tx(links) - rx0
        record["registry_sent_over_unique"] = round(
            record["registry_sent_bytes"] / self.unique_bytes, 3
        )
        outcome = "ok" if record["ok"] else f"FAILED {record.get('error') or record['missing']}"
        cpu = ", ".join(
            f"{kind} {pct:.0f}%" for kind, pct in sorted(record["usage"]["cpu_pct"].items())
        )
        print(
            f"  hosts={len(self.cluster.hosts):<3} {method:<12} {_fmt(record.get('seconds'))} s  "
            f"registry sent {record['registry_sent_over_unique']:.2f}x unique  cpu: {cpu}  "
            f"{outcome[:200]}",
            flush=True,
        )
        return record


def _tx(links: Sequence[str]) -> int:
    total = 0
    for link in links:
        with contextlib.suppress(OSError):
            total += int(Path(f"/sys/class/net/{link}/statistics/tx_bytes").read_text())
    return total


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def bounds(
    unique_bytes: int, hosts: int, registry_mbit: float, host_mbit: float
) -> dict[str, float]:
    """Registry-only: every host's bytes through the registry link. One-copy: each unique
    byte leaves the registry once, and each host still receives all of its bytes."""
    registry_bps, host_bps = registry_mbit * 1e6 / 8, host_mbit * 1e6 / 8
    return {
        "registry_only_s": max(hosts * unique_bytes / registry_bps, unique_bytes / host_bps),
        "one_copy_s": max(unique_bytes / registry_bps, unique_bytes / host_bps),
    }


def push(cluster: Cluster, specs: Sequence[tuple[str, int, int]]) -> list[PushedImage]:
    return [
        push_image_detailed(
            cluster.registry_url, repo, "latest", mb * MB, layers=layers, seed=5000 + i
        )
        for i, (repo, mb, layers) in enumerate(specs)
    ]


# --- reporting -----------------------------------------------------------------------------


def summarize(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for n in result["hosts"]:
        records = [r for r in result["records"] if r["hosts"] == n]
        bound = result["bounds"][str(n)]

        def median(method: str, key: str, records: list[dict[str, Any]] = records) -> float | None:
            values = [r[key] for r in records if r["method"] == method and r.get("ok")]
            return statistics.median(values) if values else None

        p2p, off, aao = (median(m, "seconds") for m in METHODS[::-1])
        rows.append(
            {
                "hosts": n,
                "all_at_once_s": aao,
                "houndd_off_s": off,
                "houndd_p2p_s": p2p,
                **{k: round(v, 3) for k, v in bound.items()},
                "p2p_over_registry_only": _ratio(p2p, bound["registry_only_s"]),
                "p2p_over_one_copy": _ratio(p2p, bound["one_copy_s"]),
                "p2p_over_all_at_once": _ratio(p2p, aao),
                "p2p_registry_sent_over_unique": median("houndd-p2p", "registry_sent_over_unique"),
                "off_registry_sent_over_unique": median("houndd-off", "registry_sent_over_unique"),
                "all_at_once_registry_sent_over_unique": median(
                    "all-at-once", "registry_sent_over_unique"
                ),
            }
        )
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        "# Blob sharing benchmark",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']['nproc']} CPUs ({result['machine']['cpu']}), "
        f"{result['machine']['memory_gib']} GiB, kernel {result['machine']['kernel']}, "
        f"{result['machine']['dockerd']}.",
        "",
        f"Images: {result['unique_bytes'] / MB:.1f} MB of blobs in {len(result['images'])} "
        f"images, every host needs all of them. Registry egress {result['registry_mbit']:g} "
        f"Mbit/s; host links {result['host_mbit']:g} Mbit/s down and up. houndd preset "
        f"`{result['preset']}`; {result['repeat']} run(s) per point, medians.",
        "",
        "| hosts | all at once (s) | houndd p2p off (s) | houndd p2p (s) | registry-only "
        "bound (s) | one-copy bound (s) | p2p / registry-only | p2p / one-copy | "
        "p2p / all at once | registry sent / unique: all at once, off, p2p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        sent = ", ".join(
            _fmt(row[k])
            for k in (
                "all_at_once_registry_sent_over_unique",
                "off_registry_sent_over_unique",
                "p2p_registry_sent_over_unique",
            )
        )
        lines.append(
            f"| {row['hosts']} | {_fmt(row['all_at_once_s'])} | {_fmt(row['houndd_off_s'])} | "
            f"{_fmt(row['houndd_p2p_s'])} | {_fmt(row['registry_only_s'])} | "
            f"{_fmt(row['one_copy_s'])} | {_fmt(row['p2p_over_registry_only'])} | "
            f"{_fmt(row['p2p_over_one_copy'])} | {_fmt(row['p2p_over_all_at_once'])} | {sent} |"
        )
    lines += [
        "",
        "CPU while each method ran (100 % = one core; the machine has "
        f"{result['machine']['nproc']}), summed over the hosts' processes, first run:",
        "",
        "| hosts | method | seconds | houndd | dockerd | containerd | load avg (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    seen: set[tuple[int, str]] = set()
    for r in result["records"]:
        if (r["hosts"], r["method"]) in seen or "usage" not in r:
            continue
        seen.add((r["hosts"], r["method"]))
        cpu = r["usage"]["cpu_pct"]
        lines.append(
            f"| {r['hosts']} | {r['method']} | {_fmt(r.get('seconds'))} | "
            f"{cpu.get('houndd', 0):.0f} % | {cpu.get('dockerd', 0):.0f} % | "
            f"{cpu.get('containerd', 0):.0f} % | {r['usage']['load_busy_max']:.1f} |"
        )
    failed = [r for r in result["records"] if not r.get("ok")]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed; see results.json."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--hosts", default="4", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--registry-mbit", type=float, default=100.0, help="registry egress")
    p.add_argument("--host-mbit", type=float, default=400.0, help="each host's link, both ways")
    p.add_argument("--repeat", type=int, default=1, help="runs per method and host count")
    p.add_argument("--preset", default="lan", choices=["lan", "local"], help="houndd timings")
    p.add_argument("--settle-s", type=float, default=1.0, help="pause after clearing images")
    p.add_argument(
        "--log-level", default="INFO", help="houndd log level (DEBUG: per-blob timeline)"
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), type=lambda s: [m for m in s.split(",") if m]
    )
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--workdir", type=Path, default=None, help="cluster scratch directory")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    if any(m.startswith("houndd") for m in args.methods) and houndd_missing():
        print(f"houndd cannot run: {houndd_missing()}", file=sys.stderr)
        return 2
    out = args.out or RESULTS_DIR / f"p2p-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records: list[dict[str, Any]] = []
    pushed: list[PushedImage] = []
    all_bounds: dict[str, dict[str, float]] = {}
    for n in args.hosts:
        with (
            scratch_dir(args.workdir, "hd-p2p-") as wd,
            Cluster(
                n,
                workdir=wd,
                registry_egress_mbit=args.registry_mbit,
                host_ingress_mbit=args.host_mbit,
            ) as cluster,
        ):
            for h in cluster.hosts:
                cluster.set_host_egress(h, args.host_mbit)
            pushed = push(cluster, DEFAULT_IMAGES)
            bench = P2PBench(cluster, pushed, args)
            all_bounds[str(n)] = bounds(bench.unique_bytes, n, args.registry_mbit, args.host_mbit)
            print(
                f"{n} hosts, {bench.unique_bytes / MB:.1f} MB unique; bounds: "
                + ", ".join(f"{k} {v:.2f}" for k, v in all_bounds[str(n)].items())
            )
            for rep in range(args.repeat):
                for method in args.methods:
                    records.append(bench.measure(method, rep))
            bench.reset()
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "hosts": args.hosts,
        "registry_mbit": args.registry_mbit,
        "host_mbit": args.host_mbit,
        "preset": args.preset,
        "repeat": args.repeat,
        "images": [
            {"repository": p.repository, "bytes": p.size_bytes, "layers": len(p.layer_digests)}
            for p in pushed
        ],
        "unique_bytes": sum(p.size_bytes for p in pushed),
        "bounds": all_bounds,
        "records": records,
    }
    result["summary"] = summarize(result)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(f"\nwrote {out}/results.json and results.md\n")
    print((out / "results.md").read_text())
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
