#!/usr/bin/env bash
# Two Airlock builds side by side on one machine's noise: the same PostgreSQL, NATS and policy
# store (bench/pg_env.sh), one proxy from BASELINE and one from this tree's release build, and
# for each workload PAIRS (default 3) pairs of pgbench runs alternating between them. Prints
# TPS and each proxy's user and system CPU µs per transaction (from /proc). Runs alternate, so a
# busy spell hits both; compare within a pair, and swap the builds (BIN/BASELINE) to see how
# much going first matters.
#
#   BASELINE=/path/to/older/airlock bench/ab.sh [SECONDS_PER_RUN]
#
# MASKING, RECORDING and WORKERS as for bench/pgbench.sh; WORKLOADS is a comma-separated list
# of pgbench arguments (default: the four of bench/pgbench.sh).
set -euo pipefail
: "${BASELINE:?set BASELINE to the airlock binary to compare against}"
[ -x "$BASELINE" ] || { echo "BASELINE=$BASELINE is not an executable" >&2; exit 1; }
source "$(dirname "${BASH_SOURCE[0]}")/pg_env.sh"

BASE_PORT=$(free_port)
sed "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$BASE_PORT/" "$WORK/airlock.toml" > "$WORK/baseline.toml"
RUST_LOG=warn "$BASELINE" -c "$WORK/baseline.toml" proxy >"$WORK/baseline.log" 2>&1 & BASE_PID=$!; PIDS+=($BASE_PID)
sleep 1

bench_once() { # label port pid workload-args...
    local label=$1 port=$2 pid=$3; shift 3
    local u0 s0 u1 s1 out tx
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    out=$(PGPASSWORD="$KEY" "$PGBIN/pgbench" -n -c 8 -j 2 -T "$SECS" -h 127.0.0.1 -p "$port" -U agent "$@" bench 2>&1) \
        || { echo "$label: pgbench failed: $out" >&2; return 1; }
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v l="$label" -v tx="$tx" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v secs="$SECS" \
        'BEGIN { printf "  %-10s %9.0f tps   user %6.1f µs/tx   sys %6.1f µs/tx\n", l, tx / secs, u / hz * 1e6 / tx, s / hz * 1e6 / tx }'
}

IFS=, read -ra WLS <<<"${WORKLOADS:--S -M simple,-S -M extended,-S -M prepared,-M simple}"
for w in "${WLS[@]}"; do
    echo "== pgbench $w"
    # Warm both (connections, caches) before timing.
    # shellcheck disable=SC2086
    for port in "$BASE_PORT" "$PROXY_PORT"; do
        PGPASSWORD="$KEY" "$PGBIN/pgbench" -n -c 8 -j 2 -T 2 -h 127.0.0.1 -p "$port" -U agent $w bench >/dev/null 2>&1
    done
    for _ in $(seq "${PAIRS:-3}"); do
        # shellcheck disable=SC2086
        bench_once baseline "$BASE_PORT" "$BASE_PID" $w
        # shellcheck disable=SC2086
        bench_once "this build" "$PROXY_PORT" "$PROXY_PID" $w
    done
done
