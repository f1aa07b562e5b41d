#!/usr/bin/env bash
# tokio (epoll) against monoio (io_uring), the same forwarding loop (src/main.rs), and amazing-proxy
# (access log off) beside them: wrk (1 thread, 50 connections) and the fixed-answer nginx share
# CPU 0, each forwarder runs alone on CPU 1. Prints req/s, p99, the forwarder's CPU seconds and
# requests per CPU-second: wrk, not the forwarder, is the limit here, so compare the last column.
# Usage: bench/uring-probe/bench.sh [ROUNDS] [DURATION_S]   (bench/peerbench/setup.sh first)
#   AMAZING_BIN: the amazing-proxy binary (default: scripts/release.sh --print-path).
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rounds=${1:-3}; dur=${2:-5}
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
(cd "$here" && cargo build --release --locked -q) || { echo "building the probe failed" >&2; exit 1; }
probe=$here/target/release/uring-probe
for b in wrk nginx taskset; do command -v "$b" >/dev/null || { echo "$b missing: bench/peerbench/setup.sh" >&2; exit 1; }; done
for port in 18000 18080; do
  [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || { echo "port $port is already in use" >&2; exit 1; }
done
up=""; px=""
cleanup() { [ -n "$px" ] && kill "$px" 2>/dev/null; [ -n "$up" ] && kill "$up" $(pgrep -P "$up") 2>/dev/null; wait 2>/dev/null; }
trap cleanup EXIT
trap 'exit 130' INT TERM
taskset -c 0 nginx -c "$root/bench/peerbench/upstream-nginx.conf" & up=$!
sleep 0.5
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
one() {
  local name=$1; shift
  taskset -c 1 "$@" >/dev/null 2>&1 & px=$!
  sleep 0.4
  taskset -c 0 wrk -t1 -c50 -d1s "http://127.0.0.1:18000/get?query=param" >/dev/null 2>&1
  local t0 t1 out
  t0=$(ticks "$px")
  out=$(taskset -c 0 wrk -t1 -c50 -d"${dur}s" --latency "http://127.0.0.1:18000/get?query=param" 2>&1)
  t1=$(ticks "$px")
  kill "$px"; wait "$px" 2>/dev/null; px=""
  local rps p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  awk -v n="$name" -v r="$rps" -v p="$p99" -v d="$dur" -v a="$t0" -v b="$t1" \
    'BEGIN { c=(b-a)/100; printf "%-8s req/s %8.0f  p99 %-7s  cpu_s %5.2f  req per cpu_s %6.0f\n", n, r, p, c, r*d/c }'
}
for _ in $(seq "$rounds"); do
  one tokio "$probe" tokio 127.0.0.1:18000 127.0.0.1:18080
  one monoio "$probe" monoio 127.0.0.1:18000 127.0.0.1:18080
  one amazing "$AMAZING_BIN" run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 --admin 127.0.0.1:18500 --outbound off --workers 1 --access-log off
done
