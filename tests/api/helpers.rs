//! Test scaffolding: a scripted provider, a server on port 0, and an SSE reader.

#![allow(dead_code, reason = "each test module uses a different part")]

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use duet::{
    audit::{AuditSink, AuditWriter, MemorySink, RunRecord, Store, WriterOptions},
    config::Config,
    metrics::Metrics,
    providers::{
        Completion, ErrorType, ModelRequest, Provider, ProviderError, ProviderEvent,
        ProviderStream, Usage,
    },
    server::{Parts, Server},
};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;

/// One step of a scripted model call.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Wait(Duration),
    Delta(&'static str),
    /// Sends the query itself back as one delta (for injection tests).
    EchoQuery,
    Finish,
    /// As `Finish`, with the model version the upstream says answered.
    FinishAs(&'static str),
    Fail(ErrorType, bool),
    Panic,
    /// Never yields again.
    Hang,
    /// Ends the stream without `Finished` (a truncated answer).
    End,
}

pub(crate) fn ms(n: u64) -> Step {
    Step::Wait(Duration::from_millis(n))
}

/// A provider that plays scripts, one per attempt (the last repeats), and counts calls
/// started and streams dropped.
pub(crate) struct Scripted {
    name: &'static str,
    model: &'static str,
    scripts: Vec<Vec<Step>>,
    pub started: Arc<AtomicUsize>,
    pub dropped: Arc<AtomicUsize>,
    /// Deltas handed out, to check backpressure.
    pub yielded: Arc<AtomicUsize>,
    /// Every request it was asked, oldest first.
    pub requests: Arc<std::sync::Mutex<Vec<ModelRequest>>>,
}

impl Scripted {
    pub(crate) fn new(model: &'static str, script: Vec<Step>) -> Arc<Self> {
        Self::attempts(model, vec![script])
    }

    pub(crate) fn attempts(model: &'static str, scripts: Vec<Vec<Step>>) -> Arc<Self> {
        Arc::new(Scripted {
            name: "scripted",
            model,
            scripts,
            started: Arc::default(),
            dropped: Arc::default(),
            yielded: Arc::default(),
            requests: Arc::default(),
        })
    }

    /// The requests it was asked, oldest first.
    pub(crate) fn requests(&self) -> Vec<ModelRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub(crate) fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub(crate) fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Counts a drop of the stream it lives in.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Provider for Scripted {
    fn provider_name(&self) -> &str {
        self.name
    }

    fn model_name(&self) -> &str {
        self.model
    }

    fn stream(&self, request: &ModelRequest) -> ProviderStream {
        let attempt = self.started.fetch_add(1, Ordering::SeqCst);
        self.requests.lock().unwrap().push(request.clone());
        let script = self.scripts[attempt.min(self.scripts.len() - 1)].clone();
        let counter = DropCounter(Arc::clone(&self.dropped));
        let yielded = Arc::clone(&self.yielded);
        let query = request.conversation.last_user().to_owned();
        let model = self.model;
        let state = (script.into_iter(), counter, 0u64);
        futures::stream::unfold(state, move |(mut steps, counter, mut n)| {
            let query = query.clone();
            let yielded = Arc::clone(&yielded);
            async move {
                loop {
                    let item = match steps.next()? {
                        Step::Wait(d) => {
                            tokio::time::sleep(d).await;
                            continue;
                        }
                        Step::Delta(t) => {
                            n += 1;
                            yielded.fetch_add(1, Ordering::SeqCst);
                            Ok(ProviderEvent::Delta(t.to_owned()))
                        }
                        Step::EchoQuery => {
                            n += 1;
                            Ok(ProviderEvent::Delta(query.clone()))
                        }
                        Step::Finish => Ok(ProviderEvent::Finished(Completion {
                            finish_reason: Some("stop".into()),
                            usage: Usage {
                                input_tokens: Some(7),
                                output_tokens: Some(n),
                            },
                            model_version: Some(format!("{model}-v1")),
                        })),
                        Step::FinishAs(version) => Ok(ProviderEvent::Finished(Completion {
                            finish_reason: Some("stop".into()),
                            usage: Usage {
                                input_tokens: Some(7),
                                output_tokens: Some(n),
                            },
                            model_version: Some(version.to_owned()),
                        })),
                        Step::Fail(kind, retryable) => Err(ProviderError::new(
                            kind,
                            retryable,
                            format!("{model} failed ({kind})"),
                        )
                        .with_detail(format!("upstream said no to {model}"))),
                        Step::Panic => panic!("scripted provider panic"),
                        Step::Hang => {
                            std::future::pending::<()>().await;
                            return None;
                        }
                        Step::End => return None,
                    };
                    return Some((item, (steps, counter, n)));
                }
            }
        })
        .boxed()
    }
}

pub(crate) struct TestApp {
    pub addr: std::net::SocketAddr,
    pub server: Option<Server>,
    pub sink: MemorySink,
    pub client: reqwest::Client,
    pub flash: Arc<Scripted>,
    pub pro: Arc<Scripted>,
}

/// Config for tests: defaults plus overrides, bound to port 0.
pub(crate) fn config(overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<&str, &str> = overrides.iter().copied().collect();
    vars.entry("BIND_ADDR").or_insert("127.0.0.1:0");
    vars.entry("LOG_FORMAT").or_insert("pretty");
    Config::from_source(&vars).expect("test config is valid")
}

/// The usual pair: Flash answers after 300 ms, Pro after 2 s.
pub(crate) fn normal_flash() -> Vec<Step> {
    vec![
        ms(300),
        Step::Delta("Quick"),
        ms(10),
        Step::Delta(" answer"),
        Step::Finish,
    ]
}

pub(crate) fn normal_pro() -> Vec<Step> {
    vec![
        ms(2000),
        Step::Delta("Careful"),
        ms(20),
        Step::Delta(" final"),
        ms(20),
        Step::Delta(" answer"),
        Step::Finish,
    ]
}

pub(crate) async fn spawn_app(
    flash: Vec<Step>,
    pro: Vec<Step>,
    overrides: &[(&str, &str)],
) -> TestApp {
    spawn_with(
        Scripted::new("flash-m", flash),
        Scripted::new("pro-m", pro),
        overrides,
    )
    .await
}

pub(crate) async fn spawn_with(
    flash: Arc<Scripted>,
    pro: Arc<Scripted>,
    overrides: &[(&str, &str)],
) -> TestApp {
    let sink = MemorySink::new();
    let sink_dyn: Arc<dyn AuditSink> = Arc::new(sink.clone());
    let metrics = Metrics::new().expect("metrics");
    spawn_parts(flash, pro, overrides, sink, sink_dyn, None, metrics).await
}

/// A server whose runs go through a real [`AuditWriter`] into `store` (records are not
/// kept in `TestApp::sink`). Stop the app, then shut the writer down, to drain it.
pub(crate) async fn spawn_audited(
    flash: Arc<Scripted>,
    pro: Arc<Scripted>,
    overrides: &[(&str, &str)],
    store: Store,
    options: WriterOptions,
) -> (TestApp, AuditWriter) {
    let metrics = Metrics::new().expect("metrics");
    let writer = AuditWriter::start(Arc::new(store.clone()), options, metrics.clone())
        .expect("writer starts");
    let app = spawn_parts(
        flash,
        pro,
        overrides,
        MemorySink::new(),
        Arc::new(writer.clone()),
        Some(store),
        metrics,
    )
    .await;
    (app, writer)
}

/// A server with its own sink and no audit database.
pub(crate) async fn spawn_sink(
    flash: Arc<Scripted>,
    pro: Arc<Scripted>,
    sink: Arc<dyn AuditSink>,
) -> TestApp {
    let metrics = Metrics::new().expect("metrics");
    spawn_parts(flash, pro, &[], MemorySink::new(), sink, None, metrics).await
}

async fn spawn_parts(
    flash: Arc<Scripted>,
    pro: Arc<Scripted>,
    overrides: &[(&str, &str)],
    sink: MemorySink,
    sink_dyn: Arc<dyn AuditSink>,
    store: Option<Store>,
    metrics: Metrics,
) -> TestApp {
    let parts = Parts {
        config: config(overrides),
        flash: flash.clone(),
        pro: pro.clone(),
        sink: sink_dyn,
        metrics,
        store,
        instance: None,
    };
    let server = Server::start(parts).await.expect("server starts");
    TestApp {
        addr: server.addr,
        server: Some(server),
        sink,
        client: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client"),
        flash,
        pro,
    }
}

/// One parsed server-sent event.
#[derive(Debug, Clone)]
pub(crate) struct Ev {
    pub event: String,
    pub id: String,
    pub data: Value,
}

/// `data` of the first event named `name` in `events`.
pub(crate) fn event_data<'a>(events: &'a [Ev], name: &str) -> &'a Value {
    &events
        .iter()
        .find(|e| e.event == name)
        .unwrap_or_else(|| panic!("no {name} event in {events:?}"))
        .data
}

