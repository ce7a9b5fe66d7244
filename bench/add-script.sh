#!/usr/bin/env bash
# Redis's own cost of the routed add script (`src/queue/lua/add_routed.lua`,
# with `order.lua`, `dedup.lua` and `check.lua` in front of it, as the relay
# loads it), at each given git revision: `redis-benchmark` calls it with
# EVALSHA, 4 events of 2 destinations per call (random dedup ids), and `INFO
# commandstats` gives the microseconds per call, and the Redis commands the
# script ran per call (a count: the same on any machine). Rounds alternate between the
# revisions; each round starts from an empty Redis. A private redis-server
# on a free port, without persistence. The time is a timing: compare
# revisions in one run, on a quiet machine, over many rounds.
#
#   bench/add-script.sh [--calls N] [--rounds R] [REV...]   (default: HEAD)
#
# Needs: redis-server, redis-cli, redis-benchmark, python3 (a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
calls=10000 rounds=5 revs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --calls) calls=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) revs+=("$1"); shift ;;
  esac
done
[ ${#revs[@]} -gt 0 ] || revs=(HEAD)
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --save '' --appendonly no --dir "$work" --daemonize yes \
  --pidfile "$work/redis.pid" >/dev/null
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# Up within 5 s, or say so.
for i in $(seq 51); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  [ "$i" -lt 51 ] || { echo "redis-server did not answer on port $port within 5 s" >&2; exit 1; }
  sleep 0.1
done
for rev in "${revs[@]}"; do
  # (check.lua: from this pass on)
  for f in order dedup check add_routed; do
    git show "$rev:src/queue/lua/$f.lua" 2>/dev/null || [ "$f" = check ]
  done > "$work/$(echo "$rev" | tr '/' '_').lua"
done
# Four events, each: dedup id, data, opts, no lock, no key sharer, and 2
# destinations (prefix, name, no ordering key, no hold).
events=()
for n in 1 2 3 4; do
  events+=("k${n}__rand_int__" '{"a":1}' '{}' '' 0 '' '' 2
    'bull:q.a:' a '' 0 'bull:q.b:' b '' 0)
done
round() {
  local script=$1
  redis-cli -p "$port" FLUSHALL >/dev/null
  redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
  local sha
  sha=$(redis-cli -p "$port" SCRIPT LOAD "$(cat "$script")")
  redis-benchmark -p "$port" -q -n "$calls" -c 4 -r 1000000000 \
    EVALSHA "$sha" 1 bull:q:id bull:q: 1700000000000 60000 deliver-event w \
    "${events[@]}" >/dev/null
  # "<us per call> <commands per call>": every command but the ones above
  # ran inside the script.
  redis-cli -p "$port" INFO commandstats | tr -d '\r' | awk -F'[:,=]' '
    /^cmdstat_evalsha:/ { for (i = 2; i < NF; i++) { if ($i == "calls") n = $(i + 1); if ($i == "usec_per_call") us = $(i + 1) } }
    /^cmdstat_/ && !/^cmdstat_(evalsha|script|config|flushall|info|ping)/ { for (i = 2; i < NF; i++) if ($i == "calls") c += $(i + 1) }
    END { printf "%s %.1f\n", us, c / n }'
}
declare -A got cmds
for r in $(seq "$rounds"); do
  for rev in "${revs[@]}"; do
    read -r us n < <(round "$work/$(echo "$rev" | tr '/' '_').lua")
    echo "round $r, $rev: $us us, $n commands per call" >&2
    got[$rev]="${got[$rev]:-} $us"
    cmds[$rev]=$n
  done
done
echo "| revision ($calls calls of 4 events x 2 destinations, $rounds rounds) | us per call (median) | rounds | commands per call |"
echo "|---|---|---|---|"
for rev in "${revs[@]}"; do
  median=$(echo "${got[$rev]}" | tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "| $rev | $median | ${got[$rev]# } | ${cmds[$rev]} |"
done
