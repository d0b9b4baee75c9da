"""`houndd run` as a real subprocess: serves /v1/health, stops cleanly on SIGTERM, refuses
loose key files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import LocalCluster, http

pytestmark = pytest.mark.processes


def test_run_answers_health_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    node = cluster.add("solo")
    cluster.start("solo")
    try:
        cluster.wait_ready("solo")
        status, body = http("GET", node.api + "/v1/health")
        assert status == 200
        assert body["status"] == "ok" and body["node"] == "solo"
        assert body["docker"] == "unavailable"  # the configured socket does not exist

        status, info = node.get("/v1/node")
        assert status == 200
        assert info["name"] == "solo" and info["docker"]["state"] == "unavailable"
        assert "Cannot connect" in info["docker"]["error"] or info["docker"]["error"]

        status, problem = http("GET", node.api + "/v1/node")  # no token
        assert status == 401 and problem["title"] == "unauthorized"

        assert node.proc is not None
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout=5)
        assert code == 0, node.log()
        assert time.monotonic() - started < 5
        assert "stopped node=solo" in node.log()
    finally:
        cluster.close()


def test_run_refuses_key_file_readable_by_others(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    node = cluster.add("loose")
    key = node.state_dir / "cluster.key"
    os.chmod(key, 0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "houndd", "run", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert str(key) in proc.stderr
    assert "chmod 600" in proc.stderr


def test_init_writes_private_keys_and_join_copies_the_cluster_key(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    out = subprocess.run(
        [sys.executable, "-m", "houndd", "init", "--state-dir", str(first)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "--join-key-file" in out
    for name in ("identity.key", "cluster.key"):
        assert (first / name).stat().st_mode & 0o777 == 0o600
    subprocess.run(
        [
            sys.executable,
            "-m",
            "houndd",
            "init",
            "--state-dir",
            str(second),
            "--join-key-file",
            str(first / "cluster.key"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert (second / "cluster.key").read_bytes() == (first / "cluster.key").read_bytes()
    assert (second / "identity.key").read_bytes() != (first / "identity.key").read_bytes()
    assert (second / "cluster.key").stat().st_mode & 0o777 == 0o600


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "houndd.toml"
    config.write_text('port = "seventy"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "houndd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "port" in proc.stderr and "integer" in proc.stderr


def test_status_and_label_cli_and_unreachable_exit_code(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    node = cluster.add("cli-node")
    cluster.start("cli-node")
    base = [sys.executable, "-m", "houndd"]
    where = ["--api", node.api, "--token", node.token]
    try:
        cluster.wait_ready("cli-node")
        cluster.wait_for(
            lambda: cluster.coordinator("cli-node")[0] == "cli-node", 10, "coordinator"
        )

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*base, *args, *where], capture_output=True, text=True, timeout=30, check=False
            )

        status = run("status", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["coordinator"]["name"] == "cli-node" and data["term"] >= 1
        assert [m["name"] for m in data["members"]] == ["cli-node"]

        labelled = run("label", "cli-node", "gpu=true", "zone=a")
        assert labelled.returncode == 0, labelled.stderr
        assert "gpu=true" in labelled.stdout
        table = run("status")
        assert table.returncode == 0 and "cli-node" in table.stdout and "gpu=true" in table.stdout
        assert run("label", "cli-node", "gpu-").returncode == 0
        data = json.loads(run("status", "--json").stdout)
        assert data["members"][0]["labels"] == {"zone": "a"}

        bad = run("label", "cli-node", "no-equals-sign")
        assert bad.returncode == 2 and "key=value" in bad.stderr
    finally:
        cluster.close()
    gone = subprocess.run(
        [*base, "status", *where], capture_output=True, text=True, timeout=30, check=False
    )
    assert gone.returncode == 3
    assert "cannot reach" in gone.stderr