impl TestApp {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) async fn post_stream(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/query/stream"))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// `POST /query` with a JSON body.
    pub(crate) async fn post_query(&self, body: Value) -> reqwest::Response {
        post_query_to(&self.client, self.addr, body).await
    }

    /// Runs a query and returns every event until the stream ends.
    pub(crate) async fn stream(&self, body: Value) -> Vec<Ev> {
        let resp = self.post_stream(body).await;
        assert_eq!(resp.status(), 200);
        read_events(resp).await
    }

    /// Waits (on the test clock) until the sink holds `n` records.
    pub(crate) async fn records(&self, n: usize) -> Vec<RunRecord> {
        for _ in 0..1000 {
            let records = self.sink.records();
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} records, have {}", self.sink.records().len());
    }

    pub(crate) async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean stop");
        }
    }
}

/// `POST /query` with a JSON body, from `client` to the service at `addr` (a test's own
/// process, say); [`TestApp::post_query`] for a test app.
pub(crate) async fn post_query_to(
    client: &reqwest::Client,
    addr: impl std::fmt::Display,
    body: Value,
) -> reqwest::Response {
    client
        .post(format!("http://{addr}/query"))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// The service's `/metrics` exposition (asserting 200).
pub(crate) async fn scrape(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

pub(crate) async fn read_events(resp: reqwest::Response) -> Vec<Ev> {
    let mut events = Vec::new();
    let mut stream = resp.bytes_stream().eventsource();
    while let Some(ev) = stream.next().await {
        let ev = ev.expect("well-formed event stream");
        events.push(Ev {
            event: ev.event,
            id: ev.id,
            data: serde_json::from_str(&ev.data).expect("data is JSON"),
        });
    }
    events
}

pub(crate) fn names(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

/// Checks the invariants every stream keeps: ids `{run_id}:{seq}` from 0 without gaps, every
/// data object carries the run id, `start` first and `done` last and once.
pub(crate) fn check_invariants(events: &[Ev]) -> String {
    assert!(!events.is_empty());
    let run_id = events[0].data["run_id"]
        .as_str()
        .expect("run_id")
        .to_owned();
    for (seq, ev) in events.iter().enumerate() {
        assert_eq!(ev.id, format!("{run_id}:{seq}"), "{ev:?}");
        assert_eq!(ev.data["run_id"], run_id.as_str());
    }
    assert_eq!(events[0].event, "start");
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"));
    assert_eq!(names(events).iter().filter(|n| **n == "done").count(), 1);
    run_id
}

pub(crate) fn done(events: &[Ev]) -> &Value {
    &events.last().expect("events").data
}

/// The `duet` binary in `dir`, with a clean environment and JSON logs.
pub(crate) fn duet_command(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_FORMAT", "json");
    cmd
}

/// For a child started with `BIND_ADDR=127.0.0.1:0` and piped stdout: the address from its
/// "listening" log line (the one place port 0's choice is told), and a thread that keeps
/// reading stdout and returns the whole log once the child exits.
pub(crate) fn listening(
    child: &mut std::process::Child,
) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let mut log = String::new();
    let addr = loop {
        let line = lines.next().expect("a listening line").unwrap();
        log.push_str(&line);
        log.push('\n');
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    let rest = std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    (addr, rest)
}

/// Sends SIGTERM and returns the exit code.
pub(crate) async fn terminate(mut child: std::process::Child) -> Option<i32> {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap()
        .code()
}

/// Skips a test whose tool or service is missing: a notice on a developer's machine, a
/// failure in CI (`CI` set), where `.ci/run` installs or starts everything the suite needs,
/// so a test that silently stopped running cannot pass there.
pub(crate) fn skip(reason: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("CI is set, so this test may not be skipped: {reason}");
    }
    // Straight to stderr, not eprintln!: the harness captures the macros' output of passing
    // tests, and this notice is meant to be seen.
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("notice: skipping: {reason}\n").as_bytes());
}

/// A replica of `duet serve` on `url`, on a port of its own, whose simulated Pro model takes
/// `pro_ttft_s` to answer (Flash and the tokens are quick), with `INSTANCE_LEASE_S` =
/// `lease_s` and any `extra` settings: what the tests about several processes start.
pub(crate) fn replica(
    dir: &std::path::Path,
    url: &str,
    pro_ttft_s: &str,
    lease_s: &str,
    extra: &[(&str, &str)],
) -> (std::process::Child, String) {
    let mut child = duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", url)
        .env("INSTANCE_LEASE_S", lease_s)
        .env("SIMULATED_FLASH_TTFT_S", "0.01")
        .env("SIMULATED_FLASH_TOKEN_S", "0.001")
        .env("SIMULATED_PRO_TTFT_S", pro_ttft_s)
        .env("SIMULATED_PRO_TOKEN_S", "0.001")
        .env("PRO_TIMEOUT_S", "120")
        .envs(extra.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = listening(&mut child);
    (child, addr)
}

/// `duet mock-provider`, served in-process on a free loopback port with `config`; its
/// address. It serves until the test's runtime ends.
pub(crate) async fn start_mock(config: duet::devtools::mock::MockConfig) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(duet::devtools::mock::serve(
        listener,
        config,
        std::future::pending(),
    ));
    addr
}

/// A client that never goes through a proxy from the environment.
pub(crate) fn direct_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}
