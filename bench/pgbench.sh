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
# ROUNDS=N (default 3) runs each workload N times in all three ways, rotating which way goes
# first, and prints medians: the ratio is the median of the rounds' ratios (each against the
# direct run of its own round), with their range, so a busy spell of the machine moves one
# round, not the result.
ROUNDS="${ROUNDS:-3}"
median() { tr ' ' '\n' | grep -v '^-*$' | sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
range() { tr ' ' '\n' | grep -v '^-*$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {if (NR) printf "%.2f-%.2f", lo, hi; else print "-"}'; }
two() { awk '{ if ($1 == "-") print "-"; else printf "%.2f", $1 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0) ? a / b : 0 }'; }
printf '%-16s %8s | %8s %5s %11s %6s | %8s %5s %11s %6s %6s\n' workload direct pgbouncer ratio range "µs/tx" airlock ratio range "µs/tx" "nats"
for w in "-S -M simple" "-S -M extended" "-S -M prepared" "-M simple"; do
    name="$w"; [ "$w" = "-M simple" ] && name="TPC-B-like"
    D=() B=() A=() BR=() AR=() BC=() AC=() NC=()
    for r in $(seq "$ROUNDS"); do
        ways=(direct bouncer airlock)
        for i in $(seq 0 2); do
            case "${ways[$(( (i + r - 1) % 3 ))]}" in
                # shellcheck disable=SC2086
                direct) read -r d_tps _ _ _ < <(run "$PG_PORT" airlock_svc "$PW" - - $w) ;;
                # shellcheck disable=SC2086
                bouncer) read -r b_tps _ b_cpu _ < <(run "$PGB_PORT" airlock_svc "$PW" "$PGB_PID" - $w) ;;
                # shellcheck disable=SC2086
                airlock) read -r a_tps _ a_cpu n_cpu < <(run "$PROXY_PORT" agent "$KEY" "$PROXY_PID" "$NATS_PID" $w) ;;
            esac
        done
        D+=("$d_tps"); B+=("$b_tps"); A+=("$a_tps"); BC+=("$b_cpu"); AC+=("$a_cpu"); NC+=("$n_cpu")
        # pgbouncer's transaction pooling cannot run -M prepared: no ratio, not a zero one.
        BR+=("$([ "${b_tps%.*}" = 0 ] && echo - || ratio "$b_tps" "$d_tps")"); AR+=("$(ratio "$a_tps" "$d_tps")")
        [ "$ROUNDS" -gt 1 ] && printf '  round %s: direct %.0f, pgbouncer %.0f (%s), airlock %.0f (%s)\n' "$r" "$d_tps" "$b_tps" "${BR[-1]}" "$a_tps" "${AR[-1]}" >&2
    done
    printf '%-16s %8.0f | %8.0f %5s %11s %6s | %8.0f %5.2f %11s %6s %6s\n' "$name" \
        "$(echo "${D[*]}" | median)" "$(echo "${B[*]}" | median)" "$(echo "${BR[*]}" | median | two)" "$(echo "${BR[*]}" | range)" \
        "$(echo "${BC[*]}" | median)" "$(echo "${A[*]}" | median)" "$(echo "${AR[*]}" | median)" "$(echo "${AR[*]}" | range)" \
        "$(echo "${AC[*]}" | median)" "$(echo "${NC[*]}" | median)"
done
