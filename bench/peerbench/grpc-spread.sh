#!/usr/bin/env bash
# gRPC spread over three endpoints (issue 19): one HTTP/2 connection of gRPC-shaped calls (h2load,
# one connection, 100 streams at once: a gRPC channel) sent by "the app" through amazing-proxy's
# outbound route (routes-grpc.yaml: three static endpoints, round-robin), beside Envoy doing the
# same with its round_robin cluster (proxy-envoy-grpc.yaml). Each proxy has one worker pinned to
# CPU 1; the endpoints (one nginx, h2c) and h2load share CPU 0.
# It runs in a network namespace of its own (apbench-grpc, loopback only), where the app's
# connections to port 19090 are redirected to the outbound listener as `init` would; the namespace
# is removed on exit, whatever happens.
# Usage: grpc-spread.sh [DURATION_S] [STREAMS]    (root; bench/peerbench/setup.sh first)
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
dur=${1:-8}; streams=${2:-100}
ns=apbench-grpc
in_ns() { ip netns exec "$ns" "$@"; }
# Everything started in the namespace is killed by the namespace's list, whatever wrapped it.
cleanup() {
  ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null; sleep 0.5
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns del "$ns" 2>/dev/null
}
trap cleanup EXIT INT TERM
ip netns del "$ns" 2>/dev/null
ip netns add "$ns" && in_ns ip link set lo up || exit 1
mkdir -p /tmp/peerbench
wait_port() { for _ in $(seq 100); do in_ns bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

ip netns exec "$ns" taskset -c 0 nginx -c "$here/upstream-grpc-nginx.conf" >/dev/null 2>&1 &
wait_port 18181 && wait_port 18182 && wait_port 18183 || exit 1
# A 5-byte gRPC frame (an empty message) as each call's body.
printf '\0\0\0\0\0' > /tmp/peerbench/grpc-call.bin

# The app's connections to :19090 go to the outbound listener; the proxy's own (mark 1337) do not.
in_ns iptables -t nat -A OUTPUT -p tcp --dport 19090 -m mark ! --mark 1337 -j REDIRECT --to-ports 15001 || exit 1

call() { # name url
  local out
  out=$(in_ns taskset -c 0 h2load -D "$dur" -c 1 -m "$streams" -d /tmp/peerbench/grpc-call.bin \
    -H 'content-type: application/grpc' -H 'te: trailers' "$2" 2>&1)
  local rps ok
  rps=$(awk '/^finished in/{gsub(",","",$4); print $4}' <<<"$out")
  ok=$(awk '/^status codes:/{print $3}' <<<"$out")
  printf "%-9s %10s req/s  2xx=%s\n" "$1" "$rps" "$ok"
}

echo "one HTTP/2 connection, $streams streams, ${dur}s; three endpoints"
ip netns exec "$ns" taskset -c 1 "$AMAZING_BIN" run --inbound 127.0.0.1:18000 --outbound 127.0.0.1:15001 \
  --app 127.0.0.1:9 --admin 127.0.0.1:18500 --workers 1 --access-log json \
  --routes "$here/routes-grpc.yaml" >/tmp/peerbench/amazing-grpc-access.log 2>/tmp/peerbench/amazing-grpc-err.log & p=$!
wait_port 15001 || exit 1
call amazing http://127.0.0.1:19090/bench.Svc/Call
echo "  per endpoint: $(in_ns curl -s http://127.0.0.1:18500/metrics | awk -F'[ ,}]' '/^amazing_proxy_endpoint_requests_total/{for(i=1;i<=NF;i++) if ($i ~ /^endpoint=/) e=$i; printf "%s=%s ", e, $NF}')"
kill "$p" 2>/dev/null

ip netns exec "$ns" taskset -c 1 "$ENVOY" -c "$here/proxy-envoy-grpc.yaml" --concurrency 1 -l error >/tmp/peerbench/envoy-grpc-err.log 2>&1 & p=$!
wait_port 18001 || exit 1
call envoy http://127.0.0.1:18001/bench.Svc/Call
echo "  per endpoint: $(in_ns curl -s http://127.0.0.1:19901/clusters | awk -F'::' '$1=="spread" && $3=="rq_total"{printf "%s=%s ", $2, $4}')"
kill "$p" 2>/dev/null
