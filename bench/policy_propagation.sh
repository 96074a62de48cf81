#!/usr/bin/env bash
# Policy propagation on loopback: a 3-node `airlock policy-store` cluster (release build, redb on
# the local disk), 10 followers (the Watch follower every proxy node runs) spread over the nodes.
#   - latency: each of N changes (default 100) timed from the start of Apply until all 10
#     followers enforce it; p50, p99, max. Target: p99 < 200 ms.
#   - throughput: changes/s applied by 16 concurrent writers through all three nodes.
#
#   bench/policy_propagation.sh [CHANGES] [PROXIES]
# BENCH_AIRLOCK=path uses that airlock binary instead of building target/release/airlock.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
changes="${1:-100}"
proxies="${2:-10}"
airlock="${BENCH_AIRLOCK:-target/release/airlock}"
[ -n "${BENCH_AIRLOCK:-}" ] || cargo build --release -p airlock --bin airlock >/dev/null
cargo build --release -p policy-store --example propagation_bench >/dev/null
dir="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ports=("$(free_port)" "$(free_port)" "$(free_port)")
# Every node needs the same admin token (writes, raft RPCs); followers read with the read token.
admin_token="bench-admin-$RANDOM$RANDOM"
read_token="bench-read-$RANDOM$RANDOM"
endpoints=()
for i in 1 2 3; do
  peers=""
  for j in 1 2 3; do
    [ "$i" = "$j" ] && continue
    peers="${peers:+$peers, }$j = \"127.0.0.1:${ports[$((j-1))]}\""
  done
  mkdir -p "$dir/n$i"
  cat > "$dir/n$i/airlock.toml" <<TOML
[policy_store]
node_id = $i
listen = "127.0.0.1:${ports[$((i-1))]}"
data_dir = "$dir/n$i/data"
peers = { $peers }
admin_token = "$admin_token"
read_token = "$read_token"
TOML
  RUST_LOG=warn "$airlock" -c "$dir/n$i/airlock.toml" policy-store >"$dir/n$i/log" 2>&1 &
  pids+=("$!")
  endpoints+=("http://127.0.0.1:${ports[$((i-1))]}")
done
for p in "${ports[@]}"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done
# The first apply waits for the election (the store forwards and retries for a leader).
STORE_ADMIN_TOKEN="$admin_token" STORE_READ_TOKEN="$read_token" \
  target/release/examples/propagation_bench "$proxies" "$changes" "${endpoints[@]}"
