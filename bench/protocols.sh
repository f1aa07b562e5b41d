#!/usr/bin/env bash
# Protocol benchmarks (issue 6), one run on loopback:
#  (1) HTTP/2: h2load -n N -c 10 -m 5 (50 concurrent streams over 10 h2c connections) against
#      amazing-proxy, Envoy and nginx, each terminating h2c (prior knowledge) and forwarding
#      HTTP/1.1 to the fixed-answer nginx of bench/peerbench. Every proxy has one worker pinned to
#      CPU 1; the upstream nginx and h2load share CPU 0 (as bench/peerbench/run.sh does).
#  (2) Opaque TCP: iperf3 (one stream, client to server) direct, through amazing-proxy's opaque
#      path (--opaque-ports) and through Envoy's tcp_proxy (the reference for what a user-space
#      proxy costs here); proxies on CPU 1, iperf3 client and server on CPU 0.
# Needs: h2load (nghttp2-client), nginx, Envoy (bench/peerbench/setup.sh), iperf3 (apt), and a
# release build (scripts/release.sh).
# Usage: bench/protocols.sh [REQUESTS] [TCP_SECONDS]
#   ROUNDS (1): HTTP/2 rounds, each with the proxies in a rotated order; with more than one, the
#   ratios of each round and their medians (one run's ratio on a shared machine is mostly noise).
#   AMAZING: the binary (default: scripts/release.sh --print-path); PEERBENCH: the peerbench dir (bench/peerbench);
#   ONLY: subset of "amazing envoy nginx tcp". IPERF_ARGS: extra iperf3 client flags; `-Z`
#   (sendfile) takes the client's copy off CPU 0, which iperf3's client and server share and which
#   limits every proxied run (the proxy's own core stays at 55-65 %).
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
. "$here/median.sh"
n=${1:-200000}
tcp_s=${2:-5}
peer=${PEERBENCH:-$here/peerbench}
AMAZING=${AMAZING:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
only=${ONLY:-amazing envoy nginx tcp}
out=/tmp/protobench
mkdir -p "$out" /tmp/peerbench
rm -f "$out"/*.log

for tool in h2load nginx iperf3 taskset python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install nghttp2-client nginx-light iperf3)" >&2; exit 1; }
done
[ -x "$AMAZING" ] || { echo "no release binary at $AMAZING: scripts/release.sh" >&2; exit 1; }
[ -f "$peer/upstream-nginx.conf" ] || { echo "no $peer/upstream-nginx.conf (set PEERBENCH)" >&2; exit 1; }

pids=()
current=""  # the proxy of the HTTP/2 round running now
cleanup() { for p in "${pids[@]}" $current; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
cpu_ticks() { awk '{print $14+$15}' /proc/$1/stat 2>/dev/null; }
hwm_kb() { awk '/^VmHWM/{print $2}' /proc/$1/status 2>/dev/null; }

taskset -c 0 nginx -c "$peer/upstream-nginx.conf" & pids+=($!)
wait_port 18080 || exit 1

declare -A rps
echo "== HTTP/2 (h2c in, HTTP/1.1 to the upstream): h2load -n $n -c 10 -m 5"
printf "%-8s %10s %10s %10s %10s %8s %10s\n" proxy req/s mean_ms sd_ms succeeded failed cpu_s
h2bench() { # name port pid
  local name=$1 port=$2 pid=$3
  taskset -c 0 h2load -n 20000 -c 10 -m 5 "http://127.0.0.1:$port/get?query=param" >/dev/null 2>&1 # warm-up
  local t0 t1 res
  t0=$(cpu_ticks "$pid")
  res=$(taskset -c 0 h2load -n "$n" -c 10 -m 5 "http://127.0.0.1:$port/get?query=param" 2>&1)
  t1=$(cpu_ticks "$pid")
  printf '%s\n' "$res" > "$out/h2load-$name.txt"
  local r mean sd ok failed
  r=$(awk '/^finished in/{gsub(",","",$4); print $4}' <<<"$res")
  mean=$(awk '/^time for request:/{print $6}' <<<"$res")
  sd=$(awk '/^time for request:/{print $7}' <<<"$res")
  ok=$(awk '/^requests:/{print $8}' <<<"$res")
  failed=$(awk '/^requests:/{print $10}' <<<"$res")
  ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); printf "%.3f", v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); printf "%.3f", v} else if (v ~ /s$/) {sub(/s/,"",v); printf "%.3f", v*1000} else print "?" }'; }
  rps[$name]=$r
  printf "%-8s %10s %10s %10s %10s %8s %10s\n" "$name" "$r" "$(ms "$mean")" "$(ms "$sd")" "$ok" "$failed" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/100}')"
}

rounds=${ROUNDS:-1}
targets=(); for t in $only; do case $t in amazing|envoy|nginx) targets+=("$t") ;; esac; done
ratios=$(mktemp); trap 'cleanup; rm -f "$ratios"' EXIT
for r in $(seq "$rounds"); do
  [ "$rounds" -gt 1 ] && echo "round $r"
  rps=()
  for i in "${!targets[@]}"; do
    t=${targets[$(( (i + r - 1) % ${#targets[@]} ))]}
    case $t in
      amazing)
        taskset -c 1 "$AMAZING" run --inbound 127.0.0.1:18020 --app 127.0.0.1:18080 --outbound off \
          --admin 127.0.0.1:19020 --workers 1 --proxy-mark 0 --app-protocol http1 \
          >"$out/amazing-access.log" 2>"$out/amazing-err.log" & p=$!; current=$p
        wait_port 18020 && sleep 0.3 && h2bench amazing 18020 "$p"; kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; current="" ;;
      envoy)
        taskset -c 1 "$ENVOY" -c "$here/envoy-h2c.yaml" --concurrency 1 -l error >"$out/envoy-err.log" 2>&1 & p=$!; current=$p
        wait_port 18021 && sleep 0.5 && h2bench envoy 18021 "$p"; kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; current="" ;;
      nginx)
        taskset -c 1 nginx -c "$here/nginx-h2c.conf" & p=$!; current=$p
        wait_port 18022 && sleep 0.3
        w=$(pgrep -P "$p" | head -1); h2bench nginx 18022 "${w:-$p}"; kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; current="" ;;
    esac
  done
  if [ -n "${rps[amazing]:-}" ]; then
    for peer_name in envoy nginx; do
      [ -n "${rps[$peer_name]:-}" ] && awk -v a="${rps[amazing]}" -v b="${rps[$peer_name]}" -v p="$peer_name" \
        'BEGIN{printf "amazing / %-6s = %.2f\n", p, a/b}' | tee -a "$ratios"
    done
  fi
done
if [ "$rounds" -gt 1 ]; then
  for peer_name in envoy nginx; do
    vals=$(awk -v p="$peer_name" '$3 == p {print $5}' "$ratios")
    [ -n "$vals" ] && printf "median of %d rounds: amazing / %-6s = %.2f\n" \
      "$(wc -l <<<"$vals")" "$peer_name" "$(median <<<"$vals")"
  done
fi

case " $only " in *" tcp "*)
  echo
  echo "== Opaque TCP: iperf3 -t $tcp_s ${IPERF_ARGS:-}, one stream, client to server (best of 3 runs each)"
  iperf_bps() { # port -> best bits/s received by the server over 3 runs
    local best=0 b
    for _ in 1 2 3; do
      # shellcheck disable=SC2086 # IPERF_ARGS is a list of flags
      b=$(taskset -c 0 iperf3 -c 127.0.0.1 -p "$1" -t "$tcp_s" ${IPERF_ARGS:-} -J 2>/dev/null \
        | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]))' 2>/dev/null)
      [ -n "$b" ] && [ "$b" -gt "$best" ] && best=$b
    done
    echo "$best"
  }
  gbps() { awk -v b="${1:-0}" 'BEGIN{printf "%.2f", b/1e9}'; }
  taskset -c 0 iperf3 -s -p 18090 >"$out/iperf3-server.log" 2>&1 & pids+=($!)
  wait_port 18090 || exit 1
  direct=$(iperf_bps 18090)
  printf "%-8s %8s %8s %8s %11s\n" path Gbit/s ratio cpu_s peakRSS_MB
  printf "%-8s %8s %8s %8s %11s\n" direct "$(gbps "$direct")" 1.00 - -
  tcpbench() { # name port pid
    local t0 t1 hwm bps
    t0=$(cpu_ticks "$3"); bps=$(iperf_bps "$2"); t1=$(cpu_ticks "$3"); hwm=$(hwm_kb "$3")
    printf "%-8s %8s %8s %8s %11s\n" "$1" "$(gbps "$bps")" "$(awk -v a="$bps" -v b="$direct" 'BEGIN{printf "%.2f", a/b}')" \
      "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/100}')" "$(awk -v k="${hwm:-0}" 'BEGIN{printf "%.1f", k/1024}')"
  }
  taskset -c 1 "$AMAZING" run --inbound 127.0.0.1:18030 --opaque-ports 18030 --app 127.0.0.1:18090 \
    --outbound off --admin 127.0.0.1:19030 --workers 1 --proxy-mark 0 \
    >"$out/amazing-tcp-access.log" 2>"$out/amazing-tcp-err.log" & p=$!; pids+=($p)
  wait_port 18030 && sleep 0.3 && tcpbench amazing 18030 "$p"; kill "$p" 2>/dev/null
  taskset -c 1 "$ENVOY" -c "$here/envoy-tcp.yaml" --concurrency 1 -l error >"$out/envoy-tcp-err.log" 2>&1 & p=$!; pids+=($p)
  wait_port 18031 && sleep 0.5 && tcpbench envoy 18031 "$p"; kill "$p" 2>/dev/null
;; esac
