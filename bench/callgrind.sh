#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: repeatable for the
# same binary and inputs, whatever else the machine is doing, so it shows what
# a change to the request path costs where the timed benchmark is too noisy.
#
#   bench/callgrind.sh            one Remora hop (plaintext inbound, HTTP/1.1
#                                 and gRPC), the client sidecar of the mesh path
#                                 (HTTP/1.1 in, HTTP/2 over mTLS out), and nginx
#                                 as a reverse proxy (HTTP/1.1 and gRPC), 2,000
#                                 requests each
#   bench/callgrind.sh N          N requests each
#
# Each profiled process gets a warm-up of 400 requests, then its counters are
# zeroed and N requests are counted. The profiles stay in $RESULTS (default
# bench/results/callgrind) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
RESULTS=${RESULTS:-bench/results/callgrind}
RATE=200

for need in valgrind:valgrind nginx:nginx; do
    cmd=${need%%:*}
    if ! command -v "$cmd" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need##*:}" >&2
        else
            echo "$cmd is missing (apt-get install ${need##*:})" >&2
            exit 1
        fi
    fi
done
cargo build --release --workspace --bins >&2
B=$PWD/target/release
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/remora-callgrind-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -f "valgrind.*$WORK" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
    for _ in $(seq 600); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "$1 never answered" >&2
    return 1
}
PIN0=(); PIN1=()
if [ "$(nproc --all)" -ge 2 ] && command -v taskset >/dev/null; then PIN0=(taskset -c 0); PIN1=(taskset -c 1); fi

UP=$(port); GRPC=$(port); HTTP=$(port)
"${PIN0[@]}" "$B/remora-bench" upstream --listen "127.0.0.1:$UP" >"$WORK/upstream.log" 2>&1 & pids+=($!)
"${PIN1[@]}" "$B/remora-control" serve --listen "127.0.0.1:$GRPC" --http-listen "127.0.0.1:$HTTP" \
    --data-dir "$WORK/cp" >"$WORK/cp.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$HTTP/ready"
CLI=("$B/remora-control" --server "http://127.0.0.1:$GRPC" --data-dir "$WORK/cp")
"$B/remora-bench" policy >"$WORK/policy.yaml"
"${CLI[@]}" apply -f "$WORK/policy.yaml" >/dev/null

# proxy NAME SERVICE VALGRIND(yes|no) ENDPOINT(yes|no): starts a sidecar (an
# endpoint of its service, or not); sets IN, OUT, HEALTH (its ports) and PID
proxy() {
    local name=$1 service=$2 vg=$3 endpoint=$4 admin
    IN=$(port); OUT=$(port); admin=$(port); HEALTH=$(port)
    "${CLI[@]}" token create --service "$service" --namespace bench >"$WORK/$name.token"
    local run=("${PIN1[@]}")
    [ "$vg" = yes ] && run+=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$name.cg")
    local advertise=()
    [ "$endpoint" = yes ] && advertise=(--advertise "127.0.0.1:$IN")
    "${run[@]}" "$B/remora-proxy" run --control-plane "http://127.0.0.1:$GRPC" --service "$service" \
        --namespace bench --app-port "$UP" --inbound-port "$IN" "${advertise[@]}" \
        --outbound-port "$OUT" --admin-port "$admin" --health-port "$HEALTH" \
        --token-file "$WORK/$name.token" --ca-file "$WORK/cp/trust-bundle.pem" \
        --access-log false --trace-sampling 0 >"$WORK/$name.log" 2>&1 &
    PID=$!
    pids+=("$PID")
}

# count NAME SLUG PID CGFILE ADDR [load flags]: warm up, zero, count N requests,
# dump; prints a table row with the instructions per request
count() {
    local name=$1 slug=$2 pid=$3 file=$4 addr=$5; shift 5
    "${PIN0[@]}" "$B/remora-bench" load --addr "$addr" --rate $RATE --secs 2 --connections 8 "$@" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    "${PIN0[@]}" "$B/remora-bench" load --addr "$addr" --rate $RATE --secs "$(( N / RATE ))" \
        --connections 8 "$@" >"$WORK/$slug.load"
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    local dump total ok
    dump=$(ls -t "$file".* | head -1)
    cp "$dump" "$RESULTS/$slug.callgrind"
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
    ok=$(grep -o '[0-9]* ok' "$WORK/$slug.load" | cut -d' ' -f1)
    printf '| %s | %s | %s |\n' "$name" "$ok" "$(( total / ok ))"
}

proxy backend-cg backend yes no
b_in=$IN; b_pid=$PID
wait_http "http://127.0.0.1:$HEALTH/ready"
callgrind_control -i on "$b_pid" >/dev/null 2>&1

proxy backend backend no yes
wait_http "http://127.0.0.1:$HEALTH/ready"
proxy frontend-cg frontend yes no
f_out=$OUT; f_pid=$PID
wait_http "http://127.0.0.1:$HEALTH/ready"
callgrind_control -i on "$f_pid" >/dev/null 2>&1

NG=$(port); NG2=$(port)
mkdir -p "$WORK/nginx/logs"
cat >"$WORK/nginx/nginx.conf" <<EOF
master_process off;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NG; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:$NG2 http2; location / { grpc_pass grpc://up; } }
}
EOF
"${PIN1[@]}" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/nginx.cg" \
    nginx -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
n_pid=$!; pids+=("$n_pid")
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$NG/" && break; sleep 0.2; done
callgrind_control -i on "$n_pid" >/dev/null 2>&1

echo "| process (what it proxies) | requests | instructions per request |"
echo "|---|---:|---:|"
count "remora 1 hop (inbound, HTTP/1.1)" remora-1-hop "$b_pid" "$WORK/backend-cg.cg" "127.0.0.1:$b_in"
count "remora 1 hop (inbound, gRPC over h2c)" remora-1-hop-grpc "$b_pid" "$WORK/backend-cg.cg" "127.0.0.1:$b_in" --grpc
# The mesh path's client sidecar; the server sidecar runs normally behind it.
mesh_ready() { curl -sf -o /dev/null -x "http://127.0.0.1:$f_out" http://backend.bench:8080/; }
for _ in $(seq 100); do mesh_ready && break; sleep 0.2; done
count "remora mesh client sidecar (HTTP/1.1 in, h2+mTLS out)" remora-mesh-client "$f_pid" "$WORK/frontend-cg.cg" \
    "127.0.0.1:$f_out" --explicit-proxy
count "nginx (1 process, keep-alive upstream)" nginx "$n_pid" "$WORK/nginx.cg" "127.0.0.1:$NG"
count "nginx (gRPC, grpc_pass over h2c)" nginx-grpc "$n_pid" "$WORK/nginx.cg" "127.0.0.1:$NG2" --grpc
echo
echo "profiles in $RESULTS (callgrind_annotate FILE)"
