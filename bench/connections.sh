#!/usr/bin/env bash
# Connection churn: pgbench -C (a new connection for every transaction, `-S -M simple`, 4
# clients) directly, through pgbouncer and through Airlock, in one run. Prints connections per
# second, the ratio to direct, and each proxy's CPU per connection (from /proc). What it
# measures is everything a new session costs: the client's login, the proxy's login to the
# target, its first catalog lookups and the session's events.
#
#   bench/connections.sh [SECONDS_PER_RUN]      (default 10; needs a release build)
#
# Reads MASKING, RECORDING, UPSTREAM, WORKERS and BIN like bench/pgbench.sh. ROUNDS=N (default
# 3) runs all three ways N times, rotating which goes first, and prints the median ratio.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/pg_env.sh"
run() { # port user password pid  (prints "tps proxy-ms-per-connection")
    local port=$1 user=$2 pass=$3 pid=$4 before after out tps tx
    before=$([ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
    out=$(PGPASSWORD="$pass" "$PGBIN/pgbench" -n -C -c 4 -j 2 -T "$SECS" -S -M simple -h 127.0.0.1 -p "$port" -U "$user" bench 2>&1) || { echo "0 -"; return; }
    after=$([ "$pid" = - ] && echo 0 || cpu_ticks "$pid")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    if [ "$pid" = - ] || [ -z "$tx" ] || [ "$tx" = 0 ]; then echo "${tps:-0} -"; return; fi
    echo "$tps $(awk -v t=$((after - before)) -v hz="$HZ" -v n="$tx" 'BEGIN { printf "%.2f", t / hz * 1e3 / n }')"
}
ROUNDS="${ROUNDS:-3}"
median() { tr ' ' '\n' | grep -v '^-*$' | sort -g | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0) ? a / b : 0 }'; }
D=() B=() A=() BR=() AR=() BC=() AC=()
for r in $(seq "$ROUNDS"); do
    ways=(direct bouncer airlock)
    for i in 0 1 2; do
        case "${ways[$(( (i + r - 1) % 3 ))]}" in
            direct) read -r d _ < <(run "$PG_PORT" airlock_svc "$PW" -) ;;
            bouncer) read -r b bc < <(run "$PGB_PORT" airlock_svc "$PW" "$PGB_PID") ;;
            airlock) read -r a ac < <(run "$PROXY_PORT" agent "$KEY" "$PROXY_PID") ;;
        esac
    done
    D+=("$d"); B+=("$b"); A+=("$a"); BC+=("$bc"); AC+=("$ac")
    BR+=("$(ratio "$b" "$d")"); AR+=("$(ratio "$a" "$d")")
    printf '  round %s: direct %.0f, pgbouncer %.0f (%s), airlock %.0f (%s)\n' "$r" "$d" "$b" "${BR[-1]}" "$a" "${AR[-1]}" >&2
done
printf '%-12s %8s | %9s %5s %8s | %8s %5s %8s\n' "" direct pgbouncer ratio "ms/conn" airlock ratio "ms/conn"
printf '%-12s %8.0f | %9.0f %5.2f %8s | %8.0f %5.2f %8s\n' "connections/s" \
    "$(echo "${D[*]}" | median)" "$(echo "${B[*]}" | median)" "$(echo "${BR[*]}" | median)" "$(echo "${BC[*]}" | median)" \
    "$(echo "${A[*]}" | median)" "$(echo "${AR[*]}" | median)" "$(echo "${AC[*]}" | median)"
