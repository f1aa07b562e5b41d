#!/usr/bin/env bash
# Every test: installs what they need (scripts/deps.sh --tests), then lint and the whole suite:
# the unit tests and three integration binaries (tests/in_process, tests/netns, tests/containers;
# docs/testing.md). The netns and containers suites need root (and Docker); elsewhere they skip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/deps.sh --tests
export AMAZING_PROXY_TEST_VENV="$root/target/venv"
export PATH="$AMAZING_PROXY_TEST_VENV/bin:$PATH"
cargo fmt --check
# The supply-chain checker and the fuzz targets are built in the background while clippy and the
# tests run: the tests spend most of their time waiting on sockets, which leaves the CPU free.
mkdir -p target
(scripts/deny.sh --install-only && scripts/fuzz.sh --build-only) >target/tools-build.log 2>&1 &
tools=$!
trap 'kill "$tools" 2>/dev/null || true' EXIT
cargo clippy --all-targets --locked -- -D warnings
# A test that cannot run here says why in this file (tests/support's `skip`); under CI none may.
export AMAZING_PROXY_TEST_SKIP_LOG="$root/target/skipped-tests.log"
mkdir -p "$root/target" && : >"$AMAZING_PROXY_TEST_SKIP_LOG"
status=0
cargo test --locked --no-fail-fast -- --test-threads 4 || status=$?
if wait "$tools"; then
  scripts/deny.sh || status=$?
  scripts/fuzz.sh 10 || status=$?
else
  echo "test: building cargo-deny or the fuzz targets failed:" >&2
  tail -n 30 target/tools-build.log >&2
  status=1
fi
skipped=$(wc -l <"$AMAZING_PROXY_TEST_SKIP_LOG")
if [ "$skipped" -gt 0 ]; then
  echo "test: $skipped test(s) skipped:" >&2
  sed 's/^/  /' "$AMAZING_PROXY_TEST_SKIP_LOG" >&2
  if [ -n "${CI:-}" ]; then
    echo "test: CI runs every test; fix the causes above" >&2
    status=1
  fi
else
  echo "test: no test skipped" >&2
fi
exit "$status"
