//! Traces over OTLP (contract §9): a real `duet` process exporting to an OTLP receiver in
//! this test (OTLP/HTTP decoded with the protocol's own protobuf types, and OTLP/gRPC served
//! with its generated service), checked span by span: the tree, the parent links to the
//! caller's `traceparent`, the GenAI attributes with exact values, the `traceparent` sent
//! upstream; and what happens with a dead collector or with no endpoint at all.

use std::{
    collections::BTreeMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message;
use serde_json::{Value, json};

use crate::{helpers::*, upstream::*};

/// A caller's trace context, as an instrumented client would send it.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The collector key: sent to the collector, and never anywhere in duet's log.
const OTEL_KEY: &str = "PLANTED-otel-key-5f2c9a";

/// One export request as the receiver got it.
#[derive(Clone)]
struct Received {
    headers: HeaderMap,
    request: ExportTraceServiceRequest,
}

/// An OTLP receiver on loopback: `POST /v1/traces` (OTLP/HTTP, protobuf) and the OTLP/gRPC
/// `TraceService`, both keeping every request.
struct Collector {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

#[derive(Clone)]
struct Grpc(Arc<Mutex<Vec<Received>>>);

#[async_trait::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        self.0.lock().unwrap().push(Received {
            headers,
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(
    State(received): State<Arc<Mutex<Vec<Received>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-protobuf");
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    received.lock().unwrap().push(Received { headers, request });
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

impl Collector {
    async fn start() -> Collector {
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(http_export))
            .route_service(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                TraceServiceServer::new(Grpc(Arc::clone(&received))),
            )
            .with_state(Arc::clone(&received));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // axum serves HTTP/1.1 and, for gRPC, HTTP/2 with prior knowledge on one port.
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, with the `service.name` of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for received in self.received.lock().unwrap().iter() {
            for rs in &received.request.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| &r.attributes[..])
                    .unwrap_or(&[]);
                let service = resource
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .map(value)
                    .unwrap_or(Value::Null);
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        spans.push((service.as_str().unwrap_or("").to_owned(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Waits (up to 20 s of real time: export runs on duet's own schedule) for `n` spans.
    async fn wait_for(&self, n: usize) -> Vec<(String, Span)> {
        for _ in 0..400 {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("expected {n} spans, got {}", self.spans().len());
    }

    fn headers(&self) -> Vec<HeaderMap> {
        let received = self.received.lock().unwrap();
        received.iter().map(|r| r.headers.clone()).collect()
    }
}

/// An attribute value as JSON, for exact comparisons.
fn value(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::ArrayValue(a)) => Value::Array(a.values.iter().map(value).collect()),
        other => panic!("unexpected attribute value {other:?}"),
    }
}

fn attributes(span: &Span) -> BTreeMap<String, Value> {
    span.attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(value).unwrap_or(Value::Null),
            )
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one run: its run span and its two model spans, Flash's first.
fn run_tree<'a>(spans: &'a [(String, Span)], run_id: &str) -> (&'a Span, &'a Span, &'a Span) {
    let of_run: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| attributes(s).get("duet.run_id") == Some(&json!(run_id)))
        .collect();
    assert_eq!(of_run.len(), 3, "one run span and two model spans per run");
    let run = *of_run
        .iter()
        .find(|s| s.name == "duet.run")
        .expect("run span");
    let model = |m: &str| {
        *of_run
            .iter()
            .find(|s| attributes(s).get("duet.model") == Some(&json!(m)))
            .expect("model span")
    };
    (run, model("flash"), model("pro"))
}

/// duet with Flash on a scripted OpenAI-compatible upstream (`upstream`), Pro simulated and
/// timing out after 0.5 s, exporting to `collector` over `protocol`.
fn duet_exporting(
    dir: &std::path::Path,
    upstream: &FixtureServer,
    endpoint: &str,
    extra: &[(&str, &str)],
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    let mut child = duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("FLASH_PROVIDER", "openai")
        .env("FLASH_MODEL", "gpt-4.1-mini")
        .env("FLASH_BASE_URL", upstream.base("/v1"))
        .env("FLASH_API_KEY", KEY)
        .env("SIMULATED_PRO_TTFT_S", "30")
        .env("PRO_TIMEOUT_S", "0.5")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            format!("authorization=Bearer%20{OTEL_KEY}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env("RUST_LOG", "trace")
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    (child, addr, log)
}

#[tokio::test]
async fn every_run_exports_its_span_tree_over_otlp_http() {
    let collector = Collector::start().await;
    let upstream = FixtureServer::start(vec![sse(wire("openai_stream_ok.sse"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, log) = duet_exporting(dir.path(), &upstream, &collector.url(), &[]);
    let client = direct_client();

    // A run under the caller's trace.
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .header("tracestate", "vendor=abc")
        .json(&json!({"query": "Write a haiku about the sea.", "max_tokens": 64}))
        .send()
        .await
        .unwrap();
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let events = read_events(resp).await;
    check_invariants(&events);
    assert_eq!(done(&events)["status"], "partial", "{events:?}");

    // A run whose traceparent is malformed: answered as usual, in a trace of its own.
    let resp = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("traceparent", "00-not-a-trace-01")
        .json(&json!({"model": "duet", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let other_run = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let _ = resp.bytes().await.unwrap();

    let spans = collector.wait_for(6).await;
    assert!(
        spans.iter().all(|(service, _)| service == "duet"),
        "service.name"
    );

    let (run, flash, pro) = run_tree(&spans, &run_id);
    // The run span: the caller's child, in the caller's trace.
    assert_eq!(hex(&run.trace_id), TRACE_ID);
    assert_eq!(hex(&run.parent_span_id), CALLER_SPAN);
    assert_eq!(run.kind, SpanKind::Server as i32);
    let a = attributes(run);
    assert_eq!(a["http.route"], "/query/stream");
    assert_eq!(a["duet.status"], "partial");
    // The model spans: the run span's children.
    for model in [flash, pro] {
        assert_eq!(model.trace_id, run.trace_id);
        assert_eq!(model.parent_span_id, run.span_id);
        assert_eq!(model.kind, SpanKind::Client as i32);
        assert!(model.end_time_unix_nano <= run.end_time_unix_nano);
    }
    assert_eq!(flash.name, "chat gpt-4.1-mini");
    let a = attributes(flash);
    let expected: BTreeMap<String, Value> = [
        ("duet.run_id", json!(run_id)),
        ("duet.model", json!("flash")),
        ("duet.outcome", json!("ok")),
        ("gen_ai.operation.name", json!("chat")),
        ("gen_ai.provider.name", json!("openai")),
        ("gen_ai.request.model", json!("gpt-4.1-mini")),
        ("gen_ai.request.max_tokens", json!(64)),
        ("gen_ai.response.model", json!("gpt-4.1-mini-2025-04-14")),
        ("gen_ai.usage.input_tokens", json!(27)),
        ("gen_ai.usage.output_tokens", json!(20)),
        ("gen_ai.response.finish_reasons", json!(["stop"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(a, expected);
    assert_ne!(
        flash.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    // Pro timed out: error.type and an error status, and no usage.
    assert_eq!(pro.name, "chat simulated-pro");
    let a = attributes(pro);
    assert_eq!(a["error.type"], "timeout");
    assert_eq!(a["duet.outcome"], "timeout");
    assert_eq!(a["gen_ai.provider.name"], "simulated");
    assert!(!a.contains_key("gen_ai.usage.output_tokens"), "{a:?}");
    let status = pro.status.as_ref().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_eq!(
        status.message,
        "pro did not finish within its deadline (0.5 s)"
    );

    // The upstream call carried the Flash span's context, and the caller's tracestate.
    let heads: Vec<String> = upstream.requests().into_iter().map(|r| r.head).collect();
    let sent = format!("traceparent: 00-{TRACE_ID}-{}-01", hex(&flash.span_id));
    assert!(
        heads[0].to_ascii_lowercase().contains(&sent),
        "{}",
        heads[0]
    );
    assert!(
        heads[0]
            .to_ascii_lowercase()
            .contains("tracestate: vendor=abc")
    );

    // The malformed traceparent: a new trace, not the caller's.
    let (run2, flash2, _) = run_tree(&spans, &other_run);
    assert_ne!(hex(&run2.trace_id), TRACE_ID);
    assert!(run2.parent_span_id.is_empty(), "a root span");
    assert_eq!(attributes(run2)["http.route"], "/v1/chat/completions");
    assert_eq!(flash2.parent_span_id, run2.span_id);
    let sent = format!("-{}-01", hex(&flash2.span_id));
    assert!(heads[1].contains(&hex(&run2.trace_id)) && heads[1].contains(&sent));

    // The collector got its key; duet's log (at trace level) never shows it.
    assert!(
        collector
            .headers()
            .iter()
            .all(|h| h["authorization"] == format!("Bearer {OTEL_KEY}"))
    );
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();
    assert!(
        !log.contains(OTEL_KEY),
        "the collector key leaked into the log"
    );
    let start: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "configuration")
        .unwrap();
    assert_eq!(start["traces"], collector.url());
    assert_eq!(start["traces_protocol"], "http/protobuf");
}

#[tokio::test]
async fn grpc_exports_the_same_tree() {
    let collector = Collector::start().await;
    let upstream = FixtureServer::start(vec![sse(wire("openai_stream_ok.sse"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, _log) = duet_exporting(
        dir.path(),
        &upstream,
        &collector.url(),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "duet-grpc"),
        ],
    );
    let resp = post_query_to(&direct_client(), &addr, json!({"query": "q"})).await;
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.status(), 200);
    let spans = collector.wait_for(3).await;
    assert!(spans.iter().all(|(service, _)| service == "duet-grpc"));
    let (run, flash, pro) = run_tree(&spans, &run_id);
    assert_eq!(attributes(run)["http.route"], "/query");
    assert_eq!(flash.parent_span_id, run.span_id);
    assert_eq!(pro.parent_span_id, run.span_id);
    assert_eq!(attributes(flash)["gen_ai.usage.output_tokens"], 20);
    // gRPC metadata carries the headers.
    assert_eq!(
        collector.headers()[0]["authorization"],
        format!("Bearer {OTEL_KEY}")
    );
    assert_eq!(terminate(child).await, Some(0));
}

#[tokio::test]
async fn a_dead_collector_neither_fails_nor_holds_up_runs() {
    // A port that was open a moment ago and is closed now: connections are refused.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let upstream = FixtureServer::start(vec![sse(wire("openai_stream_ok.sse"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, log) = duet_exporting(
        dir.path(),
        &upstream,
        &format!("http://{dead}"),
        &[("OTEL_BSP_SCHEDULE_DELAY", "10"), ("RUST_LOG", "info")],
    );
    let client = direct_client();
    for _ in 0..5 {
        let resp = client
            .post(format!("http://{addr}/query/stream"))
            .json(&json!({"query": "q"}))
            .send()
            .await
            .unwrap();
        let events = read_events(resp).await;
        check_invariants(&events);
        assert_eq!(done(&events)["status"], "partial");
        // Give the exporter time to try (and fail) between runs.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Shutdown's flush is bounded: the process still exits, and cleanly.
    let exit = tokio::time::timeout(Duration::from_secs(30), terminate(child))
        .await
        .expect("shutdown is not held up by the collector");
    assert_eq!(exit, Some(0));
    let log = log.join().unwrap();
    let failures = log
        .lines()
        .filter(|l| l.contains("trace export failed"))
        .count();
    assert_eq!(
        failures, 1,
        "one rate-limited line, not one per batch:\n{log}"
    );
    // Nor does the SDK log its own line per failed batch (it did: "OTLP export exhausted
    // retries", a warning every few seconds while the collector was down).
    let sdk_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"target\":\"opentelemetry"))
        .collect();
    assert!(sdk_lines.is_empty(), "the SDK's own lines: {sdk_lines:#?}");
}

#[tokio::test]
async fn without_an_endpoint_there_are_no_traces_and_no_traceparent_upstream() {
    let upstream = FixtureServer::start(vec![sse(wire("openai_stream_ok.sse"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("FLASH_PROVIDER", "openai")
        .env("FLASH_BASE_URL", upstream.base("/v1"))
        .env("FLASH_API_KEY", KEY)
        .env("SIMULATED_PRO_TTFT_S", "0.01")
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        // Set, but without an endpoint they change nothing.
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_BSP_SCHEDULE_DELAY", "10")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    let resp = direct_client()
        .post(format!("http://{addr}/query/stream"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let events = read_events(resp).await;
    check_invariants(&events);
    let head = upstream.requests()[0].head.to_ascii_lowercase();
    assert!(!head.contains("traceparent"), "{head}");
    assert_eq!(terminate(child).await, Some(0));
    let start: Value = log
        .join()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "configuration")
        .unwrap();
    assert_eq!(start["traces"], "off");
}

#[test]
fn a_bad_otel_variable_stops_the_service_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = duet_command(dir.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{stderr}");
}

/// Model spans end however the call ends: a Flash made useless by Pro's answer is
/// `skipped` (no error), and a client that leaves cuts both calls short (`cancelled`).
#[tokio::test]
async fn skipped_and_cancelled_calls_end_their_spans() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SIMULATED_FLASH_TTFT_S", "30")
        .env("FLASH_TIMEOUT_S", "60")
        .env("SIMULATED_PRO_TTFT_S", "0.3")
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = listening(&mut child);
    let client = direct_client();

    // Pro answers first: Flash is skipped.
    let resp = post_query_to(&client, &addr, json!({"query": "q"})).await;
    let skipped_run = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ok", "{body}");

    // The client leaves after `start`, before either model has answered.
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let gone_run = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let mut body = resp.bytes_stream();
    let _start = futures::StreamExt::next(&mut body).await;
    drop(body);

    let spans = collector.wait_for(6).await;
    let (run, flash, pro) = run_tree(&spans, &skipped_run);
    assert_eq!(attributes(run)["duet.status"], "ok");
    let a = attributes(flash);
    assert_eq!(a["duet.outcome"], "skipped");
    assert!(!a.contains_key("error.type"), "{a:?}");
    assert!(flash.end_time_unix_nano <= pro.end_time_unix_nano + 50_000_000);
    assert_eq!(attributes(pro)["duet.outcome"], "ok");

    let (run, flash, pro) = run_tree(&spans, &gone_run);
    assert_eq!(attributes(run)["duet.status"], "cancelled");
    for model in [flash, pro] {
        let a = attributes(model);
        assert_eq!(a["duet.outcome"], "cancelled");
        assert_eq!(a["error.type"], "cancelled");
    }
    assert_eq!(terminate(child).await, Some(0));
}

/// SIGTERM cuts a run short: its spans end (`cancelled`), and the flush at shutdown exports
/// them although the batch delay is far off.
#[tokio::test]
async fn shutdown_ends_the_spans_and_flushes_them() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("SIMULATED_FLASH_TTFT_S", "30")
        .env("SIMULATED_PRO_TTFT_S", "30")
        .env("FLASH_TIMEOUT_S", "60")
        .env("PRO_TIMEOUT_S", "60")
        .env("SHUTDOWN_GRACE_S", "0.1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url())
        // Only the shutdown flush can export within this test.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = listening(&mut child);
    let resp = direct_client()
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let reader = tokio::spawn(read_events(resp));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.spans().is_empty());
    assert_eq!(terminate(child).await, Some(0));
    let events = reader.await.unwrap();
    assert_eq!(done(&events)["status"], "cancelled");
    // Exported before the process exited.
    let spans = collector.spans();
    let (run, flash, pro) = run_tree(&spans, &run_id);
    assert_eq!(attributes(run)["duet.status"], "cancelled");
    for model in [flash, pro] {
        assert_eq!(attributes(model)["duet.outcome"], "cancelled");
    }
}

/// An endpoint may carry credentials in its user part or its query (some vendors' do): they
/// are never in the log, even at `RUST_LOG=trace`, where the HTTP client libraries would
/// print the URL they connect to.
#[tokio::test]
async fn credentials_in_the_endpoint_never_reach_the_log_even_at_trace() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let upstream = FixtureServer::start(vec![sse(wire("openai_stream_ok.sse"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, addr, log) = duet_exporting(
        dir.path(),
        &upstream,
        &format!("http://otel-user:pw-in-userinfo-4242@{dead}/?token=tok-in-query-4343"),
        &[("OTEL_BSP_SCHEDULE_DELAY", "10"), ("RUST_LOG", "trace")],
    );
    let client = direct_client();
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    let events = read_events(resp).await;
    check_invariants(&events);
    // Give the exporter time to try (and fail).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(terminate(child).await, Some(0));
    let log = log.join().unwrap();
    assert!(log.contains("trace export failed"), "the export was tried");
    for secret in ["pw-in-userinfo-4242", "tok-in-query-4343", OTEL_KEY, KEY] {
        assert!(!log.contains(secret), "the log shows {secret}");
    }
}
