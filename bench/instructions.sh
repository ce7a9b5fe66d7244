#!/usr/bin/env bash
# User-space instructions the relay spends per delivered event: the whole
# path (receive, store, claim or handoff, deliver, record), counted by
# valgrind's callgrind around the load only (--instr-atstart=no, toggled on
# before the first request and off once the target has every event). The
# same count for the same binary and input whatever else the machine does
# (kernel time is not in it; see docs/benchmark.md). Beside it, the part
# spent in SHA-256 (the ingress HMAC; the delivery's signature too when
# TARGET_SIGNING_SECRET is set, which the bench does not): valgrind's CPU has no
# SHA extensions, so it runs ring's AVX code here (SSSE3 on a CPU not
# Intel's; sha2's portable code before), where the host's CPU (with
# sha_ni) runs it with far fewer.
#
#   bench/instructions.sh [--backend embedded|redis] [--events N] [--rounds R]
#                         [--connections C] [--named] [--ordered] [--ingest]
#                         [RELAY_BIN...]
#   bench/instructions.sh --ceiling [--events N] [--rounds R] [--connections C]
#
# The load keeps C requests in flight (8 unless told; `bench run` uses 32).
# On the embedded store the count depends on it: under valgrind the relay
# runs one thread at a time and commits fewer events together than at full
# speed, and a commit's cost (its WAL frames, their checksums) is shared by
# the events in it. The table shows the events per commit beside the count
# (every commit counted: the ingest's, the claims' and the finishes').
#
# The relay delivers to TARGET_ENDPOINT (the `default` destination), or with
# --named to one destination `bench` of a destinations file; --ordered gives
# it `ordering = "session"` (the load's events are spread over 1,000
# sessions either way): compare `--named` with `--ordered`. --ingest: the
# destination is paused and only the ingest is counted (from the first
# request until every event is answered), per accepted event.
#
# With several binaries, rounds alternate between them (one binary's round,
# then the next's), and each binary's median is printed with its ratio to
# the first. The target is `cogrelay sim` (its POST /events); on Redis a
# private redis-server on a free port, without persistence.
# target/release/examples/floor (the least a durable relay does per event;
# docs/benchmark.md, "The floor") takes a relay's place among the binaries.
# --ceiling counts the bare hyper server's instructions per request instead
# (`bench ceiling`, answering 200; the reference of `bench run`).
# Needs: valgrind, curl, python3 (free ports, JSON); redis-server for redis.
set -euo pipefail
cd "$(dirname "$0")/.."
backend=embedded events=2000 rounds=3 bins=() named=no ordered=no ingest=no connections=8 ceiling=no
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --events) events=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --named) named=yes; shift ;;
    --ordered) named=yes ordered=yes; shift ;;
    --ingest) ingest=yes; shift ;;
    --ceiling) ceiling=yes; shift ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) bins+=("$1"); shift ;;
  esac
