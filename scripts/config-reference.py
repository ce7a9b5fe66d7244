#!/usr/bin/env python3
"""Writes docs/configuration.md from the binary's own --help, so that the
reference and the flags cannot disagree (tests/it/docs.rs checks they still
match). Run after changing a flag:  cargo build && scripts/config-reference.py
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "debug" / "cogrelay"

COMMANDS = [
    ("serve", "`cogrelay serve`: the relay"),
    ("register", "`cogrelay register`: register the endpoint in Cognigy"),
    ("sim", "`cogrelay sim`: the local Cognigy simulator"),
    ("jobs", "`cogrelay jobs` and `cogrelay queue`: the queue they work on"),
]

HEAD = """# Configuration

Every setting is a flag and an environment variable. Precedence: flag >
environment > a `.env` file in the working directory > the default. A bad
value stops the command with one line naming the setting and the fix (exit
code 2). Secrets and URLs are never printed: `--help` hides their values, and
error lines show a URL without its credentials. In `.env`, a `$` outside
single quotes reads a variable (`$NAME`, letters and digits, or `${NAME}`);
one that names no variable set, in the environment or on an earlier line,
is refused with the line's number (it would read as nothing, and a password
`Xy$9kQ` would be `Xy`): write such a value in single quotes, or `\\$`.

This page is generated from `--help` by `scripts/config-reference.py`, and
`tests/it/docs.rs` fails when the two disagree. `cogrelay <command> --help`
says the same, with the longer explanations.
"""

TAIL = """
## Read from the environment only

| variable | default | meaning |
|---|---|---|
| `RUST_LOG` | info | log filter (tracing's `EnvFilter` syntax, e.g. `cogrelay=debug`) |
| `TOKIO_WORKER_THREADS` | one per core | ingress threads; the delivery threads are half as many, at least one. Several relays on one machine: cores / relays each |
| `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` (or lower case), `NO_PROXY` | unset | a proxy for the deliveries, read as reqwest reads them. With none set and no `user:pass@` in the URL, a plain `http://` target gets a lean HTTP/1.1 client with keep-alive connections (about a third less CPU per delivery); `https://` targets and URLs with credentials (sent as Basic authorization) use reqwest |

## Metrics (`GET /metrics` on `ADMIN_LISTEN`)

`cogrelay_ingress_requests_total{status}`, `cogrelay_ingress_ack_seconds`
(histogram of 2xx answers), `cogrelay_events_duplicate_total` (answered
`duplicate`: stored already), `cogrelay_events_unrouted_total` (no
destination wanted them), `cogrelay_deliveries_total{outcome="delivered|retry|failed"}`
(failed = dead-lettered), `cogrelay_delivery_seconds` (histogram per attempt),
`cogrelay_queue_jobs{state}`, `cogrelay_queue_oldest_waiting_seconds`,
`cogrelay_queue_durability_risk{risk}` (1 where the store can lose an
acknowledged event: `redis_no_aof`, `redis_evicting`, `embedded_no_fsync`),
`cogrelay_delivery_up` (1 while a delivery pool runs; `/readyz` needs it),
`cogrelay_delivery_pools` (pools running, one a destination: a reload runs the
new ones before the old ones end), `cogrelay_destination_circuit{destination,state}`,
`cogrelay_held_keys{destination}` (keys an ordered destination with
`on_failure = "hold"` holds; docs/destinations.md), and
`cogrelay_destination_url_conflicts{destination}` (other relays of a shared
Redis queue whose destinations file gives the destination another URL, 0 on
the embedded store; docs/scaling-out.md).
Each relay has its own registry (`prometheus-client`); the exposition is
OpenMetrics text (`application/openmetrics-text`, ending in `# EOF`), which
Prometheus asks for first.

## The largest value of each number

Every numeric setting has a maximum; one more is one line naming it (exit 2).
The same holds in the destinations file (`timeout_ms`, `backoff_ms` and the
circuit's times at most a day, `attempts` 100, `concurrency` 4,096,
`max_age_secs` a year, `rate_limit` 5,000: the most a Redis queue's shared
limit holds within 5%).

| setting | at most |
|---|---|
| `ATTEMPTS` | 100 |
| `CONCURRENCY` | 4,096 |
| `BACKOFF_DELAY_MS` | 86,400,000 (a day) |
| `BACKOFF_JITTER` | 1 |
| `MAX_RETRY_AFTER_SECS` | 604,800 (a week) |
| `DELIVERY_TIMEOUT_MS` | 3,600,000 (an hour; below `LOCK_DURATION_MS`) |
| `LOCK_DURATION_MS` | 86,400,000 |
| `SHUTDOWN_GRACE_MS` | 3,600,000 |
| `REMOVE_ON_COMPLETE` | 1,000,000 |
| `DEDUP_TTL_SECS` | 2,592,000 (30 days) |
| `MAX_BODY_BYTES` | 67,108,864 (64 MiB) |
| `REQUEST_READ_TIMEOUT_MS` | 600,000 |
| `CIRCUIT_FAILURES` | 1,000 |
| `CIRCUIT_COOLDOWN_MS`, `CIRCUIT_MAX_COOLDOWN_MS` | 86,400,000 |
| `MAX_AGE_SECS` | 31,536,000 (a year) |
| `COGRELAY_MAX_DB_BYTES` | 2^50 |
| `INGRESS_RATE_LIMIT` | 1,000,000 (events a second) |
| `DELIVERY_NICE` | 19 |
| `register`: `TARGET_TIMEOUT_MS`, `HEALTH_DELAY_MS` | 3,600,000 (an hour) |
| `register`: `HEALTH_ATTEMPTS` | 1,000 |

## Notes on some settings

- **`DELIVERY_NICE`** (default 10): the delivery threads run this much nicer
  than the ingress. When the CPU is short, acknowledging new events comes
  first and deliveries get a smaller share; they are durable meanwhile, and
  lease renewals keep the ingress's priority. A nice value also ranks the
  delivery threads against every busy process in the same CPU cgroup (on a
  shared host, everything), so 19 can starve deliveries: the test suite beside
  two busy loops failed three tests at 19 and none at 10. 0: one priority.
- **`INGRESS_RATE_LIMIT`**: per source address. Behind a load balancer every
  event has the balancer's address: limit there instead.
- **`REQUEST_READ_TIMEOUT_MS`**: a client slower than this with its headers
  is disconnected, with its body gets 408 (slowloris). A request answered at
  its headers (503 while shutting down, 429, 415, or 401 for no credentials
  or wrong Basic ones and no signature a configured method checks) has its
  body read and thrown away, up to `MAX_BODY_BYTES` and for at most a second
  (or this, if shorter), then gets its answer; a body slower than that is
  cut off. One sent with `Expect: 100-continue`, or declared longer than
  `MAX_BODY_BYTES`, gets the answer at once.
- **`MAX_BODY_BYTES`**: each body may hold 16 KiB of its own; beyond that all
  bodies share 64 MiB (or 4 x `MAX_BODY_BYTES`), and a body that gets no room
  within a second is answered 503 (see the README's "Limits against a flood").
- **`COGRELAY_MAX_DB_BYTES`**: counts the database and its WAL together, and
  the room promised to jobs of bundled events (written when a destination
  claims them). Beside the database the relay keeps a reserve file,
  `cogrelay.reserve`, so that a full disk still lets deliveries drain the
  store (docs/guarantees.md, "Bounded disk").
- **`DEDUP_TTL_SECS`**: also how old an envelope's `timestamp` may be (the
  replay window); 0 turns deduplication off, and the window behind is then
  5 minutes. An envelope dated ahead of the relay's clock (up to 5 minutes
  is let in) keeps its dedup record this long from its date.
