#!/usr/bin/env bash
# What the rate limit shared by replicas (PostgreSQL, contract §8) costs per request
# (docs/benchmarks.md, "Rate limits shared on PostgreSQL"). Loopback only, about 3 minutes.
#
#   scripts/bench_rate_limit.sh
#
# 1. The statement alone: pgbench runs the very `INSERT ... ON CONFLICT DO UPDATE` of
#    src/api/rate_limit.rs (one client per bucket, then every client on one bucket).
# 2. Through duet: the stream benchmark at C=$C against duet on a fresh PostgreSQL database,
#    alternating rate limits off and on (a budget no request reaches, so every request pays
#    the statement and none is refused), $ROUNDS times each.
#
# Knobs: OUT, C (default 100), SECS (default 10), ROUNDS (default 2), PG_ADMIN_URL
# (default postgres://postgres@127.0.0.1:5432/postgres), SKIP_BUILD=1.
source "$(dirname "$0")/lib.sh"
OUT="${OUT:-$ROOT/target/bench/rate-limit-$(date +%Y%m%d-%H%M%S)}"
C="${C:-100}"
SECS="${SECS:-10}"
ROUNDS="${ROUNDS:-2}"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
mkdir -p "$OUT"
DB="duet_rl_bench_$$"
drop_db() { psql -q "$PG_ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true; }
trap 'cleanup; drop_db' EXIT
build
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $DB"
URL="${PG_ADMIN_URL%/*}/$DB"
DATABASE_URL="$URL" "$BIN" migrate >>"$OUT/migrate.log"

say "== $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"

# 1. The statement alone, prepared as sqlx prepares it, parameters inlined as pgbench needs.
take_sql() {
  cat <<EOF
\\set c random(1, $1)
WITH taken AS (
    INSERT INTO rate_limit_buckets AS b (bucket, tat)
    VALUES ('ip:10.0.0.' || :c, now() + 0.0001::float8 * interval '1 second')
    ON CONFLICT (bucket) DO UPDATE
        SET tat = GREATEST(b.tat, now()) + 0.0001::float8 * interval '1 second'
        WHERE GREATEST(b.tat, now()) + 0.0001::float8 * interval '1 second'
              <= now() + 100::float8 * interval '1 second'
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM taken) AS allowed,
       (SELECT EXTRACT(EPOCH FROM tat - now())::float8
          FROM rate_limit_buckets WHERE bucket = 'ip:10.0.0.' || :c) AS ahead_s;
EOF
}
for buckets in 1000 1; do
  take_sql "$buckets" >"$OUT/take-$buckets.sql"
  for clients in 1 8; do
    pgbench -n -M prepared -f "$OUT/take-$buckets.sql" -c "$clients" -j 2 -T 10 "$URL" \
      >"$OUT/pgbench-$buckets-$clients.txt" 2>&1
    say "-- statement, $buckets bucket(s), $clients connection(s): $(awk -F' = ' '/latency average/ {l=$2} /^tps/ {split($2, t, " "); printf "latency %s, %d statements/s", l, t[1]}' "$OUT/pgbench-$buckets-$clients.txt")"
  done
done

# 2. Through duet.
start_mock --ttft-ms 200 --token-ms 20 --tokens 19
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    if [ "$mode" = on ]; then limit=(RATE_LIMIT_PER_MINUTE=100000000 RATE_LIMIT_BURST=100000000)
    else limit=(RATE_LIMIT_PER_MINUTE=0); fi
    start_duet DATABASE_URL="$URL" "${limit[@]}"
    t0=$(cpu_ticks "$DUET_PID")
    bench_streams --target duet --url "http://127.0.0.1:$DUET_PORT/query/stream" \
      -c "$C" --duration "$SECS" --warmup 1 --json >"$OUT/duet-$mode-$round.json"
    t1=$(cpu_ticks "$DUET_PID")
    streams=$(jq '.streams' "$OUT/duet-$mode-$round.json")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
    say "-- C=$C rate limits $mode (round $round): $(jq -r '"\(.streams_per_s|floor)/s, ttfb p50=\(.ttfb.p50_ms) p99=\(.ttfb.p99_ms), first flash p50=\(.first_flash.p50_ms) p99=\(.first_flash.p99_ms), errors=\(.errors_total)"' "$OUT/duet-$mode-$round.json"); duet CPU $(awk -v c="$cpu" -v n="$streams" 'BEGIN {printf "%.2f", c * 1000 / n}') s per 1000 streams; fallbacks $(metric 'duet_rate_limit_fallbacks_total{reason="error"}')/$(metric 'duet_rate_limit_fallbacks_total{reason="timeout"}')"
    wait_metric duet_streams_active 0 30
    stop_pid "$DUET_PID"
  done
done
say "-- rows in rate_limit_buckets after the runs: $(psql -tA "$URL" -c 'select count(*) from rate_limit_buckets')"
say "== done; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
