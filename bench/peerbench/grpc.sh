#!/usr/bin/env bash
# gRPC unary calls through each proxy (issue 20): 50 streams over 10 connections (h2load -c 10
# -m 5, each call a 5-byte empty gRPC message with content-type application/grpc and te: trailers)
# through amazing-proxy's inbound (h2c in, `--app-protocol http2` to the app), Envoy
# (proxy-envoy-grpc-unary.yaml, HTTP/2 cluster) and nginx's grpc_pass (proxy-nginx-grpc.conf), to
# one h2c endpoint answering as a gRPC server would (upstream-grpc-nginx.conf, 127.0.0.1:18181).
# Each proxy has one worker pinned to CPU 1 and logs every call to /tmp/peerbench; the endpoint and
# h2load share CPU 0. Everything is on loopback: no namespace, nothing redirected; every process the
# script started is stopped on exit, whatever happens. Before measuring, one call through each
# proxy (curl) must come back with grpc-status 0.
# It prints, per target, calls/s (h2load's req/s: every answered call), 2xx/s and the 2xx count,
# h2load's failed calls (non-2xx and errors), its mean and max time per call, the proxy's CPU seconds
# over the measured window (every thread and child process; the warm-up second excluded) and 2xx per
# CPU-second, then amazing/envoy and amazing/nginx in 2xx/s and in 2xx per CPU-second: a call that
# failed does not count. A proxy that saturates its core scores alike in both; one that does not
# (its load generator's core is the limit) is compared fairly only by the second. With REPEAT > 1 the three targets
# run interleaved REPEAT times (the order rotating each round) and the median of each ratio follows.
# nginx's grpc_pass answers a few calls 502 ("upstream sent frame for unknown stream" in
# /tmp/peerbench/proxy-nginx-grpc-error.log): the fixed-answer endpoint ends every call with an
# RST_STREAM (NO_ERROR) after its answer (it never reads the body), and when that frame comes after
# nginx has put the connection back for the next call, nginx fails that call; Envoy and
# amazing-proxy ignore it.
# Usage: grpc.sh [DURATION_S] [REPEAT]   (default 8 s, 1 round; bench/peerbench/setup.sh first)
#   AMAZING_BIN: the amazing-proxy binary (default: scripts/release.sh --print-path). ENVOY: Envoy.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
dur=${1:-8}; repeat=${2:-1}
app=127.0.0.1:18181
[ -x "$AMAZING_BIN" ] || { echo "no amazing-proxy at $AMAZING_BIN: scripts/release.sh, or set AMAZING_BIN" >&2; exit 1; }
[ -x "$ENVOY" ] || { echo "no Envoy at $ENVOY: bench/peerbench/setup.sh, or set ENVOY" >&2; exit 1; }
for b in h2load nginx curl taskset; do command -v "$b" >/dev/null || { echo "$b missing: bench/peerbench/setup.sh" >&2; exit 1; }; done
# Another benchmark holding one of these ports would be measured in place of ours.
for port in 18000 18001 18002 18181 18182 18183 18500; do
  [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || { echo "port $port is already in use (another benchmark?)" >&2; exit 1; }
done

mkdir -p /tmp/peerbench
rows=$(mktemp)
upstream=""; proxy=""
# Stops one process we started and its children (nginx's workers): TERM, then KILL after 3 s.
stop() {
  local p=$1 kids
  kids=$(pgrep -P "$p" 2>/dev/null)
  kill "$p" $kids 2>/dev/null
  for _ in $(seq 30); do kill -0 "$p" $kids 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" $kids 2>/dev/null
  wait "$p" 2>/dev/null
}
cleanup() { [ -n "$proxy" ] && stop "$proxy"; [ -n "$upstream" ] && stop "$upstream"; rm -f "$rows"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
# CPU ticks (1/100 s) of a process, its threads and its children (nginx's workers).
cpu_ticks() {
  local p t=0
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); printf "%.3f", v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); printf "%.3f", v} else if (v ~ /s$/) {sub(/s/,"",v); printf "%.3f", v*1000} else print "?" }'; }

taskset -c 0 nginx -c "$here/upstream-grpc-nginx.conf" >/dev/null 2>&1 & upstream=$!
wait_port 18181 || exit 1
# A 5-byte gRPC frame (an empty message) as each call's body.
printf '\0\0\0\0\0' > /tmp/peerbench/grpc-call.bin
url() { echo "http://127.0.0.1:$1/bench.Svc/Call"; }

start() { # name: starts that proxy on CPU 1; sets proxy (its pid) and port
  case $1 in
    amazing)
      taskset -c 1 "$AMAZING_BIN" run --inbound 127.0.0.1:18000 --app "$app" --app-protocol http2 \
        --admin 127.0.0.1:18500 --outbound off --workers 1 --access-log json --drain-delay 0s \
        >>/tmp/peerbench/amazing-grpc-unary-access.log 2>>/tmp/peerbench/amazing-grpc-unary-err.log &
      proxy=$! port=18000 ;;
    envoy)
      taskset -c 1 "$ENVOY" -c "$here/proxy-envoy-grpc-unary.yaml" --concurrency 1 -l error \
        >>/tmp/peerbench/envoy-grpc-unary-err.log 2>&1 &
      proxy=$! port=18001 ;;
    nginx)
      taskset -c 1 nginx -c "$here/proxy-nginx-grpc.conf" >/dev/null 2>&1 &
      proxy=$! port=18002 ;;
  esac
}

