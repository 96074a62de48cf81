#!/usr/bin/env bash
# Heap allocations the proxy makes per pgbench transaction, counted exactly by valgrind's dhat
# (instructions, not time: the same build and workload give the same count on a busy machine).
#
#   bench/allocs.sh [WORKLOAD...]     (default: the four workloads of bench/pgbench.sh)
#
# Builds airlock with `--features system-allocator` (mimalloc bypasses malloc, so dhat would see
# nothing) into target/system-allocator, then for each workload runs the proxy under dhat twice,
# for 50 and for 250 transactions per client (8 clients), and prints the difference per
# transaction, so connection setup and startup do not count. Reads MASKING, RECORDING, UPSTREAM
# and WORKERS like bench/pgbench.sh. Each proxy's dhat profile is kept in the printed folder
# (open it with valgrind's dh_view.html) to see where the allocations are made.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -p airlock --features system-allocator --target-dir target/system-allocator >&2
REAL="$(pwd)/target/system-allocator/release/airlock"
OUT="$(mktemp -d /tmp/airlock-allocs.XXXXXX)"
# pg_env.sh runs "$BIN proxy" once; this wrapper puts the proxy (and only it) under dhat.
cat > "$OUT/airlock" <<SH
#!/usr/bin/env bash
for a in "\$@"; do
    if [ "\$a" = proxy ]; then
        exec valgrind --tool=dhat --dhat-out-file="\$DHAT_OUT" "$REAL" "\$@" 2>"\$DHAT_OUT.log"
    fi
done
exec "$REAL" "\$@"
SH
chmod +x "$OUT/airlock"
export DHAT_OUT="$OUT/startup.dhat"
BIN="$OUT/airlock"
source bench/pg_env.sh 1
# Under valgrind the proxy starts slowly: wait until it takes connections.
ready() { PGPASSWORD="$KEY" psql -X -q -h 127.0.0.1 -p "$PROXY_PORT" -U agent -c 'select 1' bench >/dev/null 2>&1; }
# SIGTERM: a background job of a script ignores SIGINT. dhat writes its profile either way.
stop_proxy() { kill -TERM "$PROXY_PID" 2>/dev/null || true; while kill -0 "$PROXY_PID" 2>/dev/null; do sleep 0.2; done; }
restart_proxy() { # $1: dhat file
    stop_proxy
    DHAT_OUT="$1" RUST_LOG=warn "$BIN" -c "$WORK/airlock.toml" proxy >"$WORK/proxy.log" 2>&1 &
    PROXY_PID=$!; PIDS+=("$PROXY_PID")
    for _ in $(seq 120); do ready && return; sleep 0.5; done
    echo "the proxy under dhat did not start: $(tail -3 "$WORK/proxy.log")" >&2; exit 1
}
blocks() { sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 \2/p' "$1.log" | tr -d ,; }
count() { # workload-args... ; prints "blocks-per-tx bytes-per-tx"
    local name="$1" small large; shift
    for t in 50 250; do
        restart_proxy "$OUT/$name.$t.dhat"
        PGPASSWORD="$KEY" "$PGBIN/pgbench" -n -c 8 -j 2 -t "$t" -h 127.0.0.1 -p "$PROXY_PORT" -U agent "$@" bench >/dev/null 2>&1
        stop_proxy
    done
    read -r sb sn < <(blocks "$OUT/$name.50.dhat")
    read -r lb ln < <(blocks "$OUT/$name.250.dhat")
    awk -v sb="$sb" -v sn="$sn" -v lb="$lb" -v ln="$ln" 'BEGIN { printf "%.1f %.0f\n", (ln - sn) / 1600, (lb - sb) / 1600 }'
}
[ "$#" -gt 0 ] || set -- "-S -M simple" "-S -M extended" "-S -M prepared" "-M simple"
printf '%-20s %14s %14s\n' workload "allocs/tx" "bytes/tx"
for w in "$@"; do
    name="$w"; [ "$w" = "-M simple" ] && name="TPC-B-like"
    read -r n b < <(count "$(tr -c 'a-zA-Z0-9' _ <<<"$name")" $w)
    printf '%-20s %14s %14s\n' "$name" "$n" "$b"
done
echo "dhat profiles: $OUT"
