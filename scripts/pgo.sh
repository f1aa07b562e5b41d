#!/usr/bin/env bash
# Builds the release binary with profile-guided optimisation (PGO) and prints its path, the same
# path as scripts/release.sh (which it runs twice):
#   1. an instrumented build (-Cprofile-generate), in $CARGO_TARGET_DIR/pgo/generate;
#   2. training: the benchmarks' loads through that binary, every path a request takes often:
#      bench/peerbench/ab.sh (HTTP/1.1, h2c and gRPC unary on the inbound side) and bench/mtls.sh
#      (a sidecar pair in plaintext and in HBONE: outbound and inbound, TLS on both sides, one
#      bulk stream each); each proxy writes its counts when it exits; then one proxy started
#      alone (as bench/peerbench/run.sh starts it), probed once and stopped: what a start runs;
#   3. llvm-profdata merges the training's counts, and the script checks that every path above
#      has counts; the functions the start ran are listed (startup.order);
#   4. the release build again, with -Cprofile-use, the linker keeping LLVM's .text.hot and
#      .text.unlikely apart (-z keep-text-section-prefix), and the start's functions first in
#      each of them (lld's --symbol-ordering-file).
#
# Why (docs/benchmarks.md, "2026-12-07"): LLVM lays out and inlines the code the training ran as
# hot, and optimises what it never ran for size, far from the rest. Against the plain release build,
# on one machine: h2c and gRPC unary 1.19x and 1.17x the requests per second, HTTP/1.1 level (the
# kernel's share there is four fifths), and an idle proxy 1.1 MB smaller (the code it touches at
# start fits in fewer pages). A path the training never runs is optimised for size: a new hot path
# belongs in the training (step 2) and in the check (step 3). The start's functions run once per
# start, so LLVM counts many of them cold and scatters them among code that never runs; the kernel
# maps 64 KiB around every page a process touches, so an idle proxy's RSS is mostly those pages.
# Listed first, they share fewer: 5.2 MB idle against 6.5 (docs/benchmarks.md, "2026-12-07 (later)").
#
# Usage (root: bench/mtls.sh makes network namespaces): scripts/pgo.sh
# Needs bench/peerbench/setup.sh's tools, iperf3, and llvm-profdata of rustc's LLVM major version
# (Debian: `apt-get install llvm-22` for rustc 1.95). Takes two release builds and about 3 minutes
# of training.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cargo=${CARGO:-cargo}
rustc=${RUSTC:-rustc}
[ "$(id -u)" = 0 ] || { echo "pgo: run as root: the training (bench/mtls.sh) makes network namespaces" >&2; exit 1; }
major=$("$rustc" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$major" ] || { echo "pgo: $rustc -vV printed no LLVM version" >&2; exit 1; }
profdata=
for candidate in "llvm-profdata-$major" llvm-profdata; do
  if command -v "$candidate" >/dev/null && "$candidate" --version | grep -q "LLVM version $major\."; then
    profdata=$candidate
    break
  fi
done
[ -n "$profdata" ] || { echo "pgo: no llvm-profdata of LLVM $major (rustc's own): apt-get install llvm-$major" >&2; exit 1; }
for tool in wrk h2load nginx iperf3 curl taskset; do
  command -v "$tool" >/dev/null || { echo "pgo: $tool is missing: bench/peerbench/setup.sh, and apt-get install iperf3" >&2; exit 1; }
done

target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
work="$target/pgo"
profiles="$work/profiles"
rm -rf "$profiles" && mkdir -p "$profiles"

echo "pgo: 1/4 the instrumented build" >&2
generate=$(CARGO="$cargo" CARGO_TARGET_DIR="$work/generate" RELEASE_RUSTFLAGS="-Cprofile-generate=$profiles" "$root/scripts/release.sh")

echo "pgo: 2/4 training" >&2
for load in http1 h2c grpc; do
  AB_LOAD=$load "$root/bench/peerbench/ab.sh" 1 "$generate" "" "$generate" "" >&2
done
AMAZING_BIN="$generate" ONLY="plain mtls bulk" "$root/bench/mtls.sh" 4 50 >&2
start="$work/start"
rm -rf "$start" && mkdir -p "$start"
LLVM_PROFILE_FILE="$start/%p.profraw" "$generate" run --inbound 127.0.0.1:18000 --app 127.0.0.1:18080 \
  --admin 127.0.0.1:18500 --outbound off --workers 1 --access-log json --drain-delay 0s >/dev/null 2>&1 &
alone=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18000) 2>/dev/null && break; sleep 0.1; done
sleep 0.5
kill "$alone" && wait "$alone" || { echo "pgo: the proxy started alone did not run and exit cleanly" >&2; exit 1; }

echo "pgo: 3/4 merging the counts" >&2
shopt -s nullglob
raw=("$profiles"/*.profraw)
[ ${#raw[@]} -gt 0 ] || { echo "pgo: the training left no counts in $profiles: did the proxies exit by themselves?" >&2; exit 1; }
"$profdata" merge -o "$work/merged.profdata" "${raw[@]}"
# Each path named in the header must have run: a module of it with a function that counted.
for module in 5proxy5http1 10hyper_path 5hbone7inbound 5hbone8outbound 3tcp4copy; do
  counted=$("$profdata" show --counts --function="$module" "$work/merged.profdata" | grep -cE 'Block counts: \[[^]]*[1-9]' || true)
  [ "$counted" -gt 0 ] || { echo "pgo: the training never ran $module: the profile would make it slow; see step 2" >&2; exit 1; }
done

# Every function with a count in the start's profile, by its symbol (the profile prefixes a local
# function's name with its object's, up to a ';').
"$profdata" merge -o "$start/start.profdata" "$start"/*.profraw
"$profdata" show --all-functions --counts "$start/start.profdata" |
  awk '/^  [^ ].*:$/ { name = substr($0, 3, length($0) - 3); sub(/^.*;/, "", name); next }
       /Block counts:/ && /[1-9]/ { print name }' >"$work/startup.order"
[ -s "$work/startup.order" ] || { echo "pgo: the start's profile names no function" >&2; exit 1; }

echo "pgo: 4/4 the optimised build" >&2
# Symbols of the list that the optimised build inlined away are skipped without a warning.
use="-Cprofile-use=$work/merged.profdata -Clink-arg=-Wl,-z,keep-text-section-prefix"
order="-Clink-arg=-Wl,--symbol-ordering-file=$work/startup.order -Clink-arg=-Wl,--no-warn-symbol-ordering"
CARGO="$cargo" RELEASE_RUSTFLAGS="$use $order" "$root/scripts/release.sh"
