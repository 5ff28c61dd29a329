#!/usr/bin/env bash
# Issue 18, "the relay at the limit": two duet binaries compared back to back on the relay
# workload, loopback only, bounded in time. See docs/benchmarks.md, "Issue 18".
#
#   BIN=target/release/duet BASE_BIN=/path/to/baseline/duet scripts/bench_relay.sh
#   BIN=target/release/duet scripts/bench_relay.sh          # one binary, no comparison
#
# Workload: two `duet mock-provider` processes, Flash `--ttft-ms 50` and Pro `--ttft-ms 250`,
# both 20 tokens 5 ms apart, OpenAI wire format. duet (each binary, on its own port, both
# started once and kept) relays Flash from the first and Pro from the second over HTTP/1.1
# (a connection per call), SQLite audit on, `delta` events on, rate limits off.
#
# Each round, at each C of LEVELS: the Flash mock directly, the Pro mock directly, then the
# two binaries one after the other (the order alternates between rounds, so drift in the
# machine's load does not favour one). Every run is SECS seconds of streams started (open
# ones finish, each bounded by a 30 s deadline). The directs are the control for the load of
# the moment; "added first token" = duet's first Flash `delta` percentile minus the Flash
# mock's direct first-token percentile at the same C in the same round (a difference of
# percentiles, p50 - p50 and p99 - p99; the mock answers with the same pacing either way).
# "Mock + client CPU" per duet run = what a Flash stream and a Pro stream cost the mock that
# served it plus the load generator that read it, in the same round's direct runs (CPU of
# each process over the run, per stream). A reference, not a floor: a relay reads both streams as
# that client does and writes both streams' events as that server does, through the same
# kernel paths (a loopback `writev` also runs the reader's receive side), but the mock also
# paces its tokens with timers and the load generator keeps statistics, while the relay
# also parses the client's request, sends the run's other events and writes its audit
# record. duet at or under it relays a run for no more than its two ends spend on it.
# "Serving / audit / other threads": duet's CPU per run split by thread (from
# /proc/PID/task/*/schedstat): tokio's workers (or serving threads; tokio's blocking-pool
# threads share the workers' name and count there), the audit writer's thread with SQLite's
# connection threads (the read pool's too), and the rest (the log thread, ...). A thread
# that ends during a run drops out, so the three may add up to less than duet's CPU.
#
# Knobs (environment): BIN (the build under test, default target/release/duet), BASE_BIN
# (the build to compare with; unset: BIN alone), LEVELS (default "1 100 1000"), ROUNDS
# (default 3), SECS (default 10), BUSY=1 (a busy loop keeps one core busy throughout),
# MOCK_BIN (which binary serves the mocks and generates the load: default BASE_BIN, else
# BIN, so both builds face the same mock), OUT (default target/bench/relay-DATE), ports
# FLASH_PORT/PRO_PORT (19190/19191), NEW_PORT/BASE_PORT (18190/18191), NEW_ENV/BASE_ENV
# (extra VAR=VALUE words for that duet only: e.g. the same binary twice, one with
# NEW_ENV=LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2, compares allocators),
# RAMP (seconds over which each run's C streams start; default 0 below C=1,000 and 2 at
# 1,000). With RAMP=0 the C clients start together and, every stream taking the same time,
# stay in step: runs start, stream and end in bursts of C, which makes the audit writer's
# batches large and its cost per run small. RAMP=1 spreads them, as independent clients
# would be, and the writer then commits a few records at a time.
#
# Builds nothing: build each binary first (`cargo build --release`, then copy it aside).
# Output in $OUT: one JSON report per run, results.tsv (one line per run), table.txt (the
# table printed at the end: median over rounds, and the range), duet and mock logs.
NEW_BIN_ARG="${BIN:-}"
source "$(dirname "$0")/lib.sh"
BIN="${NEW_BIN_ARG:-$ROOT/target/release/duet}"
BASE_BIN="${BASE_BIN:-}"
MOCK_BIN="${MOCK_BIN:-${BASE_BIN:-$BIN}}"
LEVELS="${LEVELS:-1 100 1000}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-10}"
BUSY="${BUSY:-0}"
FLASH_PORT="${FLASH_PORT:-19190}"
PRO_PORT="${PRO_PORT:-19191}"
NEW_PORT="${NEW_PORT:-18190}"
BASE_PORT="${BASE_PORT:-18191}"
NEW_ENV="${NEW_ENV:-}"
BASE_ENV="${BASE_ENV:-}"
OUT="${OUT:-$ROOT/target/bench/relay-$(date +%Y%m%d-%H%M%S)}"
PACE="--token-ms 5 --tokens 20"
mkdir -p "$OUT"
trap cleanup EXIT

