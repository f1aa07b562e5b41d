#!/usr/bin/env bash
# Reliability under attack and accident (issue 10), amazing-proxy beside nginx as a proxy (and
# Envoy), in one run on loopback. Every proxy gets one worker pinned to CPU 1; the nginx app and
# the load clients (bench/reliability/load.py, Python asyncio; wrk for the drain) share CPU 0.
#
# Usage: bench/reliability.sh [SCENARIO...]   scenarios: slowloris idle race recover drain (default: all)
#   N_SLOW (2000) slowloris sockets, SLOW_AT ("35 65") when to count them (seconds),
#   N_IDLE (10000) idle clients, IDLE_HOLD (65) seconds they then stay idle, IDLE_H2=1: they speak
#   HTTP/2 (h2c; ours only: PROXIES=amazing, the peers' configurations here serve HTTP/1.1), RACE (5000) requests in the race,
#   PROXIES ("amazing nginx envoy") which proxies, AMAZING_BIN (scripts/release.sh --print-path).
# Needs: nginx, wrk, python3 (bench/peerbench/setup.sh installs them, and Envoy into /tmp/peers).
# Prints a table at the end; the raw JSON of each measurement is in /tmp/reliability/results.jsonl.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
AMAZING_BIN=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
ENVOY=${ENVOY:-$(command -v envoy 2>/dev/null || echo /tmp/peers/bin/envoy)}
N_SLOW=${N_SLOW:-2000}; N_IDLE=${N_IDLE:-10000}; RACE=${RACE:-5000}
PROXIES=${PROXIES:-amazing nginx envoy}
scenarios=${*:-slowloris idle race recover drain}
load="python3 $here/reliability/load.py"
work=/tmp/reliability; mkdir -p "$work"; rm -f "$work"/*.log "$work/results.jsonl"
results=$work/results.jsonl

# Ports: the nginx app, the closing app, and one per proxy (admin ports beside).
APP=28080; CLOSE_APP=28081; OURS=28000; OURS_ADMIN=28500; ENVOY_PORT=28001; ENVOY_ADMIN=28901; NGINX=28002

# 10,000 idle clients need more descriptors than the usual 1024, on both ends.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "descriptor limit: $(ulimit -n)" >&2
[ -x "$AMAZING_BIN" ] || { echo "no binary at $AMAZING_BIN: run scripts/release.sh" >&2; exit 1; }
for tool in nginx wrk python3 taskset; do
  command -v $tool >/dev/null || { echo "$tool is missing: run bench/peerbench/setup.sh" >&2; exit 1; }
done
if [[ " $PROXIES " == *" envoy "* ]] && [ ! -x "$ENVOY" ]; then
  echo "no Envoy at $ENVOY (bench/peerbench/setup.sh installs it): leaving it out" >&2
  PROXIES=${PROXIES//envoy/}
fi

pids=()
# kill_tree PID: the process and its children (nginx's worker), by id, reaped quietly.
kill_tree() { [ -n "$1" ] || return 0; local c; for c in $(pgrep -P "$1"); do kill -9 "$c" 2>/dev/null; done; { kill -9 "$1"; wait "$1"; } 2>/dev/null; }
cleanup() { for p in "${pids[@]}"; do kill_tree "$p"; done; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
record() { # scenario proxy variant json
  python3 -c 'import json,sys; d=json.loads(sys.argv[4]); d.update(scenario=sys.argv[1], proxy=sys.argv[2], variant=sys.argv[3]); print(json.dumps(d))' "$@" >>"$results"
  echo "$1 $2 $3: $4" >&2
}

# ---- the apps ---------------------------------------------------------------------------------
# nginx as the app: a fixed 200, one process (so killing it is a crash). $1: keepalive_timeout.
app_conf() {
  cat >"$work/app.conf" <<EOF
worker_processes 1; master_process off; daemon off;
pid $work/app.pid; error_log $work/app-error.log warn;
events { worker_connections 20000; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout ${1:-75s};
  server { listen 127.0.0.1:$APP backlog=4096; location / { return 200 "ok\n"; } }
}
EOF
}
APP_PID=""
start_app() { app_conf "${1:-}"; taskset -c 0 nginx -c "$work/app.conf" & APP_PID=$!; pids+=("$APP_PID"); wait_port $APP; }
stop_app() { kill_tree "$APP_PID"; }

# ---- the proxies --------------------------------------------------------------------------------
# start_proxy NAME APP_PORT [extra args for amazing-proxy | nginx worker_connections]
# sets PORT, PID (the process that serves: nginx's worker) and ADMIN (ours only).
start_proxy() {
  local name=$1 app=$2; shift 2
  ADMIN=""
  case $name in
    amazing)
      taskset -c 1 "$AMAZING_BIN" run --inbound 127.0.0.1:$OURS --admin 127.0.0.1:$OURS_ADMIN \
        --app 127.0.0.1:$app --outbound off --proxy-mark 0 --workers 1 "$@" \
        >"$work/amazing-out.log" 2>>"$work/amazing-err.log" &
      PID=$!; PORT=$OURS; ADMIN=127.0.0.1:$OURS_ADMIN ;;
    nginx)
      local connections=30000; [[ ${1:-} =~ ^[0-9]+$ ]] && connections=$1
      # client_header_timeout and keepalive_timeout as our --header-timeout and --idle-timeout.
      cat >"$work/nginx.conf" <<EOF
worker_processes 1; daemon off; worker_rlimit_nofile 65536;
pid $work/nginx.pid; error_log $work/nginx-error.log warn;
events { worker_connections $connections; }
http {
  access_log off; keepalive_requests 1000000; client_header_timeout 30s; keepalive_timeout 60s;
  upstream app { server 127.0.0.1:$app; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX backlog=4096;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
      taskset -c 1 nginx -c "$work/nginx.conf" & PID=$!; PORT=$NGINX ;;
    envoy)
      sed -e "s/port_value: 19901/port_value: $ENVOY_ADMIN/" -e "s/port_value: 18001/port_value: $ENVOY_PORT/" \
          -e "s/port_value: 18080/port_value: $app/" -e "s#/tmp/peerbench/envoy-access.log#/dev/null#" \
          "$here/peerbench/proxy-envoy.yaml" >"$work/envoy.yaml"
      taskset -c 1 "$ENVOY" -c "$work/envoy.yaml" --concurrency 1 -l error --drain-time-s 5 \
        >"$work/envoy-err.log" 2>&1 &
      PID=$!; PORT=$ENVOY_PORT ;;
  esac
  MASTER=$PID; pids+=("$PID")
  wait_port "$PORT" || return 1
  sleep 0.5
  [ "$name" = nginx ] && PID=$(pgrep -P "$MASTER" | head -1)
  # one request first, so that what is measured is the steady state
  $load race 127.0.0.1:$PORT --requests 1 --connections 1 >/dev/null
}
stop_proxy() { kill_tree "$MASTER"; }

# ---- (a) slowloris ------------------------------------------------------------------------------
slowloris() {
  start_app
  for p in $PROXIES; do
    case $p in
      amazing) variants=("default:" "max-connections 500:--max-connections 500") ;;
      nginx) variants=("worker_connections 30000:30000" "worker_connections 500:500") ;;
      envoy) variants=("defaults:") ;;
    esac
    for v in "${variants[@]}"; do
      start_proxy "$p" $APP ${v#*:} || continue
      record slowloris "$p" "${v%%:*}" "$(taskset -c 0 $load slowloris 127.0.0.1:$PORT --n "$N_SLOW" --every 3 --at ${SLOW_AT:-35 65})"
      stop_proxy
    done
  done
  stop_app
}

# ---- (b) idle clients ---------------------------------------------------------------------------
idle() {
  start_app
  for p in $PROXIES; do
    start_proxy "$p" $APP || continue
    local admin=(); [ -n "$ADMIN" ] && admin=(--admin "$ADMIN")
    local h2=(); [ -n "${IDLE_H2:-}" ] && h2=(--h2)
    record idle "$p" "$N_IDLE clients${IDLE_H2:+ (HTTP/2)}" "$(taskset -c 0 $load idle 127.0.0.1:$PORT --n "$N_IDLE" --pid "$PID" --app-port $APP --hold "${IDLE_HOLD:-65}" "${admin[@]}" "${h2[@]}")"
    stop_proxy
  done
  stop_app
}

# ---- (c) the keep-alive race ----------------------------------------------------------------------
race() {
  for app in "nginx keepalive_timeout 1ms" "closes after every response"; do
    if [[ $app == nginx* ]]; then start_app 1ms; port=$APP
    else taskset -c 0 $load close-app $CLOSE_APP & APP_PID=$!; pids+=("$APP_PID"); wait_port $CLOSE_APP; port=$CLOSE_APP; fi
    for p in $PROXIES; do
      start_proxy "$p" "$port" || continue
      record race "$p" "$app" "$(taskset -c 0 $load race 127.0.0.1:$PORT --requests "$RACE" --connections 4)"
      stop_proxy
    done
    stop_app
  done
}

# ---- (d) recovery after an app restart ------------------------------------------------------------
recover() {
  for p in $PROXIES; do
    start_app
    start_proxy "$p" $APP || continue
    out=$(taskset -c 0 $load recover 127.0.0.1:$PORT --app 127.0.0.1:$APP --app-pid "$APP_PID" --down 1 \
      --restart "taskset -c 0 nginx -c $work/app.conf")
    { wait "$APP_PID"; } 2>/dev/null  # the crashed app, reaped quietly
    APP_PID=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["app_pid"])' "$out") || continue
    pids+=("$APP_PID")
    record recover "$p" "app killed, back after 1 s" "$out"
    stop_proxy; stop_app
  done
}

# ---- (e) drain under load -------------------------------------------------------------------------
# wrk (50 connections, 6 s) runs; 1 s in, the drain starts: SIGTERM for us (--drain-delay 10s, so
# the whole load falls inside the delay), SIGQUIT for nginx (its graceful stop), POST
# /drain_listeners?graceful for Envoy. Errors: wrk's socket errors plus non-2xx answers.
drain() {
  start_app
  for p in $PROXIES; do
    start_proxy "$p" $APP --drain-delay 10s || continue
    taskset -c 0 wrk -t1 -c50 -d6s "http://127.0.0.1:$PORT/" >"$work/wrk-drain-$p.txt" 2>&1 & wrk=$!
    sleep 1
    local t0; t0=$(date +%s.%N)
    case $p in
      amazing) kill -TERM "$MASTER" ;;
      nginx) kill -QUIT "$MASTER" ;;
      envoy) curl -s -X POST "http://127.0.0.1:$ENVOY_ADMIN/drain_listeners?graceful" >/dev/null ;;
    esac
    wait "$wrk"
    local code="-" secs="-"
    if [ "$p" != envoy ]; then
      for _ in $(seq 300); do kill -0 "$MASTER" 2>/dev/null || break; sleep 0.1; done
      wait "$MASTER" 2>/dev/null; code=$?
      secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    fi
    record drain "$p" "wrk -c50 -d6s, drain at 1 s" "$(python3 - "$work/wrk-drain-$p.txt" "$code" "$secs" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
errors = dict(zip(["connect", "read", "write", "timeout"], map(int, socket.groups()))) if socket else {}
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
requests = re.search(r"(\d+) requests in", text)
print(json.dumps({"requests": int(requests.group(1)) if requests else 0,
                  "errors": sum(errors.values()) + (int(non2xx.group(1)) if non2xx else 0),
                  "socket_errors": errors, "exit_code": sys.argv[2], "exit_after_s": sys.argv[3]}))
EOF
)"
    stop_proxy
  done
  stop_app
}

for s in $scenarios; do
  echo "== $s" >&2
  $s
done

# ---- the table ------------------------------------------------------------------------------------
python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def fmt(r):
    s = r["scenario"]
    if s == "slowloris":
        n = r["normal"]
        ok = n.get("200", 0)
        return (f"normal client {ok}/{sum(n.values())} 200 ({', '.join(f'{k}: {v}' for k, v in n.items() if k != '200') or 'nothing else'}); "
                f"slowloris open: {r['opened']} at start, " + ", ".join(f"{v} at {k}" for k, v in r["still_open"].items()))
    if s == "idle":
        return (f"{r['bytes_per_idle']} B and {r['fds_per_idle']} fd per idle client, {r['app_connections']} app connections held "
                f"({r['connected']}/{r['clients']} connected, {r['kept_by_proxy']} kept open by the proxy, "
                f"first request failed: {r['first_request_failed'] or 0}); new requests {r['new_requests']}"
                + (f"; /metrics {r['admin_metrics']}" if r["admin_metrics"] else "")
                + (f"; {r['still_open_after_hold']} still open after {r['hold_s']:g} s idle" if r["hold_s"] else ""))
    if s == "race":
        return f"{r['errors']} errors in {r['requests']} ({r['statuses']})"
    if s == "recover":
        return (f"first 200 {r['first_200_ms']} ms after the app's port opened; while down {r['while_down']}; "
                f"{r['before_first_200']} failed after the restart")
    if s == "drain":
        return (f"{r['errors']} errors in {r['requests']} requests ({r['socket_errors']})"
                + (f"; exit {r['exit_code']} after {r['exit_after_s']} s" if r["exit_code"] != "-" else ""))
print(f"{'scenario':<10} {'proxy':<8} {'variant':<30} result")
for r in rows:
    print(f"{r['scenario']:<10} {r['proxy']:<8} {r['variant']:<30} {fmt(r)}")
EOF
