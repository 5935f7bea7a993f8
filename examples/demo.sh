#!/usr/bin/env bash
# The local mesh demo: a control plane, a frontend and two versions of a backend,
# each behind its own remora-proxy, all on 127.0.0.1. It applies
# examples/policies/shop.yaml, sends traffic through the frontend's sidecar and
# reports the canary split. `--hold` keeps the mesh up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# The etcd client the control plane links compiles etcd's protos with protoc.
if ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null; }
  else
    sudo apt-get install -y protobuf-compiler
  fi
fi
cargo build --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/mesh-demo" "$@"
