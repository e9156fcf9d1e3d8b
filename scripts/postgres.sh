#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suite.
#
#   scripts/postgres.sh start   installs Debian's postgresql if its binaries are missing,
#                               creates a cluster (trust authentication, loopback only)
#                               and starts it unless it already runs; prints the
#                               connection URL of its superuser on stdout.
#   scripts/postgres.sh stop    stops it.
#
# TESSERA_PG_DIR (default /tmp/tessera-postgres) and TESSERA_PG_PORT (default 54329)
# choose where. Tests create one database per test in it. Nothing here is for
# production: the cluster trusts every local connection.
set -euo pipefail

dir=${TESSERA_PG_DIR:-/tmp/tessera-postgres}
port=${TESSERA_PG_PORT:-54329}
url="postgres://postgres@127.0.0.1:${port}/postgres"

log() { echo "postgres.sh: $*" >&2; }

bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
    fi
  done | sort -V | tail -n 1
}

install_server() {
  if [ -n "$(bindir)" ]; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null; then
    log "PostgreSQL server binaries are missing and cannot be installed here (need root and apt-get)"
    return 1
  fi
  log "installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's maintainer scripts would start a cluster of their own: policy-rc.d says no.
  local policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created_policy=1
  fi
  local ok=0
  apt-get install -y -q postgresql > /dev/null 2>&1 \
    || { apt-get update -q > /dev/null 2>&1 && apt-get install -y -q postgresql > /dev/null 2>&1; } \
    || ok=1
  if [ -n "$created_policy" ]; then rm -f "$policy"; fi
  if [ "$ok" -ne 0 ] || [ -z "$(bindir)" ]; then
    log "apt-get install postgresql failed"
    return 1
  fi
}

# Runs a PostgreSQL program as the cluster's owner: `postgres` when we are root
# (the server refuses to run as root), else ourselves.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

start() {
  install_server
  local bin
  bin=$(bindir)
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    rm -rf "$dir"
    mkdir -p "$dir/data"
    if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$dir"; fi
    chmod 700 "$dir/data"
    as_owner "$bin/initdb" -D "$dir/data" --auth=trust --username=postgres \
      --encoding=UTF8 --no-sync > "$dir/initdb.log" 2>&1 \
      || { log "initdb failed: $(tail -n 5 "$dir/initdb.log")"; return 1; }
  fi
  if ! as_owner "$bin/pg_ctl" -D "$dir/data" status > /dev/null 2>&1; then
    # Tests open many short-lived databases: fsync off and more connections than
    # the default. Sockets in the cluster's own directory, TCP on loopback only.
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off \
          -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
      > /dev/null \
      || { log "the server did not start: $(tail -n 5 "$dir/server.log")"; return 1; }
  fi
  local i
  for i in $(seq 1 100); do
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
      echo "$url"
      return 0
    fi
    sleep 0.1
  done
  log "the server does not accept connections on 127.0.0.1:$port"
  return 1
}

stop() {
  local bin
  bin=$(bindir)
  if [ -n "$bin" ] && [ -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop > /dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
