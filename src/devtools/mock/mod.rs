//! `duet mock-provider`: a local upstream speaking the Gemini, OpenAI and Anthropic wire
//! formats, for demos, tests and benchmarks.
//!
//! Routes (stream and non-stream alike):
//! - Gemini: `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`, `…:generateContent`
//!   (and `…:streamGenerateContent` without `alt=sse`, answered as one JSON array);
//! - OpenAI: `POST /v1/chat/completions`, streamed when the body says `"stream": true`;
//! - Anthropic: `POST /v1/messages`, streamed when the body says `"stream": true`.
//!
//! The bytes copy the fixtures in `tests/fixtures/wire` (Gemini CRLF and `": "` spacing, OpenAI's
//! role chunk, finish chunk, usage chunk and `[DONE]`, Anthropic's named events with a ping).
//! Keys are accepted and ignored. Pacing comes from [`MockConfig`], and a request can pick a
//! fault with a directive anywhere in its text, e.g. `[[mock:status=429]]`; several can be
//! given comma-separated in one directive. See [`Directives`] and docs/providers.md.
//!
//! It is built to be cheap at thousands of concurrent streams: per stream one timer that is
//! re-armed, one reusable buffer, JSON written from pre-escaped pieces (no `serde_json::Value`
//! per token), and no task of its own (the body is a poll-driven stream).
//!
//! Files: this one serves; `directives` reads a request's faults; `answer` turns a request
//! into a plan and a response; `stream` writes a streamed answer as it is polled; `whole`
//! writes whole answers and error bodies.

mod answer;
mod directives;
mod stream;
mod whole;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    routing::{get, post},
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use directives::Directives;

/// Pacing of every answer unless a request's directives say otherwise.
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub token_interval: Duration,
    /// Tokens per answer.
    pub tokens: usize,
    /// HTTP/2 streams one connection may carry at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    /// 100 by default, as many real front ends announce: a client that puts more calls on
    /// one connection sees them wait, as it would against a real provider.
    pub h2_max_streams: u32,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            ttft: Duration::from_millis(200),
            token_interval: Duration::from_millis(20),
            tokens: 19,
            h2_max_streams: 100,
        }
    }
}

/// A `hang` or a held stream ends after this long, so a forgotten client cannot pin a task
/// for ever.
const HOLD_MAX: Duration = Duration::from_secs(600);

/// The answer's words, cycled: the haiku of the fixtures, as real tokenizers split it.
const WORDS: &[&str] = &[
    "Gray",
    " waves",
    " fold",
    " to",
    " foam",
    "\u{2014}\n",
    "salt",
    " wind",
    " combs",
    " the",
    " restless",
    " tide",
    ",\n",
    "the",
    " moon",
    " keeps",
    " its",
    " count",
    ".",
];

const GEMINI_RESPONSE_ID: &str = "bW9jay1kdWV0LXJlc3BvbnNl";
const OPENAI_ID: &str = "chatcmpl-mockDuet0000000000000000";
const ANTHROPIC_ID: &str = "msg_01MockDuet000000000000000";
const CREATED: u64 = 1_759_312_284;

/// The words as JSON string literals, escaped once.
static WORDS_JSON: LazyLock<Vec<String>> =
    LazyLock::new(|| WORDS.iter().map(|w| json_str(w)).collect());

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The text of an answer of `n` tokens.
pub fn answer_text(n: usize) -> String {
    (0..n).map(|i| WORDS[i % WORDS.len()]).collect()
}

/// The mock as an app, for tests that serve it themselves.
pub fn router(config: MockConfig) -> Router {
    Router::new()
        .route("/v1beta/models/{*rest}", post(answer::gemini))
        .route("/models/{*rest}", post(answer::gemini))
        .route("/v1/chat/completions", post(answer::openai))
        .route("/chat/completions", post(answer::openai))
        .route("/v1/messages", post(answer::anthropic))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(config))
}

/// Open connections get this long to finish after `shutdown` before they are dropped (a
/// `hang` answer would otherwise hold `serve` for `HOLD_MAX`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the mock on `listener` until `shutdown` resolves (HTTP/1.1 and h2c).
///
/// A small accept loop over hyper-util rather than `axum::serve`, which exposes neither the
/// HTTP/2 stream limit nor `TCP_NODELAY`: small SSE frames must leave at once, as a real
/// provider's do, or Nagle's algorithm would add its delay to every benchmark.
pub async fn serve(
    listener: TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::{conn::auto, graceful::GracefulShutdown},
        service::TowerToHyperService,
    };
    use tower::ServiceExt;

    let app = router(config);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(config.h2_max_streams);
    let graceful = GracefulShutdown::new();
    // Every connection runs on this tracker and ends on `stop`, so none outlives `serve`.
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors: back off instead of spinning on accept.
                    tracing::warn!(error = %e, "mock provider: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(|req: axum::http::Request<hyper::body::Incoming>| req.map(Body::new));
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                // A client that resets its connection is the client's business.
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        // Past the grace (a `hang`, a held stream): drop what is still open.
        stop.cancel();
    }
    tracker.wait().await;
    Ok(())
}

/// Binds `addr` and serves until SIGINT/SIGTERM: `duet mock-provider`.
pub async fn run(addr: SocketAddr, config: MockConfig) -> std::io::Result<()> {
    let signals = crate::server::Signals::install();
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, ?config, "mock provider listening");
    serve(listener, config, signals.recv()).await
}
