"""`scripts/install.sh` and the README's operator path, from a fresh copy of the tree.

The script runs with `--root` into a temporary directory (nothing outside it is touched), then
the installed `houndd` follows the README's steps on three "hosts": `houndd init` on the first,
the key copied and `houndd init --join-key-file` on the others, each daemon started with the
unit's own ExecStart line and the example config, and `houndd status` lists all three.

Two concessions to a test machine: pip installs houndd without its dependencies (the test
venv's are put on the installed venv's path afterwards, so no download is needed), and each
"host" is a state directory and port on loopback, set through HOUNDD_* variables as a systemd
drop-in would, since the example config names /var/lib/houndd and port 7480.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from houndd.config import load
from tests.procs import free_port, http

pytestmark = pytest.mark.processes

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/opt/houndd"
SYSTEM_PATHS = ("/opt/houndd", "/etc/houndd", "/usr/local/bin/houndd",
                "/etc/systemd/system/houndd.service")  # fmt: skip
TODAY_EXPOSURE = 3.6  # `systemd-analyze security` of the unit before this work


@dataclass
class Installed:
    root: Path
    source: Path
    output: str

    @property
    def houndd(self) -> Path:
        return self.root / PREFIX.lstrip("/") / "bin" / "houndd"

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system/houndd.service"

    @property
    def config(self) -> Path:
        return self.root / "etc/houndd/houndd.toml"


def fresh_copy(dest: Path) -> Path:
    """The tree as a fresh clone would hold it (tracked and new files, nothing ignored)."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / name
        if src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to(os.readlink(src))
        elif src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run_install(source: Path, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
    env["HOUNDD_PIP_ARGS"] = "--no-deps"
    return subprocess.run(
        ["bash", str(source / "scripts/install.sh"), "--root", str(root)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if shutil.which("git") is None:
        pytest.fail("the install test copies the tree with git", pytrace=False)
    before = {p: os.path.lexists(p) for p in SYSTEM_PATHS}
    base = tmp_path_factory.mktemp("install")
    source = fresh_copy(base / "src")
    root = base / "root"
    proc = run_install(source, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the dependencies, from the test venv (pip installed houndd alone)
    (site_dir,) = (root / PREFIX.lstrip("/")).glob("lib/python3.*/site-packages")
    (site_dir / "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    yield Installed(root, source, proc.stdout)
    assert {p: os.path.lexists(p) for p in SYSTEM_PATHS} == before  # nothing outside --root
    shutil.rmtree(base)


def test_layout(installed: Installed) -> None:
    assert installed.houndd.exists()
    link = installed.root / "usr/local/bin/houndd"
    assert os.readlink(link) == f"{PREFIX}/bin/houndd"
    version = subprocess.run([str(installed.houndd), "--version"], capture_output=True,
                             text=True, check=True)  # fmt: skip
    assert version.stdout.strip() == "houndd 0.1.0"
    assert installed.config.stat().st_mode & 0o777 == 0o644
    assert "installed houndd 0.1.0" in installed.output
    assert "houndd init --join-key-file" in installed.output
    # the wheel ships the unit and the example config as package data
    shipped = subprocess.run(
        [str(installed.houndd.with_name("python")), "-c",
         "import importlib.resources as r; p = r.files('houndd') / 'packaging'; "
         "print((p / 'houndd.service').read_text())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shipped.stdout.strip() == installed.unit.read_text().strip()


def _unit_entries(text: str) -> dict[str, list[str]]:
    """key -> values (a key may repeat, like SystemCallFilter) of a unit file."""
    entries: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def test_the_unit_starts_the_installed_daemon_and_is_hardened(installed: Installed) -> None:
    unit = _unit_entries(installed.unit.read_text())
    assert unit["ExecStart"] == [f"{PREFIX}/bin/houndd run --config /etc/houndd/houndd.toml"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error does not restart-loop
    assert unit["Type"] == ["notify"] and unit["StateDirectory"] == ["houndd"]
    assert unit["DynamicUser"] == ["yes"] and unit["SupplementaryGroups"] == ["docker"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert "AF_UNIX" in unit["RestrictAddressFamilies"][0]  # the Docker socket


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_unit_and_rates_it_better(installed: Installed) -> None:
    units = installed.root / "usr/lib/systemd/system"
    if not units.exists():  # the targets the unit is ordered against
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed.root}",
         "/etc/systemd/system/houndd.service"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(installed.unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for houndd.service: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) < TODAY_EXPOSURE - 1.0, match.group(0)


def test_the_example_config_is_accepted_and_never_replaced(installed: Installed) -> None:
    config = load(installed.config, env={})
    assert config.state_dir == "/var/lib/houndd"
    edited = installed.config.read_text() + 'node_name = "edited-by-the-operator"\n'
    installed.config.write_text(edited)
    again = run_install(installed.source, installed.root)  # an upgrade in place
    assert again.returncode == 0, again.stderr
    assert "keeping /etc/houndd/houndd.toml" in again.stdout
    assert installed.config.read_text() == edited


@dataclass
class Host:
    name: str
    state: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None


def test_the_readme_operator_path_makes_a_three_host_cluster(
    installed: Installed, tmp_path: Path
) -> None:
    readme = (installed.source / "README.md").read_text()
    for step in (
        "sudo bash scripts/install.sh",
        "sudo houndd init",
        "houndd init --join-key-file",
        "systemctl enable --now houndd",
        "houndd status",
    ):
        assert step in readme, f"the README no longer says {step!r}"  # fmt: skip
    exec_start = _unit_entries(installed.unit.read_text())["ExecStart"][0].split()
    assert exec_start[0] == f"{PREFIX}/bin/houndd"
    argv = [str(installed.houndd), *exec_start[1:]]
    argv[argv.index("/etc/houndd/houndd.toml")] = str(installed.config)

    hosts = [Host(f"host-{i}", tmp_path / f"host-{i}", free_port()) for i in (1, 2, 3)]

    def env(h: Host) -> dict[str, str]:  # what a systemd drop-in would set on that host
        out = {k: v for k, v in os.environ.items() if not k.startswith("HOUNDD_")}
        out.update(
            HOUNDD_STATE_DIR=str(h.state), HOUNDD_NODE_NAME=h.name, HOUNDD_BIND="127.0.0.1",
            HOUNDD_PORT=str(h.port), HOUNDD_MDNS="false", HOUNDD_PRESET="local",
            HOUNDD_DOCKER_HOST="fake://", HOUNDD_SEEDS=f"127.0.0.1:{hosts[0].port}",
        )  # fmt: skip
        return out

    def houndd(h: Host, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(installed.houndd), *args, "--config", str(installed.config)],
            capture_output=True, text=True, env=env(h), timeout=60, check=False,
        )  # fmt: skip

    try:
        first = houndd(hosts[0], "init")
        assert first.returncode == 0, first.stderr
        key = tmp_path / "cluster.key"  # "copy /var/lib/houndd/cluster.key to the other hosts"
        shutil.copyfile(hosts[0].state / "cluster.key", key)
        key.chmod(0o600)
        for h in hosts[1:]:
            joined = houndd(h, "init", "--join-key-file", str(key))
            assert joined.returncode == 0 and "joined" in joined.stdout, joined.stderr
        for h in hosts:  # "systemctl enable --now houndd"
            h.proc = subprocess.Popen(argv, env=env(h), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        members: list[str] = []
        while time.monotonic() < deadline:
            status = houndd(hosts[1], "status", "--json")
            if status.returncode == 0:
                data = json.loads(status.stdout)
                members = sorted(m["name"] for m in data["members"] if m["state"] == "alive")
                if members == [h.name for h in hosts] and data["coordinator"]["name"]:
                    break
            time.sleep(0.2)
        assert members == ["host-1", "host-2", "host-3"], members
        table = houndd(hosts[2], "status")
        assert table.returncode == 0 and "coordinator" in table.stdout, table.stderr
        code, health = http("GET", f"http://127.0.0.1:{hosts[2].port}/v1/health")
        assert code == 200 and health["version"] == "0.1.0"
    finally:
        for h in hosts:
            if h.proc is not None and h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
        for h in hosts:
            if h.proc is not None:
                assert h.proc.wait(20) == 0  # a clean stop (what systemctl stop sends)


def test_install_needs_root_or_a_root_directory() -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: the refusal is for other users")
    proc = subprocess.run(["bash", str(REPO / "scripts/install.sh")], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 2 and "run as root" in proc.stderr


def test_unknown_arguments_are_refused() -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--bogus"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
    assert sys.executable  # the suite's interpreter made the venv's dependencies importable
