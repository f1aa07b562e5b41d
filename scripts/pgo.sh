#!/usr/bin/env bash
# Builds the release binary with profile-guided optimisation (PGO) and prints its path, the same
# path as scripts/release.sh (which it runs twice):
#   1. an instrumented build (-Cprofile-generate), in $CARGO_TARGET_DIR/pgo/generate;
#   2. training: the benchmarks' loads through that binary, every path a request takes often:
#      bench/peerbench/ab.sh (HTTP/1.1, h2c and gRPC unary on the inbound side) and bench/mtls.sh
#      (a sidecar pair in plaintext and in HBONE: outbound and inbound, TLS on both sides, one
#      bulk stream each); each proxy writes its counts when it exits;
#   3. llvm-profdata merges them, and the script checks that every path above has counts;
#   4. the release build again, with -Cprofile-use and the linker keeping LLVM's .text.hot and
#      .text.unlikely apart (-z keep-text-section-prefix).
#
# Why (docs/benchmarks.md, "2026-12-07"): LLVM lays out and inlines the code the training ran as
# hot, and optimises what it never ran for size, far from the rest. Against the plain release build,
# on one machine: h2c and gRPC unary 1.19x and 1.17x the requests per second, HTTP/1.1 level (the
# kernel's share there is four fifths), and an idle proxy 1.1 MB smaller (the code it touches at
# start fits in fewer pages). A path the training never runs is optimised for size: a new hot path
# belongs in the training (step 2) and in the check (step 3).
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

echo "pgo: 4/4 the optimised build" >&2
CARGO="$cargo" RELEASE_RUSTFLAGS="-Cprofile-use=$work/merged.profdata -Clink-arg=-Wl,-z,keep-text-section-prefix" \
  "$root/scripts/release.sh"
