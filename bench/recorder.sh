#!/usr/bin/env bash
# Recorder throughput end to end, NATS JetStream -> object storage, with 1 and 2 recorders.
# Each run starts its own nats-server and moto (S3), publishes the events first the way proxies
# do (batch messages of PER_MESSAGE envelopes mixing the sessions), then times the recorders until
# every event is acked (stored in its session's hash chain), and finally runs `audit verify` over
# the archive. With 2 recorders they run as shards 0/2 and 1/2 (one durable consumer each).
# A local-directory run is the baseline without moto's cost.
#
#   bench/recorder.sh [EVENTS] [SESSIONS] [PER_MESSAGE] [BATCH]   (defaults 200000, 20, 50, 10000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
events="${1:-200000}"
sessions="${2:-20}"
per_message="${3:-50}"
batch="${4:-10000}"
cargo build --release -p recorder --example record_bench >/dev/null
bin=target/release/examples/record_bench
echo "| store | recorders | events | sessions | events/message | batch (messages) | time | events/s | events/s per recorder | verify |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for store in file s3; do
    for recorders in 1 2; do
        "$bin" --events "$events" --sessions "$sessions" --recorders "$recorders" --store "$store" \
            --per-message "$per_message" --batch "$batch"
    done
done
