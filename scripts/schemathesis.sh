#!/usr/bin/env bash
# Property-based API test: runs schemathesis against a live duet and its own /openapi.json.
#
# Builds duet (debug), starts it on a free loopback port with the simulated providers at tiny
# timings, a throw-away SQLite database, API keys and an admin token (so the authenticated
# paths and 401s are exercised too), runs every schemathesis check with a bounded number of
# examples per operation, and stops duet whatever happens.
#
#   scripts/schemathesis.sh                 # about 15 to 60 s after the build
#   EXAMPLES=200 scripts/schemathesis.sh    # a longer hunt
#   scripts/schemathesis.sh --seed 1234     # extra arguments go to `schemathesis run`
#
# Needs: cargo, python3 and schemathesis (`python3 -m pip install schemathesis`).
# Settings and the reasons for each exception: scripts/schemathesis.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

EXAMPLES="${EXAMPLES:-30}"
ST="$(command -v st || command -v schemathesis || true)"
if [ -z "$ST" ]; then
  echo "schemathesis is not installed: python3 -m pip install schemathesis" >&2
  exit 2
fi

cargo build --quiet --bin duet

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A free port: bind port 0, read what the kernel chose, release it for duet.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
token="st-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"

# The SSE routes stream for as long as the simulated models take: keep it to milliseconds.
# The rate limit is off: schemathesis sends hundreds of requests a second from one address.
env \
  BIND_ADDR="127.0.0.1:$port" \
  DATABASE_URL="sqlite://$work/duet.db" \
  AUDIT_DEADLETTER_PATH="$work/deadletter.jsonl" \
  FLASH_PROVIDER=simulated PRO_PROVIDER=simulated \
  SIMULATED_FLASH_TTFT_S=0.01 SIMULATED_PRO_TTFT_S=0.01 \
  SIMULATED_FLASH_TOKEN_S=0.001 SIMULATED_PRO_TOKEN_S=0.001 \
  RATE_LIMIT_PER_MINUTE=0 \
  MAX_QUERY_BYTES=4096 \
  API_KEYS="$token" ADMIN_TOKEN="$token" \
  LOG_FORMAT=json RUST_LOG=warn \
  target/debug/duet serve >"$work/duet.log" 2>&1 &
pid=$!

base="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
  if curl -fsS "$base/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "duet did not start:" >&2
    cat "$work/duet.log" >&2
    exit 1
  fi
  sleep 0.1
done

mkdir -p target/schemathesis
status=0
"$ST" --config-file scripts/schemathesis.toml run "$base/openapi.json" \
  --checks all \
  --max-examples "$EXAMPLES" \
  --header "Authorization: Bearer $token" \
  --request-timeout 30 \
  --no-color \
  --report junit --report-dir target/schemathesis \
  --generation-database target/schemathesis/examples \
  "$@" || status=$?

if grep -q '"level":"ERROR"' "$work/duet.log"; then
  echo "duet logged errors during the run:" >&2
  grep '"level":"ERROR"' "$work/duet.log" | head -20 >&2
  status=1
fi
exit "$status"
