#!/usr/bin/env bash
# The main job: the tutorial's pod on this machine, and the tutorial's requests through amazing-proxy.
#
#   scripts/demo.sh               the pod as a network namespace joined to the host by a veth pair
#                                 (198.18.0.1 host side, 198.18.0.2 pod side), with httpbin
#                                 (gunicorn) on port 80, the proxy on 8000 and `amazing-proxy init`'s
#                                 redirect rules inside
#   scripts/demo.sh --containers  deploy/pod.yaml in Docker, as a kubelet would run it: the image
#                                 built by scripts/image.sh, a pause container, the init container,
#                                 the proxy as a native sidecar, httpbin (scripts/pod-docker.py)
#
# Needs root (network namespaces, Docker); run as another user, it builds first, then re-runs itself
# under sudo. Everything it creates is removed on exit; when something fails, the proxy's and the
# app's logs are printed and kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

containers=0; bin=""; args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --containers) containers=1; shift ;;
    --binary) bin=$2; shift 2 ;;
    *) echo "usage: scripts/demo.sh [--containers] [--binary PATH (instead of building)]" >&2; exit 2 ;;
  esac
done

# Prints a command as it is run (quoted so that it can be pasted), then runs it.
run() {
  local shown=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then shown+=("$arg"); else shown+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "\$ ${shown[*]}" >&2
  "$@"
}

# cargo: on PATH, else in ~/.cargo/bin (the user's own when run through sudo, whose PATH lacks it).
find_cargo() {
  local home dir
  command -v cargo && return 0
  home=$HOME; [ -n "${SUDO_USER:-}" ] && home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  for dir in "$home/.cargo/bin" "$HOME/.cargo/bin"; do
    [ -x "$dir/cargo" ] && { echo "$dir/cargo"; return 0; }
  done
  echo "demo: cargo not found on PATH nor in ~/.cargo/bin: install Rust (https://rustup.rs)" >&2
  return 1
}

# Builds the release binary (as the user who asked, when run through sudo) and prints its path.
build() {
  local cargo as_user=()
  cargo=$(find_cargo)
  [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && as_user=(sudo -u "$SUDO_USER" --preserve-env=CARGO_TARGET_DIR)
  echo "== building $("${as_user[@]}" env CARGO="$cargo" scripts/release.sh --print-path) (the first build takes a few minutes)" >&2
  run "${as_user[@]}" env CARGO="$cargo" scripts/release.sh
}

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "demo: needs root (network namespaces): run it as root" >&2; exit 1; }
  command -v python3 >/dev/null || scripts/deps.sh
  [ -n "$bin" ] || bin=$(build)
  exec sudo "$0" "${args[@]}" --binary "$bin"
fi

if [ $containers -eq 1 ]; then scripts/deps.sh --containers; else scripts/deps.sh; fi
[ -n "$bin" ] || bin=$(build)
[ -x "$bin" ] || { echo "demo: no binary at $bin" >&2; exit 1; }

work=$(mktemp -d /tmp/amazing-proxy-demo.XXXXXX)
failed() {
  echo "demo: FAILED (exit $1). The logs are kept in $work:" >&2
  local f
  for f in "$work"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 40 "$f" >&2; }; done
}
curl_i() { run curl -sS -i "$@"; echo; echo; }

if [ $containers -eq 1 ]; then
  . scripts/docker.sh
  pod="demo-$$"
  cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
      [ -n "${proxy:-}" ] && docker logs "$proxy" >"$work/proxy.log" 2>&1
      [ -n "${app:-}" ] && docker logs "$app" >"$work/app.log" 2>&1
      failed "$status"
    else
      rm -rf "$work"
    fi
    python3 scripts/pod-docker.py down --pod "$pod" >/dev/null 2>&1 || true
    docker_down
  }
  trap cleanup EXIT
  docker_up
  echo "== the images (scripts/image.sh)"
  scripts/image.sh --binary "$bin"
  echo "== the pod: deploy/pod.yaml, as a kubelet would run it"
  run python3 scripts/pod-docker.py up deploy/pod.yaml --pod "$pod" \
    --image kennethreitz/httpbin=amazing-proxy-local/httpbin >"$work/pod.json"
  pod_ip=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["ip"])' "$work/pod.json")
  proxy="$pod-amazing-proxy"; app="$pod-httpbin"
  echo "== the pod's address: $pod_ip"
  echo
  curl_i "http://$pod_ip/get?query=param"
  curl_i -X POST -d body=parameters "http://$pod_ip/post"
  curl_i "http://$pod_ip/status/429"
  echo "== the sidecar's log (kubectl logs httpbin --container=amazing-proxy)"
  run docker logs "$proxy" 2>/dev/null
  echo "== deleting the pod: SIGTERM to the sidecar, which drains and exits"
  run docker stop "$proxy" >/dev/null
  run docker inspect --format 'exit code {{.State.ExitCode}}' "$proxy"
  exit 0
fi

ns="ap-demo-pod-$$"; host_if="apdemo$$"; pod_ip=198.18.0.2
pids=()
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Whatever else still runs in the pod (gunicorn's workers) would keep the namespace alive.
  ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$host_if" 2>/dev/null || true
  if [ "$status" -ne 0 ]; then failed "$status"; else rm -rf "$work"; fi
}
trap cleanup EXIT
in_pod() { ip netns exec "$ns" "$@"; }
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done; echo "demo: $1 never answered" >&2; return 1; }

echo "== the pod: network namespace $ns, eth0 $pod_ip/30"
ip netns add "$ns"
ip link add "$host_if" type veth peer name eth0 netns "$ns"
ip addr add 198.18.0.1/30 dev "$host_if"; ip link set "$host_if" up
in_pod ip addr add "$pod_ip/30" dev eth0
in_pod ip link set eth0 up; in_pod ip link set lo up

echo "== the app: httpbin under gunicorn on :80 (log: $work/app.log)"
# `ip netns exec` directly (not through in_pod) so that $! is the process itself.
gunicorn="$root/target/venv/bin/gunicorn"; gunicorn_args=(-b 0.0.0.0:80 httpbin:app)
# gunicorn 23+ opens a control socket in $HOME unless told not to.
"$gunicorn" --help | grep -q -- --no-control-socket && gunicorn_args+=(--no-control-socket)
ip netns exec "$ns" "$gunicorn" "${gunicorn_args[@]}" >"$work/app.log" 2>&1 & pids+=($!)
echo "== the sidecar: amazing-proxy run --access-log seed (inbound :8000, admin 127.0.0.1:15000; log: $work/proxy.log)"
ip netns exec "$ns" "$bin" run --access-log seed --drain-delay 0s >"$work/access.log" 2>"$work/proxy.log" & pids+=($!)
in_pod bash -c "$(declare -f wait_http); wait_http http://127.0.0.1:80/get && wait_http http://127.0.0.1:15000/ready"
echo "== the init container: amazing-proxy init"
run ip netns exec "$ns" "$bin" init
echo

curl_i "http://$pod_ip/get?query=param"
curl_i -X POST -d body=parameters "http://$pod_ip/post"
curl_i "http://$pod_ip/status/429"

sleep 0.3  # the access log is flushed every 100 ms
echo "== the proxy's access log"
cat "$work/access.log"
