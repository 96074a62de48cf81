#!/usr/bin/env bash
# Policy propagation to whole proxy processes on loopback: a real PostgreSQL and nats-server, a
# 3-node `airlock policy-store` cluster and PROXIES (default 10) `airlock proxy` processes (release
# build), each following a different store node first, one agent session open through each.
#   - latency: each of CHANGES (default 100) changes, one after another, timed from the start of
#     Apply until a query through every proxy is refused by the new rule; p50, p99, max.
#     Target: p99 < 200 ms.
#   - throughput: changes/s applied by 16 concurrent writers through all three nodes.
#
#   bench/policy_propagation_proxies.sh [CHANGES] [PROXIES]
# BENCH_AIRLOCK=path uses that airlock binary instead of building target/release/airlock.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
changes="${1:-100}"
proxies="${2:-10}"
airlock="${BENCH_AIRLOCK:-target/release/airlock}"
# One cargo invocation for both, so they share one feature resolution (no rebuild between them).
if [ -n "${BENCH_AIRLOCK:-}" ]; then
  cargo build --release -p airlock --example proxy_propagation_bench >/dev/null
else
  cargo build --release -p airlock --bin airlock --example proxy_propagation_bench >/dev/null
fi
target/release/examples/proxy_propagation_bench "$airlock" "$changes" "$proxies"
