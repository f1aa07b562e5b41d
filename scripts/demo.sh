#!/usr/bin/env bash
# The main job: reproduces a Kubernetes pod on this machine and sends the tutorial's requests
# through amazing-proxy. The pod is a network namespace joined to the host by a veth pair
# (198.18.0.1 host side, 198.18.0.2 pod side), with httpbin (gunicorn) on port 80, the proxy on
# 8000 and `amazing-proxy init`'s redirect rules inside. Everything is removed on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "$(id -u)" -ne 0 ]; then exec sudo -E "$0" "$@"; fi

scripts/deps.sh
cargo build --release --locked --quiet
bin="$root/target/release/amazing-proxy"
ns="ap-demo-pod-$$"; host_if="apdemo$$"; pod_ip=198.18.0.2
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Whatever else still runs in the pod (gunicorn's workers) would keep the namespace alive.
  ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$host_if" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
in_pod() { ip netns exec "$ns" "$@"; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "demo: $1 never answered" >&2; return 1; }

echo "== the pod: network namespace $ns, eth0 $pod_ip/30"
ip netns add "$ns"
ip link add "$host_if" type veth peer name eth0 netns "$ns"
ip addr add 198.18.0.1/30 dev "$host_if"; ip link set "$host_if" up
in_pod ip addr add "$pod_ip/30" dev eth0
in_pod ip link set eth0 up; in_pod ip link set lo up

echo "== the app: httpbin under gunicorn on :80"
# `ip netns exec` directly (not through in_pod) so that $! is the process itself.
ip netns exec "$ns" "$root/target/venv/bin/gunicorn" -b 0.0.0.0:80 httpbin:app >"$work/app.log" 2>&1 & pids+=($!)
echo "== the sidecar: amazing-proxy run --access-log seed (inbound :8000, admin 127.0.0.1:15000)"
ip netns exec "$ns" "$bin" run --access-log seed --drain-delay 0s >"$work/access.log" 2>"$work/proxy.log" & pids+=($!)
in_pod bash -c "$(declare -f wait_http); wait_http http://127.0.0.1:80/get && wait_http http://127.0.0.1:15000/ready"
echo "== the init container: amazing-proxy init"
in_pod "$bin" init
echo

show() { echo "\$ curl $*"; curl -s -i "$@" | sed -e 's/\r$//'; echo; }
show "http://$pod_ip/get?query=param"
show -X POST -d body=parameters "http://$pod_ip/post"
show "http://$pod_ip/status/429"

sleep 0.3  # the access log is flushed every 100 ms
echo "== the proxy's access log"
cat "$work/access.log"
