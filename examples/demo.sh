#!/usr/bin/env bash
# The local mesh demo: a control plane, a frontend and two versions of a backend,
# each behind its own remora-proxy, all on 127.0.0.1. It applies
# examples/policies/shop.yaml, sends traffic through the frontend's sidecar and
# reports the canary split. `--hold` keeps the mesh up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/mesh-demo" "$@"
