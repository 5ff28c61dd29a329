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

use std::{
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, RawQuery, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::{BufMut, BytesMut};
use futures::Stream;
use tokio::{net::TcpListener, time::Sleep};

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
        .route("/v1beta/models/{*rest}", post(gemini))
        .route("/models/{*rest}", post(gemini))
        .route("/v1/chat/completions", post(openai))
        .route("/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(config))
}

/// Open connections get this long to finish after `shutdown` before they are dropped (a
/// `hang` answer would otherwise hold the process for `HOLD_MAX`).
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
        tokio::spawn(async move {
            // A client that resets its connection is the client's business.
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    Ok(())
}

/// Binds `addr` and serves until SIGINT/SIGTERM: `duet mock-provider`.
pub async fn run(addr: SocketAddr, config: MockConfig) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, ?config, "mock provider listening");
    serve(listener, config, crate::server::signal()).await
}

/// Faults and pacing a request asks for with `[[mock:…]]` directives in its text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Directives {
    /// `status=N`: answer with this HTTP status and the family's error body.
    pub status: Option<u16>,
    /// `retry_after=S`: the `Retry-After` header of an error answer (429 gets 1 s by default).
    pub retry_after: Option<f64>,
    /// `hang`: never answer (no status line, no byte).
    pub hang: bool,
    /// `stall_after=N`: send N tokens, then nothing more while keeping the connection open.
    pub stall_after: Option<usize>,
    /// `malformed`: a chunk of broken JSON after the first token.
    pub malformed: bool,
    /// `midstream-error`: the family's mid-stream error object after two tokens, then the end.
    pub midstream_error: bool,
    /// `endless`: tokens for ever, never a finish.
    pub endless: bool,
    /// `truncate`: the body ends halfway, without a finish or terminator.
    pub truncate: bool,
    /// `no-done`: everything including finish and usage, then the connection stays open
    /// without OpenAI's `[DONE]` (other families: without closing).
    pub no_done: bool,
    /// `ttft_ms=`, `token_ms=`, `tokens=`: pacing for this request.
    pub ttft_ms: Option<u64>,
    pub token_ms: Option<u64>,
    pub tokens: Option<usize>,
}

impl Directives {
    /// Reads every `[[mock:…]]` in a raw request body (directives are ASCII, so the JSON
    /// escaping of the text around them does not matter).
    pub fn parse(body: &[u8]) -> Directives {
        let mut d = Directives::default();
        let text = String::from_utf8_lossy(body);
        let mut rest = text.as_ref();
        while let Some(at) = rest.find("[[mock:") {
            rest = &rest[at + 7..];
            let Some(end) = rest.find("]]") else { break };
            for item in rest[..end].split(',') {
                let (name, value) = item.split_once('=').unwrap_or((item, ""));
                let value = value.trim();
                match name.trim() {
                    "status" => d.status = value.parse().ok(),
                    "retry_after" => d.retry_after = value.parse().ok(),
                    "hang" => d.hang = true,
                    "stall" => d.stall_after = Some(1),
                    "stall_after" => d.stall_after = value.parse().ok(),
                    "malformed" => d.malformed = true,
                    "midstream-error" | "midstream_error" => d.midstream_error = true,
                    "endless" => d.endless = true,
                    "truncate" => d.truncate = true,
                    "no-done" | "no_done" => d.no_done = true,
                    "ttft_ms" => d.ttft_ms = value.parse().ok(),
                    "token_ms" => d.token_ms = value.parse().ok(),
                    "tokens" => d.tokens = value.parse().ok(),
                    _ => {}
                }
            }
            rest = &rest[end..];
        }
        d
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Gemini,
    OpenAi,
    Anthropic,
}

/// Everything one answer needs, fixed when the request arrives.
struct Plan {
    family: Family,
    /// The model as a JSON string literal.
    model: String,
    input_tokens: usize,
    tokens: usize,
    ttft: Duration,
    token_interval: Duration,
    d: Directives,
}

impl Plan {
    fn new(family: Family, model: &str, body: &[u8], config: &MockConfig) -> Plan {
        let d = Directives::parse(body);
        Plan {
            family,
            model: json_str(model),
            // About four bytes a token, as for English; the envelope counts too, which is
            // fine for a mock.
            input_tokens: body.len().div_ceil(4).max(1),
            tokens: d.tokens.unwrap_or(config.tokens).max(1),
            ttft: d.ttft_ms.map_or(config.ttft, Duration::from_millis),
            token_interval: d
                .token_ms
                .map_or(config.token_interval, Duration::from_millis),
            d,
        }
    }

