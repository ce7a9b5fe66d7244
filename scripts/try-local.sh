#!/usr/bin/env bash
# Runs the relay (embedded queue in ./data) against a local target that prints
# every delivery. Ctrl-C stops both. Send an event from another terminal with
# scripts/send-event.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --bin cogrelay --example local_target
target/debug/examples/local_target --port "${TARGET_PORT:-8600}" &
target_pid=$!
trap 'kill $target_pid 2>/dev/null || true' EXIT
export WEBHOOK_SIGNING_SECRET="${WEBHOOK_SIGNING_SECRET:-dev-secret}"
export TARGET_ENDPOINT="${TARGET_ENDPOINT:-http://127.0.0.1:${TARGET_PORT:-8600}/events}"
export LOG_FORMAT="${LOG_FORMAT:-pretty}"
target/debug/cogrelay serve "$@"
