#!/usr/bin/env bash
# The benchmark suite of docs/benchmarks.md, loopback only, bounded in time (about 5 minutes
# with the defaults). Results (JSON per run, logs, summary.txt) go to $OUT.
#
#   scripts/bench.sh                     # everything
#   PHASES="overhead" scripts/bench.sh   # some of: overhead capacity audit
#
# Knobs (environment): OUT, PHASES, LEVELS (concurrency levels, default "1 100 1000"),
# SECS (seconds per overhead run, default 15), MOCK_PACE (mock pacing flags),
# UPSTREAMS (how duet reaches the mock in the overhead runs: "http1 http2", default both),
# CAPACITY_H1 / CAPACITY_H2 (streams held open, default 6000 / 15000; 0 skips that run),
# DUET_ENV (extra VAR=VALUE words for every `duet serve`, e.g. "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"), AUDIT_RECORDS,
# PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres), SKIP_BUILD=1.
source "$(dirname "$0")/lib.sh"
OUT="${OUT:-$ROOT/target/bench/$(date +%Y%m%d-%H%M%S)}"
PHASES="${PHASES:-overhead capacity audit}"
LEVELS="${LEVELS:-1 100 1000}"
UPSTREAMS="${UPSTREAMS:-http1 http2}"
SECS="${SECS:-15}"
MOCK_PACE="${MOCK_PACE:---ttft-ms 200 --token-ms 20 --tokens 19}"
CAPACITY_H1="${CAPACITY_H1:-6000}"
CAPACITY_H2="${CAPACITY_H2:-15000}"
AUDIT_RECORDS="${AUDIT_RECORDS:-50000}"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DUET_ENV="${DUET_ENV:-}"
mkdir -p "$OUT"
trap cleanup EXIT
build
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem/ {print $2}') GiB; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
say "== duet $("$BIN" --version), results in $OUT"

# overhead: the same workload direct to the mock and through duet, at each concurrency, with
# duet reaching the mock over HTTP/1.1 (a connection per call) and over HTTP/2 (h2c, calls
# multiplexed; how real providers are reached over TLS).
phase_overhead() {
  local up
  for up in $UPSTREAMS; do
    overhead_runs "$up"
  done
}

overhead_runs() {
  local up="$1" tag
  start_mock $MOCK_PACE
  # shellcheck disable=SC2086 # DUET_ENV is a list of words
  if [ "$up" = http2 ]; then start_duet $DUET_ENV UPSTREAM_HTTP2=1; else start_duet $DUET_ENV; fi
  local c warm
  for c in $LEVELS; do
    tag="$up-c$c"
    warm=$([ "$c" -ge 100 ] && echo 1 || echo 3)
    say "-- C=$c direct (mock $MOCK_PACE) [duet upstream: $up]"
    bench_streams --target openai --url "http://127.0.0.1:$MOCK_PORT/v1/chat/completions" \
      -c "$c" --duration "$SECS" --warmup "$warm" --ramp "$([ "$c" -ge 1000 ] && echo 2 || echo 0)" \
      --json >"$OUT/direct-$tag.json"
    jq -r '"   ended=\(.ended) errors=\(.errors_total) \(.streams_per_s|floor)/s first_token p50=\(.first_token.p50_ms) p99=\(.first_token.p99_ms) end p50=\(.end.p50_ms) p99=\(.end.p99_ms)"' "$OUT/direct-$tag.json" | tee -a "$SUMMARY"

    say "-- C=$c through duet [$up]"
    local t0 t1 depth_file="$OUT/queue-depth-$tag.txt"
    : >"$depth_file"
    ( for _ in $(seq 1 $((SECS * 4 + 80))); do metric duet_audit_queue_depth >>"$depth_file" || true; sleep 0.25; done ) &
    local poller=$!
    t0=$(cpu_ticks "$DUET_PID")
    bench_streams --target duet --url "http://127.0.0.1:$DUET_PORT/query/stream" \
      -c "$c" --duration "$SECS" --warmup "$warm" --ramp "$([ "$c" -ge 1000 ] && echo 2 || echo 0)" \
      --json >"$OUT/duet-$tag.json"
    t1=$(cpu_ticks "$DUET_PID")
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    jq -r '"   ended=\(.ended) errors=\(.errors_total) \(.streams_per_s|floor)/s first_flash p50=\(.first_flash.p50_ms) p99=\(.first_flash.p99_ms) end p50=\(.end.p50_ms) p99=\(.end.p99_ms)"' "$OUT/duet-$tag.json" | tee -a "$SUMMARY"
    local streams cpu
    streams=$(jq '.streams' "$OUT/duet-$tag.json")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
    say "   duet CPU: ${cpu}s for $streams streams = $(awk -v c="$cpu" -v n="$streams" 'BEGIN {printf "%.2f", c * 1000 / n}') CPU-s per 1000 streams; audit queue depth max $(sort -n "$depth_file" | tail -1) over $(wc -l <"$depth_file") samples"
    say "   added: first token p50 $(jq -n --slurpfile d "$OUT/direct-$tag.json" --slurpfile r "$OUT/duet-$tag.json" '($r[0].first_flash.p50_ms - $d[0].first_token.p50_ms)*1000|round/1000') ms, p99 $(jq -n --slurpfile d "$OUT/direct-$tag.json" --slurpfile r "$OUT/duet-$tag.json" '($r[0].first_flash.p99_ms - $d[0].first_token.p99_ms)*1000|round/1000') ms; end p50 $(jq -n --slurpfile d "$OUT/direct-$tag.json" --slurpfile r "$OUT/duet-$tag.json" '($r[0].end.p50_ms - $d[0].end.p50_ms)*1000|round/1000') ms, p99 $(jq -n --slurpfile d "$OUT/direct-$tag.json" --slurpfile r "$OUT/duet-$tag.json" '($r[0].end.p99_ms - $d[0].end.p99_ms)*1000|round/1000') ms"
    wait_metric duet_streams_active 0 30
  done
  cleanup
}