    fn output_text(&self) -> String {
        answer_text(self.tokens)
    }
}

async fn gemini(
    State(config): State<Arc<MockConfig>>,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let (model, action) = rest.rsplit_once(':').unwrap_or((&rest, ""));
    let plan = Plan::new(Family::Gemini, model, &body, &config);
    let sse = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "alt=sse"));
    match action {
        "streamGenerateContent" if sse => respond(plan, true).await,
        "streamGenerateContent" | "generateContent" => {
            let array = action == "streamGenerateContent";
            if let Some(early) = before_answer(&plan).await {
                return early;
            }
            let mut out = gemini_whole(&plan);
            if array {
                out = format!("[{}]", out.trim_end());
            }
            json_response(StatusCode::OK, out)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            gemini_error(404, "NOT_FOUND", "Method not found."),
        ),
    }
}

async fn openai(State(config): State<Arc<MockConfig>>, body: Bytes) -> Response {
    let (model, stream) = model_and_stream(&body, "gpt-4.1-mini");
    respond(Plan::new(Family::OpenAi, &model, &body, &config), stream).await
}

async fn anthropic(State(config): State<Arc<MockConfig>>, body: Bytes) -> Response {
    let (model, stream) = model_and_stream(&body, "claude-sonnet-4-5");
    respond(Plan::new(Family::Anthropic, &model, &body, &config), stream).await
}

fn model_and_stream(body: &[u8], default: &str) -> (String, bool) {
    #[derive(serde::Deserialize)]
    struct Head {
        model: Option<String>,
        #[serde(default)]
        stream: bool,
    }
    match serde_json::from_slice::<Head>(body) {
        Ok(h) => (h.model.unwrap_or_else(|| default.to_owned()), h.stream),
        Err(_) => (default.to_owned(), false),
    }
}

/// Hang and status faults, common to streamed and whole answers.
async fn before_answer(plan: &Plan) -> Option<Response> {
    if plan.d.hang {
        tokio::time::sleep(HOLD_MAX).await;
        return Some(StatusCode::GATEWAY_TIMEOUT.into_response());
    }
    let status = plan.d.status.and_then(|s| StatusCode::from_u16(s).ok())?;
    let mut response = json_response(status, error_body(plan.family, status.as_u16()));
    let retry_after = plan
        .d
        .retry_after
        .or((status == StatusCode::TOO_MANY_REQUESTS).then_some(1.0));
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if plan.family == Family::Anthropic && matches!(status.as_u16(), 429 | 500..=599) {
        response
            .headers_mut()
            .insert("x-should-retry", HeaderValue::from_static("true"));
    }
    Some(response)
}

