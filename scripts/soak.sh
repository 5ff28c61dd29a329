#!/usr/bin/env bash
# Endurance and faults, loopback only, bounded in time. Exits non-zero if a check fails.
#
#   scripts/soak.sh                      # soak (SOAK_SECS, default 300) + outage + kill9
#   SOAK_SECS=60 PHASES=soak scripts/soak.sh
#
# soak:   steady load (SOAK_C streams, default 50) mixing normal runs, timeouts, upstream
#         errors, mid-stream errors, stalls, client disconnects and slow readers. Checks:
#         no client-side error, every stream not left on purpose ended with `done`,
#         dual_runs has exactly one row per started run (ids from X-Run-Id), nothing
#         dead-lettered, duet_streams_active back to 0, RSS and fds back near baseline.
# outage: duet's PostgreSQL reached through a TCP proxy (socat) that is killed for
#         OUTAGE_SECS mid-load, then restarted: streams unaffected, records dead-lettered,
#         `duet audit replay` restores them, final count exact. Own database, dropped after.
# kill9:  SIGKILL under load; counts started runs with no row (the loss window).
source "$(dirname "$0")/lib.sh"
OUT="${OUT:-$ROOT/target/soak/$(date +%Y%m%d-%H%M%S)}"
PHASES="${PHASES:-soak outage kill9}"
SOAK_SECS="${SOAK_SECS:-300}"
SOAK_C="${SOAK_C:-50}"
# Longer than the writer's whole retry cycle (5 attempts, each waiting up to 5 s for a
# connection, plus about 7 s of backoff), or the writer simply rides the outage out.
OUTAGE_SECS="${OUTAGE_SECS:-45}"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
PROXY_PORT="${PROXY_PORT:-15433}"
MIX="${MIX:-normal:60,hang:5,error:10,midstream:5,stall:5,disconnect:10,slow:5}"
# Short deadlines so that faulty runs end in seconds, as they would with real timeouts.
# Ended runs stay in memory for Last-Event-ID resumes for RESUME_RETENTION_S (default 300 s,
# i.e. tens of thousands of runs at soak rates): a short retention lets the end-of-soak
# memory check see a leak rather than that deliberate, bounded buffer.
FAULT_ENV=(FLASH_TIMEOUT_S=1 PRO_TIMEOUT_S=3 STALL_TIMEOUT_S=1 RESUME_RETENTION_S=5)
mkdir -p "$OUT"
trap cleanup EXIT
build
FAILED=0
check() { # check DESCRIPTION CONDITION...
  local what="$1"; shift
  if "$@"; then echo "   ok: $what"; else echo "   FAILED: $what"; FAILED=1; fi
}
load() { # load SECONDS C IDS_FILE JSON_FILE
  bench_streams --target duet --url "http://127.0.0.1:$DUET_PORT/query/stream" \
    -c "$2" --duration "$1" --timeout 30 --mix "$MIX" --slow-read-ms 50 \
    --run-ids "$3" --json >"$4"
}
# started_ids FILE: the run ids of every started stream, sorted.
started_ids() { awk '{print $1}' "$1" | sort; }

