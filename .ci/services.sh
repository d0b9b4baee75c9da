#!/usr/bin/env bash
# Services the real-Docker tests need. Tests start their own dockerd and docker-registry
# (tests/fixtures/services.py); this script only makes sure the binaries are installed.
#
#   bash .ci/services.sh install   # idempotent, quiet; apt-get only when something is missing
#   bash .ci/services.sh check     # exit 1 and name what is missing
set -euo pipefail

# binary -> Debian package that provides it
declare -A PROVIDES=(
  [dockerd]=docker.io
  [docker]=docker.io
  [containerd]=containerd
  [docker-registry]=docker-registry
  [htpasswd]=apache2-utils
  [ip]=iproute2
  [iptables]=iptables
  [nsenter]=util-linux
)

missing_packages() {
  local bin pkgs=()
  for bin in "${!PROVIDES[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$bin" && ! -x "/usr/bin/$bin" ]]; then
      pkgs+=("${PROVIDES[$bin]}")
    fi
  done
  if ((${#pkgs[@]})); then
    printf '%s\n' "${pkgs[@]}" | sort -u
  fi
}

cmd="${1:-install}"
case "$cmd" in
  install)
    mapfile -t pkgs < <(missing_packages)
    if ((${#pkgs[@]} == 0)); then
      exit 0
    fi
    if [[ $EUID -ne 0 ]]; then
      echo "services.sh: need root to install: ${pkgs[*]}" >&2
      exit 1
    fi
    echo "services.sh: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # docker.io always comes along: it pulls in containerd and runc at matching versions.
    apt-get install -y -qq --no-install-recommends docker.io docker-registry apache2-utils \
      iproute2 iptables util-linux >/dev/null
    mapfile -t still < <(missing_packages)
    if ((${#still[@]})); then
      echo "services.sh: still missing after install: ${still[*]}" >&2
      exit 1
    fi
    ;;
  check)
    mapfile -t pkgs < <(missing_packages)
    if ((${#pkgs[@]})); then
      echo "missing packages: ${pkgs[*]} (run: bash .ci/services.sh install)" >&2
      exit 1
    fi
    echo "all test services installed"
    ;;
  *)
    echo "usage: $0 install|check" >&2
    exit 2
    ;;
esac
