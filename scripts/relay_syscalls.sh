#!/usr/bin/env bash
# System calls per run of the relay (docs/benchmarks.md, "Relay, own HTTP/1.1 client"):
# `strace -c -f` on `duet serve` while it relays N runs at concurrency C against two mock
# OpenAI upstreams (50 ms and 250 ms to the first token, 20 tokens 5 ms apart), SQLite audit
# on, deltas on. Prints the most frequent calls divided by N. Needs strace.
#
#   scripts/relay_syscalls.sh [BIN] [N] [C]   # defaults: target/release/duet, 200, 10
#
# Ports: PORT_BASE (default 28417) and the three after it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/target/release/duet}"
N="${2:-200}"
C="${3:-10}"
P="${PORT_BASE:-28417}"
OUT="${OUT:-$ROOT/target/relay_syscalls/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
"$BIN" mock-provider --port "$P" --ttft-ms 50 --token-ms 5 --tokens 20 >"$OUT/flash.log" 2>&1 &
PIDS+=($!)
"$BIN" mock-provider --port $((P + 1)) --ttft-ms 250 --token-ms 5 --tokens 20 >"$OUT/pro.log" 2>&1 &
PIDS+=($!)
DATABASE_URL="sqlite://$OUT/audit.db?mode=rwc" "$BIN" migrate >"$OUT/migrate.log" 2>&1
env BIND_ADDR="127.0.0.1:$((P + 2))" DATABASE_URL="sqlite://$OUT/audit.db" \
  AUDIT_DEADLETTER_PATH="$OUT/deadletter.jsonl" \
  FLASH_PROVIDER=openai PRO_PROVIDER=openai \
  FLASH_BASE_URL="http://127.0.0.1:$P/v1" PRO_BASE_URL="http://127.0.0.1:$((P + 1))/v1" \
  FLASH_API_KEY=mock PRO_API_KEY=mock RATE_LIMIT_PER_MINUTE=0 MAX_CONCURRENT_STREAMS=20000 \
  MAX_CONNECTIONS_PER_CLIENT=0 MAX_CONNECTIONS=0 LOG_FORMAT=json RUST_LOG=info \
  "$BIN" serve >"$OUT/duet.log" 2>&1 &
DUET=$!
PIDS+=("$DUET")
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$((P + 2))/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
streams() { "$BIN" bench streams --target duet --url "http://127.0.0.1:$((P + 2))/query/stream" -c "$C" --timeout 60 "$@"; }
streams -n $((C * 5)) >"$OUT/warmup.txt" 2>&1
strace -c -f -o "$OUT/strace.txt" -p "$DUET" 2>/dev/null &
TRACER=$!
sleep 1
streams -n "$N" >"$OUT/bench.txt" 2>&1
sleep 1
kill -INT "$TRACER"
wait "$TRACER" 2>/dev/null || true
echo "$(grep -o "ended=[0-9]*" "$OUT/bench.txt" | head -1) $(grep -o "errors=[0-9]*" "$OUT/bench.txt" | head -1)"
# strace -c's table: "% time  seconds  usecs/call  calls  [errors]  syscall".
awk -v n="$N" 'NR > 2 && $NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ { printf "%s %.1f\n", $NF, $4 / n }' \
  "$OUT/strace.txt" | sort -k2 -nr | head -10 | awk '{ printf "%s=%s ", $1, $2 } END { print "(per run)" }'
