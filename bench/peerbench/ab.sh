#!/usr/bin/env bash
# Interleaved A/B of two amazing-proxy configurations on the benchmark's path (wrk, 50
# connections, 5 s after a 1 s warm-up; the proxy pinned to CPU 1, wrk and the fixed-answer nginx
# upstream to CPU 0): N pairs, each run of A followed by one of B, and the median of the per-pair
# ratios B/A. Interleaving cancels most of a shared machine's drift, which separate runs do not.
# Usage: ab.sh N BIN_A "ARGS_A" BIN_B "ARGS_B"
#   ARGS are added to `run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 --admin 127.0.0.1:18500
#   --outbound off --workers 1 --access-log json`. ARGS_B may start with `tap:` to attach a reader
#   of GET /tap (curl, on CPU 0) to B's runs: `ab.sh 7 BIN "" BIN "tap:"`.
# AB_LOAD=h2c: HTTP/2 instead (h2c with prior knowledge in, HTTP/1.1 to the app): h2load with 10
#   connections x 5 streams, 100,000 requests after 20,000 of warm-up, as bench/protocols.sh does.
# Needs wrk, h2load, nginx and curl (bench/peerbench/setup.sh).
set -u
here=$(cd "$(dirname "$0")" && pwd)
n=${1:?runs}; bin_a=${2:?binary A}; args_a=${3-}; bin_b=${4:?binary B}; args_b=${5-}
mkdir -p /tmp/peerbench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
taskset -c 0 nginx -c "$here/upstream-nginx.conf" & pids+=($!)
sleep 0.5
one() { # bin args -> req/s
  local bin=$1 args=$2 reader=""
  local tap=0; case $args in tap:*) tap=1; args=${args#tap:} ;; esac
  # shellcheck disable=SC2086
  taskset -c 1 "$bin" run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 --admin 127.0.0.1:18500 \
    --outbound off --workers 1 --access-log json $args >/tmp/peerbench/ab-access.log 2>/tmp/peerbench/ab-err.log &
  local p=$!; sleep 0.6
  if [ $tap -eq 1 ]; then taskset -c 0 curl -sN http://127.0.0.1:18500/tap >/dev/null & reader=$!; sleep 0.2; fi
  if [ "${AB_LOAD:-}" = h2c ]; then
    taskset -c 0 h2load -n 20000 -c 10 -m 5 "http://127.0.0.1:18000/get?query=param" >/dev/null 2>&1
    taskset -c 0 h2load -n 100000 -c 10 -m 5 "http://127.0.0.1:18000/get?query=param" | awk '/^finished in/{print $4}'
  else
    taskset -c 0 wrk -t1 -c50 -d1s "http://127.0.0.1:18000/get?query=param" >/dev/null 2>&1
    taskset -c 0 wrk -t1 -c50 -d5s "http://127.0.0.1:18000/get?query=param" | awk '/Requests\/sec/{print $2}'
  fi
  [ -n "$reader" ] && kill "$reader" 2>/dev/null
  kill "$p"; wait "$p" 2>/dev/null
}
rows=$(mktemp); trap 'cleanup; rm -f "$rows"' EXIT
for _ in $(seq "$n"); do
  a=$(one "$bin_a" "$args_a"); b=$(one "$bin_b" "$args_b")
  echo "$a $b" | awk '{printf "A %s  B %s  B/A %.3f\n", $1, $2, ($1 > 0 ? $2 / $1 : 0)}' | tee -a "$rows"
done
awk '{r[NR] = $6} END {
  for (i = 1; i <= NR; i++) for (j = i + 1; j <= NR; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
  printf "%d pairs: median B/A %.3f\n", NR, (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2 }' "$rows"
