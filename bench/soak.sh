#!/usr/bin/env bash
# Remora's soak run (issue 13; not in CI), one command:
#   bench/soak.sh                          30 minutes, growth measured after a 5-minute warm-up
#   bench/soak.sh --minutes 3 --warmup 1   a short check of the harness itself
# Any other flag goes to `remora-bench soak` (see `remora-bench soak --help`:
# --limit PCT, --interval SECS, --rate RPS).
# Builds the proxy, the control plane and the bench in release mode, starts a
# control plane, two sidecars and an upstream of its own, and sends mixed
# traffic through them (steady keep-alive requests, uploads, slow readers,
# slow uploaders, clients that abort mid-request and mid-response, one
# request per connection, one-hop requests), printing each proxy's RSS and
# open fds every minute. Exits non-zero when either proxy's RSS or fd count
# grew more than 5 % from the end of the warm-up to the end, when a proxy
# exited, or when the mesh no longer answers.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo build --release -p remora-proxy -p remora-control -p remora-bench" >&2
cargo build --release -p remora-proxy -p remora-control -p remora-bench --bins

# Slow readers and uploaders hold connections on every side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

bench=target/release/remora-bench
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
    # The clients and the upstream on core 0; the proxies and the control
    # plane are pinned to core 1 by the bench.
    exec taskset -c 0 "$bench" soak "$@"
fi
exec "$bench" soak "$@"
