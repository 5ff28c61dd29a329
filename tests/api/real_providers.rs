//! End to end with the real adapters: `/query/stream` against `duet mock-provider` (served
//! in-process) and against the fixture server, for every family as Flash and as Pro; retries,
//! deadlines and redaction through the orchestrator. Real sockets, so real time: the margins
//! are generous and every wait is short.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use duet::{
    audit::{Deadline, MemorySink, Outcome},
    config::Config,
    devtools::mock::{self, MockConfig},
    server::{Parts, Server},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::{helpers::*, upstream::*};

fn fast() -> MockConfig {
    MockConfig {
        ttft: Duration::from_millis(20),
        token_interval: Duration::from_millis(2),
        tokens: 12,
        ..MockConfig::default()
    }
}

/// The base URL of a family on an upstream at `addr`.
fn base(family: &str, addr: std::net::SocketAddr) -> String {
    match family {
        "gemini" => format!("http://{addr}/v1beta"),
        "openai" => format!("http://{addr}/v1"),
        _ => format!("http://{addr}"),
    }
}

struct RealApp {
    server: Option<Server>,
    addr: std::net::SocketAddr,
    sink: MemorySink,
    client: reqwest::Client,
}

impl RealApp {
    /// duet with both roles on real adapters, built the way `duet serve` builds them.
    async fn start(vars: &[(&str, String)]) -> RealApp {
        let mut map: HashMap<&str, &str> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        map.entry("BIND_ADDR").or_insert("127.0.0.1:0");
        map.entry("LOG_FORMAT").or_insert("pretty");
        let config = Config::from_source(&map).unwrap();
        let sink = MemorySink::new();
        let parts = Parts::from_config(config, Arc::new(sink.clone())).unwrap();
        let server = Server::start(parts).await.unwrap();
        RealApp {
            addr: server.addr,
            server: Some(server),
            sink,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn stream(&self, body: Value) -> Vec<Ev> {
        let resp = self
            .client
            .post(format!("http://{}/query/stream", self.addr))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let events = read_events(resp).await;
        check_invariants(&events);
        events
    }

    /// The records once at least `n` are stored (they are written after `done`).
    async fn records(&self, n: usize) -> Vec<duet::audit::RunRecord> {
        for _ in 0..500 {
            let r = self.sink.records();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} records");
    }

    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }
}

fn role_vars(
    role: &str,
    family: &str,
    base: String,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, String)> {
    let up = if role == "flash" { "FLASH" } else { "PRO" };
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut v = vec![
        (leak(format!("{up}_PROVIDER")), family.to_owned()),
        (leak(format!("{up}_BASE_URL")), base),
        (leak(format!("{up}_API_KEY")), KEY.to_owned()),
    ];
    v.extend(extra.iter().map(|(k, val)| (*k, (*val).to_owned())));
    v
}

#[tokio::test]
async fn every_family_as_flash_and_as_pro_through_query_stream() {
    let mock = start_mock(fast()).await;
    for family in ["gemini", "openai", "anthropic"] {
        for (role, other) in [("flash", "pro"), ("pro", "flash")] {
            let mut vars = role_vars(role, family, base(family, mock), &[]);
            // The other role is the simulated one, slowed so that Pro is the last to end.
            let sim = if other == "pro" {
                [
                    ("SIMULATED_PRO_TTFT_S", "0.3"),
                    ("SIMULATED_PRO_TOKEN_S", "0.001"),
                ]
            } else {
                [
                    ("SIMULATED_FLASH_TTFT_S", "0.01"),
                    ("SIMULATED_FLASH_TOKEN_S", "0.001"),
                ]
            };
            vars.extend(sim.map(|(k, v)| (k, v.to_owned())));
            let app = RealApp::start(&vars).await;
            let events = app
                .stream(json!({"query": "write a haiku", "system": "be brief", "deltas": true}))
                .await;
            let answer = events
                .iter()
                .find(|e| e.event == role)
                .unwrap_or_else(|| panic!("{family} {role}: {:?}", names(&events)));
            let d = &answer.data;
            assert_eq!(d["provider"], family, "{family} {role}");
            assert_eq!(d["text"], mock::answer_text(12), "{family} {role}");
            assert_eq!(
                d["model_version"], d["model_name"],
                "the mock echoes the model"
            );
            assert_eq!(d["usage"]["output_tokens"], 12);
            assert!(d["usage"]["input_tokens"].as_u64().unwrap() > 0);
            assert!(d["ttft_ms"].as_u64().unwrap() >= 15, "{d}");
            let deltas: String = events
                .iter()
                .filter(|e| e.event == "delta" && e.data["model"] == role)
                .map(|e| e.data["text"].as_str().unwrap())
                .collect();
            assert_eq!(deltas, mock::answer_text(12));
            assert_eq!(done(&events)["status"], "ok", "{family} {role}");
            let record = &app.records(1).await[0];
            let trace = if role == "flash" {
                &record.flash
            } else {
                &record.pro
            };
            assert_eq!(trace.outcome, Outcome::Ok);
            assert_eq!(trace.output_tokens, Some(12));
            assert!(trace.finish_reason.is_some());
            app.stop().await;
        }
    }
}

#[tokio::test]
async fn retryable_failure_before_first_token_is_retried() {
    // 503, then the real stream: the client sees one clean answer.
    let server = FixtureServer::start(vec![
        status(503, wire("gemini_error_503.json")),
        sse(wire("gemini_stream_ok.sse")),
    ])
    .await;
    let mut vars = role_vars("pro", "gemini", base("gemini", server.addr), &[]);
    vars.push(("SIMULATED_FLASH_TTFT_S", "0.01".into()));
    let app = RealApp::start(&vars).await;
    let events = app.stream(json!({"query": "q"})).await;
    // The replayed answer is instant, so Pro may end before Flash (which is then skipped).
    assert_eq!(done(&events)["pro"], "ok");
    assert!(!names(&events).contains(&"error"));
    assert_eq!(server.requests().len(), 2);
    app.stop().await;

    // A Retry-After that fits the deadline is honoured.
    let server = FixtureServer::start(vec![
        with_header(
            status(429, wire("openai_error_429.json")),
            "retry-after",
            "0.3",
        ),
        sse(wire("openai_stream_ok.sse")),
    ])
    .await;
    let mut vars = role_vars("pro", "openai", base("openai", server.addr), &[]);
    vars.push(("SIMULATED_FLASH_TTFT_S", "0.01".into()));
    let app = RealApp::start(&vars).await;
    let started = Instant::now();
    let events = app.stream(json!({"query": "q"})).await;
    assert_eq!(done(&events)["pro"], "ok");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(server.requests().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn no_retry_after_first_token_nor_past_the_deadline() {
    // A retryable mid-stream error after text was relayed: not retried.
    let server =
        FixtureServer::start(vec![sse(wire("anthropic_stream_midstream_error.sse"))]).await;
    let mut vars = role_vars("pro", "anthropic", base("anthropic", server.addr), &[]);
    vars.push(("SIMULATED_FLASH_TTFT_S", "0.01".into()));
    let app = RealApp::start(&vars).await;
    let events = app.stream(json!({"query": "q", "deltas": true})).await;
    let err = events.iter().find(|e| e.event == "error").unwrap();
    assert_eq!(err.data["model"], "pro");
    assert_eq!(err.data["error_type"], "provider_error");
    assert_eq!(err.data["retryable"], true);
    assert_eq!(server.requests().len(), 1);
    assert_eq!(done(&events)["status"], "partial");
    let record = &app.records(1).await[0];
    assert_eq!(
        record.pro.text, "Gray waves fold to foam",
        "partial text is kept"
    );
    app.stop().await;

    // Gemini asks for 41 s; Flash has 1 s: one attempt, the real error, well within the deadline.
    let server = FixtureServer::start(vec![status(429, wire("gemini_error_429.json"))]).await;
    let vars = role_vars(
        "flash",
        "gemini",
        base("gemini", server.addr),
        &[("FLASH_TIMEOUT_S", "1"), ("SIMULATED_PRO_TTFT_S", "0.01")],
    );
    let app = RealApp::start(&vars).await;
    let events = app.stream(json!({"query": "q"})).await;
    let record = &app.records(1).await[0];
    assert!(record.flash.latency_ms < 900, "{}", record.flash.latency_ms);
    let err = events.iter().find(|e| e.event == "error").unwrap();
    assert_eq!(err.data["error_type"], "rate_limited");
    assert_eq!(server.requests().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn silent_stalled_and_endless_upstreams_end_at_their_deadlines() {
    let mock = start_mock(fast()).await;
    let cases = [
        // Never a byte: the total deadline.
        (
            "[[mock:hang]]",
            vec![("FLASH_TIMEOUT_S", "0.5")],
            "total",
            0.5,
        ),
        // Slow first token: the first-token deadline.
        (
            "[[mock:ttft_ms=3000]]",
            vec![("FLASH_TTFT_TIMEOUT_S", "0.3")],
            "first_token",
            0.3,
        ),
        // Two tokens, then silence: the stall deadline.
        (
            "[[mock:stall_after=2]]",
            vec![("STALL_TIMEOUT_S", "0.3")],
            "stall",
            0.3,
        ),
        // Tokens for ever: the total deadline.
        (
            "[[mock:endless,token_ms=1]]",
            vec![("FLASH_TIMEOUT_S", "0.6")],
            "total",
            0.6,
        ),
    ];
    // The cases run at once: each has its own server, and the deadlines are what is measured.
    let runs = cases
        .into_iter()
        .map(|(directive, extra, kind, deadline)| async move {
            let mut extra = extra;
            extra.push(("SIMULATED_PRO_TTFT_S", "1.5"));
            extra.push(("SIMULATED_PRO_TOKEN_S", "0.001"));
            let vars = role_vars("flash", "openai", base("openai", mock), &extra);
            let app = RealApp::start(&vars).await;
            let started = Instant::now();
            let resp_events = app.stream(json!({"query": format!("q {directive}")})).await;
            let err = resp_events
                .iter()
                .find(|e| e.event == "error")
                .unwrap_or_else(|| panic!("{directive}: {:?}", names(&resp_events)));
            assert_eq!(err.data["error_type"], "timeout", "{directive}");
            let record = &app.records(1).await[0];
            assert_eq!(record.flash.outcome, Outcome::Timeout, "{directive}");
            assert_eq!(
                record.flash.deadline.map(Deadline::as_str),
                Some(kind),
                "{directive}"
            );
            let msg = record.flash.error_message.as_deref().unwrap();
            assert!(!msg.contains("[deadline"), "{directive}: {msg}");
            // The flash error event came at its deadline, not later: it precedes Pro's answer,
            // which takes 1.5 s.
            assert!(
                names(&resp_events).iter().position(|n| *n == "error")
                    < names(&resp_events).iter().position(|n| *n == "pro"),
                "{directive}"
            );
            assert!(record.flash.latency_ms as f64 >= deadline * 1000.0 - 1.0);
            assert!(
                (record.flash.latency_ms as f64) < deadline * 1000.0 + 400.0,
                "{directive}: {} ms",
                record.flash.latency_ms
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            app.stop().await;
        });
    futures::future::join_all(runs).await;
}

#[tokio::test]
async fn mock_faults_are_classified_end_to_end() {
    let mock = start_mock(fast()).await;
    let cases = [
        ("gemini", "[[mock:status=400]]", "provider_error", false),
        ("openai", "[[mock:malformed]]", "invalid_response", false),
        ("anthropic", "[[mock:truncate]]", "invalid_response", false),
        ("gemini", "[[mock:midstream-error]]", "provider_error", true),
        ("anthropic", "[[mock:status=529]]", "provider_error", true),
        (
            "openai",
            "[[mock:status=429,retry_after=30]]",
            "rate_limited",
            true,
        ),
    ];
    for (family, directive, error_type, retryable) in cases {
        let vars = role_vars(
            "pro",
            family,
            base(family, mock),
            &[("PRO_TIMEOUT_S", "2"), ("SIMULATED_FLASH_TTFT_S", "0.01")],
        );
        let app = RealApp::start(&vars).await;
        let events = app.stream(json!({"query": format!("q {directive}")})).await;
        let err = events
            .iter()
            .find(|e| e.event == "error")
            .unwrap_or_else(|| panic!("{family} {directive}: {:?}", names(&events)));
        assert_eq!(err.data["error_type"], error_type, "{family} {directive}");
        assert_eq!(err.data["retryable"], retryable, "{family} {directive}");
        assert_eq!(done(&events)["status"], "partial");
        app.stop().await;
    }
    // no-done: finished at once all the same.
    let vars = role_vars(
        "pro",
        "openai",
        base("openai", mock),
        &[("SIMULATED_FLASH_TTFT_S", "0.01")],
    );
    let app = RealApp::start(&vars).await;
    let events = app.stream(json!({"query": "[[mock:no-done]]"})).await;
    assert_eq!(done(&events)["status"], "ok");
    app.stop().await;
}

/// An upstream that echoes the key back, as OpenAI does for a bad key (Flash: a 401 body) and
/// as a broken server might mid-stream (Pro), against the real binary: its events, its audit
/// record (read back from its SQLite file) and its whole log at `trace` must not hold the key.
/// Run for a key with a known shape (`sk-…`, which the shape-based pass would remove anyway)
/// and for one with no known shape, which only the exact-secret pass can catch.
///
/// The real process, not an in-process subscriber: a thread-local `set_default` subscriber
/// misses events whose callsites another test thread registered first (tracing caches each
/// callsite's interest globally), which made the in-process version fail about 1 run in 10.
#[tokio::test]
async fn a_planted_key_appears_in_no_event_record_or_log() {
    for key in [KEY, "ollama-local-secret-42"] {
        planted_key_stays_out(key).await;
    }
}

async fn planted_key_stays_out(key: &str) {
    let echo = format!(
        "{{\"error\":{{\"message\":\"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys.\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"invalid_api_key\"}}}}"
    );
    let mid = format!(
        "data: {{\"error\":{{\"message\":\"key {key} revoked\",\"type\":\"server_error\"}}}}\n\n"
    );
    let flash_up = FixtureServer::start(vec![status(401, echo.into_bytes())]).await;
    let pro_up = FixtureServer::start(vec![sse(mid.into_bytes())]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "trace")
        .env("FLASH_PROVIDER", "openai")
        .env("FLASH_BASE_URL", base("openai", flash_up.addr))
        .env("FLASH_API_KEY", key)
        .env("PRO_PROVIDER", "openai")
        .env("PRO_BASE_URL", base("openai", pro_up.addr))
        .env("PRO_API_KEY", key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": "q", "deltas": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let run_id: uuid::Uuid = resp.headers()["x-run-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let raw = resp.text().await.unwrap();
    // SIGTERM drains the audit queue before the process exits.
    assert_eq!(terminate(child).await, Some(0));
    let logs = log.join().unwrap();

    assert!(raw.contains("invalid_api_key"), "{raw}");
    assert!(!raw.contains(key), "events: {raw}");
    assert!(
        !raw.contains("127.0.0.1"),
        "no internal address in events: {raw}"
    );
    let db = format!("sqlite://{}", dir.path().join("duet.db").display());
    let store = duet::audit::Store::connect(&db).await.unwrap();
    let record = store
        .fetch(run_id)
        .await
        .unwrap()
        .expect("the run's record");
    let record = serde_json::to_string(&record).unwrap();
    assert!(!record.contains(key), "record: {record}");
    assert!(
        record.contains("[redacted]"),
        "the detail is kept, redacted: {record}"
    );
    assert!(logs.contains("model failed"), "logs captured: {logs}");
    assert!(
        logs.contains("[redacted]"),
        "the detail is logged, redacted: {logs}"
    );
    assert!(!logs.contains(key), "logs: {logs}");
}

/// Every log line a run writes carries its `run_id` (the JSON log's `span`), from each place
/// a run logs: a retry before the first token, a model's end (at `debug`), a model's failure,
/// the run's end. The run's span is entered only around the work that may log, not around
/// every poll of the run (docs/benchmarks.md, "Relay CPU, second pass"), so each place is
/// checked. The real process, for the reason given above.
#[tokio::test]
async fn every_log_line_of_a_run_carries_its_run_id() {
    // Flash: a 503 (retried), then an answer. Pro: a 401, which fails the model at once.
    let flash_up = FixtureServer::start(vec![
        status(503, wire("openai_error_503.json")),
        sse(wire("openai_stream_ok.sse")),
    ])
    .await;
    let pro_up = FixtureServer::start(vec![status(
        401,
        br#"{"error":{"message":"bad key","type":"invalid_request_error","code":"invalid_api_key"}}"#
            .to_vec(),
    )])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = duet_command(dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .env("FLASH_PROVIDER", "openai")
        .env("FLASH_BASE_URL", base("openai", flash_up.addr))
        .env("FLASH_API_KEY", KEY)
        .env("PRO_PROVIDER", "openai")
        .env("PRO_BASE_URL", base("openai", pro_up.addr))
        .env("PRO_API_KEY", KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (addr, log) = listening(&mut child);
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/query/stream"))
        .header("x-request-id", "req-7")
        .json(&json!({"query": "q", "deltas": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let events = read_events(resp).await;
    assert_eq!(done(&events)["flash"], "ok");
    assert_eq!(done(&events)["pro"], "error");
    assert_eq!(terminate(child).await, Some(0));
    let logs = log.join().unwrap();

    let wanted = [
        "retrying before first token",
        "model ended",
        "model failed",
        "run ended",
    ];
    let mut seen = Vec::new();
    for line in logs.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let Some(message) = v["message"].as_str() else {
            continue;
        };
        if wanted.contains(&message) {
            assert_eq!(v["span"]["run_id"], run_id.as_str(), "{line}");
            assert_eq!(v["span"]["client_request_id"], "req-7", "{line}");
            seen.push(message.to_owned());
        }
    }
    for message in wanted {
        assert!(
            seen.iter().any(|m| m == message),
            "no {message:?} in {logs}"
        );
    }
    assert_eq!(flash_up.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_serves_a_thousand_concurrent_streams() {
    let mock = start_mock(MockConfig {
        ttft: Duration::from_millis(50),
        token_interval: Duration::from_millis(20),
        tokens: 10,
        // All on one connection here: this is about the mock, not duet's connection pool.
        h2_max_streams: 2000,
    })
    .await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let started = Instant::now();
    let calls = (0..1000).map(|_| {
        let client = client.clone();
        async move {
            let body = client
                .post(format!("http://{mock}/v1/chat/completions"))
                .json(&json!({"model": "m", "stream": true}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(body.ends_with("data: [DONE]\n\n"));
        }
    });
    futures::future::join_all(calls).await;
    // Each stream takes 0.23 s of pacing; all of them together should take little more.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Upstreams announce a limit of concurrent HTTP/2 streams per connection (often 100), and
/// hyper queues calls past it on the one connection. duet spreads its calls over as many
/// connections as they need, so a call never waits for another call to finish: here the
/// mock allows 2 streams per connection, 3 runs make 6 calls, and every one gets its first
/// token at once. The control run, with spreading effectively off, shows the queue.
#[tokio::test]
async fn calls_past_an_upstreams_stream_limit_open_more_connections() {
    let mock = start_mock(MockConfig {
        ttft: Duration::from_millis(100),
        token_interval: Duration::from_millis(50),
        tokens: 20,
        h2_max_streams: 2,
    })
    .await;
    // Each answer takes 1.1 s; a call queued behind one gets its first token after it.
    let ttfts = |per_connection: &'static str| async move {
        let mut vars = role_vars("flash", "openai", base("openai", mock), &[]);
        vars.extend(role_vars("pro", "openai", base("openai", mock), &[]));
        vars.push(("UPSTREAM_HTTP2", "1".to_owned()));
        vars.push(("UPSTREAM_STREAMS_PER_CONNECTION", per_connection.to_owned()));
        let app = RealApp::start(&vars).await;
        let body = json!({"query": "q"});
        let (a, b, c) = tokio::join!(
            app.stream(body.clone()),
            app.stream(body.clone()),
            app.stream(body)
        );
        for events in [a, b, c] {
            assert_eq!(done(&events)["status"], "ok", "{:?}", names(&events));
        }
        let records = app.records(3).await;
        assert_eq!(records.len(), 3);
        app.stop().await;
        // Pro always runs to its end; Flash may be skipped when Pro ends first.
        let pro: Vec<u64> = records.iter().map(|r| r.pro.ttft_ms.unwrap()).collect();
        let flash: Vec<u64> = records.iter().filter_map(|r| r.flash.ttft_ms).collect();
        (pro, flash)
    };
    let (pro, flash) = ttfts("2").await;
    assert!(
        pro.iter().chain(&flash).all(|&t| t < 700),
        "every call started at once: pro {pro:?}, flash {flash:?}"
    );
    let (pro, _) = ttfts("1000").await;
    assert!(
        pro.iter().any(|&t| t > 1000),
        "one connection queues calls past the limit: pro {pro:?}"
    );
}

/// An OpenAI-compatible upstream that keeps its connections alive (HTTP/1.1, chunked) and,
/// like a real one, sends `[DONE]` and the end of the body a little after the usage chunk
/// that finishes the call. Counts the connections it accepts.
async fn keep_alive_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let body = wire("openai_stream_ok.sse");
    let text = String::from_utf8(body).unwrap();
    let cut = text.rfind("data: [DONE]").unwrap();
    let (answer, done) = (text[..cut].to_owned(), text[cut..].to_owned());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (answer, done) = (answer.clone(), done.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    if read_request(&mut socket, &mut buf).await.is_none() {
                        return;
                    }
                    let sent = async {
                        socket
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                  transfer-encoding: chunked\r\n\r\n",
                            )
                            .await?;
                        let frame = format!("{:x}\r\n{answer}\r\n", answer.len());
                        socket.write_all(frame.as_bytes()).await?;
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let frame = format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
                        socket.write_all(frame.as_bytes()).await
                    };
                    if sent.await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

/// An HTTP/1.1 upstream connection serves one call after another: the rest of a finished
/// call's body is read, so hyper gives the connection back to the pool instead of closing it
/// (one TCP handshake, and one TIME_WAIT socket, per call otherwise).
#[tokio::test]
async fn finished_http1_calls_leave_their_connection_for_the_next_call() {
    let (upstream, connections) = keep_alive_upstream().await;
    let mut vars = role_vars("flash", "openai", base("openai", upstream), &[]);
    vars.extend(role_vars("pro", "openai", base("openai", upstream), &[]));
    let app = RealApp::start(&vars).await;
    for _ in 0..4 {
        let events = app.stream(json!({"query": "q"})).await;
        assert_eq!(done(&events)["status"], "ok");
        // The rest of the body comes 30 ms after the finish: a generous margin for it
        // before the next call looks for an idle connection.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Flash and Pro each have their own pool: one connection each, for four runs.
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    app.stop().await;
}
