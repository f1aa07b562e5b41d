#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time: scripts/fuzz.sh [SECONDS_PER_TARGET]
# (default 12: about a minute for the six targets, plus the first build of fuzz/, a few minutes).
# `scripts/fuzz.sh --build-only` installs cargo-fuzz and builds the targets, then stops.
#
# cargo-fuzz needs nightly-only rustc flags (-Z sanitizer, sancov); the toolchain here is stable,
# so RUSTC_BOOTSTRAP=1 lets stable accept them. No sanitizer (-s none): the crate forbids unsafe,
# and this keeps builds and runs fast. The committed corpus (fuzz/corpus/<target>/) is read as
# seeds; new inputs go to a temporary directory, so a run leaves the tree clean. A crash stops
# with a non-zero status and leaves its input in fuzz/artifacts/<target>/: fix the bug and add
# the input to fuzz/corpus/<target>/.
set -euo pipefail
seconds=${1:-12}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo fuzz build -s none
[ "$seconds" = "--build-only" ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "$work/$target"
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run -s none "$target" "$work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 |
    grep -E '^(Done|stat::number_of_executed_units|==|thread|assertion|  left|  right|SUMMARY|artifact_prefix|Test unit written)' || true
  # grep hides the exit status of the run; a crash leaves an artifact.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz: $target crashed, inputs in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
echo "fuzz: every target ran ${seconds}s without a crash"