# capacity: N streams held open at once (a slow upstream), duet's memory per open stream.
capacity_run() {
  local label="$1" n="$2"
  shift 2
  start_mock --ttft-ms 2000 --token-ms 2000 --tokens 20
  # shellcheck disable=SC2086 # DUET_ENV is a list of words
  start_duet SSE_KEEPALIVE_S=15 $DUET_ENV "$@"
  sleep 1
  local base_rss base_fds
  base_rss=$(rss_kb "$DUET_PID")
  base_fds=$(fds "$DUET_PID")
  bench_streams --target duet --url "http://127.0.0.1:$DUET_PORT/query/stream" \
    -c "$n" -n "$n" --ramp 20 --timeout 120 --json >"$OUT/capacity-$label.json" &
  local bench=$! peak_active=0 peak_fds=0 a f
  while kill -0 "$bench" 2>/dev/null; do
    a=$(metric duet_streams_active || echo 0)
    f=$(fds "$DUET_PID")
    [ "${a:-0}" -gt "$peak_active" ] && peak_active=$a
    [ "$f" -gt "$peak_fds" ] && peak_fds=$f
    sleep 0.5
  done
  wait "$bench" || true
  local hwm
  hwm=$(hwm_kb "$DUET_PID")
  say "-- capacity $label: asked $n, peak duet_streams_active=$peak_active, peak open at client=$(jq .peak_open "$OUT/capacity-$label.json"), ended=$(jq .ended "$OUT/capacity-$label.json"), errors=$(jq -c .errors "$OUT/capacity-$label.json")"
  say "   duet RSS baseline ${base_rss} KiB, peak ${hwm} KiB => $(awk -v b="$base_rss" -v p="$hwm" -v n="$peak_active" 'BEGIN {printf "%.1f", (p - b) / (n > 0 ? n : 1)}') KiB per open stream; fds baseline $base_fds, peak $peak_fds"
  cleanup
}

phase_capacity() {
  [ "$CAPACITY_H1" -gt 0 ] && capacity_run http1 "$CAPACITY_H1"
  [ "$CAPACITY_H2" -gt 0 ] && capacity_run http2 "$CAPACITY_H2" UPSTREAM_HTTP2=1
  return 0
}

# audit: the writer's sustained records/s on SQLite and on PostgreSQL.
phase_audit() {
  rm -f "$OUT/bench-audit.db"*
  "$BIN" bench audit --database-url "sqlite://$OUT/bench-audit.db" -n "$AUDIT_RECORDS" \
    --deadletter "$OUT/audit-deadletter.jsonl" --json >"$OUT/audit-sqlite.json"
  say "-- audit sqlite: $(jq -r '"\(.records) records, \(.records_per_s|floor) records/s, peak queue \(.peak_queue_depth), dead-lettered \(.deadlettered)"' "$OUT/audit-sqlite.json"); rows: $(sqlite3 "$OUT/bench-audit.db" 'select count(*) from dual_runs')"
  local db="duet_bench_$$"
  psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $db"
  local url="${PG_ADMIN_URL%/*}/$db"
  "$BIN" bench audit --database-url "$url" -n "$AUDIT_RECORDS" \
    --deadletter "$OUT/audit-deadletter.jsonl" --json >"$OUT/audit-postgres.json" || true
  say "-- audit postgres: $(jq -r '"\(.records) records, \(.records_per_s|floor) records/s, peak queue \(.peak_queue_depth), dead-lettered \(.deadlettered)"' "$OUT/audit-postgres.json"); rows: $(psql -tA "$url" -c 'select count(*) from dual_runs')"
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE $db WITH (FORCE)"
}

for phase in $PHASES; do
  "phase_$phase"
done
say "== done; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
