#!/usr/bin/env bash
# Runs the whole test suite: builds the binaries that the CLI scenarios execute, then
# every unit, plugin and scenario test with cargo-nextest (one process per test, so a
# hung scenario cannot stall the others). Extra arguments go to nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version > /dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast "$@"