async fn respond(plan: Plan, stream: bool) -> Response {
    if let Some(early) = before_answer(&plan).await {
        return early;
    }
    if !stream {
        tokio::time::sleep(
            plan.ttft + plan.token_interval * (plan.tokens.saturating_sub(1) as u32),
        )
        .await;
        let body = match plan.family {
            Family::Gemini => gemini_whole(&plan),
            Family::OpenAi => openai_whole(&plan),
            Family::Anthropic => anthropic_whole(&plan),
        };
        return json_response(StatusCode::OK, body);
    }
    let content_type = match plan.family {
        Family::Gemini => "text/event-stream",
        Family::OpenAi | Family::Anthropic => "text/event-stream; charset=utf-8",
    };
    let body = MockBody {
        plan: Arc::new(plan),
        stage: Stage::Preamble,
        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        waiting: false,
        buf: BytesMut::with_capacity(1024),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    Preamble,
    Token(usize),
    Final,
    Hold,
    End,
}

/// A streamed answer, produced as it is polled: no task, one timer re-armed per token.
struct MockBody {
    plan: Arc<Plan>,
    stage: Stage,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
    buf: BytesMut,
}

impl MockBody {
    fn wait(&mut self, d: Duration) {
        if !d.is_zero() {
            self.sleep.as_mut().reset(tokio::time::Instant::now() + d);
            self.waiting = true;
        }
    }

    /// The bytes written so far, as one frame; the buffer's memory is reused once the frame
    /// has been written out.
    fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    fn next_stage(&mut self) -> Option<Bytes> {
        let plan = Arc::clone(&self.plan);
        let d = &plan.d;
        match self.stage {
            Stage::Preamble => {
                preamble(&plan, &mut self.buf);
                self.stage = Stage::Token(0);
                self.wait(plan.ttft);
            }
            Stage::Token(k) => {
                if d.stall_after == Some(k) {
                    self.stage = Stage::Hold;
                    return None;
                }
                if d.truncate && k == plan.tokens / 2 {
                    self.stage = Stage::End;
                    return None;
                }
                if d.midstream_error && k == 2.min(plan.tokens - 1) {
                    midstream_error(&plan, &mut self.buf);
                    self.stage = Stage::End;
                    return Some(self.take());
                }
                let last = !d.endless && k + 1 >= plan.tokens;
                token(&plan, k, last, &mut self.buf);
                if d.malformed && k == 0 {
                    malformed(plan.family, &mut self.buf);
                }
                self.stage = match (last, plan.family) {
                    (true, Family::Gemini) if d.no_done => Stage::Hold,
                    (true, Family::Gemini) => Stage::End,
                    (true, _) => Stage::Final,
                    (false, _) => Stage::Token(k + 1),
                };
                if !last {
                    self.wait(plan.token_interval);
                }
            }
            Stage::Final => {
                finale(&plan, &mut self.buf);
                self.stage = if d.no_done { Stage::Hold } else { Stage::End };
            }
            Stage::Hold => {
                self.wait(HOLD_MAX);
                self.stage = Stage::End;
                return None;
            }
            Stage::End => return None,
        }
        (!self.buf.is_empty()).then(|| self.take())
    }
}

impl Stream for MockBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.waiting {
                match this.sleep.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.waiting = false,
                }
            }
            if matches!(this.stage, Stage::End) {
                return Poll::Ready(None);
            }
            if let Some(frame) = this.next_stage() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }
}

const GEMINI_RESPONSE_ID: &str = "bW9jay1kdWV0LXJlc3BvbnNl";
const OPENAI_ID: &str = "chatcmpl-mockDuet0000000000000000";
const ANTHROPIC_ID: &str = "msg_01MockDuet000000000000000";
const CREATED: u64 = 1_759_312_284;

/// What goes out before the first token: OpenAI's role chunk; Anthropic's message_start,
/// content_block_start and a ping; nothing for Gemini.
fn preamble(plan: &Plan, buf: &mut BytesMut) {
    let m = &plan.model;
    let p = plan.input_tokens;
    match plan.family {
        Family::Gemini => {}
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            );
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"model\":{m},\"id\":\"{ANTHROPIC_ID}\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"cache_creation\":{{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0}},\"output_tokens\":1,\"service_tier\":\"standard\"}}}}}}\n\n\
                 event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
                 event: ping\ndata: {{\"type\": \"ping\"}}\n\n"
            );
        }
    }
}

/// Token `k`; for Gemini the last token's chunk also carries the finish reason.
fn token(plan: &Plan, k: usize, last: bool, buf: &mut BytesMut) {
    let w = &WORDS_JSON[k % WORDS.len()];
    let m = &plan.model;
    match plan.family {
        Family::Gemini => {
            let p = plan.input_tokens;
            let n = k + 1;
            let finish = if last {
                "\"finishReason\": \"STOP\","
            } else {
                ""
            };
            let _ = write!(
                Writer(buf),
                "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": {w}}}],\"role\": \"model\"}},{finish}\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": {p},\"candidatesTokenCount\": {n},\"totalTokenCount\": {t},\"promptTokensDetails\": [{{\"modality\": \"TEXT\",\"tokenCount\": {p}}}]}},\"modelVersion\": {m},\"responseId\": \"{GEMINI_RESPONSE_ID}\"}}\r\n\r\n",
                t = p + n
            );
        }
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{w}}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            );
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":{w}}}}}\n\n"
            );
        }
    }
}

