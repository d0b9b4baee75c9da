#!/usr/bin/env bash
# The README's first command: houndd warming up the paper's Table 1 on 4 Docker hosts.
#
#   sudo bash scripts/demo.sh [extra demo/cluster_demo.py args, e.g. --host-mbit 40]
#
# From a fresh machine (Debian/Ubuntu, root): installs the system packages the demo needs
# (dockerd, docker-registry, iproute2, iptables), creates .venv and installs houndd into it,
# then runs demo/cluster_demo.py. The demo builds 4 hosts (network namespaces, each with its own
# dockerd) and a registry on a private bridge, pushes Table 1's images, starts houndd on every
# host, submits the plan to a node that is not the coordinator, shows progress, the report and
# `houndd status`, checks every host's dockerd, and tears everything down. Nothing leaves the
# machine: the hosts have no default route. Exit code 0 means every image landed everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n### %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
    echo "demo.sh: run as root (it creates network namespaces and starts dockerd)" >&2
    exit 1
fi

step "1/3 system packages: docker.io, docker-registry, iproute2, iptables (apt-get, only if missing)"
bash .ci/services.sh install
bash .ci/services.sh check

step "2/3 Python: .venv with houndd installed (pip install -e '.[test,bench]')"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
.venv/bin/python -m houndd --help >/dev/null
echo "houndd installed: $(.venv/bin/python -c 'import houndd; print(houndd.__version__)')"

step "3/3 the demo: 4 hosts + registry, Table 1 plan, live progress, report, status, teardown"
exec .venv/bin/python demo/cluster_demo.py --hosts 4 "$@"
