#!/usr/bin/env bash
# The whole test suite, from a fresh machine: system packages, Python deps, lint, types, tests.
# Run as root (the tests start their own dockerd, docker-registry and network namespaces).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/services.sh install

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
# exit code 5 (no tests collected) is a failure like any other non-zero code
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
