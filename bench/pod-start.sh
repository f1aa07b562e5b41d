#!/usr/bin/env bash
# The cost of starting a sidecar (issue 20): from exec to `/ready` answering 200, with a workload
# identity (a development CA's, in the --identity-dir layout: the certificate is read, checked and
# its TLS configurations built before ready) and without. On loopback only; each start is polled
# by bash itself (no process per poll), so the resolution is well under a millisecond.
# Usage: bench/pod-start.sh [RUNS]   (default 20; the release binary of scripts/release.sh, or
#   AMAZING_BIN). Prints each run's milliseconds, then the median and the worst.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${AMAZING_BIN:-$("$root/scripts/release.sh" --print-path)}
runs=${1:-20}
[ -x "$bin" ] || { echo "pod-start: no binary at $bin (scripts/release.sh, or set AMAZING_BIN)" >&2; exit 1; }
work=$(mktemp -d); pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$bin" identity ca --out "$work/ca" >/dev/null 2>&1 &&
  "$bin" identity issue --ca "$work/ca" --spiffe-id spiffe://cluster.local/ns/default/sa/bench \
    --out "$work/id" >/dev/null 2>&1 || { echo "pod-start: identity issue failed" >&2; exit 1; }

ready() { # port: 0 once /ready answered 200
  { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
  printf 'GET /ready HTTP/1.0\r\n\r\n' >&3
  local line; read -r line <&3; exec 3<&-
  [[ $line == *" 200 "* ]]
}

measure() { # label, extra flags...
  local label=$1; shift
  local times=()
  for _ in $(seq "$runs"); do
    local t0=$EPOCHREALTIME
    "$bin" run --admin 127.0.0.1:18600 --inbound 127.0.0.1:18601 --outbound 127.0.0.1:18602 \
      --app 127.0.0.1:18603 --access-log off "$@" >/dev/null 2>&1 & pid=$!
    until ready 18600; do
      kill -0 "$pid" 2>/dev/null || { echo "pod-start: the proxy exited" >&2; exit 1; }
    done
    local t1=$EPOCHREALTIME
    times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)*1000}')")
    kill -KILL "$pid"; wait "$pid" 2>/dev/null; pid=""
  done
  printf '%s\n' "${times[@]}" | sort -n | awk -v l="$label" '{v[NR]=$1} END {printf "%-16s median %6.1f ms   worst %6.1f ms   (%d runs)\n", l, v[int((NR+1)/2)], v[NR], NR}'
}

measure "no identity"
measure "with identity" --identity-dir "$work/id" --hbone 127.0.0.1:18608
