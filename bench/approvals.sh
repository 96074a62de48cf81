#!/usr/bin/env bash
# Approval latency on loopback, with a real nats-server and a fake Slack that answers at once:
#   - hold created -> Slack post (HoldRequested published until chat.postMessage is received);
#   - approving click -> decision (a signed Approve callback until HoldDecided is on the bus,
#     which is what the waiting proxy acts on: the statement then runs on its session).
# Holds are created one after another; p50, p99 and max over N holds (default 200).
# Target: p99 < 100 ms for both.
#
#   bench/approvals.sh [HOLDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
holds="${1:-200}"
cargo build --release -p approval-service --example approvals_bench >/dev/null
target/release/examples/approvals_bench "$holds"
