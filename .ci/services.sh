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

# promtool (`promtool check metrics` in tests/api/test_metrics.py) comes from Debian's
# prometheus package; only the binary is taken from it, so no Prometheus server gets installed
# or started on the test machine.
install_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    return 0
  fi
  local tmp
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) \
      && dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool; then
    install -m 755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
  else
    echo "services.sh: could not fetch promtool; the promtool test will be skipped" >&2
  fi
  rm -rf "$tmp"
}

cmd="${1:-install}"
case "$cmd" in
  install)
    mapfile -t pkgs < <(missing_packages)
    if ((${#pkgs[@]} == 0)); then
      if [[ $EUID -eq 0 ]] && ! command -v promtool >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        install_promtool
      fi
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
    install_promtool
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
