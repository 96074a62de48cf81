#!/usr/bin/env bash
# Approval latency on loopback, with a real nats-server and PostgreSQL, the proxy in-process and a
# fake Slack that answers at once:
#   - hold created -> Slack post (the held UPDATE leaving the client until chat.postMessage);
#   - approving click -> statement run (a signed Approve callback until the client has the
#     UPDATE's result back from PostgreSQL).
# Holds are created one after another; p50, p99 and max over N holds (default 200).
# Target: p99 < 100 ms for both.
#
#   bench/approvals.sh [HOLDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
holds="${1:-200}"
cargo build --release -p approval-service --example approvals_bench >/dev/null
target/release/examples/approvals_bench "$holds"
