"""Where the time goes: profiles of the coordinator on the paths the benchmarks measure.

Two profiles, each summarised as a short table (self time by area, and the functions that
cost most) in `bench/results/where-<label>.md` (and `.json`):

- `real`: 10 `houndd run` daemons on 127.0.0.1 (`lan` preset, in-memory engine, a real
  docker-registry), `--submissions` plans of one image on every node submitted to the
  coordinator one after the other (each cancelled once every node accepted its dispatch),
  while py-spy samples the coordinator's process (a dev tool: `pip install py-spy`; needs
  root or ptrace rights) whenever a thread holds the GIL: the table is the coordinator's
  Python CPU (threads waiting, and C code that released the GIL, are not in it).
- `sim`: the 1,000-node simulation of `bench/dispatch.py`, cProfile over the coordinator's
  core calls plus the encoding, sealing and opening of every message it sends or receives.

Run it on the code to compare and give each run a label (`--label before`, `--label after`);
the lead re-runs on a quiet machine:

    sudo .venv/bin/python bench/where.py --label after [--submissions 30] [--sim-n 1000]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.failover import push_images  # noqa: E402
from bench.membership import RESULTS_DIR, fleet, load_1m, md_table  # noqa: E402
from tests.fixtures.services import start_registry  # noqa: E402
from tests.procs import http  # noqa: E402

# Where a frame's file lives -> the area its self time is charged to (first match wins).
AREAS: tuple[tuple[str, str], ...] = (
    ("nacl/", "crypto (sign, verify, seal)"),
    ("msgpack", "msgpack"),
    ("houndd/wire/schema.py", "payload encode/decode (schema)"),
    ("houndd/wire/", "wire (envelope, replay, keys)"),
    ("houndd/membership/", "membership + bus"),
    ("houndd/coordinator/scheduler.py", "scheduler"),
    ("houndd/coordinator/replica.py", "replica"),
    ("houndd/coordinator/plan/", "plan parse + validation"),
    ("houndd/coordinator/records.py", "records (build, hash)"),
    ("houndd/coordinator/views.py", "plan views"),
    ("houndd/coordinator/", "coordinator core + shell"),
    ("houndd/image/", "registry client"),
    ("houndd/", "houndd other"),
    ("sqlite3", "sqlite"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("multidict/", "aiohttp"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
    ("logging/", "logging"),
)


def area_of(location: str) -> str:
    for needle, area in AREAS:
        if needle in location:
            return area
    return "other (stdlib, interpreter)"


def summarise(self_time: Counter[str], inclusive: Counter[str], unit: str) -> dict[str, Any]:
    total = sum(self_time.values()) or 1
    by_area: Counter[str] = Counter()
    for func, t in self_time.items():
        by_area[area_of(func)] += t
    return {
        "unit": unit,
        "total": total,
        "areas": [(a, t, t / total) for a, t in by_area.most_common()],
        "self": [(f, t, t / total) for f, t in self_time.most_common(15)],
        "inclusive": [(f, t, t / total) for f, t in inclusive.most_common(15) if "houndd/" in f],
    }


# --- real daemons, py-spy ---------------------------------------------------------------------


def _parse_raw(path: Path) -> tuple[Counter[str], Counter[str]]:
    """py-spy's raw output: `frame;frame;...;leaf count` per line."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # `function (file:line)`: one entry per function, whatever line was running.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        self_time[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return self_time, inclusive