bench() { # round name
  local round=$1 name=$2 port status out rps ok okps failed mean max t0 t1 cpu percpu
  start "$name"
  if ! wait_port "$port"; then stop "$proxy"; proxy=""; return 1; fi
  sleep 0.3
  # One call first: the proxy must carry the endpoint's grpc-status 0 back.
  status=$(curl -s -m 5 --http2-prior-knowledge -D - -o /dev/null --data-binary @/tmp/peerbench/grpc-call.bin \
    -H 'content-type: application/grpc' -H 'te: trailers' "$(url "$port")" |
    awk -F': *' 'tolower($1)=="grpc-status"{sub(/\r$/, "", $2); print $2}')
  out=$(mktemp)
  taskset -c 0 h2load -c 10 -m 5 --warm-up-time=1 -D "$dur" -d /tmp/peerbench/grpc-call.bin \
    -H 'content-type: application/grpc' -H 'te: trailers' "$(url "$port")" >"$out" 2>&1 &
  local load=$!
  # The proxy's CPU over the measured window only: h2load counts no call of its warm-up second.
  sleep 1; t0=$(cpu_ticks "$proxy")
  wait "$load"; t1=$(cpu_ticks "$proxy")
  out=$(cat "$out"; rm -f "$out")
  stop "$proxy"; proxy=""
  rps=$(awk '/^finished in/{gsub(",","",$4); print $4}' <<<"$out")
  ok=$(awk '/^status codes:/{print $3}' <<<"$out")
  failed=$(awk '/^requests:/{gsub(",",""); print $10}' <<<"$out")
  okps=$(awk -v n="$ok" -v d="$dur" 'BEGIN{ if (n != "") printf "%.1f", n / d }')
  cpu=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/100}')
  percpu=$(awk -v n="$ok" -v c="$cpu" 'BEGIN{ if (n != "" && c > 0) printf "%.0f", n / c; else print "?" }')
  mean=$(awk '/^time for request:/{print $6}' <<<"$out"); max=$(awk '/^time for request:/{print $5}' <<<"$out")
  printf "%-8s %10s %10s %10s %8s %10s %10s %8s %10s %12s\n" "$name" "${rps:-?}" "${okps:-?}" "${ok:-?}" \
    "${failed:-?}" "$(ms "$mean")" "$(ms "$max")" "$cpu" "$percpu" "${status:-none}"
  [ -n "$okps" ] || { printf '%s\n' "$out" | tail -5 >&2; return 1; }
  echo "$round $name $okps $percpu" >> "$rows"
}

echo "gRPC unary, 10 connections x 5 streams (50 calls in flight), ${dur}s per target, $repeat round(s)"
printf "%-8s %10s %10s %10s %8s %10s %10s %8s %10s %12s\n" target calls/s 2xx/s 2xx failed mean_ms max_ms cpu_s 2xx/CPU-s \
  grpc-status
targets=(amazing envoy nginx)
for r in $(seq "$repeat"); do
  [ "$repeat" -gt 1 ] && echo "round $r"
  for i in 0 1 2; do bench "$r" "${targets[$(( (i + r - 1) % 3 ))]}"; done
done

# Per round: amazing / envoy and amazing / nginx in 2xx/s and in 2xx per CPU-second; then the
# median of each ratio.
awk -v rounds="$repeat" '
  { rps[$1, $2] = $3; cpu[$1, $2] = $4 }
  function ratio(r, peer, v,   k) {
    k = (r SUBSEP "amazing"); if (!(k in v) || !((r, peer) in v) || v[r, peer] + 0 <= 0 || v[k] + 0 <= 0) return ""
    return v[k] / v[r, peer]
  }
  END {
    n = 0
    for (r = 1; r <= rounds; r++) {
      line = ""
      for (p = 1; p <= 2; p++) {
        peer = p == 1 ? "envoy" : "nginx"
        x = ratio(r, peer, rps); y = ratio(r, peer, cpu)
        if (x != "") { c[peer, ++cn[peer]] = x; line = line sprintf("  amazing/%s %.2fx", peer, x) }
        if (y != "") { d[peer, ++dn[peer]] = y; line = line sprintf(" (per CPU-s %.2fx)", y) }
      }
      if (line != "") { n++; printf "round %d 2xx/s:%s\n", r, line }
    }
    if (n == 0) { print "no round measured amazing-proxy and a peer" > "/dev/stderr"; exit 1 }
    if (rounds > 1)
      for (p = 1; p <= 2; p++) {
        peer = p == 1 ? "envoy" : "nginx"
        if (cn[peer]) printf "median of %d rounds: amazing/%s %.2fx in 2xx/s", cn[peer], peer, median(c, peer, cn[peer])
        if (dn[peer]) printf ", %.2fx in 2xx per CPU-second", median(d, peer, dn[peer])
        if (cn[peer]) printf "\n"
      }
  }
  function median(v, peer, n,   i, j, t, a) {
    for (i = 1; i <= n; i++) a[i] = v[peer, i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }' "$rows"
