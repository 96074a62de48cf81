#!/usr/bin/env bash
# pgbench through Airlock, against the same PostgreSQL directly and through pgbouncer (the peer
# baseline), in one run. Prints TPS, the ratio to direct, each proxy's CPU µs per transaction
# (from /proc), and for Airlock also nats-server's. Airlock runs split (policy store + proxy) with a 20-rule policy and every event
# published to a real NATS JetStream.
#
#   bench/pgbench.sh [SECONDS_PER_RUN]      (default 10; needs a release build: cargo build --release)
#
# MASKING=1 adds masking to the policy: a column of two tables masked by origin and every
# detector on every value (and on every statement and parameter recorded), to measure what inline
# masking costs. MASKING=table masks one table's column by origin only (the issue's "masking on
# one table"): every result is still planned against the column origins.
# RECORDING=best-effort sets `require_recording: false` on the connection: every event is still
# published, but sessions do not wait for JetStream's acknowledgement.
# UPSTREAM=socket makes both pgbouncer and Airlock reach PostgreSQL through its Unix-domain socket
# instead of loopback TCP (pgbench itself always connects over TCP).
# WORKERS=N sets the proxy's `runtime.worker_threads` (default: one per core).
# BIN=path runs another airlock binary.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/pg_env.sh"
run() { # target port user password pid other-pid workload-args...  (prints tps tx µs/tx other-µs/tx)
    local port=$1 user=$2 pass=$3 pid=$4 other=$5; shift 5
    local before after obefore oafter out tps tx
    before=$([ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
    obefore=$([ "$other" = - ] && echo 0 || cpu_ticks "$other")
    out=$(PGPASSWORD="$pass" "$PGBIN/pgbench" -n -c 8 -j 2 -T "$SECS" -h 127.0.0.1 -p "$port" -U "$user" "$@" bench 2>&1) || { echo "0 0 - -"; return; }
    after=$([ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
    oafter=$([ "$other" = - ] && echo 0 || cpu_ticks "$other")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    if [ "$pid" = - ] || [ -z "$tx" ] || [ "$tx" = 0 ]; then echo "${tps:-0} ${tx:-0} - -"; return; fi
    per_tx() { awk -v t="$1" -v hz="$HZ" -v n="$tx" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }'; }
    echo "$tps $tx $(per_tx $((after - before))) $([ "$other" = - ] && echo - || per_tx $((oafter - obefore)))"
}
printf '%-20s %10s | %10s %6s %9s | %10s %6s %9s %12s\n' workload direct pgbouncer ratio "µs/tx" airlock ratio "µs/tx" "nats µs/tx"
for w in "-S -M simple" "-S -M extended" "-S -M prepared" "-M simple"; do
    name="$w"; [ "$w" = "-M simple" ] && name="TPC-B-like"
    read -r d_tps _ _ _ < <(run "$PG_PORT" airlock_svc "$PW" - - $w)
    read -r b_tps _ b_cpu _ < <(run "$PGB_PORT" airlock_svc "$PW" "$PGB_PID" - $w)
    read -r a_tps _ a_cpu n_cpu < <(run "$PROXY_PORT" agent "$KEY" "$PROXY_PID" "$NATS_PID" $w)
    printf '%-20s %10.0f | %10.0f %6.2f %9s | %10.0f %6.2f %9s %12s\n' "$name" "$d_tps" "$b_tps" \
        "$(awk -v a="$b_tps" -v b="$d_tps" 'BEGIN{print (b>0)?a/b:0}')" "$b_cpu" "$a_tps" \
        "$(awk -v a="$a_tps" -v b="$d_tps" 'BEGIN{print (b>0)?a/b:0}')" "$a_cpu" "$n_cpu"
done
