#!/usr/bin/env bash
# run.sh N times (amazing-proxy and nginx, interleaved within each run) and the medians of the
# per-run ratios: on a shared machine one run's p99 is mostly the neighbours' noise, so a claim
# about the tail needs several runs and their median.
# Usage: repeat.sh [RUNS] [DURATION_S] [CONNECTIONS]   (default 5 runs of 8 s at 50 connections)
#   Other variables as for run.sh (AMAZING_BIN, AMAZING_CMD...); ONLY defaults to "amazing nginx".
set -u
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-5}; dur=${2:-8}; conns=${3:-50}
export ONLY=${ONLY:-amazing nginx}
rows=$(mktemp); trap 'rm -f "$rows"' EXIT
for i in $(seq "$runs"); do
  "$here/run.sh" "$dur" "$conns" | awk -v run="$i" '$1=="amazing" || $1=="nginx" {print run, $0}' | tee -a "$rows"
done
# Per run: amazing / nginx for req/s, p99, requests per CPU-second and idle RSS; then the median of
# each ratio. When wrk's core is saturated (gen_core% near 100) req/s is bounded by the load, not
# the proxy, and requests per CPU-second is the ratio that tells the proxies apart.
awk '
  { rps[$1, $2] = $3; p99[$1, $2] = $6; idle[$1, $2] = $7; cpu[$1, $2] = $9; gen[$1, $2] = $10; seen[$1] = 1 }
  END {
    n = 0
    for (r in seen) if (rps[r, "amazing"] > 0 && rps[r, "nginx"] > 0) {
      n++; a[n] = rps[r, "amazing"] / rps[r, "nginx"]; b[n] = p99[r, "amazing"] / p99[r, "nginx"]
      c[n] = idle[r, "amazing"]; g[n] = gen[r, "amazing"]
      d[n] = (cpu[r, "amazing"] > 0 && cpu[r, "nginx"] > 0) ? (rps[r, "amazing"] / cpu[r, "amazing"]) / (rps[r, "nginx"] / cpu[r, "nginx"]) : 0
    }
    if (n == 0) { print "no run had both amazing and nginx" > "/dev/stderr"; exit 1 }
    printf "%d runs: median req/s vs nginx %.2fx, median p99 vs nginx %.2fx, median idle RSS %.1f MB\n",
      n, median(a, n), median(b, n), median(c, n)
    printf "        median req per CPU-second vs nginx %.2fx; wrk and upstream core busy %.1f %% (median, amazing runs)\n",
      median(d, n), median(g, n)
  }
  function median(v, n,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }' "$rows"