phase_soak() {
  echo "== soak: ${SOAK_SECS}s at C=$SOAK_C, mix $MIX"
  rm -f "$OUT"/audit.db* "$OUT/deadletter.jsonl"
  start_mock --ttft-ms 100 --token-ms 10 --tokens 19
  start_duet "${FAULT_ENV[@]}"
  # Baseline after a short warm-up at the same load, so pools and allocator arenas exist.
  load 10 "$SOAK_C" "$OUT/warm-ids.txt" "$OUT/warm.json"
  wait_metric duet_streams_active 0 30
  sleep 2
  local rss0 fds0
  rss0=$(rss_kb "$DUET_PID"); fds0=$(fds "$DUET_PID")
  echo "   baseline: RSS ${rss0} KiB, fds $fds0"
  load "$SOAK_SECS" "$SOAK_C" "$OUT/soak-ids.txt" "$OUT/soak.json"
  wait_metric duet_streams_active 0 30 || true
  local started expected rows
  started=$(cat "$OUT/warm-ids.txt" "$OUT/soak-ids.txt" | wc -l)
  # Records are written by the background writer: give it a bounded moment.
  for _ in $(seq 1 100); do
    rows=$(sqlite3 "$OUT/audit.db" 'select count(*) from dual_runs')
    [ "$rows" -ge "$started" ] && break
    sleep 0.1
  done
  sleep 12 # past RESUME_RETENTION_S and a registry sweep, before the after-picture
  local rss1 fds1
  rss1=$(rss_kb "$DUET_PID"); fds1=$(fds "$DUET_PID")
  jq -c '{streams, ended, disconnected, errors_total, errors, statuses, kinds, streams_per_s, end_p99: .end.p99_ms}' "$OUT/soak.json"
  echo "   after: RSS ${rss1} KiB (peak $(hwm_kb "$DUET_PID") KiB), fds $fds1, rows $rows for $started started runs"
  check "no client-side error" [ "$(jq .errors_total "$OUT/soak.json")" = 0 ]
  check "every stream not left on purpose ended with done" \
    [ "$(awk '$2 != "done" && $2 != "disconnected"' "$OUT/warm-ids.txt" "$OUT/soak-ids.txt" | wc -l)" = 0 ]
  cat "$OUT/warm-ids.txt" "$OUT/soak-ids.txt" | awk '{print $1}' | sort >"$OUT/started.txt"
  sqlite3 "$OUT/audit.db" 'select run_id from dual_runs' | sort >"$OUT/stored.txt"
  check "dual_runs holds exactly the started runs ($started)" cmp -s "$OUT/started.txt" "$OUT/stored.txt"
  check "two model_traces per run" [ "$(sqlite3 "$OUT/audit.db" 'select count(*) from model_traces')" = $((2 * started)) ]
  check "nothing dead-lettered" [ ! -s "$OUT/deadletter.jsonl" ]
  check "duet_streams_active back to 0" [ "$(metric duet_streams_active)" = 0 ]
  check "fds back near baseline (+64)" [ "$fds1" -le $((fds0 + 64)) ]
  check "RSS back near baseline (+25%)" [ "$rss1" -le $((rss0 * 5 / 4)) ]
  sqlite3 "$OUT/audit.db" 'select status, count(*) from dual_runs group by status' | tr '\n' ' '; echo
  cleanup
}

