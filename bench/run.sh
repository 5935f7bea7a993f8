#!/usr/bin/env bash
# Remora's benchmark (issue 7), one command:
#   bench/run.sh           full mode: 3 runs per figure (5 for the one-core maximum), ~30 minutes
#   bench/run.sh --quick   1 short run per figure, ~5 minutes
#   bench/run.sh --sims 100,1000,10000   adds the propagation rows at 10,000
#                          simulated proxies (~3 more minutes; the bench holds
#                          ~5 GB then). Only that figure:
#                          ulimit -n 65536; target/release/remora-bench propagation --sims 10000
#                          Spread over three replicas sharing an etcd (Debian's etcd-server):
#                          target/release/remora-bench propagation --sims 1000,10000 --replicas 3
# Any other flag goes to `remora-bench run` (see `remora-bench run --help`).
# Builds the workspace in release mode, installs nginx, HAProxy and wrk (the
# one-core generator) from Debian packages if they are missing (as root), then
# prints a Markdown table and
# writes it with the same figures as JSON to bench/results/latest.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo build --release --workspace --bins" >&2
cargo build --release --workspace --bins

missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2 \
            || echo "note: installing ${missing[*]} failed; those rows are skipped" >&2
    else
        echo "note: ${missing[*]} missing and not root: those rows are skipped" >&2
    fi
fi

# N simulated proxies hold N connections on each side: the control plane the
# bench starts inherits this limit (the propagation figure prints it).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

bench=target/release/remora-bench
cmd=(run --command "bench/run.sh $*" "$@")
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
    # The generator (and the upstream it starts) on core 0; it pins what it
    # measures to core 1.
    exec taskset -c 0 "$bench" "${cmd[@]}"
fi
exec "$bench" "${cmd[@]}"
