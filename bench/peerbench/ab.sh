#!/usr/bin/env bash
# Interleaved A/B of two amazing-proxy configurations on the benchmark's path (wrk, 50
# connections, 5 s after a 1 s warm-up; the proxy pinned to CPU 1, wrk and the fixed-answer nginx
# upstream to CPU 0): N pairs, A and B in turn (the order alternates between pairs), and the
# median of the per-pair ratios B/A. Interleaving cancels most of a shared machine's drift, which
# separate runs do not.
# Usage: ab.sh N BIN_A "ARGS_A" BIN_B "ARGS_B"
#   ARGS are added to `run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 --admin 127.0.0.1:18500
#   --outbound off --workers 1 --access-log json`. ARGS_B may start with `tap:` to attach a reader
#   of GET /tap (curl, on CPU 0) to B's runs: `ab.sh 7 BIN "" BIN "tap:"`.
# AB_LOAD: http1 (the default, wrk as above); h2c: HTTP/2 with prior knowledge in, HTTP/1.1 to the
#   app, h2load with 10 connections x 5 streams (as bench/protocols.sh), 100,000 requests after
#   20,000 of warm-up; grpc: gRPC unary calls as bench/peerbench/grpc.sh makes them (h2load 10 x 5,
#   a 5-byte message, the h2c endpoint of upstream-grpc-nginx.conf as the app, `--app-protocol
#   http2`), 100,000 after 20,000. Besides req/s, each row gives the proxy's CPU microseconds per
#   request (utime + stime over the measured run).
# Needs wrk, h2load, nginx and curl (bench/peerbench/setup.sh).
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../median.sh"
n=${1:?runs}; bin_a=${2:?binary A}; args_a=${3-}; bin_b=${4:?binary B}; args_b=${5-}
load=${AB_LOAD:-http1}
case $load in
  http1) need=wrk; app=127.0.0.1:18080 ;;
  h2c) need=h2load; app=127.0.0.1:18080 ;;
  grpc) need=h2load; app=127.0.0.1:18181 ;;
  *) echo "ab: AB_LOAD must be http1, h2c or grpc, not '$load'" >&2; exit 2 ;;
esac
for tool in $need nginx curl taskset; do
  command -v "$tool" >/dev/null || { echo "ab: $tool is missing: run bench/peerbench/setup.sh" >&2; exit 1; }
done
mkdir -p /tmp/peerbench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" $(pgrep -P "$p") 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
taskset -c 0 nginx -c "$here/upstream-nginx.conf" & pids+=($!)
if [ "$load" = grpc ]; then
  taskset -c 0 nginx -c "$here/upstream-grpc-nginx.conf" & pids+=($!)
  printf '\0\0\0\0\0' > /tmp/peerbench/grpc-call.bin
fi
sleep 0.5
one() { # bin args -> "req/s cpu-us-per-request"
  local bin=$1 args=$2 reader="" url=http://127.0.0.1:18000/get?query=param t0 t1 rate
  local tap=0; case $args in tap:*) tap=1; args=${args#tap:} ;; esac
  local h2=(-c 10 -m 5) requests=100000
  [ "$load" = grpc ] && { url=http://127.0.0.1:18000/bench.Svc/Call; args="--app-protocol http2 $args"
    h2+=(-d /tmp/peerbench/grpc-call.bin -H 'content-type: application/grpc' -H 'te: trailers'); }
  # shellcheck disable=SC2086
  taskset -c 1 "$bin" run --inbound 127.0.0.1:18000 --app "$app" --admin 127.0.0.1:18500 \
    --outbound off --workers 1 --access-log json $args >/tmp/peerbench/ab-access.log 2>/tmp/peerbench/ab-err.log &
  local p=$!; sleep 0.6
  if [ $tap -eq 1 ]; then taskset -c 0 curl -sN http://127.0.0.1:18500/tap >/dev/null & reader=$!; sleep 0.2; fi
  # Warm-up, then the measured run, with the proxy's CPU ticks read around it.
  if [ "$load" = http1 ]; then
    taskset -c 0 wrk -t1 -c50 -d1s "$url" >/dev/null 2>&1
    measured() { taskset -c 0 wrk -t1 -c50 -d5s "$url" | awk '/Requests\/sec/{print $2}'; }
  else
    taskset -c 0 h2load -n 20000 "${h2[@]}" "$url" >/dev/null 2>&1
    measured() { taskset -c 0 h2load -n "$requests" "${h2[@]}" "$url" | awk '/^finished in/{print $4}'; }
  fi
  t0=$(awk '{print $14+$15}' "/proc/$p/stat")
  rate=$(measured)
  t1=$(awk '{print $14+$15}' "/proc/$p/stat")
  # wrk runs for a time, not a count: its requests are its rate over the 5 s.
  [ "$load" = http1 ] && requests=$(awk -v r="${rate:-0}" 'BEGIN{printf "%d", r * 5}')
  [ -n "$reader" ] && kill "$reader" 2>/dev/null
  kill "$p"; wait "$p" 2>/dev/null
  awk -v r="${rate:-0}" -v a="${t0:-0}" -v b="${t1:-0}" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
    'BEGIN{printf "%s %.2f\n", r, (n > 0 ? (b - a) / hz * 1e6 / n : 0)}'
}
rows=$(mktemp); trap 'cleanup; rm -f "$rows"' EXIT
for i in $(seq "$n"); do
  # A first in odd pairs, B first in even ones: whichever ran second measured 3-4 % slower on
  # the two-core machine of 2026-12-06 (the same two binaries gave the second 0.955 and 0.967).
  if [ $((i % 2)) -eq 1 ]; then a=$(one "$bin_a" "$args_a"); b=$(one "$bin_b" "$args_b")
  else b=$(one "$bin_b" "$args_b"); a=$(one "$bin_a" "$args_a"); fi
  echo "$a $b" | awk '{printf "A %s req/s %s us  B %s req/s %s us  B/A %.3f  cpu B/A %.3f\n", $1, $2, $3, $4,
    ($1 > 0 ? $3 / $1 : 0), ($2 > 0 ? $4 / $2 : 0)}' | tee -a "$rows"
done
# Medians of the per-pair ratios: requests per second (field 12), then CPU per request (15).
printf '%d pairs: median req/s B/A %.3f\n' "$n" "$(awk '{print $12}' "$rows" | median)"
printf '%d pairs: median CPU per request B/A %.3f\n' "$n" "$(awk '{print $15}' "$rows" | median)"
