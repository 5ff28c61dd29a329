#!/usr/bin/env bash
# What traces cost per run (docs/benchmarks.md, "Traces"): the stream benchmark at C=$C
# against duet with traces off, on (exporting over OTLP/HTTP to a local sink that answers
# every export at once), and on with a dead collector (a closed port), alternating, $ROUNDS
# times each. Loopback only, about 3 minutes.
#
#   scripts/bench_traces.sh
#
# Knobs: OUT, C (default 100), SECS (default 15), ROUNDS (default 3), MODES (default
# "off on dead"), SKIP_BUILD=1.
source "$(dirname "$0")/lib.sh"
OUT="${OUT:-$ROOT/target/bench/traces-$(date +%Y%m%d-%H%M%S)}"
C="${C:-100}"
SECS="${SECS:-15}"
ROUNDS="${ROUNDS:-3}"
MODES="${MODES:-off on dead}"
SINK_PORT="${SINK_PORT:-19318}"
mkdir -p "$OUT"
trap cleanup EXIT
build
SUMMARY="$OUT/summary.txt"
say() { echo "$*" | tee -a "$SUMMARY"; }
say "== $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT"

# The collector: takes every OTLP/HTTP export and answers an empty ExportTraceServiceResponse
# (zero bytes of protobuf), counting the requests and bytes it got.
python3 - "$SINK_PORT" "$OUT/sink.txt" >"$OUT/sink.log" 2>&1 <<'EOF' &
import http.server, sys
port, report = int(sys.argv[1]), sys.argv[2]
seen = {"requests": 0, "bytes": 0}
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        seen["requests"] += 1
        seen["bytes"] += n
        with open(report, "w") as f:
            f.write(f"{seen['requests']} exports, {seen['bytes']} bytes\n")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
EOF
PIDS+=("$!")
wait_http "http://127.0.0.1:$SINK_PORT/"
DEAD_PORT=19319 # nothing listens here

start_mock --ttft-ms 200 --token-ms 20 --tokens 19
for round in $(seq 1 "$ROUNDS"); do
  for mode in $MODES; do
    case "$mode" in
      off) traces=() ;;
      on) traces=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$SINK_PORT") ;;
      dead) traces=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$DEAD_PORT") ;;
    esac
    start_duet "${traces[@]}"
    t0=$(cpu_ticks "$DUET_PID")
    bench_streams --target duet --url "http://127.0.0.1:$DUET_PORT/query/stream" \
      -c "$C" --duration "$SECS" --warmup 1 --json >"$OUT/duet-$mode-$round.json"
    t1=$(cpu_ticks "$DUET_PID")
    streams=$(jq '.streams' "$OUT/duet-$mode-$round.json")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
    say "-- C=$C traces $mode (round $round): $(jq -r '"\(.streams_per_s|floor)/s, ttfb p50=\(.ttfb.p50_ms) p99=\(.ttfb.p99_ms), first flash p50=\(.first_flash.p50_ms) p99=\(.first_flash.p99_ms), errors=\(.errors_total)"' "$OUT/duet-$mode-$round.json"); duet CPU $(awk -v c="$cpu" -v n="$streams" 'BEGIN {printf "%.2f", c * 1000 / n}') s per 1000 streams; RSS $(rss_kb "$DUET_PID") kB"
    wait_metric duet_streams_active 0 30
    stop_pid "$DUET_PID"
  done
done
say "-- sink: $(cat "$OUT/sink.txt" 2>/dev/null || echo 'no export'); export failures logged: $(grep -c 'trace export failed' "$OUT/duet.log" || true)"
say "== done; load after: $(cut -d' ' -f1-3 /proc/loadavg)"
