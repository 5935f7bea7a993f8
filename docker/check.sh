#!/bin/sh
# Checks docker/ as far as a machine without a Docker engine can:
#  - docker-compose (Debian's, installed here if missing and possible) parses
#    compose.yaml and resolves every service;
#  - every file the compose file and the Dockerfiles refer to exists;
#  - prometheus.yml is YAML; init.sh is valid shell;
#  - the binaries the Dockerfiles build exist in the workspace (cargo metadata).
# The init entrypoint itself is run in a network namespace by
# `cargo test -p remora-tests --test pods` (as root).
set -eu
cd "$(dirname "$0")/.."

fail() { echo "docker/check.sh: $*" >&2; exit 1; }

sh -n docker/init.sh || fail "docker/init.sh is not valid shell"

for f in docker/proxy.Dockerfile docker/control-plane.Dockerfile docker/sample-app.Dockerfile \
         docker/init.sh docker/prometheus.yml examples/policies/shop.yaml; do
    [ -f "$f" ] || fail "$f is missing"
done

# The Dockerfiles' `cargo build -p PKG [--bin BIN]` targets must be real binaries.
if command -v cargo >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
    cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
bins = {(p["name"], t["name"]) for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}
want = {("remora-proxy", "remora-proxy"), ("remora-control", "remora-control"), ("remora-examples", "sample-app")}
missing = want - bins
if missing:
    sys.exit("docker/check.sh: the Dockerfiles build binaries the workspace lacks: %s" % sorted(missing))
' || exit 1
    echo "docker/check.sh: the Dockerfiles' binaries exist in the workspace"
fi

if ! command -v docker-compose >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "docker/check.sh: installing docker-compose (Debian)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } \
            >/dev/null 2>&1 || true
    fi
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "docker/check.sh: SKIPPED the compose check: docker-compose is not installed and could not be"
    exit 0
fi

out=$(docker-compose -f docker/compose.yaml config 2>&1) || fail "docker-compose config refused docker/compose.yaml:
$out"
services=$(docker-compose -f docker/compose.yaml config --services 2>/dev/null | sort | tr '\n' ' ')
for s in control-plane bootstrap frontend frontend-init frontend-proxy backend backend-init backend-proxy \
         jaeger prometheus; do
    case " $services" in
        *" $s "*) ;;
        *) fail "compose.yaml has no service $s (it has: $services)" ;;
    esac
done
if command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' 2>/dev/null; then
    python3 -c 'import yaml; yaml.safe_load(open("docker/prometheus.yml"))' \
        || fail "docker/prometheus.yml is not YAML"
fi
echo "docker/check.sh: compose.yaml parses ($services)"
