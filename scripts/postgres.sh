#!/usr/bin/env bash
# A throwaway PostgreSQL server for the test suite.
#
#   scripts/postgres.sh start   installs Debian's postgresql if its binaries are missing,
#                               creates a cluster and starts it unless it already runs;
#                               prints the connection URL of its superuser on stdout
#                               (postgres://postgres:<password>@127.0.0.1:<port>/postgres).
#   scripts/postgres.sh stop    stops it.
#
# TESSERA_PG_DIR (default ${TMPDIR:-/tmp}/tessera-postgres-<uid>) and TESSERA_PG_PORT
# (default 54329) choose where. Tests create one database per test in it. The server
# listens on 127.0.0.1 only; TCP connections need the superuser's password, generated
# when the cluster is created and kept in <dir>/password (mode 0600); connections on
# its Unix socket (in <dir>, mode 0700) are trusted. Nothing here is for production.
set -euo pipefail

dir=${TESSERA_PG_DIR:-${TMPDIR:-/tmp}/tessera-postgres-$(id -u)}
port=${TESSERA_PG_PORT:-54329}
password_file="$dir/password"

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

# Refuses a cluster directory that someone else could have prepared (it may sit in a
# shared /tmp, and start() deletes a half-made cluster in it): a symbolic link, or a
# directory owned by anyone but us or the postgres user.
check_dir() {
  if [ -L "$dir" ]; then
    log "refusing $dir: it is a symbolic link (set TESSERA_PG_DIR to a directory of your own)"
    exit 1
  fi
  if [ ! -e "$dir" ]; then
    return 0
  fi
  if [ ! -d "$dir" ]; then
    log "refusing $dir: it is not a directory"
    exit 1
  fi
  local owner postgres_uid
  owner=$(stat -c %u -- "$dir")
  postgres_uid=$(id -u postgres 2> /dev/null || echo none)
  if [ "$owner" != "$(id -u)" ] && [ "$owner" != "$postgres_uid" ]; then
    log "refusing $dir: it belongs to uid $owner, neither us nor postgres (set TESSERA_PG_DIR to a directory of your own)"
    exit 1
  fi
}

# Creates the cluster in $dir: a random superuser password in $password_file, and
# password authentication (SCRAM) for every TCP connection.
create_cluster() {
  local bin=$1
  if [ ! -d "$dir" ]; then
    # Not `mkdir -p`: fails if someone created it since check_dir looked.
    mkdir -m 700 -- "$dir" || { log "cannot create $dir"; exit 1; }
  fi
  check_dir
  chmod 700 -- "$dir"
  # A cluster that initdb left half-made; $dir is ours and not a link (checked).
  rm -rf -- "$dir/data"
  mkdir -m 700 -- "$dir/data"
  (
    umask 077
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$password_file"
    echo >> "$password_file"
  )
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres: -- "$dir"; fi
  as_owner "$bin/initdb" -D "$dir/data" --username=postgres --pwfile="$password_file" \
    --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --no-sync > "$dir/initdb.log" 2>&1 \
    || { log "initdb failed: $(tail -n 5 "$dir/initdb.log")"; return 1; }
}

start() {
  check_dir
  install_server
  local bin password
  bin=$(bindir)
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    create_cluster "$bin"
  fi
  password=$(head -n 1 "$password_file" 2> /dev/null || true)
  if [ -z "$password" ]; then
    log "$dir holds a cluster without $password_file (made by an older postgres.sh, with trust authentication): stop it (TESSERA_PG_DIR=$dir $0 stop) and remove $dir"
    return 1
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
      echo "postgres://postgres:${password}@127.0.0.1:${port}/postgres"
      return 0
    fi
    sleep 0.1
  done
  log "the server does not accept connections on 127.0.0.1:$port"
  return 1
}

stop() {
  check_dir
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
