#!/usr/bin/env bash
# Re-runnable benchmark: the ceiling (minimal hyper server), cogrelay on the
# embedded queue, and the seed's Node relay on a private redis-server, all with
# the same load generator in one run. Prints a Markdown table.
#   bench/run.sh [--events N] [--connections C] [--concurrency K]
# Needs: cargo; for the seed relay also node, npm and redis-server (skipped if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cogrelay --example bench
seed_args=()
peer="../shared/peers/seed-node-relay"
if [ -d "$peer" ] && command -v node >/dev/null && command -v npm >/dev/null && command -v redis-server >/dev/null; then
  mkdir -p target/seed-relay
  cp "$peer"/index.js "$peer"/package.json target/seed-relay/
  if [ ! -d target/seed-relay/node_modules ]; then
    (cd target/seed-relay && npm install --silent --no-audit --no-fund >/dev/null)
  fi
  seed_args=(--seed-dir target/seed-relay)
else
  echo "seed relay skipped (needs $peer, node, npm and redis-server)" >&2
fi
exec target/release/examples/bench run --relay-bin target/release/cogrelay "${seed_args[@]}" "$@"