/// After the last token: OpenAI's finish chunk, usage chunk and `[DONE]`; Anthropic's
/// content_block_stop, message_delta and message_stop.
fn finale(plan: &Plan, buf: &mut BytesMut) {
    let m = &plan.model;
    let (p, n) = (plan.input_tokens, plan.tokens);
    match plan.family {
        Family::Gemini => {}
        Family::OpenAi => {
            let _ = write!(
                Writer(buf),
                "data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n\
                 data: {{\"id\":\"{OPENAI_ID}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":{m},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mockduet\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{n},\"total_tokens\":{t},\"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
                t = p + n
            );
            if !plan.d.no_done {
                buf.put_slice(b"data: [DONE]\n\n");
            }
        }
        Family::Anthropic => {
            let _ = write!(
                Writer(buf),
                "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
                 event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":{n}}}}}\n\n\
                 event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            );
        }
    }
}

fn midstream_error(plan: &Plan, buf: &mut BytesMut) {
    buf.put_slice(match plan.family {
        Family::Gemini => {
            b"data: {\"error\": {\"code\": 503,\"message\": \"The model is overloaded. Please try again later.\",\"status\": \"UNAVAILABLE\"}}\r\n\r\n".as_slice()
        }
        Family::OpenAi => {
            b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\ndata: [DONE]\n\n".as_slice()
        }
        Family::Anthropic => {
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"details\":null,\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".as_slice()
        }
    });
}

fn malformed(family: Family, buf: &mut BytesMut) {
    buf.put_slice(match family {
        Family::Gemini => b"data: {\"candidates\": [{\"content\": \r\n\r\n".as_slice(),
        Family::OpenAi => b"data: {\"id\":\"chatcmpl-mock\",\"choices\":[{\"delta\":\n\n".as_slice(),
        Family::Anthropic => {
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_de\n\n".as_slice()
        }
    });
}

fn gemini_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\n  \"candidates\": [\n    {{\n      \"content\": {{\n        \"parts\": [\n          {{\n            \"text\": {text}\n          }}\n        ],\n        \"role\": \"model\"\n      }},\n      \"finishReason\": \"STOP\",\n      \"index\": 0\n    }}\n  ],\n  \"usageMetadata\": {{\n    \"promptTokenCount\": {p},\n    \"candidatesTokenCount\": {n},\n    \"totalTokenCount\": {t},\n    \"promptTokensDetails\": [\n      {{\n        \"modality\": \"TEXT\",\n        \"tokenCount\": {p}\n      }}\n    ]\n  }},\n  \"modelVersion\": {m},\n  \"responseId\": \"{GEMINI_RESPONSE_ID}\"\n}}\n",
        t = p + n
    )
}

fn openai_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\n  \"id\": \"{OPENAI_ID}\",\n  \"object\": \"chat.completion\",\n  \"created\": {CREATED},\n  \"model\": {m},\n  \"choices\": [\n    {{\n      \"index\": 0,\n      \"message\": {{\n        \"role\": \"assistant\",\n        \"content\": {text},\n        \"refusal\": null,\n        \"annotations\": []\n      }},\n      \"logprobs\": null,\n      \"finish_reason\": \"stop\"\n    }}\n  ],\n  \"usage\": {{\n    \"prompt_tokens\": {p},\n    \"completion_tokens\": {n},\n    \"total_tokens\": {t}\n  }},\n  \"service_tier\": \"default\",\n  \"system_fingerprint\": \"fp_mockduet\"\n}}\n",
        t = p + n
    )
}

fn anthropic_whole(plan: &Plan) -> String {
    let text = json_str(&plan.output_text());
    let (m, p, n) = (&plan.model, plan.input_tokens, plan.tokens);
    format!(
        "{{\"model\":{m},\"id\":\"{ANTHROPIC_ID}\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[{{\"type\":\"text\",\"text\":{text}}}],\"stop_reason\":\"end_turn\",\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{p},\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":{n},\"service_tier\":\"standard\"}}}}"
    )
}

fn gemini_error(code: u16, status: &str, message: &str) -> String {
    format!(
        "{{\n  \"error\": {{\n    \"code\": {code},\n    \"message\": {},\n    \"status\": \"{status}\"\n  }}\n}}\n",
        json_str(message)
    )
}

fn openai_error(message: &str, kind: &str, code: &str) -> String {
    format!(
        "{{\n    \"error\": {{\n        \"message\": {},\n        \"type\": \"{kind}\",\n        \"param\": null,\n        \"code\": {code}\n    }}\n}}\n",
        json_str(message)
    )
}

fn anthropic_error(kind: &str, message: &str) -> String {
    format!(
        "{{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":{}}},\"request_id\":\"req_011MockDuet0000000000000\"}}",
        json_str(message)
    )
}

