#!/usr/bin/env bash
# What the proxy does per pgbench transaction, counted exactly by valgrind: heap allocations
# (dhat) or user-space instructions (callgrind). Counts, not time: the same build and workload
# give about the same figure on a busy machine, so a change too small for a TPS run to resolve
# still shows.
#
#   COUNT=allocs|instructions bench/counts.sh [WORKLOAD...]
#       (default COUNT=allocs; default workloads: the four of bench/pgbench.sh)
#
# For each workload the proxy runs under valgrind twice, for 50 and for 250 transactions per
# client (8 clients), and the script prints the difference per transaction, so connection setup
# and startup do not count. Reads MASKING, RECORDING, UPSTREAM and WORKERS like
# bench/pgbench.sh. The profiles are kept in the printed folder: open dhat's with valgrind's
# dh_view.html, callgrind's with `callgrind_annotate --inclusive=yes FILE` to see where the
# allocations or instructions go.
#
# allocs builds airlock with `--features system-allocator` into target/system-allocator (dhat
# sees only malloc, and mimalloc bypasses it); instructions counts the release build itself.
# AIRLOCK=path counts that binary instead, unbuilt (an older build, to compare; for allocs it
# must have been built with the system-allocator feature).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
COUNT="${COUNT:-allocs}"
case "$COUNT" in
    allocs)
        [ -n "${AIRLOCK:-}" ] || cargo build --release -p airlock --features system-allocator --target-dir target/system-allocator >&2
        REAL="${AIRLOCK:-$(pwd)/target/system-allocator/release/airlock}"
        TOOL=(--tool=dhat --dhat-out-file='$VG_OUT') ;;
    instructions)
        [ -n "${AIRLOCK:-}" ] || cargo build --release -p airlock >&2
        REAL="${AIRLOCK:-$(pwd)/target/release/airlock}"
        TOOL=(--tool=callgrind --callgrind-out-file='$VG_OUT') ;;
    *) echo "COUNT must be allocs or instructions" >&2; exit 1 ;;
esac
OUT="$(mktemp -d /tmp/airlock-counts.XXXXXX)"
# pg_env.sh runs "$BIN proxy" once; this wrapper puts the proxy (and only it) under valgrind.
cat > "$OUT/airlock" <<SH
#!/usr/bin/env bash
for a in "\$@"; do
    if [ "\$a" = proxy ]; then
        exec valgrind ${TOOL[*]} "$REAL" "\$@" 2>"\$VG_OUT.log"
    fi
done
exec "$REAL" "\$@"
SH
chmod +x "$OUT/airlock"
export VG_OUT="$OUT/startup.out"
BIN="$OUT/airlock"
source bench/pg_env.sh 1
# Under valgrind the proxy starts slowly: wait until it takes connections.
ready() { PGPASSWORD="$KEY" psql -X -q -h 127.0.0.1 -p "$PROXY_PORT" -U agent -c 'select 1' bench >/dev/null 2>&1; }
# SIGTERM: a background job of a script ignores SIGINT. valgrind writes its profile either way.
stop_proxy() { kill -TERM "$PROXY_PID" 2>/dev/null || true; while kill -0 "$PROXY_PID" 2>/dev/null; do sleep 0.2; done; }
restart_proxy() { # $1: profile file
    stop_proxy
    VG_OUT="$1" RUST_LOG=warn "$BIN" -c "$WORK/airlock.toml" proxy >"$WORK/proxy.log" 2>&1 &
    PROXY_PID=$!; PIDS+=("$PROXY_PID")
    for _ in $(seq 120); do ready && return; sleep 0.5; done
    echo "the proxy under valgrind did not start: $(tail -3 "$WORK/proxy.log")" >&2; exit 1
}
totals() { # profile file; prints "count bytes" (bytes: allocs only)
    case "$COUNT" in
        allocs) sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\2 \1/p' "$1.log" | tr -d , ;;
        instructions) echo "$(sed -n 's/.*Collected : *\([0-9]*\).*/\1/p' "$1.log") 0" ;;
    esac
}
count() { # name workload-args... ; prints "count-per-tx bytes-per-tx"
    local name="$1" small large; shift
    for t in 50 250; do
        restart_proxy "$OUT/$name.$t.out"
        PGPASSWORD="$KEY" "$PGBIN/pgbench" -n -c 8 -j 2 -t "$t" -h 127.0.0.1 -p "$PROXY_PORT" -U agent "$@" bench >/dev/null 2>&1
        stop_proxy
    done
    read -r small sb < <(totals "$OUT/$name.50.out")
    read -r large lb < <(totals "$OUT/$name.250.out")
    awk -v s="$small" -v l="$large" -v sb="$sb" -v lb="$lb" 'BEGIN { printf "%.1f %.0f\n", (l - s) / 1600, (lb - sb) / 1600 }'
}
[ "$#" -gt 0 ] || set -- "-S -M simple" "-S -M extended" "-S -M prepared" "-M simple"
if [ "$COUNT" = allocs ]; then
    printf '%-20s %14s %14s\n' workload "allocs/tx" "bytes/tx"
else
    printf '%-20s %14s\n' workload "instructions/tx"
fi
for w in "$@"; do
    name="$w"; [ "$w" = "-M simple" ] && name="TPC-B-like"
    read -r n b < <(count "$(tr -c 'a-zA-Z0-9' _ <<<"$name")" $w)
    if [ "$COUNT" = allocs ]; then
        printf '%-20s %14s %14s\n' "$name" "$n" "$b"
    else
        printf '%-20s %14s\n' "$name" "$n"
    fi
done
echo "profiles: $OUT"
