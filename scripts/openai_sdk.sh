#!/usr/bin/env bash
# The official `openai` Python package against a live duet (docs/openai.md): a normal answer,
# Pro failing before its first token, Pro cut off mid-answer, and both models failing, each
# a fresh duet (debug build, simulated models timed for the scenario, a throw-away SQLite
# database, an API key and an admin token). Fails loudly on the first thing that is off.
#
#   scripts/openai_sdk.sh            # about 10 s after the build
#
# Needs: cargo, python3 and the openai package (`python3 -m pip install openai`).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import openai' 2>/dev/null; then
  echo "the openai package is not installed: python3 -m pip install openai" >&2
  exit 2
fi

cargo build --quiet --bin duet

work="$(mktemp -d)"
pid=""
stop() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  pid=""
}
cleanup() {
  stop
  rm -rf "$work"
}
trap cleanup EXIT

key="sdk-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
token="admin-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"

# run SCENARIO [VAR=VALUE...]: a fresh duet with these settings, then the scenario against it.
run() {
  local scenario="$1"
  shift
  local port
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  rm -f "$work"/duet.db* "$work/deadletter.jsonl"
  env \
    BIND_ADDR="127.0.0.1:$port" \
    DATABASE_URL="sqlite://$work/duet.db" \
    AUDIT_DEADLETTER_PATH="$work/deadletter.jsonl" \
    FLASH_PROVIDER=simulated PRO_PROVIDER=simulated \
    SIMULATED_FLASH_TTFT_S=0.02 SIMULATED_FLASH_TOKEN_S=0.001 \
    SIMULATED_PRO_TTFT_S=0.05 SIMULATED_PRO_TOKEN_S=0.002 \
    API_KEYS="$key" ADMIN_TOKEN="$token" \
    LOG_FORMAT=json RUST_LOG=warn \
    "$@" \
    target/debug/duet serve >"$work/duet-$scenario.log" 2>&1 &
  pid=$!
  local base="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    if curl -fsS "$base/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "duet did not start:" >&2
      cat "$work/duet-$scenario.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "== openai SDK: $scenario"
  if ! python3 scripts/openai_sdk.py "$scenario" "$base" "$key" "$token"; then
    echo "scenario $scenario failed; duet's log:" >&2
    tail -50 "$work/duet-$scenario.log" >&2
    exit 1
  fi
  stop
  if grep -q '"level":"ERROR"' "$work/duet-$scenario.log"; then
    echo "duet logged errors during scenario $scenario:" >&2
    grep '"level":"ERROR"' "$work/duet-$scenario.log" | head -20 >&2
    exit 1
  fi
}

run ok
# Pro's first token would come after 5 s; its deadline is 0.5 s.
run pro-fails SIMULATED_PRO_TTFT_S=5 PRO_TIMEOUT_S=0.5
# Pro starts at once but needs about 3 s for its ~60 tokens; its deadline is 1 s.
run pro-cut SIMULATED_PRO_TOKEN_S=0.05 PRO_TIMEOUT_S=1
# Neither model's first token comes within its deadline.
run both-fail SIMULATED_FLASH_TTFT_S=5 FLASH_TIMEOUT_S=0.3 SIMULATED_PRO_TTFT_S=5 PRO_TIMEOUT_S=0.5
echo "openai SDK: every scenario passed"