/// The family's error body for an HTTP status, shaped like the fixtures.
fn error_body(family: Family, status: u16) -> String {
    match family {
        Family::Gemini => {
            let (s, msg) = match status {
                400 => {
                    return "{\n  \"error\": {\n    \"code\": 400,\n    \"message\": \"API key not valid. Please pass a valid API key.\",\n    \"status\": \"INVALID_ARGUMENT\",\n    \"details\": [\n      {\n        \"@type\": \"type.googleapis.com/google.rpc.ErrorInfo\",\n        \"reason\": \"API_KEY_INVALID\",\n        \"domain\": \"googleapis.com\",\n        \"metadata\": {\n          \"service\": \"generativelanguage.googleapis.com\"\n        }\n      }\n    ]\n  }\n}\n".to_owned();
                }
                403 => ("PERMISSION_DENIED", "Permission denied."),
                404 => ("NOT_FOUND", "Model not found."),
                429 => {
                    return "{\n  \"error\": {\n    \"code\": 429,\n    \"message\": \"You exceeded your current quota, please check your plan and billing details.\",\n    \"status\": \"RESOURCE_EXHAUSTED\",\n    \"details\": [\n      {\n        \"@type\": \"type.googleapis.com/google.rpc.RetryInfo\",\n        \"retryDelay\": \"1s\"\n      }\n    ]\n  }\n}\n".to_owned();
                }
                500 => ("INTERNAL", "An internal error has occurred."),
                503 => (
                    "UNAVAILABLE",
                    "The model is overloaded. Please try again later.",
                ),
                504 => ("DEADLINE_EXCEEDED", "Deadline exceeded."),
                _ => ("UNKNOWN", "Mock error."),
            };
            gemini_error(status, s, msg)
        }
        Family::OpenAi => match status {
            400 => openai_error(
                "This model's maximum context length is 128000 tokens.",
                "invalid_request_error",
                "\"context_length_exceeded\"",
            ),
            401 => openai_error(
                "Incorrect API key provided.",
                "invalid_request_error",
                "\"invalid_api_key\"",
            ),
            429 => openai_error(
                "Rate limit reached for requests. Please try again in 1s.",
                "requests",
                "\"rate_limit_exceeded\"",
            ),
            503 => openai_error(
                "Our servers are currently overloaded. Please try again later.",
                "service_unavailable_error",
                "\"server_is_overloaded\"",
            ),
            s if s >= 500 => openai_error("The server had an error.", "server_error", "null"),
            _ => openai_error("Mock error.", "invalid_request_error", "null"),
        },
        Family::Anthropic => match status {
            400 => anthropic_error("invalid_request_error", "prompt is too long"),
            401 => anthropic_error("authentication_error", "invalid x-api-key"),
            403 => anthropic_error("permission_error", "Permission denied."),
            404 => anthropic_error("not_found_error", "Not found."),
            429 => anthropic_error(
                "rate_limit_error",
                "This request would exceed the rate limit.",
            ),
            529 => anthropic_error("overloaded_error", "Overloaded"),
            s if s >= 500 => anthropic_error("api_error", "Internal server error"),
            _ => anthropic_error("invalid_request_error", "Mock error."),
        },
    }
}

/// `fmt::Write` into a `BytesMut`, so `write!` fills the reusable buffer directly.
struct Writer<'a>(&'a mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_parse() {
        let body = br#"{"contents":[{"parts":[{"text":"hi [[mock:status=429,retry_after=0.5]] and [[mock:ttft_ms=5, tokens=3]] [[mock:midstream-error]]"}]}]}"#;
        let d = Directives::parse(body);
        assert_eq!(d.status, Some(429));
        assert_eq!(d.retry_after, Some(0.5));
        assert_eq!(d.ttft_ms, Some(5));
        assert_eq!(d.tokens, Some(3));
        assert!(d.midstream_error);
        assert_eq!(Directives::parse(b"plain"), Directives::default());
    }

    #[test]
    fn error_bodies_parse_as_faults() {
        use crate::providers::http::Fault;
        for family in [Family::Gemini, Family::OpenAi, Family::Anthropic] {
            for status in [400, 401, 404, 429, 500, 503, 529] {
                let body = error_body(family, status);
                assert!(
                    Fault::from_bytes(body.as_bytes()).is_some(),
                    "{family:?} {status}: {body}"
                );
            }
        }
    }

    #[test]
    fn whole_bodies_are_json() {
        for family in [Family::Gemini, Family::OpenAi, Family::Anthropic] {
            let plan = Plan::new(family, "m\"odel", b"{}", &MockConfig::default());
            for body in [
                gemini_whole(&plan),
                openai_whole(&plan),
                anthropic_whole(&plan),
            ] {
                serde_json::from_str::<serde_json::Value>(&body).unwrap();
            }
        }
    }
}