phase_outage() {
  echo "== outage: PostgreSQL unreachable for ${OUTAGE_SECS}s under load"
  local db="duet_outage_$$" direct proxied
  direct="${PG_ADMIN_URL%/*}/$db"
  proxied="postgres://postgres@127.0.0.1:$PROXY_PORT/$db"
  psql -q "$PG_ADMIN_URL" -c "CREATE DATABASE $db"
  rm -f "$OUT/outage-deadletter.jsonl"*
  start_proxy() {
    setsid socat "TCP-LISTEN:$PROXY_PORT,bind=127.0.0.1,fork,reuseaddr" TCP:127.0.0.1:5432 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    sleep 0.3
  }
  # socat forks one child per connection: the whole process group goes.
  kill_proxy() { kill -- -"$PROXY_PID" 2>/dev/null || kill "$PROXY_PID" 2>/dev/null || true; }
  start_proxy
  start_mock --ttft-ms 100 --token-ms 10 --tokens 19
  start_duet "${FAULT_ENV[@]}" DATABASE_URL="$proxied" AUDIT_DEADLETTER_PATH="$OUT/outage-deadletter.jsonl"
  load $((OUTAGE_SECS + 30)) "$SOAK_C" "$OUT/outage-ids.txt" "$OUT/outage.json" &
  local bench=$!
  sleep 10
  echo "   proxy down at $(date +%T)"; kill_proxy
  sleep "$OUTAGE_SECS"
  start_proxy; echo "   proxy up at $(date +%T)"
  wait "$bench"
  wait_metric duet_streams_active 0 30 || true
  # The writer may still be riding out its retry schedule for the last failed batch.
  wait_metric duet_audit_queue_depth 0 60 || true
  sleep 10
  local started rows dead
  started=$(wc -l <"$OUT/outage-ids.txt")
  rows=$(psql -tA "$direct" -c 'select count(*) from dual_runs')
  dead=0
  [ -f "$OUT/outage-deadletter.jsonl" ] && dead=$(wc -l <"$OUT/outage-deadletter.jsonl")
  jq -c '{streams, ended, disconnected, errors_total, errors, statuses}' "$OUT/outage.json"
  echo "   started $started, rows before replay $rows, dead-lettered $dead, audit log: $(grep -c 'audit batch failed; retrying' "$OUT/duet.log") retries"
  stop_pid "$DUET_PID"
  env DATABASE_URL="$direct" AUDIT_DEADLETTER_PATH="$OUT/outage-deadletter.jsonl" "$BIN" audit replay | tee "$OUT/replay.txt"
  rows=$(psql -tA "$direct" -c 'select count(*) from dual_runs')
  awk '{print $1}' "$OUT/outage-ids.txt" | sort >"$OUT/outage-started.txt"
  psql -tA "$direct" -c 'select run_id from dual_runs' | sort >"$OUT/outage-stored.txt"
  check "no client-side error during the outage" [ "$(jq .errors_total "$OUT/outage.json")" = 0 ]
  check "records reached the dead-letter file" [ "$dead" -gt 0 ]
  check "after replay dual_runs holds exactly the started runs ($started, now $rows)" cmp -s "$OUT/outage-started.txt" "$OUT/outage-stored.txt"
  cleanup
  psql -q "$PG_ADMIN_URL" -c "DROP DATABASE $db WITH (FORCE)"
}

phase_kill9() {
  echo "== kill -9 under load (C=$SOAK_C)"
  rm -f "$OUT"/audit.db* "$OUT/deadletter.jsonl"
  start_mock --ttft-ms 100 --token-ms 10 --tokens 19
  start_duet "${FAULT_ENV[@]}"
  load 20 "$SOAK_C" "$OUT/kill-ids.txt" "$OUT/kill.json" &
  local bench=$!
  sleep 10
  local active queued
  active=$(metric duet_streams_active); queued=$(metric duet_audit_queue_depth)
  kill -9 "$DUET_PID"
  echo "   SIGKILL with duet_streams_active=$active, duet_audit_queue_depth=$queued"
  wait "$bench" || true
  local started rows
  started=$(wc -l <"$OUT/kill-ids.txt")
  awk '{print $1}' "$OUT/kill-ids.txt" | sort >"$OUT/kill-started.txt"
  sqlite3 "$OUT/audit.db" 'select run_id from dual_runs' | sort >"$OUT/kill-stored.txt"
  rows=$(wc -l <"$OUT/kill-stored.txt")
  local lost done_lost
  lost=$(comm -23 "$OUT/kill-started.txt" "$OUT/kill-stored.txt" | wc -l)
  # Runs whose client saw `done` but whose record never reached the database.
  done_lost=$( (comm -23 "$OUT/kill-started.txt" "$OUT/kill-stored.txt" | grep -Fxf - <(awk '$2 == "done" {print $1}' "$OUT/kill-ids.txt") || true) | wc -l)
  echo "   started $started, stored $rows, lost $lost (of which the client had seen done: $done_lost); streams cut: $(jq -c .errors "$OUT/kill.json")"
  check "no stored run that was not started" [ "$(comm -13 "$OUT/kill-started.txt" "$OUT/kill-stored.txt" | wc -l)" = 0 ]
  cleanup
}

for phase in $PHASES; do
  "phase_$phase"
done
[ "$FAILED" = 0 ] && echo "== all checks passed" || { echo "== some checks FAILED"; exit 1; }