def profile_real(submissions: int) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is needed for the real profile: pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="houndd-bench-profile-"))
    registry = start_registry(work / "registry")
    try:
        (ref,) = push_images(registry, 1)
        with fleet(10, "lan", docker_host="fake://?pull_s=600&size=1000") as f:
            coordinator = f.wait_formed()
            node = f.nodes[coordinator]
            assert node.proc is not None
            raw = work / "coordinator.txt"
            duration = submissions * 2 + 10
            recorder = subprocess.Popen(
                [spy, "record", "--pid", str(node.proc.pid), "--rate", "1000", "--gil",
                 "--format", "raw", "--duration", str(duration), "-o", str(raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
            load = load_1m()
            started = time.time()
            for run in range(submissions):
                plan = {
                    "name": f"profile-{run}",
                    "targets": [{"images": [ref], "all": True}],
                    "policy": {"parallelism": 10, "per_node_parallelism": 1},
                }
                status, body = http("POST", node.api + "/v1/plans", f.cluster.token, plan, 30)
                if status != 201:
                    raise RuntimeError(f"submit failed: {status} {body}")

                def dispatched(plan_id: str = body["id"]) -> bool:
                    st, view = node.get(f"/v1/plans/{plan_id}", timeout=2.0)
                    return st == 200 and all(it["started_at"] for it in view["items"])

                f.cluster.wait_for(dispatched, 30, "every node dispatched", 0.05)
                http("DELETE", node.api + f"/v1/plans/{body['id']}", f.cluster.token, timeout=10)
                time.sleep(0.3)
            spent = time.time() - started
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            recorder.wait(timeout=60)
            self_time, inclusive = _parse_raw(raw)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = summarise(self_time, inclusive, "samples (1 ms)")
    out.update({"submissions": submissions, "wall_s": spent, "load_1m": load})
    return out


# --- simulation, cProfile ----------------------------------------------------------------------


def profile_sim(n: int) -> dict[str, Any]:
    from bench import dispatch

    prof = cProfile.Profile()
    watch = dispatch._DispatchWatch

    original_timed, original_cost = watch._timed, watch._wire_cost

    def timed(self: Any, name: str, fn: Any) -> Any:
        inner = original_timed(self, name, fn)

        def profiled(*args: Any, **kw: Any) -> Any:
            if self._depth:
                return inner(*args, **kw)
            prof.enable()
            try:
                return inner(*args, **kw)
            finally:
                prof.disable()

        return profiled

    def wire_cost(self: Any, src: str, dst: str, payload: Any) -> None:
        if self.watched not in (src, dst) or src == dst:
            return
        prof.enable()
        try:
            original_cost(self, src, dst, payload)
        finally:
            prof.disable()

    watch._timed, watch._wire_cost = timed, wire_cost  # type: ignore[method-assign]
    try:
        gc.collect()
        result = dispatch.sim_run(n, 0, 5.0)
    finally:
        watch._timed, watch._wire_cost = original_timed, original_cost  # type: ignore[method-assign]
    stats = pstats.Stats(prof)
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for (file, _line, func), (_, _, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{func} ({file})"
        self_time[key] += tt
        inclusive[key] += ct
    out = summarise(self_time, inclusive, "CPU seconds")
    out.update(
        {
            "n": n,
            "coordinator_cpu_to_last_dispatch_s": result["coordinator_cpu_to_last_dispatch_s"],
            "messages": result["messages_until_all_dispatched"],
        }
    )
    return out


# --- report ----------------------------------------------------------------------------------


def _short(func: str) -> str:
    name, _, where = func.partition(" (")
    where = where.removesuffix(")")
    for marker in ("site-packages/", "/houndd/", "/bench/", "python3.11/", "python3.12/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker in ("/houndd/", "/bench/"):
                where = marker.strip("/") + "/" + where
            break
    return f"`{name}` {where}"


def table(profile: dict[str, Any]) -> str:
    rows = [[area, f"{share * 100:.1f}%"] for area, _, share in profile["areas"]]
    text = md_table(["area (self time)", "share"], rows)
    text += "\n" + md_table(
        ["top functions (self time)", "share"],
        [[_short(f), f"{share * 100:.1f}%"] for f, _, share in profile["self"][:10]],
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before, after, ...: the file name")
    parser.add_argument("--submissions", type=int, default=30)
    parser.add_argument("--sim-n", type=int, default=1000)
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-sim", action="store_true")
    args = parser.parse_args()
    data: dict[str, Any] = {"command": " ".join(sys.argv), "label": args.label}
    md = [f"# Where the time goes ({args.label})\n"]
    if not args.skip_real:
        real = profile_real(args.submissions)
        data["real"] = real
        md.append(
            f"\n## Coordinator of 10 real daemons: {real['submissions']} submissions "
            "(submit -> every node dispatched)\n\n"
            f"py-spy, 1 kHz, samples holding the GIL: {real['total']} samples (ms) in "
            f"{real['wall_s']:.1f} s ({real['total'] / real['submissions']:.1f} ms per "
            "submission: the submission, the dispatches, the results, and everything else the "
            "coordinator did meanwhile: heartbeats, gossip, anti-entropy, the benchmark polling "
            f"the plan's view every 50 ms); 1-min load {real['load_1m']:.1f} on "
            f"{os.cpu_count()} cores.\n\n" + table(real)
        )
    if not args.skip_sim:
        sim = profile_sim(args.sim_n)
        data["sim"] = sim
        md.append(
            f"\n## Coordinator of {sim['n']} simulated nodes: submit -> last dispatch\n\n"
            f"cProfile over the coordinator's core calls and the encoding, sealing and opening "
            f"of its messages: {sim['total']:.3f} CPU s profiled (the benchmark's own count, "
            f"without profiler overhead: {sim['coordinator_cpu_to_last_dispatch_s']:.3f} s); "
            f"messages `{sim['messages']}`.\n\n" + table(sim)
        )
    md.append(f"\nCommand: `{data['command']}`.\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    # Profiles name files by path: keep them relative (no machine paths in results).
    paths = sysconfig.get_paths()
    for prefix in sorted({paths["purelib"], paths["stdlib"], str(REPO_ROOT)}, key=len)[::-1]:
        text = text.replace(prefix + "/", "")
    (RESULTS_DIR / f"where-{args.label}.json").write_text(text)
    (RESULTS_DIR / f"where-{args.label}.md").write_text("".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
