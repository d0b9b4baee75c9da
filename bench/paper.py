"""The Hound paper's evaluation (Figs. 4-6, Tables 7-8) on one machine, scaled down.

Hosts are network namespaces with their own dockerd (tests/cluster/harness.py); the registry
sits in its own namespace with shaped egress, each host's ingress is shaped too, so the
network, not the CPU, is what the methods compete for. Image sizes are Table 4 divided by
`--scale`. Every method is measured in the same run, on the same cluster:

  docker       `docker pull` of each image in sequence on every node, nodes in parallel
  compose      `docker-compose pull` (parallel by default) per node, one compose file per
               distinct image combination, combinations fired one after another and the
               nodes sharing a combination at once (the paper's Fig. 1(b))
  all-at-once  every node pulls all its images at once, all nodes fired simultaneously
  houndd       `houndd submit plan.yaml --wait --json` against a non-coordinator node, with
               blob sharing off unless `--p2p` (the paper's comparison is pull against
               pull) and a policy as wide as the plan (every node at once, all its images
               at once), which is what all-at-once does

Before each run every host's images are removed; after it every node is checked to hold
each requested image at the pushed digest. Results (JSON, markdown, PNG plots) go to
`bench/results/<timestamp>/`.

    sudo .venv/bin/python bench/paper.py                     # default set, ~15 min
    sudo .venv/bin/python bench/paper.py --hosts 1,2,5,10 --repeat 3 --scale 50
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from bench.common import (  # noqa: E402
    TABLE5,
    TABLE6,
    PaperImage,
    Sampler,
    Scenario,
    case,
    catalog,
    houndd_converged,
    identical,
    link_tx_bytes,
    lower_bound_s,
    machine,
    run_parallel,
    scratch_dir,
)
from tests.cluster.harness import Cluster, ClusterError, houndd_missing  # noqa: E402
from tests.fixtures.images import PushedImage, push_image_detailed  # noqa: E402

log = logging.getLogger("houndd.bench")

METHODS = ("docker", "compose", "all-at-once", "houndd")
RESULTS_DIR = REPO_ROOT / "bench" / "results"


class BenchError(RuntimeError):
    """A run did not complete (a pull failed or an image is missing afterwards)."""


@dataclass
class Images:
    """Pushed Table 4 images: reference and exact bytes per paper size."""

    cluster: Cluster
    pushed: dict[int, PushedImage]

    def ref(self, image: PaperImage) -> str:
        return self.cluster.image_ref(image.repository, image.tag)

    def repo_digest(self, image: PaperImage) -> str:
        digest = self.pushed[image.paper_mb].digest
        return f"{self.cluster.registry_address}/{image.repository}@{digest}"

    def node_bytes(self, scenario: Scenario) -> dict[str, int]:
        return {
            node: sum(self.pushed[i.paper_mb].size_bytes for i in imgs)
            for node, imgs in scenario.requests.items()
        }


# --- the methods ---------------------------------------------------------------------------


def _pull(cluster: Cluster, node: str, ref: str) -> None:
    proc = cluster.docker(node, "pull", "-q", ref, check=False)
    if proc.returncode != 0:
        raise BenchError(f"docker pull {ref} on {node}: {proc.stderr.strip()}")


def run_docker(cluster: Cluster, scenario: Scenario, images: Images) -> float:
    """`docker pull` each image in sequence on every node; nodes in parallel."""

    def node_job(node: str, imgs: Sequence[PaperImage]) -> Callable[[], None]:
        def job() -> None:
            for image in imgs:
                _pull(cluster, node, images.ref(image))

        return job

    start = time.monotonic()
    run_parallel([node_job(n, imgs) for n, imgs in scenario.requests.items()])
    return time.monotonic() - start


def run_all_at_once(cluster: Cluster, scenario: Scenario, images: Images) -> float:
    """Every node pulls all its images at once, all nodes fired simultaneously."""
    refs = [(node, images.ref(image)) for node, imgs in scenario.requests.items() for image in imgs]
    jobs = [functools.partial(_pull, cluster, node, ref) for node, ref in refs]
    start = time.monotonic()
    run_parallel(jobs)
    return time.monotonic() - start


def run_compose(cluster: Cluster, scenario: Scenario, images: Images, workdir: Path) -> float:
    """`docker-compose pull` per node, one compose file per distinct combination.

    As in the paper (Fig. 1(b)), a compose invocation carries one combination: nodes sharing
    it are fired together, and different combinations are fired one after another.
    """
    combos: dict[tuple[str, ...], list[str]] = {}
    for node, imgs in scenario.requests.items():
        combos.setdefault(tuple(images.ref(i) for i in imgs), []).append(node)
    files = []
    for k, refs in enumerate(combos):
        path = workdir / f"compose-{k}.yml"
        services = {f"s{i}": {"image": ref} for i, ref in enumerate(refs)}
        path.write_text(yaml.safe_dump({"version": "2.4", "services": services}))
        files.append(path)

    def compose_pull(node: str, path: Path) -> None:
        env = {**_clean_env(), "DOCKER_HOST": cluster.host(node).docker_host}
        proc = subprocess.run(
            ["docker-compose", "-f", str(path), "-p", "hdbench", "pull", "-q"],
            capture_output=True, text=True, env=env, timeout=3600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"docker-compose pull on {node}: {proc.stderr.strip()[-500:]}")

    start = time.monotonic()
    for path, nodes in zip(files, combos.values(), strict=True):
        run_parallel([functools.partial(compose_pull, n, path) for n in nodes])
    return time.monotonic() - start


def compose_startup_s(workdir: Path) -> float:
    """Wall time of a docker-compose invocation that pulls nothing: its fixed start-up cost,
    which every compose run above pays once per combination."""
    path = workdir / "compose-noop.yml"
    path.write_text(yaml.safe_dump({"version": "2.4", "services": {"s0": {"image": "noop"}}}))
    start = time.monotonic()
    subprocess.run(
        ["docker-compose", "-f", str(path), "config", "-q"],
        capture_output=True, env=_clean_env(), timeout=120, check=True,
    )  # fmt: skip
    return time.monotonic() - start


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}


def houndd_plan(scenario: Scenario, images: Images) -> dict[str, Any]:
    """The scenario as a houndd plan in the paper's form (node -> its images), with every
    node pulling at once and each all its images at once, as all-at-once does."""
    requests = scenario.requests
    return {
        "name": f"bench-{scenario.figure}-{scenario.label.replace(' ', '-')}",
        "nodes": {n: [images.ref(i) for i in imgs] for n, imgs in requests.items()},
        "policy": {
            "parallelism": max(1, len(requests)),
            "per_node_parallelism": max([1, *(len(imgs) for imgs in requests.values())]),
            "pull_policy": "Always",
        },
    }


def run_houndd(
    cluster: Cluster, plan: Mapping[str, Any], *, report: dict[str, Any] | None = None
) -> float:
    """`houndd submit plan.yaml --wait --json` against a non-coordinator node; wall seconds.

    Kept separate so the plan form, the submit command and the node choice can be adjusted
    in one place. The final plan report (the command's JSON) is stored into `report`.
    """
    running = [h.name for h in cluster.hosts if h.houndd_process is not None]
    if not running:
        raise BenchError("houndd runs on no host")
    coordinator = cluster.coordinator(running[0])
    entry = next((n for n in running if n != coordinator), running[0])
    path = cluster.workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(dict(plan), sort_keys=False))
    submitted_at = time.time()
    start = time.monotonic()
    proc = cluster.houndd(entry, "submit", str(path), "--wait", "--json", timeout=3600)
    elapsed = time.monotonic() - start
    ended_at = time.time()
    try:
        final = json.loads(proc.stdout)
    except ValueError:
        final = None
    if report is not None:
        report.update(
            {
                "entry": entry,
                "coordinator": coordinator,
                "submitted_at": submitted_at,
                "ended_at": ended_at,
            }
        )
        report["plan"] = final
    if proc.returncode != 0:
        raise BenchError(
            f"houndd submit on {entry} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return elapsed


def response_times(report: Mapping[str, Any]) -> dict[str, float] | None:
    """Table 8 from a houndd plan report: acceptance to first / all items dispatched (ms).

    Uses `dispatched_at` per item when the report has it, else `started_at` (the worker
    began the pull), relative to the plan's `accepted_at`. None if the report lacks times.
    """
    plan = report.get("plan")
    if not isinstance(plan, dict):
        return None
    accepted = plan.get("accepted_at")
    marks = []
    for item in plan.get("items", []):
        t = item.get("dispatched_at") or item.get("started_at")
        if isinstance(t, int | float):
            marks.append(float(t))
    if not isinstance(accepted, int | float) or not marks:
        return None
    out = {
        "accepted_to_first_dispatch_ms": (min(marks) - accepted) * 1000,
        "accepted_to_all_dispatched_ms": (max(marks) - accepted) * 1000,
    }
    if isinstance(report.get("submitted_at"), float):
        out["client_submit_to_all_dispatched_ms"] = (max(marks) - report["submitted_at"]) * 1000
    return {k: round(v, 2) for k, v in out.items()}


def timeline(report: Mapping[str, Any]) -> dict[str, float] | None:
    """Where a houndd run's wall time goes (ms), from the plan report's wall-clock marks.

    submit_to_accepted: client start (CLI start-up, nsenter, forwarding, replication) until
    the plan is stored; accepted_to_first_start: scheduling and dispatch until a node's
    engine starts pulling; pulling: first start to last finish over all items;
    last_finish_to_exit: result propagation to the entry node, the progress stream noticing
    the plan is final, and the CLI printing and exiting.
    """
    plan = report.get("plan")
    submitted, ended = report.get("submitted_at"), report.get("ended_at")
    if not isinstance(plan, dict) or not isinstance(submitted, float):
        return None
    accepted = plan.get("accepted_at")
    items = plan.get("items", [])
    starts = [i["started_at"] for i in items if isinstance(i.get("started_at"), int | float)]
    ends = [i["finished_at"] for i in items if isinstance(i.get("finished_at"), int | float)]
    if not isinstance(accepted, int | float) or not starts or not ends:
        return None
    out = {
        "submit_to_accepted_ms": (accepted - submitted) * 1000,
        "accepted_to_first_start_ms": (min(starts) - accepted) * 1000,
        "pulling_ms": (max(ends) - min(starts)) * 1000,
    }
    if isinstance(ended, float):
        out["last_finish_to_exit_ms"] = (ended - max(ends)) * 1000
    return {k: round(v, 1) for k, v in out.items()}


def houndd_startup_s(cluster: Cluster) -> float | None:
    """Wall time of a houndd CLI invocation that does nothing (`--help`) inside a host's
    namespace: the fixed cost every `houndd submit` pays before it sends the plan."""
    if houndd_missing() is not None:
        return None
    start = time.monotonic()
    proc = cluster.run_in(cluster.hosts[0], [sys.executable, "-m", "houndd", "--help"])
    return time.monotonic() - start if proc.returncode == 0 else None


# --- orchestration -------------------------------------------------------------------------


class Bench:
    """One cluster, the pushed images, and every measurement taken on them."""

    def __init__(self, cluster: Cluster, images: Images, args: argparse.Namespace, workdir: Path):
        self.cluster = cluster
        self.images = images
        self.args = args
        self.workdir = workdir
        self.records: list[dict[str, Any]] = []

    def clear(self) -> None:
        """Remove every image from every host (the paper's cold start for each run)."""
        run_parallel([functools.partial(self.cluster.remove_images, h) for h in self.cluster.hosts])

    def missing(self, scenario: Scenario) -> list[str]:
        out = []
        for node, imgs in scenario.requests.items():
            have = self.cluster.image_digests(node)
            out += [
                f"{node}:{self.images.repo_digest(i)}"
                for i in imgs
                if self.images.repo_digest(i) not in have
            ]
        return out

    def measure(self, scenario: Scenario, method: str, hosts_label: int) -> None:
        node_bytes = self.images.node_bytes(scenario)
        bound = lower_bound_s(node_bytes, self.cluster.registry_egress_mbit, self.args.host_mbit)
        links = [self.cluster.host(n).link for n in scenario.nodes]
        for rep in range(self.args.repeat):
            self.clear()
            time.sleep(self.args.settle_s)  # let dockerd finish deleting layers before timing
            record: dict[str, Any] = {
                "figure": scenario.figure,
                "label": scenario.label,
                "method": method,
                "hosts": hosts_label,
                "repeat": rep,
                "bytes_total": sum(node_bytes.values()),
                "bytes_max_node": max(node_bytes.values()),
                "lower_bound_s": round(bound, 3) if bound else None,
            }
            report: dict[str, Any] = {}
            sampler = Sampler(
                pids=lambda: [p for n in scenario.nodes for p in self.cluster.pids(n)],
                rx_bytes=lambda: link_tx_bytes(links),
            )
            try:
                with sampler:
                    seconds = self._run(method, scenario, report)
                record["seconds"] = round(seconds, 3)
                record["missing"] = self.missing(scenario)
                record["ok"] = not record["missing"]
            except (BenchError, ClusterError, subprocess.TimeoutExpired) as e:
                record.update(seconds=None, ok=False, error=str(e)[-1000:])
            record["usage"] = sampler.usage.as_dict()
            if method == "houndd":
                record["response"] = response_times(report)
                record["timeline"] = timeline(report)
            self.records.append(record)
            outcome = "ok" if record["ok"] else f"FAILED {record.get('error') or record['missing']}"
            print(
                f"  {scenario.figure} {scenario.label:<8} {method:<12} hosts={hosts_label:<2} "
                f"{_fmt(record.get('seconds'))}s  bound={_fmt(bound)}s  {outcome[:200]}",
                flush=True,
            )

    def _run(self, method: str, scenario: Scenario, report: dict[str, Any]) -> float:
        if method == "docker":
            return run_docker(self.cluster, scenario, self.images)
        if method == "compose":
            return run_compose(self.cluster, scenario, self.images, self.workdir)
        if method == "all-at-once":
            return run_all_at_once(self.cluster, scenario, self.images)
        if method == "houndd":
            return run_houndd(self.cluster, houndd_plan(scenario, self.images), report=report)
        raise ValueError(method)

    def houndd_on(self, n: int) -> None:
        """Run houndd on exactly the first n hosts and wait until they see each other."""
        wanted = {h.name for h in self.cluster.hosts[:n]}
        for h in self.cluster.hosts:
            if h.name not in wanted:
                self.cluster.stop_houndd(h)
        for h in self.cluster.hosts[:n]:
            if h.houndd_process is None:
                overrides = {"preset": self.args.preset, "p2p": self.args.p2p}
                self.cluster.start_houndd(h, overrides, wait_ready=False)
        for h in self.cluster.hosts[:n]:
            self.cluster.wait_houndd_ready(h)
        if houndd_converged(self.cluster, wanted, timeout_s=60):
            return
        tail = self.cluster.houndd_log_tail("n1")
        raise BenchError(f"houndd on {sorted(wanted)} did not converge; n1 log:\n{tail}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def push_catalog(cluster: Cluster, images: Mapping[int, PaperImage], needed: set[int]) -> Images:
    pushed = {}
    for mb in sorted(needed):
        i = images[mb]
        pushed[mb] = push_image_detailed(
            cluster.registry_url, i.repository, i.tag, i.size_bytes, layers=i.layers, seed=i.seed
        )
    return Images(cluster, pushed)


def scenarios(
    args: argparse.Namespace, images: Mapping[int, PaperImage], nodes: list[str]
) -> dict[str, list[Scenario]]:
    out: dict[str, list[Scenario]] = {"fig4": [], "fig5": [], "fig6": []}
    out["fig4"] = [identical("fig4", r, nodes[: args.fig4_hosts], images) for r in args.requests]
    out["fig5"] = [case(c, nodes, images) for c in args.cases]
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument(
        "--scale", type=float, default=100.0, help="divide Table 4 sizes by this (default 100)"
    )
    p.add_argument(
        "--hosts", type=ints, default=[1, 5, 10], help="Fig. 6 cluster sizes (default 1,5,10)"
    )
    p.add_argument(
        "--fig4-hosts", type=int, default=3, help="nodes in Fig. 4 (identical combinations)"
    )
    p.add_argument(
        "--requests", type=ints, default=list(range(1, 11)), help="Table 5 request numbers"
    )
    p.add_argument(
        "--fig6-requests", type=ints, default=[1, 4, 7, 10], help="request numbers for Fig. 6"
    )
    p.add_argument("--cases", default="A,B,C", type=lambda s: [c for c in s.split(",") if c])
    p.add_argument(
        "--methods", default=",".join(METHODS), type=lambda s: [m for m in s.split(",") if m]
    )
    p.add_argument("--registry-mbit", type=float, default=400.0, help="registry egress (Mbit/s)")
    p.add_argument("--host-mbit", type=float, default=100.0, help="each host's ingress (Mbit/s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per point (the paper: 3)")
    p.add_argument("--preset", default="lan", choices=["lan", "local"], help="houndd timing preset")
    p.add_argument(
        "--p2p", action="store_true", help="houndd with blob sharing (default: p2p = false)"
    )
    p.add_argument("--settle-s", type=float, default=1.0, help="pause after clearing images")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default bench/results/<stamp>)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="cluster workdir (default: a temp dir)"
    )
    args = p.parse_args(argv)
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for c in args.cases:
        if c not in TABLE6:
            p.error(f"unknown case {c!r}; choose from A, B, C")
    if any(not 1 <= r <= 10 for r in [*args.requests, *args.fig6_requests]):
        p.error("request numbers are 1..10 (Table 5)")
    return args


def available_methods(wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    if "compose" in wanted and shutil.which("docker-compose") is None:
        skipped["compose"] = "docker-compose not installed (apt-get install docker-compose)"
    if "houndd" in wanted and houndd_missing() is not None:
        skipped["houndd"] = str(houndd_missing())
    return [m for m in wanted if m not in skipped], skipped


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    methods, skipped = available_methods(args.methods)
    images = catalog(args.scale)
    n_hosts = max([*args.hosts, args.fig4_hosts, 10 if args.cases else 1])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS_DIR / stamp
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(
        f"houndd paper benchmark: image sizes = Table 4 / {args.scale:g}; hosts {n_hosts}; "
        f"registry egress {args.registry_mbit:g} Mbit/s, host ingress {args.host_mbit:g} Mbit/s"
    )
    for m, why in skipped.items():
        print(f"  skipping {m}: {why}")
    needed = {
        mb
        for r in {*args.requests, *args.fig6_requests, *(r for c in args.cases for r in TABLE6[c])}
        for mb in TABLE5[r]
    }
    started = time.time()
    with (
        scratch_dir(args.workdir, "hd-bench-") as wd,
        Cluster(
            n_hosts,
            workdir=wd,
            registry_egress_mbit=args.registry_mbit,
            host_ingress_mbit=args.host_mbit,
        ) as cluster,
    ):
        print(f"cluster up: {n_hosts} hosts, registry {cluster.registry_address}")
        print(f"pushing {len(needed)} images")
        pushed = push_catalog(cluster, images, needed)
        bench = Bench(cluster, pushed, args, wd)
        nodes = [h.name for h in cluster.hosts]
        plan = scenarios(args, images, nodes)
        for m in [m for m in methods if m != "houndd"]:
            for s in plan["fig4"] + plan["fig5"]:
                bench.measure(s, m, len(s.nodes))
        if "houndd" in methods:
            bench.houndd_on(n_hosts)
            for s in plan["fig4"] + plan["fig5"]:
                bench.measure(s, "houndd", len(s.nodes))
            for k in sorted(args.hosts, reverse=True):
                bench.houndd_on(k)
                for r in args.fig6_requests:
                    bench.measure(identical("fig6", r, nodes[:k], images), "houndd", k)
        records = bench.records
        startup = compose_startup_s(wd) if "compose" in methods else None
        hd_startup = houndd_startup_s(cluster) if "houndd" in methods else None
    result = {
        "command": command,
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "machine": machine(),
        "scale": args.scale,
        "houndd_p2p": args.p2p,
        "houndd_preset": args.preset,
        "registry_egress_mbit": args.registry_mbit,
        "host_ingress_mbit": args.host_mbit,
        "methods": methods,
        "skipped_methods": skipped,
        "images": {
            f"{i.content}:{mb}MB": {"bytes": pushed.pushed[mb].size_bytes, "layers": i.layers}
            for mb, i in images.items()
            if mb in pushed.pushed
        },
        "compose_startup_s": round(startup, 3) if startup is not None else None,
        "houndd_cli_startup_s": round(hd_startup, 3) if hd_startup is not None else None,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    plots(result, out)
    print(f"\nwrote {out}/results.json, results.md, fig4.png, fig5.png, fig6.png")
    print((out / "results.md").read_text())
    return 0 if all(r["ok"] for r in records) else 1


# --- reporting -----------------------------------------------------------------------------


def _mean(records: Sequence[Mapping[str, Any]]) -> float | None:
    values = [r["seconds"] for r in records if r.get("ok") and r.get("seconds") is not None]
    return statistics.fmean(values) if values else None


def _grouped(
    records: Sequence[Mapping[str, Any]], figure: str
) -> dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]]:
    """(label, hosts) -> method -> records, in first-seen order."""
    out: dict[tuple[str, int], dict[str, list[Mapping[str, Any]]]] = {}
    for r in records:
        if r["figure"] == figure:
            out.setdefault((r["label"], r["hosts"]), {}).setdefault(r["method"], []).append(r)
    return out


def markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# houndd vs. the Hound paper's baselines",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"{m['dockerd']}, {m['docker_compose']}  ",
        f"Image sizes: paper Table 4 / {result['scale']:g}. Registry egress "
        f"{result['registry_egress_mbit']:g} Mbit/s, "
        f"host ingress {result['host_ingress_mbit']:g} Mbit/s. houndd: `p2p = "
        f"{str(result.get('houndd_p2p', True)).lower()}`, preset "
        f"{result.get('houndd_preset', 'lan')}. "
        f"Times in seconds (mean of ok runs); bound = max(total bytes / registry egress, "
        f"max node bytes / host ingress).",
        "",
    ]
    if result.get("compose_startup_s") is not None:
        lines += [
            f"docker-compose start-up (an invocation that pulls nothing): "
            f"{result['compose_startup_s']:.2f} s, paid once per combination in every compose run.",
            "",
        ]
    if result.get("houndd_cli_startup_s") is not None:
        lines += [
            f"houndd CLI start-up (`houndd --help` in a host namespace, machine idle): "
            f"{result['houndd_cli_startup_s']:.2f} s, paid once in every houndd run.",
            "",
        ]
    if result["skipped_methods"]:
        lines += [
            f"Skipped: {', '.join(f'{k} ({v})' for k, v in result['skipped_methods'].items())}",
            "",
        ]
    titles = {
        "fig4": "Fig. 4: all nodes request the same combination",
        "fig5": "Fig. 5: nodes request different combinations (Table 6 cases)",
        "fig6": "Fig. 6: houndd with 1..N hosts",
    }
    records = result["records"]
    for fig, title in titles.items():
        groups = _grouped(records, fig)
        if not groups:
            continue
        methods = [x for x in METHODS if any(x in g for g in groups.values())]
        lines += [
            f"## {title}",
            "",
            "| request | hosts | " + " | ".join(methods) + " | bound | houndd / best baseline |",
            "|---|---|" + "---|" * (len(methods) + 2),
        ]
        for (label, hosts), by_method in groups.items():
            means = {x: _mean(by_method.get(x, [])) for x in methods}
            bound = next(iter(by_method.values()))[0]["lower_bound_s"]
            base = [v for k, v in means.items() if k != "houndd" and v]
            ratio = (means.get("houndd") or 0) / min(base) if base and means.get("houndd") else None
            failed = [k for k, rs in by_method.items() if not all(r["ok"] for r in rs)]
            cells = [f"{_fmt(means[x])}{' (failed)' if x in failed else ''}" for x in methods]
            lines.append(
                f"| {label} | {hosts} | "
                + " | ".join(cells)
                + f" | {_fmt(bound)} | {_fmt(ratio)} |"
            )
        lines.append("")
    t7 = [r for r in records if r["figure"] == "fig6" and r["label"] == "req 10" and r.get("ok")]
    if t7:
        lines += [
            "## Table 7: resources, houndd, request 10",
            "",
            "| hosts | load idle | load busy (max) | CPU % dockerd+containerd | CPU % houndd "
            "| disk write MB/s | network MB/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in t7:
            u = r["usage"]
            engine = u["cpu_pct"].get("dockerd", 0) + u["cpu_pct"].get("containerd", 0)
            lines.append(
                f"| {r['hosts']} | {u['load_idle']:.2f} | {u['load_busy_max']:.2f} "
                f"| {engine:.1f} | "
                f"{u['cpu_pct'].get('houndd', 0):.1f} | {u['disk_write_mb_s']:.2f} "
                f"| {u['net_mb_s']:.2f} |"
            )
        lines += [
            "",
            "Load is the machine's (all hosts share one kernel); "
            "CPU is summed over the hosts' processes (100 = one core).",
            "",
        ]
        lines += [
            "## Table 8: response time, houndd, request 10",
            "",
            "| hosts | accepted -> first dispatch (ms) | accepted -> all dispatched (ms) "
            "| client submit -> all dispatched (ms) |",
            "|---|---|---|---|",
        ]
        for r in t7:
            resp = r.get("response") or {}
            lines.append(
                f"| {r['hosts']} | {_fmt(resp.get('accepted_to_first_dispatch_ms'))} | "
                f"{_fmt(resp.get('accepted_to_all_dispatched_ms'))} | "
                f"{_fmt(resp.get('client_submit_to_all_dispatched_ms'))} |"
            )
        lines.append("")
    timed = [r for r in records if r.get("timeline") and r.get("seconds") is not None]
    if timed:
        lines += [
            "## Where houndd's time goes (ms)",
            "",
            "| figure | request | hosts | total | submit -> accepted | accepted -> first pull "
            "| pulling (first start -> last finish) | last finish -> client exit |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            t = r["timeline"]
            lines.append(
                f"| {r['figure']} | {r['label']} | {r['hosts']} | {r['seconds'] * 1000:.0f} "
                f"| {t['submit_to_accepted_ms']:.0f} | {t['accepted_to_first_start_ms']:.0f} "
                f"| {t['pulling_ms']:.0f} | {_fmt(t.get('last_finish_to_exit_ms'))} |"
            )
        lines.append("")
    failures = [r for r in records if not r["ok"]]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {r['figure']} {r['label']} {r['method']} hosts={r['hosts']}: "
            f"{r.get('error') or r.get('missing')}"
            for r in failures
        ]
    return "\n".join(lines) + "\n"


def plots(result: Mapping[str, Any], out: Path) -> None:
    """Fig. 4-6 look-alikes: grouped bars per request/case, lines per host count."""
    # Imported here: matplotlib is the optional `bench` extra, and Agg must be chosen before
    # pyplot loads (no display on a CI box).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    for fig in ("fig4", "fig5"):
        groups = _grouped(records, fig)
        if not groups:
            continue
        labels = [label for label, _ in groups]
        methods = [x for x in METHODS if any(x in g for g in groups.values())]
        width = 0.8 / max(1, len(methods))
        f, ax = plt.subplots(figsize=(max(6, len(labels) * 1.1), 4))
        for k, method in enumerate(methods):
            ys = [_mean(g.get(method, [])) or 0 for g in groups.values()]
            ax.bar([i + k * width for i in range(len(labels))], ys, width, label=method)
        bounds = [next(iter(g.values()))[0]["lower_bound_s"] or 0 for g in groups.values()]
        ax.plot(
            [i + 0.4 - width / 2 for i in range(len(labels))],
            bounds,
            "k_",
            markersize=20,
            label="bound",
        )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
        ax.set_ylabel("image distribution time / s")
        ax.set_title(f"{fig}: scale 1/{result['scale']:g}")
        ax.legend()
        f.tight_layout()
        f.savefig(out / f"{fig}.png", dpi=120)
        plt.close(f)
    groups = _grouped(records, "fig6")
    if groups:
        f, ax = plt.subplots(figsize=(6, 4))
        by_hosts: dict[int, list[tuple[str, float]]] = {}
        for (label, hosts), by_method in groups.items():
            mean = _mean(by_method.get("houndd", []))
            if mean is not None:
                by_hosts.setdefault(hosts, []).append((label, mean))
        for hosts, points in sorted(by_hosts.items()):
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=f"{hosts} hosts"
            )
        ax.set_ylabel("image distribution time / s")
        ax.set_title(f"fig6: houndd scalability, scale 1/{result['scale']:g}")
        ax.legend()
        f.tight_layout()
        f.savefig(out / "fig6.png", dpi=120)
        plt.close(f)


if __name__ == "__main__":
    sys.exit(main())
