#!/usr/bin/env bash
# Builds tessera and runs a complete local deployment in the foreground, as the invoking
# user: a server with SQLite, a join token generated and used, an attested agent, and an
# entry giving the invoking user's uid the ID spiffe://example.org/local/uid-<uid>.
# Everything lives under ./.tessera-local (or $TESSERA_LOCAL_DIR); Ctrl-C stops both.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${TESSERA_LOCAL_DIR:-$root/.tessera-local}
port=${TESSERA_LOCAL_PORT:-18081}
td=example.org
uid=$(id -u)

cd "$root"
cargo build --locked --quiet -p tessera-server -p tessera-agent
server_bin=$root/target/debug/tessera-server
agent_bin=$root/target/debug/tessera-agent

mkdir -p "$dir"
chmod 700 "$dir"
cat > "$dir/server.toml" <<TOML
[server]
trust_domain = "$td"
bind_address = "127.0.0.1:$port"
data_dir = "$dir/server-data"
admin_socket_path = "$dir/admin/admin.sock"
log_level = "info"
TOML
cat > "$dir/agent.toml" <<TOML
[agent]
trust_domain = "$td"
server_address = "127.0.0.1:$port"
socket_path = "$dir/workload/agent.sock"
data_dir = "$dir/agent-data"
trust_bundle_path = "$dir/bootstrap.pem"
log_level = "info"
TOML

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

admin=(--socket "$dir/admin/admin.sock")
"$server_bin" run -c "$dir/server.toml" 2> "$dir/server.log" &
pids+=($!)
for _ in $(seq 100); do
  "$server_bin" healthcheck "${admin[@]}" > /dev/null 2>&1 && break
  sleep 0.1
done
"$server_bin" healthcheck "${admin[@]}" > /dev/null || { cat "$dir/server.log"; exit 1; }

"$server_bin" bundle show "${admin[@]}" > "$dir/bootstrap.pem"
node_alias="spiffe://$td/local/node"
token=$("$server_bin" token generate --spiffe-id "$node_alias" "${admin[@]}")
if ! "$server_bin" entry list --output json "${admin[@]}" | grep -q "\"unix:uid:$uid\""; then
  "$server_bin" entry create --parent-id "$node_alias" --spiffe-id "spiffe://$td/local/uid-$uid" \
    --selector "unix:uid:$uid" "${admin[@]}" > /dev/null
fi

# A restarted agent reuses its stored SVID and still carries the alias; a fresh one
# attests with the token.
"$agent_bin" run -c "$dir/agent.toml" --join-token "$token" 2> "$dir/agent.log" &
pids+=($!)
socket=$dir/workload/agent.sock
for _ in $(seq 100); do
  "$agent_bin" healthcheck --socket "$socket" > /dev/null 2>&1 && break
  sleep 0.1
done
"$agent_bin" healthcheck --socket "$socket" > /dev/null || { cat "$dir/agent.log"; exit 1; }

cat <<TXT
tessera is running (server log: $dir/server.log, agent log: $dir/agent.log).
Workload API socket: $socket
From another shell:
  export SPIFFE_ENDPOINT_SOCKET=unix://$socket
  $agent_bin api fetch x509
Press Ctrl-C to stop.
TXT
wait -n "${pids[@]}"
