#!/usr/bin/env bash
# Checks the unit files in systemd/ with `systemd-analyze verify`. The units run the
# binaries from /usr/local/bin, which verify insists exist; rather than install anything,
# verify copies whose ExecStart points at this checkout's build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v systemd-analyze > /dev/null; then
  echo "systemd-analyze is missing: install the systemd package" >&2
  exit 1
fi
cargo build --locked --quiet -p tessera-server -p tessera-agent
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in systemd/*.service; do
  sed "s#/usr/local/bin/#$root/target/debug/#g" "$unit" > "$tmp/$(basename "$unit")"
done
systemd-analyze verify "$tmp"/*.service
echo "systemd units verified: $(cd systemd && echo *.service)"
