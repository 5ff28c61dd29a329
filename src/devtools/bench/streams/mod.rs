//! `duet bench streams`: the load generator. C workers each open one SSE stream at a time
//! against a URL, until a request count or a duration is used up, and time every stream.
//!
//! Two targets, so that one workload can be compared with and without the relay:
//! - `duet`: `POST /query/stream` (`{"query","deltas"}`); the first token is the first
//!   `delta` of either model (or the first answer event without deltas), the end is `done`.
//! - `openai`: an OpenAI-compatible `POST …/chat/completions` with `"stream": true`, such as
//!   `duet mock-provider`; the first token is the first chunk with content, the end is
//!   `data: [DONE]`.
//!
//! Client-side cost is kept low so the generator is not the bottleneck: one reqwest client
//! (one pool, HTTP/1.1, one kept-alive connection per worker), request bodies encoded once
//! per kind and shared as `Bytes`, events parsed by `eventsource-stream` with only the few
//! fields needed deserialized (borrowed, no `Value`). Every loop is bounded: by the request
//! count or the duration for starting streams, and by `--timeout` for each stream.
//!
//! This file runs the load; `report` turns the samples into the [`Report`] and its table.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

mod report;

pub use report::Report;
use report::{report, write_run_ids};

use super::BenchError;

/// What the load generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// duet's `POST /query/stream`.
    Duet,
    /// An OpenAI-compatible streaming chat endpoint (e.g. `duet mock-provider`).
    Openai,
}

/// What one stream does: a plain run, an upstream fault asked of the mock with a
/// `[[mock:…]]` directive, or a client behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Normal,
    /// The upstream never answers: the models' deadlines end the run.
    Hang,
    /// The upstream answers 500 (retried, then an error event).
    Error,
    /// The upstream's stream breaks after two tokens with an error object.
    Midstream,
    /// The upstream sends two tokens and then nothing: the stall deadline ends it.
    Stall,
    /// The client goes away after its first token.
    Disconnect,
    /// The client reads slowly (`--slow-read-ms` before each event).
    Slow,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Normal,
        Kind::Hang,
        Kind::Error,
        Kind::Midstream,
        Kind::Stall,
        Kind::Disconnect,
        Kind::Slow,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Normal => "normal",
            Kind::Hang => "hang",
            Kind::Error => "error",
            Kind::Midstream => "midstream",
            Kind::Stall => "stall",
            Kind::Disconnect => "disconnect",
            Kind::Slow => "slow",
        }
    }

    /// The mock directive this kind adds to the query.
    fn directive(self) -> &'static str {
        match self {
            Kind::Hang => " [[mock:hang]]",
            Kind::Error => " [[mock:status=500]]",
            Kind::Midstream => " [[mock:midstream-error]]",
            Kind::Stall => " [[mock:stall_after=2]]",
            Kind::Normal | Kind::Disconnect | Kind::Slow => "",
        }
    }
}

/// Weights of the kinds, e.g. `normal:70,hang:5,error:10`: stream `i` gets the kind whose
/// cumulative weight covers `i mod total`, so the mix is exact over every `total` streams
/// and the same on every run (no randomness to explain away between runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix(Vec<(Kind, u32)>);

impl Default for Mix {
    fn default() -> Self {
        Mix(vec![(Kind::Normal, 1)])
    }
}

impl std::str::FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Mix, String> {
        let mut mix = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, weight) = item.split_once(':').unwrap_or((item, "1"));
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    format!("unknown kind {name:?} (normal, hang, error, midstream, stall, disconnect, slow)")
                })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("weight of {name} must be a whole number"))?;
            if weight > 0 {
                mix.push((kind, weight));
            }
        }
        if mix.is_empty() {
            return Err("the mix names no kind with a weight above 0".into());
        }
        Ok(Mix(mix))
    }
}

impl Mix {
    fn pick(&self, i: u64) -> Kind {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut at = i % total.max(1);
        for (kind, weight) in &self.0 {
            if at < u64::from(*weight) {
                return *kind;
            }
            at -= u64::from(*weight);
        }
        Kind::Normal
    }
}

/// Everything a load run needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub url: String,
    pub target: Target,
    pub concurrency: usize,
    /// Streams to run in all (warm-up included); `None` with a duration: as many as fit.
    pub requests: Option<u64>,
    /// Stop starting streams after this long.
    pub duration: Option<Duration>,
    pub query: String,
    /// Bytes of earlier conversation before the query (0: send `query`, not `messages`).
    pub history_bytes: usize,
    pub deltas: bool,
    /// Deadline of one stream, from sending the request to its end.
    pub timeout: Duration,
    /// The first streams of each worker, left out of the latency figures (connection set-up).
    pub warmup: u64,
    /// Workers start spread over this long instead of all at once.
    pub ramp: Duration,
    pub mix: Mix,
    pub slow_read: Duration,
    /// Where to write `run_id outcome` per started duet stream.
    pub run_ids: Option<PathBuf>,
}

