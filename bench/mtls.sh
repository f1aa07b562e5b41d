#!/usr/bin/env bash
# Sidecar pairs side by side (issue 11, "Speed"): client-side proxy -> server-side proxy -> nginx.
#   plain: our pair in plaintext (outbound 15001 -> the server's inbound 8000);
#   mtls:  our pair in HBONE (outbound 15001 -> HTTP/2 CONNECT in TLS 1.3 mutual TLS -> 15008);
#   envoy: two Envoys, HTTP connection manager on both sides, requests over one pooled HTTP/2
#          connection in TLS 1.3 mutual TLS (ALPN h2) between them (bench/mtls/envoy-*.yaml);
# then the handshake cost: full mutual-TLS handshakes per second against each server side.
#
# Two pods as tests/support/mesh.rs makes them: network namespaces A and B joined by a veth pair on
# 198.18.200.0/30, each with `amazing-proxy init` rules (A: the app's outbound TCP -> 15001;
# B: only port 18080 -> 8000), so our outbound listener learns the destination from SO_ORIGINAL_DST
# exactly as in a pod. wrk runs in A as uid 1000 (the app) against B:18080; the Envoys run as uid
# 1337 (which init lets out unredirected) and wrk reaches the client Envoy on 127.0.0.1:15101.
# CPUs: the client-side proxy and wrk on CPU 0, the server-side proxy and nginx on CPU 1: each proxy
# on its own core, sharing it with the neighbour it talks to, identically for every pair.
#
# Usage (root): bench/mtls.sh [DURATION_S] [CONNECTIONS]   (default 8 s, 50 connections)
#   AMAZING_BIN: the binary (default: where scripts/release.sh puts it).
#   ONLY: subset of "plain mtls envoy handshakes" (default), and "bulk": one iperf3 stream per pair, each core's busy share, and the ceiling any software TLS has here (bench/aead-rate). HS_PROCS: handshake client processes (2).
#   RAW_DIR: keep each wrk output there. MEM_DETAIL=1: print each proxy's anonymous and file RSS.
# Needs: wrk, nginx, python3, curl, setpriv, iptables; Envoy for "envoy" and "handshakes"
# (bench/peerbench/setup.sh puts it in /tmp/peers); iperf3 for "bulk". Everything lives in the two
# namespaces and /tmp/mtlsbench, removed on exit.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
PYTHON=${PYTHON:-python3}
dur=${1:-8}; conns=${2:-50}
only=${ONLY:-plain mtls envoy handshakes}
work=/tmp/mtlsbench
A=ap-bench-a; B=ap-bench-b; A_IP=198.18.200.1; B_IP=198.18.200.2
CLIENT_ID=spiffe://cluster.local/ns/default/sa/bench-client
SERVER_ID=spiffe://cluster.local/ns/default/sa/bench-server

tools=("$AMAZING_BIN" wrk nginx curl setpriv "$PYTHON")
case " $only " in *" envoy "*|*" handshakes "*) tools+=("$ENVOY") ;; esac
case " $only " in *" bulk "*) tools+=(iperf3) ;; esac
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "missing $tool (scripts/release.sh; bench/peerbench/setup.sh)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root: it makes network namespaces" >&2; exit 1; }

