#!/usr/bin/env bash
# Runs the whole test suite: builds the binaries that the CLI scenarios execute, then
# every unit, plugin and scenario test with cargo-nextest (one process per test, so a
# hung scenario cannot stall the others). Extra arguments go to nextest.
#
# The PostgreSQL tests run against a throwaway server that scripts/postgres.sh installs
# (Debian's package) and starts on loopback. When that fails the PostgreSQL tests are
# skipped, each saying so on stderr, and this script says so loudly at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version > /dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
postgres_missing=""
if [ -z "${TESSERA_TEST_POSTGRES:-}" ]; then
  if url=$(scripts/postgres.sh start); then
    export TESSERA_TEST_POSTGRES="$url"
  else
    postgres_missing=1
  fi
fi
if [ -z "$postgres_missing" ]; then
  # Every PostgreSQL test must run: one without a server fails instead of skipping.
  export TESSERA_REQUIRE_POSTGRES=1
else
  echo "!!! PostgreSQL could not be installed or started: the PostgreSQL tests will be SKIPPED" >&2
fi

cargo build --workspace --bins --locked
status=0
cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
if [ -n "$postgres_missing" ]; then
  echo "!!! The PostgreSQL tests were SKIPPED: scripts/postgres.sh start failed (see above)" >&2
fi
exit "$status"