/// One stream's timings, from just before the request is sent.
#[derive(Debug, Default)]
pub(super) struct Sample {
    pub(super) warmup: bool,
    pub(super) kind: Option<Kind>,
    pub(super) ttfb: Option<Duration>,
    pub(super) first_event: Option<Duration>,
    pub(super) first_token: Option<Duration>,
    pub(super) first_flash: Option<Duration>,
    pub(super) first_pro: Option<Duration>,
    pub(super) end: Option<Duration>,
    pub(super) status: Option<String>,
    pub(super) error: Option<String>,
    pub(super) disconnected: bool,
    pub(super) run_id: Option<String>,
}

pub(super) struct Shared {
    pub(super) options: Options,
    client: reqwest::Client,
    /// Request body per kind, encoded once.
    bodies: BTreeMap<Kind, Bytes>,
    started: AtomicU64,
    open: AtomicI64,
    pub(super) peak_open: AtomicI64,
    stop_at: Option<Instant>,
}

impl Shared {
    /// The index of the next stream to start, or `None` when the run is used up.
    fn next(&self) -> Option<u64> {
        if self.stop_at.is_some_and(|at| Instant::now() >= at) {
            return None;
        }
        let i = self.started.fetch_add(1, Ordering::Relaxed);
        match self.options.requests {
            Some(n) if i >= n => None,
            _ => Some(i),
        }
    }
}

fn body(options: &Options, kind: Kind) -> Bytes {
    let query = format!("{}{}", options.query, kind.directive());
    let value = match options.target {
        Target::Duet if options.history_bytes > 0 => serde_json::json!({
            "messages": history(options.history_bytes, query),
            "deltas": options.deltas,
        }),
        Target::Duet => serde_json::json!({"query": query, "deltas": options.deltas}),
        Target::Openai => serde_json::json!({
            "model": "bench",
            "stream": true,
            "messages": [{"role": "user", "content": query}],
        }),
    };
    Bytes::from(value.to_string())
}

/// Earlier messages in a conversation of the benchmark: this many, before the query.
const HISTORY_MESSAGES: usize = 19;

/// A 20-message conversation: a system message and 18 alternating user and assistant
/// messages holding about `bytes` of text, then `query` as the last user message.
fn history(bytes: usize, query: String) -> serde_json::Value {
    let each = (bytes / HISTORY_MESSAGES).max(1);
    let filler = "The quick brown fox jumps over the lazy dog. ";
    let text: String = filler.chars().cycle().take(each).collect();
    let mut messages: Vec<serde_json::Value> = (0..HISTORY_MESSAGES)
        .map(|i| {
            let role = match i {
                0 => "system",
                i if i % 2 == 1 => "user",
                _ => "assistant",
            };
            serde_json::json!({"role": role, "content": text})
        })
        .collect();
    messages.push(serde_json::json!({"role": "user", "content": query}));
    serde_json::Value::Array(messages)
}

/// Runs the load and reports it.
pub async fn run(options: Options) -> Result<Report, BenchError> {
    if options.requests.is_none() && options.duration.is_none() {
        return Err(BenchError::Usage(
            "give --requests or --duration, so that the run ends".into(),
        ));
    }
    let concurrency = options.concurrency.max(1);
    let client = reqwest::Client::builder()
        // Loopback targets only: a proxy from the environment must not carry the load.
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        // One idle connection per worker, so every worker reuses its own.
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()?;
    let bodies = Kind::ALL.iter().map(|&k| (k, body(&options, k))).collect();
    let started_at = Instant::now();
    let shared = Arc::new(Shared {
        stop_at: options.duration.map(|d| started_at + d),
        options,
        client,
        bodies,
        started: AtomicU64::new(0),
        open: AtomicI64::new(0),
        peak_open: AtomicI64::new(0),
    });
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..concurrency {
        workers.spawn(worker(id, concurrency, Arc::clone(&shared)));
    }
    let mut samples = Vec::new();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(mut s) => samples.append(&mut s),
            Err(e) => return Err(BenchError::Usage(format!("a worker failed: {e}"))),
        }
    }
    let elapsed = started_at.elapsed();
    if let Some(path) = &shared.options.run_ids {
        write_run_ids(path, &samples)?;
    }
    Ok(report(&shared, samples, elapsed))
}

async fn worker(id: usize, concurrency: usize, shared: Arc<Shared>) -> Vec<Sample> {
    let ramp = shared.options.ramp;
    if !ramp.is_zero() {
        tokio::time::sleep(ramp.mul_f64(id as f64 / concurrency as f64)).await;
    }
    let mut samples = Vec::new();
    let mut warmup = shared.options.warmup;
    while let Some(i) = shared.next() {
        let kind = shared.options.mix.pick(i);
        let mut sample = one_stream(&shared, kind).await;
        if warmup > 0 {
            warmup -= 1;
            sample.warmup = true;
        }
        samples.push(sample);
    }
    samples
}

#[derive(Deserialize)]
struct ModelField<'a> {
    #[serde(borrow)]
    model: &'a str,
}

#[derive(Deserialize)]
struct DoneData<'a> {
    #[serde(borrow)]
    status: &'a str,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<ChoiceDelta>,
}