for b in "$BIN" "$MOCK_BIN" ${BASE_BIN:+"$BASE_BIN"}; do
  [ -x "$b" ] || { echo "no executable $b (build it, or set BIN / BASE_BIN)" >&2; exit 2; }
done
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# start_mock_at PORT NAME ARGS...: a mock on PORT.
start_mock_at() {
  local port="$1" name="$2"
  shift 2
  RUST_LOG=warn "$MOCK_BIN" mock-provider --port "$port" "$@" >"$OUT/mock-$name.log" 2>&1 &
  PIDS+=("$!")
  MOCK_PID=$!
  wait_http "http://127.0.0.1:$port/healthz"
}

# start_duet_at BINARY PORT NAME [VAR=VALUE...]: duet serve, Flash at the Flash mock and Pro at the Pro mock;
# sets DUET_PID (not a command substitution: `cleanup` must see the PID in PIDS).
start_duet_at() {
  local bin="$1" port="$2" name="$3"
  shift 3
  env BIND_ADDR="127.0.0.1:$port" \
    DATABASE_URL="sqlite://$OUT/audit-$name.db" \
    AUDIT_DEADLETTER_PATH="$OUT/deadletter-$name.jsonl" \
    FLASH_PROVIDER=openai PRO_PROVIDER=openai \
    FLASH_BASE_URL="http://127.0.0.1:$FLASH_PORT/v1" PRO_BASE_URL="http://127.0.0.1:$PRO_PORT/v1" \
    FLASH_API_KEY=mock PRO_API_KEY=mock \
    RATE_LIMIT_PER_MINUTE=0 MAX_CONCURRENT_STREAMS=20000 \
    MAX_CONNECTIONS_PER_CLIENT=0 MAX_CONNECTIONS=0 \
    LOG_FORMAT=json RUST_LOG="${DUET_LOG:-info}" \
    "$@" "$bin" serve >>"$OUT/duet-$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  DUET_PID=$pid
  wait_http "http://127.0.0.1:$port/healthz"
}

# streams_metric PORT: duet_streams_active of the duet on PORT.
active_at() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk '$1 == "duet_streams_active" {v = $2} END {print v}'
}
wait_idle_at() {
  local i
  for i in $(seq 1 300); do
    [ "$(active_at "$1")" = 0 ] && return 0
    sleep 0.1
  done
  echo "duet on port $1 still has $(active_at "$1") streams after 30 s" >&2
}

# load C TARGET URL FILE: one load run. Sets LOAD_CPU_S, the load generator's CPU seconds
# (user + system, from its rusage).
load() {
  # LC_ALL=C: `time` prints the locale's decimal point, which awk would misread.
  local c="$1" target="$2" url="$3" file="$4" TIMEFORMAT='%3U %3S' times LC_ALL=C
  times=$( { time "$MOCK_BIN" bench streams --target "$target" --url "$url" -c "$c" --duration "$SECS" \
    --warmup "$([ "$c" -ge 100 ] && echo 1 || echo 3)" \
    --ramp "${RAMP:-$([ "$c" -ge 1000 ] && echo 2 || echo 0)}" \
    --timeout 30 --deltas true --json >"$file" 2>>"$OUT/load.err"; } 2>&1 ) ||
    echo "load run failed: $file" >&2
  LOAD_CPU_S=$(awk 'END {print $1 + $2}' <<<"$times")
}

# record ROUND C WHO FILE CPU_S LOAD MOCK_CPU_S: one line of results.tsv. First token = first
# Flash delta through duet, first content chunk directly. CPU_S is duet's CPU (duet runs),
# MOCK_CPU_S the mock's (direct runs); the load generator's is LOAD_CPU_S; duet's per thread
# group (serving, audit, other) is THREADS_S. Each goes in per stream (ms).
record() {
  local round="$1" c="$2" who="$3" file="$4" cpu="$5" load="$6" mock="${7:-}" field
  jq -e .streams "$file" >/dev/null 2>&1 || { echo "no report in $file" >&2; return 0; }
  field=$([ "${who#direct}" = "$who" ] && echo first_flash || echo first_token)
  jq -r --arg r "$round" --arg c "$c" --arg who "$who" --arg cpu "$cpu" --arg load "$load" \
    --arg f "$field" --arg mock "$mock" --arg lg "$LOAD_CPU_S" --arg th "${THREADS_S:-}" \
    'def per_stream($s; $n): if $s == "" then "" else ($s | tonumber) * 1000 / ([$n, 1] | max) end;
     .streams as $n
     | [$r, $c, $who, .streams_per_s, .[$f].p50_ms, .[$f].p99_ms, .end.p50_ms, .end.p99_ms,
        per_stream($cpu; $n), .errors_total, .streams, $load, per_stream($mock; $n), per_stream($lg; $n),
        ($th | split(" ") | map(select(. != ""))
          | if length == 3 then map(per_stream(.; $n)) else ["", "", ""] end)[]]
     | map(tostring) | join("\t")' "$file" >>"$OUT/results.tsv"
}

