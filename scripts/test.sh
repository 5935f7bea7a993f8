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
            redis-cli:redis-tools redis-benchmark:redis-tools promtool:prometheus \
            setpriv:util-linux curl:curl h2load:nghttp2-client nghttpd:nghttp2-server \
            pgbench:postgresql psql:postgresql-client python3:python3 \
            protoc:protobuf-compiler etcd:etcd-server etcdctl:etcd-client; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
# The real-client tests (tests/tests/real_clients.rs) run PostgreSQL's server,
# whose Debian binaries (initdb, postgres) live off PATH.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_pkgs+=(postgresql)
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

# ...and Python's grpcio and websockets (the asyncio API, 13 or later), from PyPI.
py_mods='import grpc, websockets.asyncio.client'
if ! python3 -c "$py_mods" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    log "installing grpcio websockets (PyPI)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
      apt-get install -y -qq --no-install-recommends python3-pip >/dev/null || true
    fi
    # A Debian python3 is "externally managed": allow the install there.
    python3 -m pip install --quiet grpcio 'websockets>=13' ||
      python3 -m pip install --quiet --break-system-packages grpcio 'websockets>=13' ||
      echo "warning: could not install grpcio and websockets; the tests that need them will fail"
  else
    echo "note: not root, so not installing grpcio and websockets; the tests that need them will skip"
  fi
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "structure: imports run one way, files under 600 lines (issue 16)"
# Prints each crate's module layers; fails on an import circle or a long file.
cargo test -p remora-tests --test structure -- --nocapture

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
