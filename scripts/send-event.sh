#!/usr/bin/env bash
# Sends one signed Cognigy event envelope to a running relay.
#   scripts/send-event.sh [eventId]      (default: a fresh id each time)
# Uses WEBHOOK_SIGNING_SECRET (default dev-secret, as scripts/try-local.sh) and
# RELAY_URL (default http://127.0.0.1:3000/api/webhook/cognigy).
set -euo pipefail
secret="${WEBHOOK_SIGNING_SECRET:-dev-secret}"
url="${RELAY_URL:-http://127.0.0.1:${PORT:-3000}/api/webhook/cognigy}"
event_id="${1:-evt-$(date +%s%N)}"
body=$(printf '{"botId":"demo-bot","eventId":"%s","type":"message.received","payload":{"text":"hello from Cognigy"},"timestamp":"%s"}' \
  "$event_id" "$(date -u +%Y-%m-%dT%H:%M:%SZ)")
sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$secret" -hex | sed 's/^.*= //')
curl -sS -X POST "$url" -H 'Content-Type: application/json' -H "X-Webhook-Signature: $sig" --data-binary "$body"
echo