# threads_ns PID: nanoseconds on CPU so far of the process's threads, in three groups:
# serving (tokio's workers, serving threads), audit (the writer's thread and SQLite's
# connection threads), other (the log thread, the main thread, ...).
threads_ns() {
  local t
  for t in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(cat "$t/comm" 2>/dev/null)" "$(cut -d' ' -f1 "$t/schedstat" 2>/dev/null)"
  done | awk '$2 == "" { next }
    $1 ~ /^(tokio-rt-worker|duet-serve)/ { s += $2; next }
    $1 ~ /^(duet-audit|sqlx-sqlite)/ { a += $2; next }
    { o += $2 }
    END { printf "%d %d %d\n", s, a, o }'
}

# duet_run ROUND C NAME PORT PID
duet_run() {
  local round="$1" c="$2" name="$3" port="$4" pid="$5" t0 t1 th0 th1 l file
  file="$OUT/r$round-c$c-$name.json"
  l=$(load1)
  t0=$(cpu_ticks "$pid")
  th0=$(threads_ns "$pid")
  load "$c" duet "http://127.0.0.1:$port/query/stream" "$file"
  t1=$(cpu_ticks "$pid")
  th1=$(threads_ns "$pid")
  THREADS_S=$(awk -v a="$th0" -v b="$th1" 'BEGIN { split(a, x, " "); split(b, y, " ")
    printf "%.6f %.6f %.6f", (y[1] - x[1]) / 1e9, (y[2] - x[2]) / 1e9, (y[3] - x[3]) / 1e9 }')
  record "$round" "$c" "$name" "$file" "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {print (b - a) / hz}')" "$l"
  THREADS_S=""
  say "   r$round C=$c $name: $(jq -r '"\(.streams_per_s|floor) runs/s, first flash p50 \(.first_flash.p50_ms*100|round/100) p99 \(.first_flash.p99_ms*100|round/100) ms, errors \(.errors_total)"' "$file"), CPU $(tail -1 "$OUT/results.tsv" | cut -f9 | xargs printf '%.3f') ms/run, load $l"
  wait_idle_at "$port"
}

# direct_run ROUND C NAME PORT MOCK_PID
direct_run() {
  local round="$1" c="$2" name="$3" port="$4" pid="$5" t0 t1 l file
  file="$OUT/r$round-c$c-$name.json"
  l=$(load1)
  t0=$(cpu_ticks "$pid")
  load "$c" openai "http://127.0.0.1:$port/v1/chat/completions" "$file"
  t1=$(cpu_ticks "$pid")
  record "$round" "$c" "$name" "$file" "" "$l" "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {print (b - a) / hz}')"
  say "   r$round C=$c $name: $(jq -r '"\(.streams_per_s|floor) streams/s, first token p50 \(.first_token.p50_ms*100|round/100) p99 \(.first_token.p99_ms*100|round/100) ms, errors \(.errors_total)"' "$file"), load $l"
}

say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem/ {print $2}') GiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
say "== new:  $BIN ($("$BIN" --version), $(stat -c %s "$BIN") bytes) $NEW_ENV"
[ -n "$BASE_BIN" ] && say "== base: $BASE_BIN ($("$BASE_BIN" --version), $(stat -c %s "$BASE_BIN") bytes) $BASE_ENV"
say "== mocks and load generator: $MOCK_BIN; LEVELS=$LEVELS ROUNDS=$ROUNDS SECS=$SECS BUSY=$BUSY; results in $OUT"
printf 'round\tc\twho\tper_s\tfirst_p50\tfirst_p99\tend_p50\tend_p99\tcpu_ms_per_run\terrors\tstreams\tload1\tmock_cpu_ms_per_stream\tclient_cpu_ms_per_stream\tserving_ms_per_run\taudit_ms_per_run\tother_ms_per_run\n' >"$OUT/results.tsv"

start_mock_at "$FLASH_PORT" flash --ttft-ms 50 $PACE
FLASH_MOCK_PID=$MOCK_PID
start_mock_at "$PRO_PORT" pro --ttft-ms 250 $PACE
PRO_MOCK_PID=$MOCK_PID
# shellcheck disable=SC2086 # NEW_ENV and BASE_ENV are lists of words
start_duet_at "$BIN" "$NEW_PORT" new $NEW_ENV
NEW_PID=$DUET_PID
if [ -n "$BASE_BIN" ]; then
  # shellcheck disable=SC2086
  start_duet_at "$BASE_BIN" "$BASE_PORT" base $BASE_ENV
  BASE_PID=$DUET_PID
