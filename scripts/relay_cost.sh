#!/usr/bin/env bash
# Instructions per run of the relay (docs/benchmarks.md, "Relay CPU (issue 18)"): duet under
# callgrind serving N runs at concurrency C against two mock OpenAI upstreams (50 ms and
# 250 ms to the first token, 20 tokens TOKEN_MS apart), SQLite audit on, deltas on. User-space
# instructions are repeatable on a shared machine where CPU time is not; kernel work (socket
# calls) is not in them.
#
#   scripts/relay_cost.sh [BIN] [N] [C]   # defaults: target/profiling/duet, 100, 2
#
# Needs valgrind (callgrind_control, callgrind_annotate). The counters are zeroed after a
# warm-up of 2*C runs and dumped after the N runs; the total is divided by N. TOKEN_MS
# (default 20) is wide enough that duet keeps up under valgrind: chunks arrive one by one,
# as they do natively, instead of piling up into fewer, larger reads.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/target/profiling/duet}"
N="${2:-100}"
C="${3:-2}"
TOKEN_MS="${TOKEN_MS:-20}"
OUT="${OUT:-$ROOT/target/relay_cost/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
"$BIN" mock-provider --port 19291 --ttft-ms 50 --token-ms "$TOKEN_MS" --tokens 20 >"$OUT/flash.log" 2>&1 &
PIDS+=($!)
"$BIN" mock-provider --port 19292 --ttft-ms 250 --token-ms "$TOKEN_MS" --tokens 20 >"$OUT/pro.log" 2>&1 &
PIDS+=($!)
# Migrated natively first: under valgrind the first statements can miss duet's 2 s start-up
# check on a busy machine.
DATABASE_URL="sqlite://$OUT/audit.db?mode=rwc" "$BIN" migrate >"$OUT/migrate.log" 2>&1
env BIND_ADDR=127.0.0.1:19280 DATABASE_URL="sqlite://$OUT/audit.db" \
  AUDIT_DEADLETTER_PATH="$OUT/deadletter.jsonl" \
  FLASH_PROVIDER=openai PRO_PROVIDER=openai \
  FLASH_BASE_URL=http://127.0.0.1:19291/v1 PRO_BASE_URL=http://127.0.0.1:19292/v1 \
  FLASH_API_KEY=mock PRO_API_KEY=mock RATE_LIMIT_PER_MINUTE=0 MAX_CONCURRENT_STREAMS=20000 \
  MAX_CONNECTIONS_PER_CLIENT=0 MAX_CONNECTIONS=0 LOG_FORMAT=json RUST_LOG=info \
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" "$BIN" serve >"$OUT/duet.log" 2>&1 &
DUET=$!
PIDS+=("$DUET")
for _ in $(seq 1 300); do
  curl -fsS http://127.0.0.1:19280/healthz >/dev/null 2>&1 && break
  sleep 0.2
done
streams() { "$BIN" bench streams --target duet --url http://127.0.0.1:19280/query/stream -c "$C" --timeout 60 "$@"; }
streams -n $((C * 2)) >"$OUT/warmup.txt" 2>&1
callgrind_control -z "$DUET" >/dev/null
streams -n "$N" --json >"$OUT/bench.json" 2>"$OUT/bench.err"
sleep 1
callgrind_control -d "$DUET" >/dev/null
sleep 1
DUMP=$(ls -t "$OUT"/callgrind.*.* | head -1)
TOTAL=$(callgrind_annotate "$DUMP" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
ERRORS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["errors_total"])' "$OUT/bench.json")
echo "runs=$N concurrency=$C errors=$ERRORS instructions=$TOTAL per_run=$((TOTAL / N))"
echo "profile: $DUMP (callgrind_annotate --inclusive=yes $DUMP | less)"
