"""CLI start-up benchmark: wall time of each `houndd` verb against `python -c pass`.

One real `houndd run` daemon on 127.0.0.1 (fake engine, local preset) holding a few finished
plans; then, in interleaved rounds so that load from other work hits every command alike:

- `python -c pass` with the same interpreter (the floor every Python program pays),
- `houndd --version`, `houndd status --json`, `houndd status`, `houndd plans`,
  `houndd plan ID`, `houndd submit FILE` (the daemon's acceptance included),

each run as the installed `houndd` console script with the node's config, as an operator would.
Bytecode is compiled first (a pip install does it too); PYTHONDONTWRITEBYTECODE is removed from
the children's environment so no run pays for compiling. Prints each verb's median and p90 wall
time and its ratio to the `python -c pass` median of the same run; the targets are `status
--json` and `plans` at most 100 ms and 3.5x, `--version` at most 2x.

    .venv/bin/python bench/cli.py [--runs 30]

Writes `bench/results/cli.json` and `bench/results/cli.md`.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import loadavg_1m, machine  # noqa: E402
from tests.procs import LocalCluster  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
TARGETS = {  # verb -> (max median ms, max ratio to python -c pass)
    "status --json": (100.0, 3.5),
    "plans": (100.0, 3.5),
    "--version": (None, 2.0),
}


def houndd_script() -> str:
    """The console script next to this interpreter (what `pip install` puts on PATH)."""
    script = Path(sys.executable).with_name("houndd")
    if script.exists():
        return str(script)
    found = shutil.which("houndd")
    if found is None:
        raise SystemExit("no `houndd` console script: pip install -e . first")
    return found


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()}")
    return took


def import_profile(argv: list[str], env: dict[str, str]) -> list[tuple[str, float]]:
    """Top-level imports of one run (`python -X importtime`), cumulative ms, largest first:
    where a verb's start-up goes."""
    script = Path(argv[0])
    interpreter = script.read_text().splitlines()[0].removeprefix("#!").strip()
    proc = subprocess.run(
        [interpreter, "-X", "importtime", str(script), *argv[1:]],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    top: list[tuple[str, float]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative_us, name = line.split("|", 2)
        if name.startswith(" ") and not name.startswith("  "):  # depth 0: imported by the verb
            top.append((name.strip(), round(int(cumulative_us.strip()) / 1000, 1)))
    return sorted(top, key=lambda item: -item[1])[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per command")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    compileall.compile_dir(str(REPO_ROOT / "houndd"), quiet=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    root = Path(tempfile.mkdtemp(prefix="houndd-bench-cli-"))
    cluster = LocalCluster(root)
    started = time.monotonic()
    try:
        node = cluster.add("cli-bench", docker_host="fake://?pull_s=0.01&size=1000000",
                           extra={"log_level": "INFO"})  # fmt: skip
        cluster.start("cli-bench")
        cluster.wait_ready("cli-bench")
        cluster.wait_for(
            lambda: cluster.coordinator("cli-bench")[0] == "cli-bench", 30, "coordinator"
        )
        houndd = houndd_script()
        config = ["--config", str(node.config_path)]
        plan_file = root / "bench-plan.yaml"
        plan_file.write_text("targets:\n  - images: [127.0.0.1:1/bench/a:1]\n    all: true\n")
        plan_ids = []
        for _ in range(3):
            out = subprocess.run(
                [houndd, "submit", str(plan_file), *config],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            plan_ids.append(out.stdout.strip())
        commands: dict[str, list[str]] = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "--version": [houndd, "--version"],
            "status --json": [houndd, "status", "--json", *config],
            "status": [houndd, "status", *config],
            "plans": [houndd, "plans", *config],
            "plan ID": [houndd, "plan", plan_ids[0], *config],
            "submit FILE": [houndd, "submit", str(plan_file), *config],
        }
        for argv in commands.values():  # warm the page cache and write any bytecode left
            subprocess.run(argv, env=env, capture_output=True, check=False)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        load_before = loadavg_1m()
        for _ in range(args.runs):
            for name, argv in commands.items():
                if name == "submit FILE":
                    # submit's accepted status is 1 (the registry is unreachable on purpose)
                    start = time.perf_counter()
                    subprocess.run(argv, env=env, capture_output=True, check=False)
                    samples[name].append(time.perf_counter() - start)
                else:
                    samples[name].append(timed(argv, env))
        load_after = loadavg_1m()
        profile = import_profile(commands["status --json"], env)
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)

    floor = statistics.median(samples["python -c pass"])
    rows: list[dict[str, Any]] = []
    for name, values in samples.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) >= 10 else max(values)
        row: dict[str, Any] = {
            "command": name,
            "runs": len(values),
            "median_ms": round(median * 1000, 1),
            "p90_ms": round(p90 * 1000, 1),
            "ratio": round(median / floor, 2),
        }
        if name in TARGETS:
            max_ms, max_ratio = TARGETS[name]
            ok = row["ratio"] <= max_ratio and (max_ms is None or row["median_ms"] <= max_ms)
            row["target"] = (f"<= {max_ms:.0f} ms and " if max_ms else "") + f"<= {max_ratio}x"
            row["meets_target"] = ok
        rows.append(row)
        print(
            f"{name:<16} median {row['median_ms']:7.1f} ms   p90 {row['p90_ms']:7.1f} ms   "
            f"{row['ratio']:5.2f}x python -c pass"
            + (f"   target {row['target']}: {'ok' if row['meets_target'] else 'MISSED'}"
               if "target" in row else "")
        )  # fmt: skip

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"bench/cli.py --runs {args.runs}",
        "machine": machine(),
        "python": sys.version.split()[0],
        "load_1m": [load_before, load_after],
        "took_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "status_json_imports_ms": profile,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cli.md").write_text(render_md(result))
    print(f"wrote {args.out / 'cli.md'}")


def render_md(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# CLI start-up benchmark",
        "",
        f"Wall time of each verb as the `houndd` console script, {result['rows'][0]['runs']} "
        "interleaved runs each, against one local daemon (fake engine); ratio = median / "
        "median of `python -c pass` with the same interpreter, measured in the same run.",
        "",
        "| command | median ms | p90 ms | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        target = ""
        if "target" in r:
            target = f"{r['target']}: {'met' if r['meets_target'] else 'missed'}"
        lines.append(
            f"| `{r['command']}` | {r['median_ms']} | {r['p90_ms']} | {r['ratio']}x | {target} |"
        )
    lines += [
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}. 1-min load before/after: {result['load_1m'][0]} / "
        f"{result['load_1m'][1]} (the machine was shared with other work).",
        "",
        f"Command: `{result['command']}`; {result['took_s']} s; {result['when']}.",
        "",
        "Where `houndd status --json` spends its start-up (`python -X importtime`, top-level "
        "imports, cumulative ms, one run; `site` is the interpreter's own start-up, which "
        "`python -c pass` pays too):",
        "",
        "| module | ms |",
        "|---|---|",
        *(f"| `{name}` | {ms} |" for name, ms in result["status_json_imports_ms"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
