#!/usr/bin/env bash
# Every test: installs what they need (scripts/deps.sh --tests), then lint and the whole suite.
# The end-to-end pod tests build network namespaces and need root; elsewhere they say they skip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/deps.sh --tests
export AMAZING_PROXY_TEST_VENV="$root/target/venv"
export PATH="$AMAZING_PROXY_TEST_VENV/bin:$PATH"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads 4
