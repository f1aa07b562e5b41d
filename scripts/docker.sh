#!/usr/bin/env bash
# A Docker daemon for the image build, the containers demo and their test, that leaves the host's
# packet filter alone.
#
# Sourced (`. scripts/docker.sh; docker_up; trap docker_down EXIT`), or run as
# `scripts/docker.sh hold`: brings the daemon up, prints `DOCKER_HOST=...` and keeps it until its
# stdin closes (what the Rust test uses, so that the daemon goes away even when the test panics).
#
# A daemon that already answers (DOCKER_HOST or the default socket) is used as it is. Otherwise
# this starts Debian's dockerd with:
# - no default bridge (docker0 would outlive the daemon; builds use the host's network, pods a
#   network of their own), and every network's addresses carved from 198.19.0.0/16;
# - --iptables=false, --ip6tables=false, --ip-forward=false: Docker then neither adds nat rules nor
#   sets the FORWARD policy to DROP nor turns on forwarding, which the network-namespace tests that
#   route through the host rely on. Containers still reach and are reached from the host over their
#   bridge (a directly connected subnet); they have no way out, and need none;
# - its data under $CARGO_TARGET_DIR (or target/)/docker, and its sockets and pid file under
#   /run/amazing-proxy-docker (short paths: unix sockets are limited to 108 bytes).
# Several users share one such daemon; each holds a shared lock, and whoever leaves last stops it.

docker_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
docker_run_dir=/run/amazing-proxy-docker
docker_data_dir="${CARGO_TARGET_DIR:-$docker_root/target}/docker"
case "$docker_data_dir" in /*) ;; *) docker_data_dir="$PWD/$docker_data_dir" ;; esac
docker_started_pid=""

docker_answers() { timeout 10 docker info >/dev/null 2>&1; }

# Starts (or finds) the daemon and exports DOCKER_HOST when it is ours. Returns non-zero, with the
# reason on stderr, when Docker cannot be installed or started.
docker_up() {
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    "$docker_root/scripts/deps.sh" --containers >&2 || return 1
  fi
  mkdir -p "$docker_run_dir"
  # fd 8: a shared lock for as long as this shell uses the daemon.
  exec 8>"$docker_run_dir/users.lock"
  flock -s 8
  if docker_answers; then
    return 0 # someone's own daemon (DOCKER_HOST or the default socket)
  fi
  export DOCKER_HOST="unix://$docker_run_dir/docker.sock"
  # Serialise the start: two users arriving together must not start two daemons.
  exec 7>"$docker_run_dir/start.lock"
  flock -x 7
  if ! docker_answers; then
    mkdir -p "$docker_data_dir"
    echo "docker: starting dockerd (data in $docker_data_dir, log in $docker_run_dir/dockerd.log)" >&2
    dockerd \
      --host "$DOCKER_HOST" \
      --data-root "$docker_data_dir" \
      --exec-root "$docker_run_dir/exec" \
      --pidfile "$docker_run_dir/dockerd.pid" \
      --bridge=none \
      --default-address-pool base=198.19.0.0/16,size=24 \
      --iptables=false --ip6tables=false --ip-forward=false \
      --userland-proxy=false \
      >"$docker_run_dir/dockerd.log" 2>&1 7>&- 8>&- &
    docker_started_pid=$!
    local i
    for i in $(seq 120); do
      docker_answers && break
      if ! kill -0 "$docker_started_pid" 2>/dev/null; then break; fi
      sleep 0.5
    done
    if ! docker_answers; then
      echo "docker: dockerd did not start; its log ($docker_run_dir/dockerd.log):" >&2
      tail -n 30 "$docker_run_dir/dockerd.log" >&2
      flock -u 7
      docker_down
      return 1
    fi
  fi
  flock -u 7
}

# Leaves the daemon; stops it when it is the project's and nobody else uses it.
docker_down() {
  exec 8>&-
  [ "${DOCKER_HOST:-}" = "unix://$docker_run_dir/docker.sock" ] || return 0
  exec 7>"$docker_run_dir/start.lock"
  flock -x 7
  if flock -xn "$docker_run_dir/users.lock" true; then
    local pid
    pid=$(cat "$docker_run_dir/dockerd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      echo "docker: stopping dockerd (pid $pid)" >&2
      kill "$pid"
      local i
      for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
  fi
  exec 7>&-
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    hold)
      docker_up || exit 1
      trap docker_down EXIT
      echo "DOCKER_HOST=${DOCKER_HOST:-}"
      # Until stdin closes.
      cat >/dev/null
      ;;
    *) echo "usage: scripts/docker.sh hold (or source it)" >&2; exit 2 ;;
  esac
fi
