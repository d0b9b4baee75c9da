#!/usr/bin/env bash
# Install houndd on this host from this checkout, as root:
#
#   sudo bash scripts/install.sh            # then: houndd init; systemctl enable --now houndd
#
# What it puts where:
#   /opt/houndd/                      a Python venv holding houndd and its dependencies
#   /usr/local/bin/houndd             -> /opt/houndd/bin/houndd
#   /etc/systemd/system/houndd.service  the unit shipped in the package (replaced on upgrade)
#   /etc/houndd/houndd.toml           an example config `houndd run` accepts (never replaced)
# Running it again upgrades houndd in place and keeps the config.
#
# Options (for tests and image builds):
#   --root DIR     install into DIR as if it were /: files land under DIR, the unit and the
#                  link name the final paths; nothing outside DIR is touched (no apt-get,
#                  no systemctl)
#   --python PY    the interpreter that makes the venv (default python3; 3.11 or newer)
# Environment: HOUNDD_PIP_ARGS adds arguments to `pip install` (e.g. an offline wheelhouse:
# "--no-index --find-links /srv/wheels").
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
PYTHON="python3"
PREFIX="/opt/houndd"

while (($#)); do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -n "$ROOT" ]]; then
    ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
elif [[ $EUID -ne 0 ]]; then
    echo "install.sh: run as root (it writes /opt, /etc and /usr/local/bin), or use --root DIR" >&2
    exit 2
fi

step() { printf '==> %s\n' "$*"; }

# --- Python ----------------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: houndd needs Python 3.11 or newer as $PYTHON (Debian 12 and Ubuntu 24.04" \
         "have it); pass another with --python" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [[ -z "$ROOT" ]] && command -v apt-get >/dev/null; then
        step "installing python3-venv (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "install.sh: $PYTHON cannot make a venv; install python3-venv" >&2
        exit 2
    fi
fi

# --- the venv ------------------------------------------------------------------------------------
step "venv with houndd in $PREFIX"
if [[ ! -x "$ROOT$PREFIX/bin/python" ]]; then
    "$PYTHON" -m venv "$ROOT$PREFIX"
fi
# Build from a copy: building in the checkout would leave build/ and egg-info there.
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md houndd | tar -C "$SRC" -xf -
# shellcheck disable=SC2086  # HOUNDD_PIP_ARGS is a list of words on purpose
"$ROOT$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check \
    ${HOUNDD_PIP_ARGS:-} "$SRC"
VERSION="$("$ROOT$PREFIX/bin/houndd" --version)"

step "command: /usr/local/bin/houndd -> $PREFIX/bin/houndd"
mkdir -p "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/bin/houndd" "$ROOT/usr/local/bin/houndd"

# --- systemd unit and config -----------------------------------------------------------------------
PACKAGING="$("$ROOT$PREFIX/bin/python" -c \
    'import importlib.resources as r; print(r.files("houndd") / "packaging")')"
step "unit: /etc/systemd/system/houndd.service"
install -D -m 644 "$PACKAGING/houndd.service" "$ROOT/etc/systemd/system/houndd.service"
sed -i "s|^ExecStart=/opt/houndd/|ExecStart=$PREFIX/|" "$ROOT/etc/systemd/system/houndd.service"

install -d -m 755 "$ROOT/etc/houndd"
if [[ -e "$ROOT/etc/houndd/houndd.toml" ]]; then
    step "config: keeping /etc/houndd/houndd.toml"
else
    step "config: /etc/houndd/houndd.toml (an example; edit it)"
    install -m 644 "$PACKAGING/houndd.toml" "$ROOT/etc/houndd/houndd.toml"
fi
# The example must be one the daemon accepts: check it the way `houndd run` reads it.
"$ROOT$PREFIX/bin/python" -c 'import sys; from houndd.config import load; load(sys.argv[1])' \
    "$ROOT/etc/houndd/houndd.toml"

if [[ -z "$ROOT" ]] && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
if [[ -z "$ROOT" ]] && ! getent group docker >/dev/null; then
    echo "install.sh: warning: no docker group yet; install Docker before starting houndd" >&2
fi

cat <<EOF
installed $VERSION
next, on the first host:   sudo houndd init && sudo systemctl enable --now houndd
on every other host:       copy /var/lib/houndd/cluster.key from the first host, then
                           sudo houndd init --join-key-file cluster.key && sudo systemctl enable --now houndd
check:                     houndd status
EOF
