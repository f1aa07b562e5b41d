#!/usr/bin/env bash
# Supply chain (deny.toml): licences, duplicate versions, sources, and security advisories when the
# RustSec database can be fetched. cargo-deny is built from crates.io into target/tools the first
# time (about 6 minutes on 2 cores), so nothing is installed outside the repository.
# `--install-only` builds it and stops (scripts/test.sh does that while the tests run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=0.20.2
tools="$root/target/tools"
if ! "$tools/bin/cargo-deny" --version 2>/dev/null | grep -qx "cargo-deny $version"; then
  echo "deny: building cargo-deny $version into target/tools (once)" >&2
  cargo install --locked --quiet "cargo-deny@$version" --root "$tools"
fi
[ "${1:-}" = "--install-only" ] && exit 0
export PATH="$tools/bin:$PATH"
cargo deny --locked check licenses bans sources
echo
# The advisory database is a git repository on a host these machines cannot reach, and no crates.io,
# PyPI, Debian or npm package ships it: say so rather than pass in silence.
if out=$(timeout 120 cargo deny --locked check advisories 2>&1); then
  printf '%s\n' "$out" | tail -n 1
elif grep -q "failed to fetch advisory database" <<<"$out"; then
  echo "SKIP advisories: the RustSec advisory database cannot be fetched from here (only crates.io, PyPI, Debian and npm are reachable, and none ships it); run \`cargo deny check advisories\` where it can be" >&2
else
  printf '%s\n' "$out" >&2
  exit 1
fi