pids=()
cleanup() {
  stop "${pids[@]}"
  ip netns del "$A" 2>/dev/null; ip netns del "$B" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
in_a() { ip netns exec "$A" "$@"; }
in_b() { ip netns exec "$B" "$@"; }
# Waits (10 s at most) until URL answers 2xx in namespace NS.
wait_http() { for _ in $(seq 100); do ip netns exec "$1" curl -sf -o /dev/null "$2" && return 0; sleep 0.1; done; echo "$2 in $1 never answered" >&2; return 1; }
wait_port() { for _ in $(seq 100); do ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0; sleep 0.1; done; echo "$2:$3 in $1 never opened" >&2; return 1; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hwm_mb() { awk '/^VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
ms() { awk -v v="$1" 'BEGIN{ if (v ~ /us$/) {sub(/us/,"",v); printf "%.3f", v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v); printf "%.3f", v} else if (v ~ /s$/) {sub(/s/,"",v); printf "%.1f", v*1000} else print "?" }'; }
# SIGTERM, then SIGKILL after 5 s; returns once they are gone.
stop() {
  kill "$@" 2>/dev/null
  for p in "$@"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null || true  # its status is the signal's
  done
}

# --- identities, pods, upstream -------------------------------------------------------------------
rm -rf "$work"; mkdir -p "$work" /tmp/peerbench
"$AMAZING_BIN" identity ca --out "$work/ca" >/dev/null || exit 1
"$AMAZING_BIN" identity issue --ca "$work/ca" --spiffe-id "$CLIENT_ID" --out "$work/a" >/dev/null || exit 1
"$AMAZING_BIN" identity issue --ca "$work/ca" --spiffe-id "$SERVER_ID" --out "$work/b" >/dev/null || exit 1
chmod -R a+rX "$work"   # the Envoys run as uid 1337
echo "$B_IP $SERVER_ID" > "$work/peers"

ip netns add "$A" && ip netns add "$B" || exit 1
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B" || exit 1
for ns_ip in "$A $A_IP" "$B $B_IP"; do
  set -- $ns_ip
  ip -n "$1" addr add "$2/30" dev eth0 && ip -n "$1" link set eth0 up && ip -n "$1" link set lo up || exit 1
done
in_a "$AMAZING_BIN" init >/dev/null || exit 1
in_b "$AMAZING_BIN" init --inbound-ports 18080 --no-outbound >/dev/null || exit 1

ip netns exec "$B" taskset -c 1 nginx -c "$root/bench/peerbench/upstream-nginx.conf" & nginx=$!; pids+=($nginx)
wait_port "$B" 127.0.0.1 18080 || exit 1

# --- one pair under wrk -------------------------------------------------------------------------------
printf "%-6s %9s %8s %8s %9s %9s %10s %10s %9s %9s  %s\n" pair req/s p50_ms p99_ms cliCPU_s srvCPU_s cliPeak_MB srvPeak_MB req/CPU-s 1c_p50_ms errors
declare -A RPS P50 PERCPU MEM
# measure NAME URL CLIENT_PID SERVER_PID
measure() {
  local name=$1 url=$2 cpid=$3 spid=$4
  in_a taskset -c 0 setpriv --reuid 1000 --regid 1000 --clear-groups wrk -t1 -c"$conns" -d1s "$url" >/dev/null 2>&1 # warm-up
  local c0 s0 c1 s1 out
  c0=$(cpu_ticks "$cpid"); s0=$(cpu_ticks "$spid")
  out=$(in_a taskset -c 0 setpriv --reuid 1000 --regid 1000 --clear-groups wrk -t1 -c"$conns" -d"${dur}s" --latency "$url" 2>&1)
  c1=$(cpu_ticks "$cpid"); s1=$(cpu_ticks "$spid")
  [ -n "${MEM_DETAIL:-}" ] && for p in "$cpid" "$spid"; do
    echo "$name pid $p after the load: $(grep -E '^(VmHWM|RssAnon|RssFile)' "/proc/$p/status" | tr -s ' \t\n' ' ')" >&2
  done
  # Unloaded latency: one connection, one request at a time (at $conns connections the p50 is
  # mostly queueing, conns / throughput).
  local one; one=$(in_a taskset -c 0 setpriv --reuid 1000 --regid 1000 --clear-groups wrk -t1 -c1 -d"${dur}s" --latency "$url" 2>&1)
  [ -n "${RAW_DIR:-}" ] && printf '%s\n' "$out" > "$RAW_DIR/wrk-$name.txt" && printf '%s\n' "$one" > "$RAW_DIR/wrk-$name-1c.txt"
  local rps reqs p50 p99 ccpu scpu per errs
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  reqs=$(awk '/requests in/{print $1}' <<<"$out")
  p50=$(ms "$(awk '$1=="50%"{print $2}' <<<"$out")"); p99=$(ms "$(awk '$1=="99%"{print $2}' <<<"$out")")
  ccpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.2f", (b-a)/100}')
  scpu=$(awk -v a="$s0" -v b="$s1" 'BEGIN{printf "%.2f", (b-a)/100}')
  per=$(awk -v r="$reqs" -v c="$ccpu" -v s="$scpu" 'BEGIN{ if (c+s>0) printf "%.0f", r/(c+s); else print "?" }')
  errs=$(awk '/Non-2xx/{n=$NF} /Socket errors/{s=$0} END{printf "non2xx=%s %s", (n==""?0:n), s}' <<<"$out")
  local p50one; p50one=$(ms "$(awk '$1=="50%"{print $2}' <<<"$one")")
  RPS[$name]=$rps; P50[$name]=$p50one; PERCPU[$name]=$per
  MEM[$name]=$(awk -v a="$(hwm_mb "$cpid")" -v b="$(hwm_mb "$spid")" 'BEGIN{printf "%.1f", a+b}')
  printf "%-6s %9s %8s %8s %9s %9s %10s %10s %9s %9s  %s\n" "$name" "$rps" "$p50" "$p99" "$ccpu" "$scpu" "$(hwm_mb "$cpid")" "$(hwm_mb "$spid")" "$per" "$p50one" "$errs"
}

# our pair: client side in A on CPU 0, server side in B on CPU 1. $1: extra flags of A, $2: of B.
ours() {
  local name=$1 a_flags=$2 b_flags=$3
  local common="run --workers 1 --access-log off --drain-delay 0s --app 127.0.0.1:18080"
  ip netns exec "$A" taskset -c 0 "$AMAZING_BIN" $common $a_flags >"$work/$name-a.log" 2>&1 & local pa=$!; pids+=($pa)
  ip netns exec "$B" taskset -c 1 "$AMAZING_BIN" $common $b_flags >"$work/$name-b.log" 2>&1 & local pb=$!; pids+=($pb)
  if wait_http "$A" http://127.0.0.1:15000/ready && wait_http "$B" http://127.0.0.1:15000/ready; then
    measure "$name" "http://$B_IP:18080/get?query=param" "$pa" "$pb"
  else tail -3 "$work/$name-a.log" "$work/$name-b.log" >&2; fi
  stop "$pa" "$pb"
}

for t in $only; do
  case $t in
    plain) ours plain "" "" ;;
    mtls)
      ours mtls "--identity-dir $work/a --outbound-mtls strict --inbound-mtls off --peer-identities $work/peers" \
                "--identity-dir $work/b --inbound-mtls permissive" ;;
    envoy)
      ip netns exec "$A" taskset -c 0 setpriv --reuid 1337 --regid 1337 --clear-groups "$ENVOY" -c "$here/mtls/envoy-client.yaml" \
        --concurrency 1 --disable-hot-restart -l error >"$work/envoy-a.log" 2>&1 & pa=$!; pids+=($pa)
      ip netns exec "$B" taskset -c 1 setpriv --reuid 1337 --regid 1337 --clear-groups "$ENVOY" -c "$here/mtls/envoy-server.yaml" \
        --concurrency 1 --disable-hot-restart -l error >"$work/envoy-b.log" 2>&1 & pb=$!; pids+=($pb)
      if wait_port "$A" 127.0.0.1 15101 && wait_port "$B" "$B_IP" 15108; then
        measure envoy "http://127.0.0.1:15101/get?query=param" "$pa" "$pb"
      else tail -3 "$work/envoy-a.log" "$work/envoy-b.log" >&2; fi
      stop "$pa" "$pb" ;;
  esac
