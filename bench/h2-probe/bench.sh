#!/usr/bin/env bash
# hyper against the h2 crate directly, the same gRPC forwarding (src/main.rs), with amazing-proxy
# (access log off, as the probes do not log) and Envoy (proxy-envoy-grpc-unary.yaml, its access log
# on as in grpc.sh) beside them: h2load (10 connections x 5 streams, each call a 5-byte gRPC frame)
# and the fixed-answer gRPC endpoint (upstream-grpc-nginx.conf) share CPU 0; each forwarder runs
# alone on CPU 1. Prints calls/s, the forwarder's CPU seconds and calls per CPU-second (compare
# this column: h2load may be the limit), then each one's per-CPU-second ratio to Envoy, per round.
# Usage: bench/h2-probe/bench.sh [ROUNDS] [DURATION_S]   (bench/peerbench/setup.sh first)
#   AMAZING_BIN: the amazing-proxy binary (default: scripts/release.sh --print-path). ENVOY: Envoy.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rounds=${1:-3}; dur=${2:-6}
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
(cd "$here" && cargo build --release --locked -q) || { echo "building the probe failed" >&2; exit 1; }
probe=$here/target/release/h2-probe
for b in h2load nginx taskset; do command -v "$b" >/dev/null || { echo "$b missing: bench/peerbench/setup.sh" >&2; exit 1; }; done
[ -x "$ENVOY" ] || { echo "no Envoy at $ENVOY: bench/peerbench/setup.sh, or set ENVOY" >&2; exit 1; }
for port in 18000 18001 18181 18500; do
  [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || { echo "port $port is already in use" >&2; exit 1; }
done
mkdir -p /tmp/peerbench
printf '\0\0\0\0\0' > /tmp/peerbench/grpc-call.bin
up=""; px=""
cleanup() { [ -n "$px" ] && kill "$px" 2>/dev/null; [ -n "$up" ] && kill "$up" $(pgrep -P "$up") 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
taskset -c 0 nginx -c "$root/bench/peerbench/upstream-grpc-nginx.conf" >/dev/null 2>&1 & up=$!
sleep 0.5
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
load() { # port seconds
  taskset -c 0 h2load -c 10 -m 5 -D "$2" -d /tmp/peerbench/grpc-call.bin \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://127.0.0.1:$1/bench.Svc/Call" 2>&1
}
declare -A per
one() { # name port command...
  local name=$1 port=$2; shift 2
  taskset -c 1 "$@" >/dev/null 2>&1 & px=$!
  sleep 0.5
  load "$port" 1 >/dev/null
  local t0 t1 out ok
  t0=$(ticks "$px")
  out=$(load "$port" "$dur")
  t1=$(ticks "$px")
  kill "$px"; wait "$px" 2>/dev/null; px=""
  ok=$(awk '/^status codes:/{print $3}' <<<"$out")
  per[$name]=$(awk -v n="$ok" -v a="$t0" -v b="$t1" 'BEGIN { c=(b-a)/100; if (n != "" && c > 0) printf "%.0f", n/c; else print 0 }')
  awk -v n="$name" -v ok="$ok" -v d="$dur" -v a="$t0" -v b="$t1" -v p="${per[$name]}" \
    'BEGIN { printf "%-8s calls/s %8.0f  cpu_s %5.2f  calls per cpu_s %6s\n", n, ok/d, (b-a)/100, p }'
}
for r in $(seq "$rounds"); do
  echo "round $r"
  one envoy 18001 "$ENVOY" -c "$root/bench/peerbench/proxy-envoy-grpc-unary.yaml" --concurrency 1 -l error
  one hyper 18000 "$probe" hyper 127.0.0.1:18000 127.0.0.1:18181
  one h2 18000 "$probe" h2 127.0.0.1:18000 127.0.0.1:18181
  one amazing 18000 "$AMAZING_BIN" run --inbound 127.0.0.1:18000 --app 127.0.0.1:18181 --app-protocol http2 \
    --admin 127.0.0.1:18500 --outbound off --workers 1 --access-log off --drain-delay 0s
  awk -v e="${per[envoy]}" -v h="${per[hyper]}" -v d="${per[h2]}" -v a="${per[amazing]}" \
    'BEGIN { if (e > 0) printf "per CPU-second over Envoy: hyper %.2fx  h2 %.2fx  amazing %.2fx;  h2 over hyper %.2fx\n", h/e, d/e, a/e, (h > 0 ? d/h : 0) }'
done