#[derive(Deserialize)]
struct ChoiceDelta {
    content: Option<String>,
}

/// Counts a stream as open from its response headers to its end, keeping the peak.
struct OpenGuard<'a>(&'a Shared);

impl<'a> OpenGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        let now = shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        shared.peak_open.fetch_max(now, Ordering::Relaxed);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn one_stream(shared: &Shared, kind: Kind) -> Sample {
    let options = &shared.options;
    let mut s = Sample {
        kind: Some(kind),
        ..Sample::default()
    };
    let body = shared.bodies.get(&kind).cloned().unwrap_or_default();
    let t0 = Instant::now();
    let deadline = t0 + options.timeout;
    let request = shared
        .client
        .post(&options.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .body(body)
        .send();
    let response = match tokio::time::timeout_at(deadline, request).await {
        Err(_) => {
            s.error = Some("timeout before headers".into());
            return s;
        }
        Ok(Err(e)) => {
            s.error = Some(if e.is_connect() {
                "connect".into()
            } else {
                "request".into()
            });
            return s;
        }
        Ok(Ok(r)) => r,
    };
    s.ttfb = Some(t0.elapsed());
    s.run_id = response
        .headers()
        .get("x-run-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if !response.status().is_success() {
        s.error = Some(format!("status {}", response.status().as_u16()));
        return s;
    }
    let _open = OpenGuard::new(shared);
    let mut events = response.bytes_stream().eventsource();
    loop {
        if kind == Kind::Slow {
            tokio::time::sleep(options.slow_read).await;
        }
        let next = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(next) => next,
            Err(_) => {
                s.error = Some("timeout mid-stream".into());
                break;
            }
        };
        let event = match next {
            None => {
                s.error = Some("stream ended without its end event".into());
                break;
            }
            Some(Err(_)) => {
                s.error = Some("broken stream".into());
                break;
            }
            Some(Ok(event)) => event,
        };
        let at = t0.elapsed();
        s.first_event.get_or_insert(at);
        match options.target {
            Target::Duet => match event.event.as_str() {
                "delta" => {
                    s.first_token.get_or_insert(at);
                    match serde_json::from_str::<ModelField>(&event.data).map(|m| m.model) {
                        Ok("flash") => {
                            s.first_flash.get_or_insert(at);
                        }
                        Ok("pro") => {
                            s.first_pro.get_or_insert(at);
                        }
                        _ => {}
                    }
                }
                "flash" | "pro" => {
                    s.first_token.get_or_insert(at);
                }
                "done" => {
                    s.end = Some(at);
                    s.status = serde_json::from_str::<DoneData>(&event.data)
                        .map(|d| d.status.to_owned())
                        .ok();
                    break;
                }
                _ => {}
            },
            Target::Openai => {
                if event.data == "[DONE]" {
                    s.end = Some(at);
                    break;
                }
                let content = serde_json::from_str::<Chunk>(&event.data)
                    .ok()
                    .and_then(|c| c.choices.into_iter().next())
                    .and_then(|c| c.delta)
                    .and_then(|d| d.content)
                    .is_some_and(|t| !t.is_empty());
                if content {
                    s.first_token.get_or_insert(at);
                }
            }
        }
        if kind == Kind::Disconnect && s.first_token.is_some() {
            // Dropping the body closes the connection: the server sees the client leave.
            s.disconnected = true;
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_exact_over_its_total() {
        let mix: Mix = "normal:3,hang:1,disconnect:0".parse().unwrap();
        let picks: Vec<Kind> = (0..8).map(|i| mix.pick(i)).collect();
        assert_eq!(picks.iter().filter(|k| **k == Kind::Hang).count(), 2);
        assert_eq!(picks.iter().filter(|k| **k == Kind::Normal).count(), 6);
        assert!("bogus:1".parse::<Mix>().is_err());
        assert!("normal:0".parse::<Mix>().is_err());
    }

    #[test]
    fn bodies_carry_the_directive() {
        let options = Options {
            url: String::new(),
            target: Target::Openai,
            concurrency: 1,
            requests: Some(1),
            duration: None,
            query: "hi".into(),
            history_bytes: 0,
            deltas: true,
            timeout: Duration::from_secs(1),
            warmup: 0,
            ramp: Duration::ZERO,
            mix: Mix::default(),
            slow_read: Duration::ZERO,
            run_ids: None,
        };
        let b = body(&options, Kind::Error);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"], "hi [[mock:status=500]]");
        let duet = Options {
            target: Target::Duet,
            history_bytes: 19_000,
            ..options
        };
        let v: serde_json::Value = serde_json::from_slice(&body(&duet, Kind::Normal)).unwrap();
        let messages = v["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 20);
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[18]["role"], "assistant");
        assert_eq!(
            messages[19],
            serde_json::json!({"role": "user", "content": "hi"})
        );
        let text: usize = messages[..19]
            .iter()
            .map(|m| m["content"].as_str().unwrap().len())
            .sum();
        assert_eq!(text, 19_000);
        assert!(v.get("query").is_none());
    }
}