done

# --- ratios (same run) ------------------------------------------------------------------------------
if [ -n "${PERCPU[mtls]:-}" ] && [ -n "${PERCPU[envoy]:-}" ]; then
  awk -v o="${PERCPU[mtls]}" -v e="${PERCPU[envoy]}" -v om="${MEM[mtls]}" -v em="${MEM[envoy]}" \
    'BEGIN{printf "mtls/envoy: %.2fx requests per CPU-second (target >= 2), peak RSS %.2fx (target < 0.2)\n", o/e, om/em}'
fi
if [ -n "${P50[mtls]:-}" ] && [ -n "${P50[plain]:-}" ]; then
  awk -v m="${P50[mtls]}" -v p="${P50[plain]}" 'BEGIN{printf "p50 at one connection, mtls - plain: %.3f ms (target < 0.1)\n", m-p}'
fi

# --- handshakes: full mutual-TLS handshakes against each server side, server on CPU 1 --------------
hs() { # NAME PORT SERVER_PID
  local name=$1 port=$2 spid=$3 s0 s1 res
  s0=$(cpu_ticks "$spid")
  res=$(in_a timeout $((dur + 20)) taskset -c 0 "$PYTHON" "$here/mtls/handshakes.py" \
    "$B_IP" "$port" "$work/a/tls.crt" "$work/a/tls.key" "$work/a/ca.crt" "$dur" "${HS_PROCS:-2}")
  s1=$(cpu_ticks "$spid")
  [ -n "$res" ] || { echo "$name: the handshake client printed nothing" >&2; return 1; }
  set -- $res
  awk -v n="$1" -v e="$2" -v t="$3" -v a="$s0" -v b="$s1" -v name="$name" 'BEGIN{
    c=(b-a)/100; printf "%-6s %8.0f %8s %9.2f %14s\n", name, n/t, e, c, (c>0 ? sprintf("%.0f", n/c) : "?") }'
}
case " $only " in *" handshakes "*)
  printf "\n%-6s %8s %8s %9s %14s\n" server hs/s errors srvCPU_s hs/srvCPU-s
  ip netns exec "$B" taskset -c 1 "$AMAZING_BIN" run --workers 1 --access-log off --drain-delay 0s --app 127.0.0.1:18080 \
    --identity-dir "$work/b" >"$work/hs-b.log" 2>&1 & pb=$!; pids+=($pb)
  wait_http "$B" http://127.0.0.1:15000/ready && hs ours 15008 "$pb"
  stop "$pb"
  ip netns exec "$B" taskset -c 1 setpriv --reuid 1337 --regid 1337 --clear-groups "$ENVOY" -c "$here/mtls/envoy-server.yaml" \
    --concurrency 1 --disable-hot-restart -l error >"$work/hs-envoy.log" 2>&1 & pb=$!; pids+=($pb)
  wait_port "$B" "$B_IP" 15108 && hs envoy 15108 "$pb"
  stop "$pb" ;;