- **`VERIFY_EVENTS`**: the Cognigy.AI REST API (`rest`) has no event lookup, so
  `auto` is off with it and `on` is a configuration error.
- **Redis**: `appendonly yes` and `maxmemory-policy noeviction` matter; the
  relay warns at start-up without them. See [scaling-out.md](scaling-out.md).
"""


def options(command):
    out = subprocess.run(
        [str(BIN), *command.split(), "--help"], capture_output=True, text=True, check=True
    ).stdout
    blocks, cur = [], None
    for line in out.splitlines():
        # A heading ("Delivery:") ends the option before it.
        if re.match(r"^\S.*:$", line):
            cur = None
            continue
        m = re.match(r"^\s{2,6}(-\w, )?(--[\w-]+)", line)
        if m:
            cur = {"flag": m.group(2), "text": [], "env": None, "default": ""}
            blocks.append(cur)
            # short help: the text follows the flag on the same line
            line = line[m.end():]
            line = re.sub(r"^\s*<[^>]*>", "", line)
        if cur is None:
            continue
        env = re.search(r"\[env: ([A-Z0-9_]+)[^\]]*\]", line)
        if env:
            cur["env"] = env.group(1)
        default = re.search(r"\[default: ([^\]]*)\]", line)
        if default:
            cur["default"] = default.group(1)
        text = re.sub(r"\[(env|default): [^\]]*\]", "", line).strip()
        if text:
            cur["text"].append(text)
    return [b for b in blocks if b["env"]]


def main():
    parts = [HEAD]
    for command, title in COMMANDS:
        parts.append(f"\n## {title}\n\n| variable | flag | default | meaning |\n|---|---|---|---|\n")
        for b in options(command):
            text = " ".join(b["text"]).replace("|", "\\|")
            default = f"`{b['default']}`" if b["default"] else ""
            parts.append(f"| `{b['env']}` | `{b['flag']}` | {default} | {text} |\n")
    parts.append(TAIL)
    (ROOT / "docs" / "configuration.md").write_text("".join(parts))


if __name__ == "__main__":
    sys.exit(main())
