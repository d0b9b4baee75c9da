"""The `houndd` command as an operator runs it: a real daemon process (fake engine, tags
resolved at a real docker-registry) and the CLI as a subprocess with the node's config.

Covers what scripts and people depend on: exit codes (0 ok, 1 failed, 2 usage/config,
3 unreachable, 130 interrupted), the plan id alone on stdout, problems on stderr, no traceback
for anything a user can do wrong, progress that is plain text when not on a terminal and
redrawn in place on one, re-attaching to a plan, and Ctrl-C while waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from houndd.cli import build_parser
from tests.fixtures.images import push_image
from tests.fixtures.services import Registry
from tests.procs import LocalCluster, Node, run_houndd

pytestmark = [pytest.mark.processes, pytest.mark.docker]

# Long enough to see progress and interrupt a wait, short enough for CI.
PULL_S = 1.2
LONG_REPOSITORY = "team-with-a-long-name/project/subsystem/component-with-a-long-name"


def houndd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
    env.update(extra)
    return env


@dataclass
class Cli:
    node: Node
    registry: Registry
    images: list[str]
    root: Path

    @property
    def config(self) -> list[str]:
        return ["--config", str(self.node.config_path)]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        proc = run_houndd(*args, env=env, timeout=timeout)
        assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
        return proc

    def plan_file(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def cli(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    root = tmp_path_factory.mktemp("cli")
    images = []
    for i, repo in enumerate(["cli/web", "cli/db", LONG_REPOSITORY]):
        push_image(registry.url, repo, "1", 40_000, seed=300 + i)
        images.append(f"{registry.address}/{repo}:1")
    cluster = LocalCluster(root / "cluster")
    node = cluster.add(
        "cli-node", docker_host=f"fake://?pull_s={PULL_S}&size=3000000", extra={"log_level": "INFO"}
    )
    cluster.start("cli-node")
    try:
        cluster.wait_ready("cli-node")
        cluster.wait_for(
            lambda: cluster.coordinator("cli-node")[0] == "cli-node", 20, "coordinator"
        )
        yield Cli(node, registry, images, root)
    finally:
        cluster.close()


def _plan_state(cli: Cli, plan_id: str) -> str:
    proc = cli.run("plan", plan_id, "-o", "json", *cli.config)
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["state"])


# --- reading the cluster ----------------------------------------------------------------------


def test_status_has_role_and_version_and_formats_for_scripts(cli: Cli) -> None:
    table = cli.run("status", *cli.config)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("cluster houndd   coordinator cli-node")
    header = lines[1].split()
    assert header[:5] == ["NAME", "ROLE", "STATE", "ADDRESS", "VERSION"]
    assert "INCARNATION" not in header and "*" not in table.stdout
    row = lines[2].split()
    assert row[:3] == ["cli-node", "coordinator", "alive"] and row[4] == "0.1.0"

    wide = cli.run("status", "-o", "wide", *cli.config).stdout.splitlines()
    assert "INCARNATION" in wide[1] and "NODE ID" in wide[1]
    bare = cli.run("status", "--no-headers", *cli.config).stdout.splitlines()
    assert len(bare) == 1 and bare[0].split()[0] == "cli-node"
    as_json = json.loads(cli.run("status", "-o", "json", *cli.config).stdout)
    as_yaml = yaml.safe_load(cli.run("status", "-o", "yaml", *cli.config).stdout)
    assert as_json["members"][0]["version"] == as_yaml["members"][0]["version"] == "0.1.0"
    assert json.loads(cli.run("status", "--json", *cli.config).stdout)["self"] == "cli-node"


def test_api_address_forms(cli: Cli) -> None:
    token = ["--token", cli.node.token]
    for api in (
        f"127.0.0.1:{cli.node.port}",
        f"http://127.0.0.1:{cli.node.port}",
        f"http://127.0.0.1:{cli.node.port}/v1",
        f"http://127.0.0.1:{cli.node.port}/v1/",
    ):
        proc = cli.run("status", "--json", "--api", api, *token)
        assert proc.returncode == 0, (api, proc.stderr)
    bad = cli.run("status", "--api", "ftp://x", *token)
    assert bad.returncode == 2 and "http://HOST:PORT" in bad.stderr


def test_unreachable_daemon_says_what_to_check(cli: Cli) -> None:
    proc = cli.run("status", "--api", "127.0.0.1:1", "--token", "t")
    assert proc.returncode == 3
    assert "cannot reach the houndd API at http://127.0.0.1:1" in proc.stderr
    assert "systemctl status houndd" in proc.stderr and "--api" in proc.stderr
    assert "ssl:default" not in proc.stderr and "Connect call failed" not in proc.stderr


def test_a_closed_pipe_is_not_a_traceback(cli: Cli) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before houndd writes a byte (`| head` done early)
    proc = subprocess.run(
        [sys.executable, "-m", "houndd", "status", "-o", "json", *cli.config],
        stdout=write_end, stderr=subprocess.PIPE, text=True, env=houndd_env(), timeout=60,
        check=False,
    )  # fmt: skip
    os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0


# --- submitting ----------------------------------------------------------------------------------


def test_submit_prints_the_id_alone_and_the_name_defaults_to_the_file_stem(cli: Cli) -> None:
    plan = cli.plan_file(
        "warm-web.yaml", f"# no name: the file's stem\ntargets:\n  - images: [{cli.images[0]}]\n"
        "    all: true\n",
    )  # fmt: skip
    proc = cli.run("submit", str(plan), *cli.config)
    assert proc.returncode == 0, proc.stderr
    plan_id = proc.stdout.strip()
    assert proc.stdout == plan_id + "\n" and " " not in plan_id
    assert f"group {cli.images[0]} -> cli-node" in proc.stderr
    shown = json.loads(cli.run("plan", plan_id, "-o", "json", *cli.config).stdout)
    assert shown["name"] == "warm-web"


def test_submit_reports_what_it_cannot_serve_and_exits_1(cli: Cli) -> None:
    missing = f"{cli.registry.address}/cli/never-pushed:1"
    plan = cli.plan_file(
        "partial.yaml",
        f"name: partial\ntargets:\n  - images: [{cli.images[1]}, {missing}]\n    all: true\n"
        f"  - images: [{cli.images[1]}]\n    selector: {{gpu: 'true', zone: a}}\n"
        f"  - images: [{cli.images[1]}]\n    nodes: [ghost]\n",
    )
    proc = cli.run("submit", str(plan), *cli.config)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(proc.stdout.split()) == 1  # still the id alone: the plan was accepted
    assert f"image {missing} cannot be pulled: manifest unknown" in proc.stderr
    assert "node ghost is not a member" in proc.stderr
    assert "selector gpu=true,zone=a matches no member" in proc.stderr
    assert "{" not in proc.stderr  # no Python dict repr


def test_wait_prints_plain_progress_and_one_report(cli: Cli) -> None:
    plan = cli.plan_file(
        "waited.yaml",
        f"name: waited\ntargets:\n  - images: [{cli.images[2]}]\n    all: true\n"
        "policy: {pull_policy: Always}\n",
    )
    proc = cli.run("submit", str(plan), "--wait", *cli.config)
    assert proc.returncode == 0, proc.stderr
    plan_id, *report = proc.stdout.splitlines()
    assert report[0].startswith(f"plan {plan_id} waited: done")
    assert report[1].split()[:3] == ["NODE", "IMAGE", "STATE"]
    assert len(report) == 3  # header line, column header, the one item: the table once
    assert cli.images[2] in report[2]  # the long image name, whole
    assert f"done cli-node {cli.images[2]}" in proc.stderr
    for box in "│┃━─┏┗╭╰":
        assert box not in proc.stdout + proc.stderr


def test_plan_follow_reattaches_and_exits_by_the_outcome(cli: Cli) -> None:
    plan = cli.plan_file(
        "follow.json",
        json.dumps({"targets": [{"images": [cli.images[0]], "all": True}],
                    "policy": {"pull_policy": "Always"}}),
    )  # fmt: skip
    submitted = cli.run("submit", str(plan), *cli.config)
    plan_id = submitted.stdout.strip()
    assert _plan_state(cli, plan_id) in ("pending", "running")
    followed = cli.run("plan", plan_id, "--follow", *cli.config)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[0].startswith(f"plan {plan_id} follow: done")
    assert cli.run("plan", plan_id, "--follow", *cli.config).returncode == 0  # already final


def test_ctrl_c_while_waiting_leaves_the_plan_running_and_says_how_to_follow_it(cli: Cli) -> None:
    plan = cli.plan_file(
        "interrupted.yaml",
        f"name: interrupted\ntargets:\n  - images: [{cli.images[1]}]\n    all: true\n"
        "policy: {pull_policy: Always}\n",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "houndd", "submit", str(plan), "--wait", *cli.config],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=houndd_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    plan_id = proc.stdout.readline().strip()  # printed as soon as the plan is accepted
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopped following plan {plan_id}; it keeps running" in err
    assert f"houndd plan {plan_id} --follow" in err and f"houndd cancel {plan_id}" in err
    assert _plan_state(cli, plan_id) in ("pending", "running", "done")


def _pty_run(argv: list[str], rows: int, cols: int, timeout: float) -> tuple[int, str, str]:
    """Run with stderr on a terminal of rows x cols (stdout a pipe); (code, stdout, terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=slave, env=houndd_env(TERM="xterm"), text=True
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, screen.decode(errors="replace")


def _wait_on_a_terminal(cli: Cli, name: str, rows: int) -> tuple[str, str]:
    """`submit --wait` of all three images with stderr on a rows x 250 terminal."""
    plan = cli.plan_file(
        f"{name}.yaml",
        f"name: {name}\ntargets:\n  - images: [{', '.join(cli.images)}]\n    all: true\n"
        "policy: {pull_policy: Always}\n",
    )
    code, out, screen = _pty_run(
        [sys.executable, "-m", "houndd", "submit", str(plan), "--wait", *cli.config],
        rows=rows, cols=250, timeout=60,
    )  # fmt: skip
    assert code == 0, screen
    return out, screen


def test_live_progress_on_a_terminal_is_redrawn_in_place_then_cleared(cli: Cli) -> None:
    out, screen = _wait_on_a_terminal(cli, "live", rows=40)
    assert "\x1b[J" in screen  # the region is redrawn in place (and cleared at the end)
    assert "/s" in screen and "ETA" in screen and " / " in screen  # rate, ETA, done/total
    assert "plan live " in screen  # the overall line
    for image in cli.images:
        assert image in screen and image in out  # never truncated
    report = out.splitlines()
    assert len(report) == 1 + 2 + len(cli.images)  # id, the report's two headers, the items


def test_rows_per_image_when_items_do_not_fit_the_screen(cli: Cli) -> None:
    _, screen = _wait_on_a_terminal(cli, "small", rows=4)
    assert " nodes" in screen and "more images" in screen, screen


# --- offline ---------------------------------------------------------------------------------


def test_validate_is_offline_and_prints_groups(tmp_path: Path) -> None:
    good = tmp_path / "table-1.yaml"
    good.write_text(
        "targets:\n  - images: [reg:5000/a:1, reg:5000/b:1]\n    nodes: [n1, n2]\n"
        "  - images: [reg:5000/b:1]\n    selector: {gpu: 'true'}\n"
        "nodes:\n  n3: [reg:5000/a:1]\n"
    )
    env = houndd_env(HOUNDD_API="http://127.0.0.1:1")  # nothing listens: it must not ask
    proc = subprocess.run(
        [sys.executable, "-m", "houndd", "validate", str(good)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "valid pull plan 'table-1', 2 groups" in proc.stdout
    assert "group reg:5000/a:1 -> n1, n2, n3" in proc.stdout
    assert "group reg:5000/b:1 -> n1, n2, (nodes with gpu=true)" in proc.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntargets:\n  - images: [a\n  - b\n")
    proc = subprocess.run(
        [sys.executable, "-m", "houndd", "validate", str(bad)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not valid YAML" in proc.stderr and "(line 5, column 1)" in proc.stderr, proc.stderr


# --- bad arguments, every verb -------------------------------------------------------------------

BAD_ARGUMENTS: dict[str, list[list[str]]] = {
    "init": [["--bogus"], ["--join-key-file", "/nonexistent/cluster.key"]],
    "run": [
        ["--port", "not-a-port"],
        ["--label", "no-equals"],
        ["--config", "/nonexistent"],
        ["--preset", "fast"],
        ["--log-format", "xml"],
    ],
    "status": [["extra"], ["-o", "xml"], ["--api", "ftp://x"], ["--api", "http://h:99999"]],
    "submit": [[], ["/nonexistent/plan.yaml"], ["-", "--bogus"]],
    "validate": [[], ["/nonexistent/plan.yaml"]],
    "remove": [[], ["nginx:1"], ["nginx:1", "--nodes"]],
    "prune": [[], ["--bogus"]],
    "plans": [["extra"], ["-o", "csv"]],
    "plan": [[], ["has space"], ["a/b"]],
    "cancel": [[], ["a/b"]],
    "label": [[], ["node"], ["node", "no-equals"], ["node", "=v"]],
    "keys": [[], ["rotate"], ["install"], ["use"]],
    "completion": [[], ["fish"]],
}


def test_the_table_covers_every_verb() -> None:
    verbs = next(a.choices for a in build_parser()._actions if a.dest == "command")
    assert set(BAD_ARGUMENTS) == set(verbs)


@pytest.mark.parametrize(
    ("verb", "args"),
    [(verb, args) for verb, cases in BAD_ARGUMENTS.items() for args in cases],
    ids=[f"{verb} {' '.join(args)}" for verb, cases in BAD_ARGUMENTS.items() for args in cases],
)
def test_bad_arguments_exit_2_without_a_traceback(
    cli: Cli, tmp_path: Path, verb: str, args: list[str]
) -> None:
    # the node's config, so argument errors are not confused with a missing key or daemon
    config = [] if verb in ("validate", "completion") or "--config" in args else cli.config
    if verb in ("init",):
        config = ["--state-dir", str(tmp_path / "state")]
    proc = cli.run(verb, *args, *config)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.strip(), "an error says what is wrong"
    # argument errors are not labelled as configuration errors
    assert "houndd: config " not in proc.stderr or "--config" in args, proc.stderr


def test_an_environment_variable_error_names_the_variable(cli: Cli) -> None:
    proc = cli.run("status", *cli.config, env={"HOUNDD_PORT": "seventy"})
    assert proc.returncode == 2
    assert "HOUNDD_PORT" in proc.stderr and "'seventy'" in proc.stderr


def test_api_refusals_are_readable_and_carry_no_class_names(cli: Cli) -> None:
    proc = cli.run("plan", "p-does-not-exist", *cli.config)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "houndd: unknown plan: no plan 'p-does-not-exist' (field plan_id)"
    wrong = cli.run("status", "--token", "not-the-token", *cli.config)
    assert wrong.returncode == 2 and "unauthorized" in wrong.stderr
    assert "Error" not in proc.stderr + wrong.stderr
