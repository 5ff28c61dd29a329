# Shared helpers of scripts/bench.sh and scripts/soak.sh: start the mock and duet on loopback,
# read a process's CPU, memory and descriptors from /proc, poll metrics. Sourced, not run.
# Every wait here is bounded; every process started here is stopped by `cleanup` (by PID).

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PROFILE=profiling benchmarks the build with line tables, for perf (see Cargo.toml).
PROFILE="${PROFILE:-release}"
BIN="${DUET_BIN:-$ROOT/target/$PROFILE/duet}"
MOCK_PORT="${MOCK_PORT:-19090}"
DUET_PORT="${DUET_PORT:-18080}"
CLK_TCK="$(getconf CLK_TCK)"
PIDS=()

# The load generator, the mock and duet each hold one descriptor per stream (duet up to
# three): raise the soft limit to the hard one (20,000 on this machine).
ulimit -n "$(ulimit -Hn)"

build() {
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --profile "$PROFILE" --quiet)
  fi
}

cleanup() {
  local pid
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}

# wait_http URL: until it answers 200, at most 15 s.
wait_http() {
  local i
  for i in $(seq 1 150); do
    if curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

# start_mock ARGS...: duet mock-provider on MOCK_PORT; sets MOCK_PID.
start_mock() {
  RUST_LOG=warn "$BIN" mock-provider --port "$MOCK_PORT" "$@" >"$OUT/mock.log" 2>&1 &
  MOCK_PID=$!
  PIDS+=("$MOCK_PID")
  wait_http "http://127.0.0.1:$MOCK_PORT/healthz"
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# start_duet [VAR=VALUE...]: duet serve on DUET_PORT against the mock (both roles, OpenAI
# format), audit on SQLite in $OUT unless DATABASE_URL is given; sets DUET_PID.
start_duet() {
  env BIND_ADDR="127.0.0.1:$DUET_PORT" \
    DATABASE_URL="sqlite://$OUT/audit.db" \
    AUDIT_DEADLETTER_PATH="$OUT/deadletter.jsonl" \
    FLASH_PROVIDER=openai PRO_PROVIDER=openai \
    FLASH_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" PRO_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" \
    FLASH_API_KEY=mock PRO_API_KEY=mock \
    RATE_LIMIT_PER_MINUTE=0 MAX_CONCURRENT_STREAMS=20000 \
    MAX_CONNECTIONS_PER_CLIENT=0 MAX_CONNECTIONS=0 \
    LOG_FORMAT=json RUST_LOG="${DUET_LOG:-info}" \
    "$@" "$BIN" serve >>"$OUT/duet.log" 2>&1 &
  DUET_PID=$!
  PIDS+=("$DUET_PID")
  wait_http "http://127.0.0.1:$DUET_PORT/healthz"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }

# metric NAME: its value in duet's /metrics (first sample line), or nothing.
metric() {
  curl -fsS --max-time 2 "http://127.0.0.1:$DUET_PORT/metrics" 2>/dev/null | awk -v n="$1" '$1 == n {v = $2} END {print v}'
}

# wait_metric NAME VALUE SECONDS: until the metric reads VALUE, bounded.
wait_metric() {
  local i
  for i in $(seq 1 $(($3 * 10))); do
    [ "$(metric "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  echo "$1 did not reach $2 within $3 s (now $(metric "$1"))" >&2
  return 1
}

bench_streams() { "$BIN" bench streams "$@"; }
