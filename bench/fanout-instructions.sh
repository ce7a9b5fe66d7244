#!/usr/bin/env bash
# User-space instructions the relay spends per ingested event with 1, 2 and 4
# destinations, all paused (so the count is the ingest's alone), counted by
# valgrind's callgrind: the same count for the same binary and input whatever
# else the machine is doing (kernel time is not in it; see docs/benchmark.md).
#   bench/fanout-instructions.sh [RELAY_BIN] [EVENTS]
# Needs: valgrind, curl; builds the release binaries as bench/run.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 2; }
cargo build --release --quiet --bin cogrelay --example bench
bin=${1:-target/release/cogrelay}
events=${2:-3000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for n in 1 2 4; do
  dir="$work/$n"; mkdir -p "$dir"
  for i in $(seq 1 "$n"); do
    printf '[[destination]]\nname = "d%s"\nurl = "http://127.0.0.1:9/d%s"\n' "$i" "$i" >> "$dir/c.toml"
  done
  port=$(free_port); admin=$(free_port)
  env -i PATH="$PATH" PORT="$port" ADMIN_LISTEN="127.0.0.1:$admin" WEBHOOK_SIGNING_SECRET=bench-secret \
    COGRELAY_DATA_DIR="$dir/data" COGRELAY_CONFIG="$dir/c.toml" RUST_LOG=error LOG_FORMAT=json \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg.out" \
    "$bin" serve >/dev/null 2>"$dir/err" &
  pid=$!
  for _ in $(seq 1 600); do curl -sf -o /dev/null "127.0.0.1:$admin/admin/queue" && break; sleep 0.2; done
  for i in $(seq 1 "$n"); do curl -sf -X POST "127.0.0.1:$admin/admin/destinations/d$i/pause" >/dev/null; done
  callgrind_control -i on "$pid" >/dev/null 2>&1
  target/release/examples/bench load --port "$port" --events "$events" --connections 8 >/dev/null
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  total=$(cat "$dir"/cg.out* | awk '/^(summary|totals):/ {s += $2} END {print s}')
  echo "$n destination(s): $((total / events)) instructions per event ingested"
done
