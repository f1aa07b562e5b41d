#!/usr/bin/env bash
# Side-by-side proxy benchmark on loopback: direct vs amazing-proxy vs Envoy vs nginx vs HAProxy.
# Every proxy gets one worker, pinned to CPU 1; the upstream and the load generator share CPU 0.
# Usage: run.sh [DURATION_S] [CONNECTIONS]
#   AMAZING_CMD: command line that starts amazing-proxy listening on 127.0.0.1:18000 and
#                forwarding to 127.0.0.1:18080; default: the release build with one worker and its
#                JSON access log on (written to /tmp/peerbench/amazing-access.log), as in docs/benchmarks.md.
#   ONLY: space-separated subset of "direct amazing envoy nginx haproxy".
#   UPSTREAM_CMD: another app on 127.0.0.1:18080 instead of the fixed-answer nginx (e.g. gunicorn httpbin:app).
#   PATHQ: request path (default /get?query=param). RAW_DIR: keep each wrk output there.
# gen_core%: how busy CPU 0 (wrk and the upstream) was during the run. At 100 % the load, not the
# proxy, bounds req/s, and cpu_s (the proxy's CPU seconds) is what tells the proxies apart.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
AMAZING_CMD=${AMAZING_CMD-$AMAZING_BIN run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 --admin 127.0.0.1:18500 --outbound off --workers 1 --access-log json}
dur=${1:-8}; conns=${2:-50}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
only=${ONLY:-direct amazing envoy nginx haproxy}
mkdir -p /tmp/peerbench; rm -f /tmp/peerbench/*.log
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
rss_kb() { awk '/^VmRSS/{print $2}' /proc/$1/status 2>/dev/null; }
hwm_kb() { awk '/^VmHWM/{print $2}' /proc/$1/status 2>/dev/null; }
cpu_ticks() { awk '{print $14+$15}' /proc/$1/stat 2>/dev/null; }
core0_ticks() { awk '/^cpu0 /{print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; } # idle, total

if [ -n "${UPSTREAM_CMD:-}" ]; then taskset -c 0 $UPSTREAM_CMD >/tmp/peerbench/upstream-app.log 2>&1 & pids+=($!)
else taskset -c 0 nginx -c "$here/upstream-nginx.conf" & pids+=($!); fi
wait_port 18080 || exit 1

printf "%-9s %10s %9s %9s %9s %9s %9s %8s %9s  %s\n" target req/s p50_ms p90_ms p99_ms idleRSS_MB peakRSS_MB cpu_s gen_core% errors
bench() { # name port pid
  local name=$1 port=$2 pid=${3:-}
  local idle="" t0="" t1="" hwm=""
  [ -n "$pid" ] && idle=$(rss_kb "$pid")   # idle: before any request
  taskset -c 0 wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$port${PATHQ:-/get?query=param}" >/dev/null 2>&1 # warm-up
  [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  local g0; g0=$(core0_ticks)
  local out; out=$(taskset -c 0 wrk -t1 -c"$conns" -d"${dur}s" --latency "http://127.0.0.1:$port${PATHQ:-/get?query=param}" 2>&1)
  [ -n "${RAW_DIR:-}" ] && printf '%s\n' "$out" > "$RAW_DIR/wrk-$name.txt"
  [ -n "$pid" ] && hwm=$(hwm_kb "$pid") && t1=$(cpu_ticks "$pid")
  local gen; gen=$(awk -v a="$g0" -v b="$(core0_ticks)" 'BEGIN{split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%.1f", (t > 0) ? 100 * (1 - (y[1] - x[1]) / t) : 0}')
  local rps p50 p90 p99
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out"); p90=$(awk '$1=="90%"{print $2}' <<<"$out"); p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); printf "%.3f", v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); printf "%.3f", v} else if (v ~ /s$/) {sub(/s/,"",v); printf "%.3f", v*1000} else print "?" }'; }
  local cpu="-"; [ -n "$t0" ] && cpu=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/100}')
  local i="-" h="-"; [ -n "$idle" ] && i=$(awk -v k="$idle" 'BEGIN{printf "%.1f", k/1024}'); [ -n "$hwm" ] && h=$(awk -v k="$hwm" 'BEGIN{printf "%.1f", k/1024}')
  local errs; errs=$(awk '/Non-2xx/{n=$NF} /Socket errors/{s=$0} END{printf "non2xx=%s %s", (n==""?0:n), s}' <<<"$out")
  printf "%-9s %10s %9s %9s %9s %9s %9s %8s %9s  %s\n" "$name" "$rps" "$(ms "$p50")" "$(ms "$p90")" "$(ms "$p99")" "$i" "$h" "$cpu" "$gen" "$errs"
}
for t in $only; do
  case $t in
    direct) bench direct 18080 ;;
    amazing)
      if [ -n "${AMAZING_CMD:-}" ] && command -v "${AMAZING_CMD%% *}" >/dev/null; then
        taskset -c 1 $AMAZING_CMD >/tmp/peerbench/amazing-access.log 2>/tmp/peerbench/amazing-err.log & p=$!; pids+=($p)
        wait_port 18000 && sleep 0.5 && bench amazing 18000 "$p"; kill "$p" 2>/dev/null
      else echo "amazing   (no binary at ${AMAZING_CMD%% *}: scripts/release.sh, or set AMAZING_CMD; skipped)"; fi ;;
    envoy)
      taskset -c 1 "$ENVOY" -c "$here/proxy-envoy.yaml" --concurrency 1 -l error >/tmp/peerbench/envoy-err.log 2>&1 & p=$!; pids+=($p)
      wait_port 18001 && sleep 0.5 && bench envoy 18001 "$p"; kill "$p" 2>/dev/null ;;
    nginx)
      taskset -c 1 nginx -c "$here/proxy-nginx.conf" & p=$!; pids+=($p)
      wait_port 18002 && sleep 0.3
      w=$(pgrep -P "$p" | head -1); bench nginx 18002 "${w:-$p}"; kill "$p" 2>/dev/null ;;
    haproxy)
      taskset -c 1 haproxy -f "$here/proxy-haproxy.cfg" -db >/tmp/peerbench/haproxy.log 2>&1 & p=$!; pids+=($p)
      wait_port 18003 && sleep 0.3 && bench haproxy 18003 "$p"; kill "$p" 2>/dev/null ;;
  esac
done