esac

# --- one bulk stream: iperf3 (client in A as the app, server in B on the app's port) -----------------
# Last, as iperf3 takes nginx's place on the app port. Throughput of one opaque stream through the
# plaintext pair (spliced) and the HBONE pair (copied through TLS and HTTP/2), each proxy's peak RSS.
# CPU 0 (the sender and A's proxy) and CPU 1 (B's proxy and the receiver), busy % over the stream:
# the core at 100 % bounds it. Over veth the receiving side's TCP runs on the sender's core.
cores_ticks() { awk '/^cpu[01] /{printf "%s %s ", $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
cores_busy() { awk -v a="$1" -v b="$2" 'BEGIN{split(a, x, " "); split(b, y, " ")
  for (c = 0; c < 2; c++) { t = y[2 * c + 2] - x[2 * c + 2]; printf "%9.1f ", (t > 0) ? 100 * (1 - (y[2 * c + 1] - x[2 * c + 1]) / t) : 0 } }'; }
bulk() { # NAME A_FLAGS B_FLAGS
  local name=$1 a_flags=$2 b_flags=$3 common="run --workers 1 --access-log off --drain-delay 0s --app 127.0.0.1:18080"
  ip netns exec "$B" taskset -c 1 iperf3 -s -p 18080 >/dev/null 2>&1 & local ps=$!; pids+=($ps)
  ip netns exec "$A" taskset -c 0 "$AMAZING_BIN" $common $a_flags >"$work/bulk-$name-a.log" 2>&1 & local pa=$!; pids+=($pa)
  ip netns exec "$B" taskset -c 1 "$AMAZING_BIN" $common $b_flags >"$work/bulk-$name-b.log" 2>&1 & local pb=$!; pids+=($pb)
  if wait_http "$A" http://127.0.0.1:15000/ready && wait_http "$B" http://127.0.0.1:15000/ready && sleep 0.3; then
    local out gbit before
    before=$(cores_ticks)
    out=$(in_a taskset -c 0 setpriv --reuid 1000 --regid 1000 --clear-groups timeout $((dur + 10)) iperf3 -c "$B_IP" -p 18080 -t "$dur" -f g 2>&1)
    gbit=$(awk '/receiver/{print $(NF-2)}' <<<"$out")
    local row; row=$(printf "%-6s %10s %10s %10s %s" "$name" "${gbit:-?}" "$(hwm_mb "$pa")" "$(hwm_mb "$pb")" "$(cores_busy "$before" "$(cores_ticks)")")
    echo "$row"; echo "$row" >>"$work/bulk.rows"
    [ -n "$gbit" ] || echo "$out" | tail -3 >&2
  else tail -3 "$work/bulk-$name-a.log" "$work/bulk-$name-b.log" >&2; fi
  stop "$pa" "$pb" "$ps"
}
# The most any software TLS (rustls or the kernel's, without a NIC to offload to) can give the HBONE
# stream against the plaintext one here. Each side seals or opens every byte on top of the work the
# plaintext pair does per byte, so on the busier core c: ratio <= 1 / (busy_c + plain_rate / seal_rate),
# seal_rate being one core's AES-256-GCM (the suite our client offers first), from bench/aead-rate.
bulk_ceiling() {
  local seal
  seal=$(cd "$here/aead-rate" && cargo build --release --locked -q 2>/dev/null && ip netns exec "$A" taskset -c 0 target/release/aead-rate | awk '$1 == "AES_256_GCM" {print $2}')
  [ -n "$seal" ] || { echo "bench/aead-rate did not build or run: no ceiling" >&2; return; }
  awk -v seal="$seal" '$1 == "plain" { gbit = $2; busy = ($5 > $6 ? $5 : $6) / 100 } $1 == "mtls" { got = $2 }
    END { if (gbit > 0 && got > 0) { c = 1 / (busy + gbit / 8 / seal)
      printf "AES-256-GCM seals %.2f GB/s per core; mtls/plain %.2f; ceiling of any software TLS here %.2f\n", seal, got / gbit, c } }' "$work/bulk.rows"
}
case " $only " in *" bulk "*)
  stop "$nginx"   # iperf3's server takes the app's port
  printf "\n%-6s %10s %10s %10s %9s %9s\n" bulk Gbit/s cliPeak_MB srvPeak_MB cpu0% cpu1%
  bulk plain "" ""
  bulk mtls "--identity-dir $work/a --outbound-mtls strict --inbound-mtls off --peer-identities $work/peers" \
            "--identity-dir $work/b --inbound-mtls permissive"
  bulk_ceiling ;;
esac

