# Sourced by bench/pgbench.sh and bench/ab.sh: starts PostgreSQL (pgbench scale 10), pgbouncer
# (transaction pooling), nats-server, an Airlock policy store with the bench policy, and an
# Airlock proxy, all on loopback; everything is stopped and removed on exit. Reads MASKING,
# RECORDING, WORKERS and UPSTREAM (see bench/pgbench.sh), BIN (default target/release/airlock) and the
# caller's $1 (seconds per run, default 10). Sets PG_PORT, PGB_PORT, PGB_PID, PROXY_PORT,
# PROXY_PID, NATS_PID, KEY, PW, PGBIN, WORK, HZ and cpu_ticks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECS="${1:-10}"
BIN="${BIN:-$(pwd)/target/release/airlock}"
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
PGBIN="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
WORK="$(mktemp -d /tmp/airlock-bench.XXXXXX)"
chmod 777 "$WORK"
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

PG_PORT=$(free_port); PGB_PORT=$(free_port); PROXY_PORT=$(free_port); STORE_PORT=$(free_port); NATS_PORT=$(free_port)
PW=bench-Pa55
echo "$PW" > "$WORK/pw"; chmod 644 "$WORK/pw"
as_pg "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=scram-sha-256 --pwfile="$WORK/pw" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $WORK -c max_connections=100" -w -l "$WORK/pg.log" start >/dev/null
export PGPASSWORD="$PW"
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "CREATE ROLE airlock_svc LOGIN PASSWORD '$PW'" -c "CREATE DATABASE bench OWNER airlock_svc"
"$PGBIN/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$PG_PORT" -U airlock_svc bench >/dev/null 2>&1

# How both proxies reach PostgreSQL: loopback TCP, or with UPSTREAM=socket its Unix-domain socket
# in $WORK (the same for pgbouncer and Airlock, so the comparison stays fair).
case "${UPSTREAM:-tcp}" in
    tcp) UP_HOST=127.0.0.1 ;;
    socket) UP_HOST="$WORK" ;;
    *) echo "UPSTREAM must be tcp or socket" >&2; exit 1 ;;
esac

# pgbouncer, transaction pooling (as in the issue's table).
cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=$UP_HOST port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 100
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo "\"airlock_svc\" \"$PW\"" > "$WORK/userlist.txt"
chmod 644 "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
as_pg "$PGBOUNCER" -d "$WORK/pgbouncer.ini"
sleep 1
PGB_PID="$(cat "$WORK/pgbouncer.pid")"; PIDS+=("$PGB_PID")

# NATS + Airlock (policy store and proxy as separate processes).
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" >"$WORK/nats.log" 2>&1 & NATS_PID=$!; PIDS+=($NATS_PID)
KEY="ak_bench_$(date +%s%N)"
HASH="$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)"
cat > "$WORK/airlock.toml" <<TOML
[nats]
url = "nats://127.0.0.1:$NATS_PORT"
[policy_store]
listen = "127.0.0.1:$STORE_PORT"
data_dir = "$WORK/store"
admin_token = "bench-admin-$KEY"
read_token = "bench-read-$KEY"
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
policy_store = ["http://127.0.0.1:$STORE_PORT"]
policy_store_token = "bench-read-$KEY"
target_password_dir = "$WORK"
[log]
format = "json"
$([ -n "${WORKERS:-}" ] && printf '[runtime]\nworker_threads = %s\n' "$WORKERS")
TOML
{
  cat <<YAML
connections:
  - name: bench
    kind: postgres
    upstream: { host: "$UP_HOST", port: $PG_PORT, database: bench, tls: disable }
    credentials: { user: airlock_svc, password_file: $WORK/pw }
    require_recording: $([ "${RECORDING:-strict}" = best-effort ] && echo false || echo true)
rules:
YAML
  for i in $(seq 1 18); do
    printf '  - { name: hold-writes-%s, match: { operations: [delete, truncate], tables: [table_%s] }, action: hold, timeout: 1m }\n' "$i" "$i"
  done
  cat <<YAML
  - { name: no-ddl, match: { operations: [create, drop, alter, grant, revoke] }, action: deny }
  - { name: no-escalation, match: { operations: [escalate] }, action: deny }
service_accounts:
  - { name: bench, groups: [agents], api_key_sha256: $HASH }
YAML
  case "${MASKING:-0}" in
    1) cat <<YAML
masking:
  - columns: [pgbench_accounts.filler, pgbench_branches.filler]
    strategy: hash
  - detectors: [email, phone, credit_card, iban, ssn, ipv4, ipv6, jwt, api_key]
YAML
    ;;
    table) cat <<YAML
masking:
  - columns: [pgbench_accounts.filler]
    strategy: hash
YAML
    ;;
  esac
} > "$WORK/policy.yaml"
RUST_LOG=warn "$BIN" -c "$WORK/airlock.toml" policy-store >"$WORK/store.log" 2>&1 & PIDS+=($!)
sleep 1
for _ in $(seq 50); do "$BIN" -c "$WORK/airlock.toml" policy apply -f "$WORK/policy.yaml" >/dev/null 2>&1 && break; sleep 0.2; done
RUST_LOG=warn "$BIN" -c "$WORK/airlock.toml" proxy >"$WORK/proxy.log" 2>&1 & PROXY_PID=$!; PIDS+=($PROXY_PID)
sleep 1

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"