done
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 2; }
if [ ${#bins[@]} -eq 0 ]; then
  cargo build --release --quiet --bin cogrelay --example bench
  bins=(target/release/cogrelay)
fi
# The target: the first binary that has `cogrelay sim` (the floor has not).
sim_bin=
for b in "${bins[@]}" target/release/cogrelay; do
  if "$b" sim --help >/dev/null 2>&1; then sim_bin=$b; break; fi
done
[ -n "$sim_bin" ] || { echo "no binary with 'sim' (build target/release/cogrelay)" >&2; exit 2; }
# The load generator (built with the relay when no binary is given).
[ -x target/release/examples/bench ] || cargo build --release --quiet --example bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS CMD...: until CMD succeeds, else fail
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.2
  done
}
# The bare server's instructions per request: one line per round.
if [ "$ceiling" = yes ]; then
  for r in $(seq 1 "$rounds"); do
    dir="$work/ceiling-$r"; mkdir -p "$dir"
    port=$(free_port)
    valgrind --tool=callgrind --fair-sched=yes --instr-atstart=no --callgrind-out-file="$dir/cg.out" \
      target/release/examples/bench ceiling --port "$port" >/dev/null 2>"$dir/ceiling.err" &
    pid=$!; pids+=("$pid")
    wait_for 60 curl -s -o /dev/null "127.0.0.1:$port/"
    target/release/examples/bench load --port "$port" --events 1000 --connections "$connections" >/dev/null
    callgrind_control -i on "$pid" >/dev/null
    target/release/examples/bench load --port "$port" --events "$events" --connections "$connections" >/dev/null
    callgrind_control -i off "$pid" >/dev/null
    callgrind_control -d "$pid" >/dev/null
    wait_for 60 grep -qs '^totals:' "$dir/cg.out.1"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "round $r: $(awk '/^(summary|totals):/ {s += $2} END {print int(s / '"$events"')}' "$dir"/cg.out*) instructions per request (bare hyper server, $events requests, $connections connections, after 1,000 to warm up)"
  done
  exit 0
fi
received() { curl -sf "127.0.0.1:$1/sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["eventsReceived"])'; }
all_received() { [ "$(received "$1")" -ge "$2" ]; }

# One round: prints the relay's instructions per delivered event.
round() {
  local bin=$1 dir=$2
  mkdir -p "$dir"
  # A round runs in a subshell (its output is read): what it starts is
  # stopped when it ends, failed or not (the main shell never sees its pids).
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
  local port admin sim
  port=$(free_port); admin=$(free_port); sim=$(free_port)
  RUST_LOG=error "$sim_bin" sim --port "$sim" --rate-limit 100000000 >/dev/null 2>"$dir/sim.err" &
  local sim_pid=$!; pids+=("$sim_pid")
  wait_for 30 curl -sf "127.0.0.1:$sim/sim/stats"
  local queue_env=(COGRELAY_DATA_DIR="$dir/data")
  if [ "$backend" = redis ]; then
    local rport; rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null &
    local redis_pid=$!; pids+=("$redis_pid")
    wait_for 30 redis-cli -p "$rport" ping
    queue_env=(COGRELAY_QUEUE=redis REDIS_URL="redis://127.0.0.1:$rport")
  fi
  local dest=default target_env=(TARGET_ENDPOINT="http://127.0.0.1:$sim/events")
  if [ "$named" = yes ]; then
    dest=bench target_env=(COGRELAY_CONFIG="$dir/destinations.toml")
    {
      printf '[[destination]]\nname = "bench"\nurl = "http://127.0.0.1:%s/events"\n' "$sim"
      if [ "$ordered" = yes ]; then printf 'ordering = "session"\n'; fi
    } >"$dir/destinations.toml"
  fi
  env -i PATH="$PATH" PORT="$port" ADMIN_LISTEN="127.0.0.1:$admin" WEBHOOK_SIGNING_SECRET=bench-secret \
    "${target_env[@]}" "${queue_env[@]}" RUST_LOG=error LOG_FORMAT=json \
    valgrind --tool=callgrind --fair-sched=yes --instr-atstart=no --callgrind-out-file="$dir/cg.out" \
    "$bin" serve >/dev/null 2>"$dir/relay.err" &
  local pid=$!; pids+=("$pid")
  wait_for 120 curl -sf "127.0.0.1:$admin/readyz"
  if [ "$ingest" = yes ]; then
    curl -sf -X POST "127.0.0.1:$admin/admin/destinations/$dest/pause" >/dev/null
  fi
  callgrind_control -i on "$pid" >/dev/null
  target/release/examples/bench load --port "$port" --events "$events" --connections "$connections" >"$dir/load.out"
  if [ "$ingest" = no ]; then wait_for 300 all_received "$sim" "$events"; fi
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  # The dump is written after the command returns: its totals before the kill.
  wait_for 60 grep -qs '^totals:' "$dir/cg.out.1"
  kill "$pid" "$sim_pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [ "$backend" = redis ] && kill "$redis_pid" 2>/dev/null || true
  # KEEP_PROFILES=DIR keeps each round's callgrind output (callgrind_annotate).
  if [ -n "${KEEP_PROFILES:-}" ]; then
    local keep="$KEEP_PROFILES/$(basename "$dir")-$what"
    mkdir -p "$keep" && cp "$dir"/cg.out* "$keep/"
  fi
  local total
  total=$(cat "$dir"/cg.out* | awk '/^(summary|totals):/ {s += $2} END {print s}')
  if [ "${total:-0}" -le 0 ]; then
    echo "round $dir: no instruction count (see $dir/relay.err)" >&2
    return 1
  fi
  local sha
  sha=$({ callgrind_annotate --threshold=100 "$dir"/cg.out.1 2>/dev/null ||
    echo "round $dir: callgrind_annotate failed (the SHA-256 share shows 0)" >&2; } |
    awk '/sha2::sha256::|sha256_block_data_order/ {gsub(",", "", $1); s += $1} END {print s + 0}')
  # The store's commits (embedded): calls of SQLite's commit, from the
  # profile's call counts.
  local commits
  commits=$(python3 - "$dir/cg.out.1" <<'PY'
import re, sys
names, calls, callee = {}, 0, None
for line in open(sys.argv[1]):
    m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3)
        if m.group(1) == "cfn":
            callee = names.get(m.group(2), "")
        continue
    m = re.match(r"^calls=(\d+)", line)
    if m and callee.startswith("sqlite3PagerCommitPhaseOne"):
        calls += int(m.group(1))
print(calls)
PY
  )
  echo "$((total / events)) $((sha / events)) ${commits:-0}"
}

what=delivered label=""
if [ "$ingest" = yes ]; then what=accepted; fi
if [ "$ordered" = yes ]; then label=", ordered"; elif [ "$named" = yes ]; then label=", named"; fi
declare -A results shas batches
for r in $(seq 1 "$rounds"); do
  for i in "${!bins[@]}"; do
    read -r n sha commits < <(round "${bins[$i]}" "$work/$r-$i")
    [ -n "${n:-}" ] || exit 1
    results[$i]="${results[$i]:-} $n"
    shas[$i]="${shas[$i]:-} $sha"
    per_commit=-
    if [ "${commits:-0}" -gt 0 ]; then per_commit=$(python3 -c "print(f'{$events / $commits:.1f}')"); fi
    batches[$i]="${batches[$i]:-} $per_commit"
    echo "round $r, ${bins[$i]}: $n instructions per $what event ($backend$label), of which SHA-256 $sha; $per_commit events per commit" >&2
  done
done
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
first=$(echo "${results[0]}" | median)
echo "| binary ($backend$label, $events events, $connections connections, $rounds rounds) | instructions per $what event (median) | vs first | rounds | of which SHA-256 (median) | events per commit |"
echo "|---|---|---|---|---|---|"
for i in "${!bins[@]}"; do
  m=$(echo "${results[$i]}" | median)
  sha=$(echo "${shas[$i]}" | median)
  ratio=$(python3 -c "print(f'{($m / $first - 1) * 100:+.1f}%')")
  echo "| ${bins[$i]} | $m | $ratio |${results[$i]} | $sha |${batches[$i]} |"
done