fi
if [ "$BUSY" = 1 ]; then
  bash -c 'while :; do :; done' &
  PIDS+=("$!")
  say "== BUSY=1: a busy loop (pid $!) holds one core"
fi

for round in $(seq 1 "$ROUNDS"); do
  for c in $LEVELS; do
    say "-- round $round, C=$c"
    direct_run "$round" "$c" direct-flash "$FLASH_PORT" "$FLASH_MOCK_PID"
    direct_run "$round" "$c" direct-pro "$PRO_PORT" "$PRO_MOCK_PID"
    if [ -z "$BASE_BIN" ]; then
      duet_run "$round" "$c" new "$NEW_PORT" "$NEW_PID"
    elif [ $((round % 2)) = 1 ]; then
      duet_run "$round" "$c" base "$BASE_PORT" "$BASE_PID"
      duet_run "$round" "$c" new "$NEW_PORT" "$NEW_PID"
    else
      duet_run "$round" "$c" new "$NEW_PORT" "$NEW_PID"
      duet_run "$round" "$c" base "$BASE_PORT" "$BASE_PID"
    fi
  done
done

for name in new ${BASE_BIN:+base}; do
  say "== $name: $(sqlite3 "$OUT/audit-$name.db" "select status, count(*) from dual_runs group by status" 2>/dev/null | tr '\n' ' ')rows; dead-lettered: $(cat "$OUT/deadletter-$name.jsonl" 2>/dev/null | wc -l)"
done

# The table: per C and per process, the median over rounds and [min–max]; added first token
# per round (duet minus the same round's direct Flash), then its median and range.
# Mock + client CPU: for a direct row, what one stream cost the mock and the load generator
# together; for a duet row, the sum of both directs' in the same round (see the header).
awk -F'\t' '
  NR == 1 { next }
  { key = $2 SUBSEP $3; if (!(key in n)) { order[++k] = key }
    i = ++n[key]; per[key, i] = $4; f50[key, i] = $5; f99[key, i] = $6
    cpu[key, i] = $9; err[key] += $10; ld[key, i] = $12; round[key, i] = $1
    sv[key, i] = $15; au[key, i] = $16; ot[key, i] = $17
    pair[key, i] = ($13 != "" && $14 != "") ? $13 + $14 : ""
    if ($3 ~ /^direct/ && pair[key, i] != "") { floor[$2, $1] += pair[key, i]; halves[$2, $1]++ }
    if ($3 == "direct-flash") { d50[$2, $1] = $5; d99[$2, $1] = $6 } }
  function med(arr, key, m,   v, i, j, t, c) {
    c = 0; for (i = 1; i <= m; i++) if (arr[key, i] != "") v[++c] = arr[key, i] + 0
    if (c == 0) return "-"
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    lo = v[1]; hi = v[c]
    return (c % 2) ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
  function split3(key, m,   a, b, c) {
    a = med(sv, key, m); b = med(au, key, m); c = med(ot, key, m)
    if (a == "-" || b == "-" || c == "-") return "-"
    return sprintf("%.3f / %.3f / %.3f", a, b, c) }
  function cell(arr, key, m, fmt,   x) {
    x = med(arr, key, m); if (x == "-") return "-"
    return sprintf(fmt " [" fmt "–" fmt "]", x, lo, hi) }
  END {
    printf "| C | process | per s | first token p50 ms | first token p99 ms | added first token p50 ms | added p99 ms | duet CPU ms/run | mock + client CPU ms/run | serving / audit / other threads ms/run | errors | load avg (1 min) |\n"
    printf "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    for (o = 1; o <= k; o++) {
      key = order[o]; split(key, p, SUBSEP); m = n[key]
      for (i = 1; i <= m; i++) {
        a50[key, i] = ""; a99[key, i] = ""; fl[key, i] = pair[key, i]
        if (p[2] !~ /^direct/) { a50[key, i] = f50[key, i] - d50[p[1], round[key, i]]; a99[key, i] = f99[key, i] - d99[p[1], round[key, i]]
          fl[key, i] = (halves[p[1], round[key, i]] == 2) ? floor[p[1], round[key, i]] : "" }
      }
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | %s |\n", p[1], p[2],
        cell(per, key, m, "%.0f"), cell(f50, key, m, "%.2f"), cell(f99, key, m, "%.2f"),
        cell(a50, key, m, "%+.2f"), cell(a99, key, m, "%+.2f"), cell(cpu, key, m, "%.3f"),
        cell(fl, key, m, "%.3f"), split3(key, m), err[key], cell(ld, key, m, "%.2f")
    }
  }' "$OUT/results.tsv" >"$OUT/table.txt"
say "== median over $ROUNDS rounds [min–max]; per s = streams/s (direct) or runs/s (duet); first token through duet = first Flash delta"
cat "$OUT/table.txt" | tee -a "$SUMMARY"
say "== done; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
