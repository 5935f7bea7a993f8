#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, mesh-level integration
# tests (real control plane, proxies and apps), and, as root, the tests that need
# network namespaces and iptables. Installs what it needs from Debian packages
# when it runs as root, and then no test may skip; otherwise those tests skip
# and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

need_pkgs=()
for pair in iptables:iptables ip:iproute2 tcpdump:tcpdump redis-server:redis-server \
            redis-cli:redis-tools promtool:prometheus setpriv:util-linux curl:curl; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || \
      echo "warning: could not install ${need_pkgs[*]}; the tests that need them will fail"
  else
    echo "note: not root, so not installing ${need_pkgs[*]}; the tests that need them will skip"
  fi
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo build (binaries the mesh tests start)"
cargo build --workspace --bins

log "cargo test"
# As root (CI) every test must run, the namespace and iptables ones included:
# none may pass by skipping (see remora_tests::skip_or_fail).
if [ "$(id -u)" = 0 ]; then
  export REMORA_STRICT_TESTS=1
fi
# Mesh tests start many processes; two test threads keep a 2-core machine honest.
cargo test --workspace -- --test-threads="${REMORA_TEST_THREADS:-4}"

if [ -x docker/check.sh ]; then
  log "docker/check.sh"
  docker/check.sh
fi
