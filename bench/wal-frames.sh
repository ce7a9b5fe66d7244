#!/usr/bin/env bash
# Which B-trees the embedded store's commits write, in WAL frames (4 KiB
# pages) per commit: the relay under the benchmark's load is stopped
# (SIGSTOP) after AT seconds, its store's files copied, and the WAL's frames
# since its last restart read back and matched to tables and indexes with
# SQLite's `dbstat`. What a store design costs on disk, per commit.
#
#   bench/wal-frames.sh [--at SECONDS] [--events N] [RELAY_BIN]
#
# Needs: python3 (its sqlite3 with dbstat), curl; the load generator
# (target/release/examples/bench, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
at=1.0 events=30000 bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --at) at=$2; shift 2 ;;
    --events) events=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) bin=$1; shift ;;
  esac
done
if [ -z "$bin" ]; then
  cargo build --release --quiet --bin cogrelay
  bin=target/release/cogrelay
fi
[ -x target/release/examples/bench ] || cargo build --release --quiet --example bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim=$(free_port) port=$(free_port) admin=$(free_port)
RUST_LOG=error "$bin" sim --port "$sim" --rate-limit 100000000 >/dev/null 2>&1 &
pids+=($!)
mkdir "$work/data" "$work/snap"
env -i PATH="$PATH" PORT="$port" ADMIN_LISTEN="127.0.0.1:$admin" \
  TARGET_ENDPOINT="http://127.0.0.1:$sim/events" WEBHOOK_SIGNING_SECRET=bench-secret \
  COGRELAY_DATA_DIR="$work/data" "$bin" serve >"$work/relay.log" 2>&1 &
relay=$!
pids+=("$relay")
for _ in $(seq 100); do curl -sf "127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
target/release/examples/bench load --port "$port" --events "$events" --connections 32 >"$work/load.txt" 2>&1 &
load=$!
sleep "$at"
kill -STOP "$relay"
cp "$work"/data/cogrelay.db* "$work/snap/"
kill -CONT "$relay"
wait "$load"
python3 - "$work/snap" <<'EOF'
import collections, sqlite3, struct, sys
snap = sys.argv[1]
wal = open(snap + "/cogrelay.db-wal", "rb").read()
_, _, page, _, salt1, salt2, _, _ = struct.unpack(">8I", wal[:32])
commits, frames, off = [], [], 32
while off + 24 + page <= len(wal):
    pgno, commit, s1, s2, _, _ = struct.unpack(">6I", wal[off:off + 24])
    if (s1, s2) != (salt1, salt2):
        break  # frames of the WAL before its last restart
    frames.append(pgno)
    if commit:
        commits.append(frames)
        frames = []
    off += 24 + page
if not commits:
    sys.exit("no commit in the WAL at that moment: try another --at")
db = sqlite3.connect(snap + "/cogrelay.db")  # reads the copied WAL too
owner = {p: n + ("" if t == "leaf" else " (" + t + ")")
         for n, p, t in db.execute("SELECT name, pageno, pagetype FROM dbstat")}
count = collections.Counter(owner.get(p, "free list, pointer map") for c in commits for p in c)
total = sum(count.values())
print(f"{len(commits)} commits, {total} frames: {total / len(commits):.1f} frames per commit")
print("| B-tree | frames per commit |\n|---|---|")
for name, n in count.most_common():
    print(f"| {name} | {n / len(commits):.2f} |")
EOF
tail -1 "$work/load.txt"
