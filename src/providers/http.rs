//! What the real adapters share: the HTTP client, sending a call, classifying HTTP failures,
//! bounding and framing the upstream body, and redacting keys.
//!
//! Each adapter only knows its wire format: it builds a request and implements [`Decoder`]
//! (one upstream SSE event in, deltas or a completion out). [`call`] does the rest: send,
//! classify a non-2xx answer, read the body through [`Bounded`] (line and body limits, UTF-8,
//! lines no SSE parser can see) into `eventsource-stream`, and stop at the first completion
//! or error. Deadlines and retries are the orchestrator's: errors here only say what happened
//! and whether trying again could help.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use eventsource_stream::{Event, EventStream, EventStreamError};
use futures::{Stream, StreamExt, stream::BoxStream};
use http::{HeaderMap, StatusCode, header};
use serde_json::Value;

use super::{Completion, ErrorType, ProviderError, ProviderEvent, ProviderStream, pool::Lease};

/// Longest single line (one SSE field) accepted from an upstream. Gemini thought signatures
/// and inline images exceed the 64 KiB caps of common line readers, so the cap is large; it
/// only has to stop a line that never ends.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Longest body accepted from an upstream: far above any text answer, far below trouble.
pub const MAX_BODY_BYTES: usize = 16 << 20;
/// Error bodies are read up to this much; the rest is not worth memory.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
/// Lines outside the SSE grammar are kept up to this much, to explain a broken stream.
const MAX_STRAY_BYTES: usize = 64 << 10;
/// How much of an upstream body goes into `detail` (log and audit record).
const MAX_DETAIL_BODY_CHARS: usize = 2048;

/// Size limits of an upstream body; tests shrink them.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub line: usize,
    pub body: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            line: MAX_LINE_BYTES,
            body: MAX_BODY_BYTES,
        }
    }
}

/// What a call knows about where it goes, for messages and redaction.
#[derive(Clone)]
pub struct CallContext {
    /// `gemini`, `openai` or `anthropic`: the only name of the upstream a client ever sees.
    pub family: &'static str,
    /// The key, so that [`redact`] can remove it from anything an upstream echoes back.
    pub secret: Arc<str>,
    pub limits: BodyLimits,
}

impl CallContext {
    pub fn redact(&self, text: &str) -> String {
        redact(text, &[&self.secret])
    }
}

/// One step of decoding an upstream stream.
#[derive(Debug)]
pub enum Step {
    /// Nothing for the caller (pings, role chunks, unknown events).
    Continue,
    Delta(String),
    /// The model finished; `delta` is text that came in the same event.
    Finish {
        delta: Option<String>,
        completion: Completion,
    },
    /// The upstream's terminator arrived without a finish: a truncated answer.
    Ended,
}

/// A wire format: turns upstream events into steps.
pub trait Decoder: Send + 'static {
    /// One SSE event of the stream.
    fn event(&mut self, ctx: &CallContext, event: &Event) -> Result<Step, ProviderError>;
    /// The stream ended (EOF or terminator) without a finish. `stray` holds the lines no SSE
    /// parser sees (Gemini's raw JSON errors, llama.cpp's old `error:` field), which may say
    /// why.
    fn ended(&mut self, ctx: &CallContext, stray: &str) -> ProviderError {
        if let Some(error) = stray_error(ctx, stray) {
            return error;
        }
        truncated(ctx)
    }
    /// A whole JSON body, for upstreams that answer a streaming request without streaming.
    fn whole(
        &mut self,
        ctx: &CallContext,
        body: &Value,
    ) -> Result<(String, Completion), ProviderError>;
}

/// The error for a stream that stopped before its end.
pub fn truncated(ctx: &CallContext) -> ProviderError {
    ProviderError::new(
        ErrorType::InvalidResponse,
        false,
        format!("{} answer ended before the model finished", ctx.family),
    )
}

/// The error for a chunk that is not what the format says.
pub fn malformed(ctx: &CallContext, what: &str, raw: &str) -> ProviderError {
    ProviderError::new(
        ErrorType::InvalidResponse,
        false,
        format!("{} sent a malformed answer", ctx.family),
    )
    .with_detail(format!(
        "{} sent {what}: {}",
        ctx.family,
        ctx.redact(&clip(raw, MAX_DETAIL_BODY_CHARS))
    ))
}

/// Parses one event's data as JSON, or fails the call as malformed.
pub fn json(ctx: &CallContext, data: &str) -> Result<Value, ProviderError> {
    serde_json::from_str(data)
        .map_err(|e| malformed(ctx, &format!("an unparsable chunk ({e})"), data))
}

/// Starts the call when the stream is first polled, and decodes it.
pub fn call<D: Decoder>(
    ctx: CallContext,
    request: reqwest::RequestBuilder,
    decoder: D,
    lease: Lease,
) -> ProviderStream {
    let state = Call {
        ctx,
        decoder,
        phase: Phase::Start(Some(request)),
        stray: Arc::default(),
        queued: None,
        _lease: Some(lease),
    };
    futures::stream::unfold(state, |mut call| async move {
        let item = call.next_item().await?;
        Some((item, call))
    })
    .boxed()
}

/// Decodes an already open body: the streaming half of [`call`], for tests and tools that
/// have the bytes some other way.
pub fn decode<D: Decoder>(ctx: CallContext, body: Body, decoder: D) -> ProviderStream {
    let stray = Arc::default();
    let bounded = Bounded::new(body, ctx.limits, Arc::clone(&stray));
    let state = Call {
        ctx,
        decoder,
        phase: Phase::Streaming(EventStream::new(bounded)),
        stray,
        queued: None,
        _lease: None,
    };
    futures::stream::unfold(state, |mut call| async move {
        let item = call.next_item().await?;
        Some((item, call))
    })
    .boxed()
}

/// An upstream body as reqwest yields it.
pub type Body = BoxStream<'static, reqwest::Result<Bytes>>;

enum Phase {
    Start(Option<reqwest::RequestBuilder>),
    Streaming(EventStream<Bounded<Body>>),
    Done,
}

struct Call<D> {
    ctx: CallContext,
    decoder: D,
    phase: Phase,
    stray: Arc<Mutex<String>>,
    /// A completion that arrived with a delta: sent right after it.
    queued: Option<Completion>,
    /// The call's place on an upstream connection, held until the call is dropped.
    _lease: Option<Lease>,
}

impl<D: Decoder> Call<D> {
    fn fail(&mut self, error: ProviderError) -> Option<Result<ProviderEvent, ProviderError>> {
        self.phase = Phase::Done;
        Some(Err(error))
    }

    async fn next_item(&mut self) -> Option<Result<ProviderEvent, ProviderError>> {
        loop {
            if let Some(completion) = self.queued.take() {
                // Finishing drops the body at once: an upstream that never sends `[DONE]` or
                // closes the connection cannot hold the call open.
                self.phase = Phase::Done;
                return Some(Ok(ProviderEvent::Finished(completion)));
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Start(request) => {
                    let request = request.take()?;
                    let response = match send(&self.ctx, request).await {
                        Ok(r) => r,
                        Err(e) => return self.fail(e),
                    };
                    if is_json(response.headers()) {
                        let body = match read_json(&self.ctx, response).await {
                            Ok(v) => v,
                            Err(e) => return self.fail(e),
                        };
                        match self.decoder.whole(&self.ctx, &body) {
                            Ok((text, completion)) => {
                                self.queued = Some(completion);
                                return Some(Ok(ProviderEvent::Delta(text)));
                            }
                            Err(e) => return self.fail(e),
                        }
                    }
                    let bytes: Body = response.bytes_stream().boxed();
                    let bounded = Bounded::new(bytes, self.ctx.limits, Arc::clone(&self.stray));
                    self.phase = Phase::Streaming(EventStream::new(bounded));
                }
                Phase::Streaming(events) => match events.next().await {
                    None => {
                        let stray = stray_text(&self.stray);
                        let error = self.decoder.ended(&self.ctx, &stray);
                        return self.fail(error);
                    }
                    Some(Err(e)) => {
                        let error = body_error(&self.ctx, e);
                        return self.fail(error);
                    }
                    Some(Ok(event)) => match self.decoder.event(&self.ctx, &event) {
                        Err(e) => return self.fail(e),
                        Ok(Step::Continue) => continue,
                        Ok(Step::Delta(text)) => return Some(Ok(ProviderEvent::Delta(text))),
                        Ok(Step::Finish { delta, completion }) => {
                            self.queued = Some(completion);
                            if let Some(text) = delta {
                                return Some(Ok(ProviderEvent::Delta(text)));
                            }
                        }
                        Ok(Step::Ended) => {
                            let stray = stray_text(&self.stray);
                            let error = self.decoder.ended(&self.ctx, &stray);
                            return self.fail(error);
                        }
                    },
                },
            }
        }
    }
}

fn stray_text(stray: &Mutex<String>) -> String {
    stray.lock().map(|s| s.clone()).unwrap_or_default()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// Sends the request; anything but 2xx becomes a classified error.
async fn send(
    ctx: &CallContext,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ProviderError> {
    let response = request.send().await.map_err(|e| {
        // Nothing was received, so nothing was shown: trying again is always safe.
        ProviderError::new(
            ErrorType::ProviderError,
            true,
            format!("could not reach {}", ctx.family),
        )
        .with_detail(format!(
            "{} request failed: {}",
            ctx.family,
            ctx.redact(&error_chain(&e))
        ))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_capped(response, MAX_ERROR_BODY_BYTES).await;
    Err(classify_http(ctx, status, &headers, &body))
}

/// Reads at most `cap` bytes of a body; a broken body just ends early (it is only evidence).
async fn read_capped(response: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = cap.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= cap {
            break;
        }
    }
    body
}

async fn read_json(ctx: &CallContext, response: reqwest::Response) -> Result<Value, ProviderError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| transport_error(ctx, &e))?;
        if body.len() + chunk.len() > ctx.limits.body {
            return Err(too_large(ctx, "body"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| {
        malformed(
            ctx,
            &format!("an unparsable JSON body ({e})"),
            &String::from_utf8_lossy(&body),
        )
    })
}

fn transport_error(ctx: &CallContext, e: &reqwest::Error) -> ProviderError {
    // The connection broke mid-body: a network fault, not a malformed answer, and worth a
    // retry when no token has been shown yet (the orchestrator decides that).
    ProviderError::new(
        ErrorType::ProviderError,
        true,
        format!("the connection to {} broke mid-answer", ctx.family),
    )
    .with_detail(format!(
        "{} body failed: {}",
        ctx.family,
        ctx.redact(&error_chain(e))
    ))
}

fn too_large(ctx: &CallContext, what: &str) -> ProviderError {
    ProviderError::new(
        ErrorType::InvalidResponse,
        false,
        format!("{} answer exceeded duet's size limit", ctx.family),
    )
    .with_detail(format!(
        "{} {what} over the limit (line {} B, body {} B)",
        ctx.family, ctx.limits.line, ctx.limits.body
    ))
}

fn body_error(ctx: &CallContext, e: EventStreamError<BodyError>) -> ProviderError {
    match e {
        EventStreamError::Transport(BodyError::Transport(e)) => transport_error(ctx, &e),
        EventStreamError::Transport(BodyError::LineTooLong) => too_large(ctx, "line"),
        EventStreamError::Transport(BodyError::BodyTooLarge) => too_large(ctx, "body"),
        // Bounded hands over valid UTF-8 only, and every line is valid SSE grammar, so these
        // are not expected; they still fail the call cleanly.
        EventStreamError::Utf8(e) => malformed(ctx, "invalid UTF-8", &e.to_string()),
        EventStreamError::Parser(e) => malformed(ctx, "unparsable SSE", &e.to_string()),
    }
}

/// The error and its sources on one line (reqwest's own `Display` stops at the outermost).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What an upstream error object says, in the shapes of all three families and the
/// OpenAI-compatible servers (see `tests/fixtures/wire/README.md`).
#[derive(Debug, Default, PartialEq)]
pub struct Fault {
    /// A machine-readable reason (`API_KEY_INVALID`, `context_length_exceeded`,
    /// `overloaded_error`, ...), already checked to be safe to show.
    pub reason: Option<String>,
    /// A numeric code in the body (Gemini `code`, vLLM and llama.cpp `code`).
    pub code: Option<u16>,
    /// Gemini's `RetryInfo.retryDelay`.
    pub retry_delay: Option<Duration>,
}

impl Fault {
    /// Reads an error document; `None` when it is not one.
    pub fn from_value(v: &Value) -> Option<Fault> {
        // Vertex wraps errors in an array; vLLM's old shape is flat with `object: error`.
        let v = match v {
            Value::Array(items) => items.first()?,
            other => other,
        };
        let error = match v.get("error") {
            Some(e @ Value::Object(_)) => e,
            // Ollama's native shape: only a message, no reason.
            Some(Value::String(_)) => return Some(Fault::default()),
            _ if v.get("object").and_then(Value::as_str) == Some("error") => v,
            _ => return None,
        };
        let details = error.get("details").and_then(Value::as_array);
        let detail_of = |suffix: &str, field: &str| {
            details?.iter().find_map(|d| {
                let kind = d.get("@type")?.as_str()?;
                if kind.ends_with(suffix) {
                    d.get(field)?.as_str()
                } else {
                    None
                }
            })
        };
        let string_code = error.get("code").and_then(Value::as_str);
        let reason = [
            detail_of("ErrorInfo", "reason"),
            string_code,
            error.get("status").and_then(Value::as_str),
            error.get("type").and_then(Value::as_str),
        ]
        .into_iter()
        .flatten()
        .find_map(safe_reason);
        Some(Fault {
            reason,
            code: error
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok()),
            retry_delay: detail_of("RetryInfo", "retryDelay").and_then(parse_proto_duration),
        })
    }

    pub fn from_bytes(body: &[u8]) -> Option<Fault> {
        Fault::from_value(&serde_json::from_slice(body).ok()?)
    }

    fn reason_suffix(&self) -> String {
        self.reason
            .as_deref()
            .map(|r| format!(", {r}"))
            .unwrap_or_default()
    }
}

/// A reason code is passed to clients only if it looks like one: short, no spaces, no URL.
fn safe_reason(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    ok.then(|| s.to_owned())
}

/// `"41s"`, `"0.5s"` (protobuf JSON `Duration`).
fn parse_proto_duration(s: &str) -> Option<Duration> {
    seconds(s.strip_suffix('s')?.parse().ok()?)
}

/// A wait in seconds, if it is a sane one (NaN, negative and day-long waits are not).
fn seconds(secs: f64) -> Option<Duration> {
    (0.0..86_400.0)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

/// `Retry-After` (seconds or an HTTP date) or OpenAI's `retry-after-ms`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && let Some(wait) = seconds(ms / 1000.0)
    {
        return Some(wait);
    }
    let value = get("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The classification table for an HTTP status (see docs/providers.md).
pub fn classify_http(
    ctx: &CallContext,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> ProviderError {
    let fault = Fault::from_bytes(body).unwrap_or_default();
    let code = status.as_u16();
    let reason = fault.reason_suffix();
    let family = ctx.family;
    let (error_type, retryable, message) = match code {
        429 => {
            // Out of quota is not going to clear in the next second.
            let quota = fault.reason.as_deref() == Some("insufficient_quota");
            (
                ErrorType::RateLimited,
                !quota,
                format!("{family} rate limit reached (HTTP 429{reason})"),
            )
        }
        408 | 500..=599 => (
            ErrorType::ProviderError,
            true,
            format!("{family} is unavailable (HTTP {code}{reason})"),
        ),
        400..=499 => (
            ErrorType::ProviderError,
            false,
            format!("{family} refused the request (HTTP {code}{reason})"),
        ),
        _ => (
            ErrorType::InvalidResponse,
            false,
            format!("{family} answered with unexpected HTTP {code}"),
        ),
    };
    // Anthropic says outright whether a retry can help; believe it when it does.
    let retryable = match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => error_type != ErrorType::InvalidResponse,
        Some("false") => false,
        _ => retryable,
    };
    let wait = retry_after(headers).or(fault.retry_delay);
    ProviderError::new(error_type, retryable, message)
        .with_detail(format!(
            "{family} HTTP {code}: {}",
            ctx.redact(&clip(&String::from_utf8_lossy(body), MAX_DETAIL_BODY_CHARS))
        ))
        .with_retry_after(if retryable { wait } else { None })
}

/// An error object that arrived inside a 200 stream.
pub fn classify_midstream(ctx: &CallContext, fault: &Fault, raw: &str) -> ProviderError {
    let family = ctx.family;
    let reason = fault.reason_suffix();
    let hint = fault.reason.as_deref().unwrap_or("").to_ascii_lowercase();
    let rate_limited =
        fault.code == Some(429) || hint.contains("rate_limit") || hint == "resource_exhausted";
    let transient = matches!(fault.code, Some(500..=599))
        || [
            "server_error",
            "overloaded",
            "unavailable",
            "internal",
            "api_error",
            "service_unavailable",
            "timeout",
            "deadline_exceeded",
        ]
        .iter()
        .any(|t| hint.contains(t));
    let (error_type, retryable) = if rate_limited {
        (ErrorType::RateLimited, true)
    } else {
        (ErrorType::ProviderError, transient)
    };
    ProviderError::new(
        error_type,
        retryable,
        format!(
            "{family} reported an error mid-answer{}",
            if reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", &reason[2..])
            }
        ),
    )
    .with_detail(format!(
        "{family} mid-stream error: {}",
        ctx.redact(&clip(raw, MAX_DETAIL_BODY_CHARS))
    ))
    .with_retry_after(fault.retry_delay)
}

/// An error hidden in lines outside the SSE grammar: Gemini's raw JSON error after a stream
/// (Vertex), or llama.cpp's old `error: {...}` field.
pub fn stray_error(ctx: &CallContext, stray: &str) -> Option<ProviderError> {
    let trimmed = stray.trim();
    if trimmed.is_empty() {
        return None;
    }
    let json = trimmed
        .strip_prefix("error:")
        .map(str::trim)
        .unwrap_or(trimmed);
    let value: Value = serde_json::from_str(json).ok()?;
    // `error: {...}` carries the error object itself, without the `error` wrapper.
    let fault = Fault::from_value(&value)
        .or_else(|| Fault::from_value(&serde_json::json!({ "error": value })))?;
    Some(classify_midstream(ctx, &fault, trimmed))
}

/// At most `max` characters of `s`, marked when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…[{} more bytes]", &s[..i], s.len() - i),
    }
}

/// Removes secrets from text bound for a log or a record: every exact occurrence of a known
/// secret, and anything shaped like a provider key (`sk-…`, `AIza…`), a `key=` URL parameter
/// or a bearer token, in case an upstream echoes a key duet does not know about.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets {
        // Very short "secrets" would shred ordinary text; they are not real keys anyway.
        if secret.len() >= 6 {
            out = out.replace(secret, "[redacted]");
        }
    }
    const MARKERS: &[(&str, usize)] = &[
        ("sk-", 12),
        ("AIza", 20),
        ("key=", 1),
        ("Bearer ", 8),
        ("bearer ", 8),
        ("x-api-key: ", 8),
        ("x-goog-api-key: ", 8),
    ];
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    for (marker, min_len) in MARKERS {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(marker) {
            let after = at + marker.len();
            let len = rest[after..]
                .find(|c: char| !is_key_char(c))
                .unwrap_or(rest.len() - after);
            // `sk-` inside a word (a "task-list") is not a key; a key starts a token.
            let starts_token = rest[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !is_key_char(c));
            if len >= *min_len && (starts_token || marker.ends_with(['=', ' '])) {
                let keep = if marker.starts_with("sk-") || marker.starts_with("AIza") {
                    0
                } else {
                    marker.len()
                };
                result.push_str(&rest[..at + keep]);
                result.push_str("[redacted]");
                rest = &rest[after + len..];
            } else {
                result.push_str(&rest[..after]);
                rest = &rest[after..];
            }
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// Why [`Bounded`] stopped a body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("a line exceeded the limit")]
    LineTooLong,
    #[error("the body exceeded the limit")]
    BodyTooLarge,
}

/// Frames an upstream body for the SSE parser, within limits.
///
/// `eventsource-stream` buffers an unterminated line without limit and keeps invalid UTF-8
/// around until EOF; this sits in front of it and hands over only complete lines, as valid
/// UTF-8 (invalid sequences become U+FFFD, as the SSE spec says), failing the body when one
/// line or the whole body grows past its limit. It also keeps the lines the SSE grammar
/// ignores (field names other than `data`, `event`, `id`, `retry`), which is where some
/// upstreams put their errors.
pub struct Bounded<S> {
    inner: S,
    limits: BodyLimits,
    partial: BytesMut,
    total: usize,
    stray: Arc<Mutex<String>>,
    first_line: bool,
    failed: bool,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, limits: BodyLimits, stray: Arc<Mutex<String>>) -> Self {
        Bounded {
            inner,
            limits,
            partial: BytesMut::new(),
            total: 0,
            stray,
            first_line: true,
            failed: false,
        }
    }

    /// Checks complete lines for length and keeps the ones outside the SSE grammar.
    fn inspect(&mut self, lines: &[u8]) -> Result<(), BodyError> {
        for line in lines.split(|b| *b == b'\n' || *b == b'\r') {
            if line.len() > self.limits.line {
                return Err(BodyError::LineTooLong);
            }
            let line = if std::mem::take(&mut self.first_line) {
                line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
            } else {
                line
            };
            if line.is_empty() || line[0] == b':' {
                continue;
            }
            let name = line.split(|b| *b == b':').next().unwrap_or(line);
            if matches!(name, b"data" | b"event" | b"id" | b"retry") {
                continue;
            }
            if let Ok(mut stray) = self.stray.lock()
                && stray.len() + line.len() < MAX_STRAY_BYTES
            {
                stray.push_str(&String::from_utf8_lossy(line));
                stray.push('\n');
            }
        }
        Ok(())
    }
}

impl<S> Stream for Bounded<S>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        loop {
            let chunk = match this.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                // What is left without a line end can never complete an event: drop it.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => {
                    this.failed = true;
                    return Poll::Ready(Some(Err(BodyError::Transport(e))));
                }
                Poll::Ready(Some(Ok(chunk))) => chunk,
            };
            this.total += chunk.len();
            if this.total > this.limits.body {
                this.failed = true;
                return Poll::Ready(Some(Err(BodyError::BodyTooLarge)));
            }
            let Some(last_end) = chunk.iter().rposition(|b| *b == b'\n' || *b == b'\r') else {
                this.partial.extend_from_slice(&chunk);
                if this.partial.len() > this.limits.line {
                    this.failed = true;
                    return Poll::Ready(Some(Err(BodyError::LineTooLong)));
                }
                continue;
            };
            let lines = if this.partial.is_empty() {
                chunk.slice(..=last_end)
            } else {
                this.partial.extend_from_slice(&chunk[..=last_end]);
                this.partial.split().freeze()
            };
            this.partial.extend_from_slice(&chunk[last_end + 1..]);
            let checked = this.inspect(&lines[..lines.len() - 1]);
            if let Err(e) = checked.and_then(|()| {
                if this.partial.len() > this.limits.line {
                    Err(BodyError::LineTooLong)
                } else {
                    Ok(())
                }
            }) {
                this.failed = true;
                return Poll::Ready(Some(Err(e)));
            }
            // Complete lines end in ASCII CR or LF, so no UTF-8 sequence is cut here.
            let lines = match String::from_utf8_lossy(&lines) {
                std::borrow::Cow::Borrowed(_) => lines,
                std::borrow::Cow::Owned(fixed) => Bytes::from(fixed),
            };
            return Poll::Ready(Some(Ok(lines)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> CallContext {
        CallContext {
            family: "openai",
            secret: "sk-test-PLANTED0123456789".into(),
            limits: BodyLimits::default(),
        }
    }

    #[test]
    fn redacts_known_keys_and_key_shapes() {
        let key = "sk-test-PLANTED0123456789";
        let text = format!(
            "Incorrect API key provided: {key}. url https://x.test/v1/models/m?key=AIzaSyABCDEFGHIJKLMNOPQRSTUV&alt=sse \
             Authorization: Bearer abcdefghijklmnop, other sk-proj-ZZZZZZZZZZZZZZZZ; a task-list stays"
        );
        let out = redact(&text, &[key]);
        assert!(!out.contains(key), "{out}");
        assert!(!out.contains("AIzaSyABCDEFGHIJKLMNOPQRSTUV"), "{out}");
        assert!(!out.contains("abcdefghijklmnop"), "{out}");
        assert!(!out.contains("ZZZZZZZZZZZZ"), "{out}");
        assert!(out.contains("key=[redacted]&alt=sse"), "{out}");
        assert!(out.contains("Bearer [redacted]"), "{out}");
        assert!(out.contains("a task-list stays"), "{out}");
        assert_eq!(redact("nothing secret here", &[key]), "nothing secret here");
        // Short "secrets" are not applied: they would shred ordinary words.
        assert_eq!(redact("the cat", &["cat"]), "the cat");
    }

    #[test]
    fn faults_of_every_family() {
        let wire = crate::providers::testing::wire;
        let cases = [
            ("gemini_error_400.json", Some("API_KEY_INVALID"), Some(400)),
            (
                "gemini_error_429.json",
                Some("RESOURCE_EXHAUSTED"),
                Some(429),
            ),
            ("gemini_error_503.json", Some("UNAVAILABLE"), Some(503)),
            ("openai_error_429.json", Some("rate_limit_exceeded"), None),
            (
                "openai_error_429_insufficient_quota.json",
                Some("insufficient_quota"),
                None,
            ),
            ("openai_error_503.json", Some("server_is_overloaded"), None),
            ("vllm_error_400.json", Some("BadRequestError"), Some(400)),
            (
                "vllm_error_400_legacy.json",
                Some("BadRequestError"),
                Some(400),
            ),
            (
                "llamacpp_error_400.json",
                Some("exceed_context_size_error"),
                Some(400),
            ),
            ("ollama_error_404.json", Some("not_found_error"), None),
            ("anthropic_error_429.json", Some("rate_limit_error"), None),
            ("anthropic_error_529.json", Some("overloaded_error"), None),
            ("anthropic_error_500.json", Some("api_error"), None),
        ];
        for (file, reason, code) in cases {
            let fault = Fault::from_bytes(&wire(file)).unwrap_or_else(|| panic!("{file}"));
            assert_eq!(fault.reason.as_deref(), reason, "{file}");
            assert_eq!(fault.code, code, "{file}");
        }
        let gemini = Fault::from_bytes(&wire("gemini_error_429.json")).unwrap();
        assert_eq!(gemini.retry_delay, Some(Duration::from_secs(41)));
    }

    #[test]
    fn classification_table() {
        let ctx = ctx();
        let wire = crate::providers::testing::wire;
        let none = HeaderMap::new();
        let mut after = HeaderMap::new();
        after.insert("retry-after", "2".parse().unwrap());
        type Case<'a> = (
            u16,
            &'a HeaderMap,
            &'a str,
            ErrorType,
            bool,
            Option<Duration>,
        );
        let cases: &[Case] = &[
            (
                429,
                &after,
                "openai_error_429.json",
                ErrorType::RateLimited,
                true,
                Some(Duration::from_secs(2)),
            ),
            (
                429,
                &none,
                "gemini_error_429.json",
                ErrorType::RateLimited,
                true,
                Some(Duration::from_secs(41)),
            ),
            (
                429,
                &none,
                "openai_error_429_insufficient_quota.json",
                ErrorType::RateLimited,
                false,
                None,
            ),
            (
                503,
                &none,
                "gemini_error_503.json",
                ErrorType::ProviderError,
                true,
                None,
            ),
            (
                503,
                &none,
                "openai_error_503.json",
                ErrorType::ProviderError,
                true,
                None,
            ),
            (
                529,
                &none,
                "anthropic_error_529.json",
                ErrorType::ProviderError,
                true,
                None,
            ),
            (
                500,
                &none,
                "anthropic_error_500.json",
                ErrorType::ProviderError,
                true,
                None,
            ),
            (
                400,
                &none,
                "gemini_error_400.json",
                ErrorType::ProviderError,
                false,
                None,
            ),
            (
                400,
                &none,
                "vllm_error_400.json",
                ErrorType::ProviderError,
                false,
                None,
            ),
            (
                400,
                &none,
                "llamacpp_error_400.json",
                ErrorType::ProviderError,
                false,
                None,
            ),
            (
                404,
                &none,
                "ollama_error_404.json",
                ErrorType::ProviderError,
                false,
                None,
            ),
        ];
        for (status, headers, file, kind, retryable, wait) in cases {
            let body = wire(file);
            let e = classify_http(&ctx, StatusCode::from_u16(*status).unwrap(), headers, &body);
            assert_eq!(
                (e.error_type, e.retryable, e.retry_after),
                (*kind, *retryable, *wait),
                "{file}"
            );
            assert!(e.message.contains(&status.to_string()), "{}", e.message);
            // The client message names a reason code at most, never the body.
            assert!(e.message.len() < 100, "{}", e.message);
            assert!(!e.message.contains("http"), "{}", e.message);
        }
        let e = classify_http(
            &ctx,
            StatusCode::BAD_REQUEST,
            &none,
            &wire("gemini_error_400.json"),
        );
        assert_eq!(
            e.message,
            "openai refused the request (HTTP 400, API_KEY_INVALID)"
        );
        assert!(e.detail.contains("API key not valid"));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "1.5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", "201".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(201)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    fn frame(chunks: &[&[u8]], limits: BodyLimits) -> (Vec<Result<Bytes, String>>, String) {
        let stray = Arc::new(Mutex::new(String::new()));
        let items: Vec<reqwest::Result<Bytes>> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let bounded = Bounded::new(futures::stream::iter(items), limits, Arc::clone(&stray));
        let out =
            futures::executor::block_on(bounded.map(|r| r.map_err(|e| e.to_string())).collect());
        let stray = stray.lock().unwrap().clone();
        (out, stray)
    }

    #[test]
    fn bounded_hands_over_whole_lines_and_keeps_stray_ones() {
        let (out, stray) = frame(
            &[
                b"da",
                b"ta: caf\xC3",
                b"\xA9\r",
                b"\n\r\nerror: {\"code\":400}\n\n{\n  \"x\": 1\n}\ntail",
            ],
            BodyLimits::default(),
        );
        let text: Vec<String> = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(
            text.concat(),
            "data: caf\u{e9}\r\n\r\nerror: {\"code\":400}\n\n{\n  \"x\": 1\n}\n"
        );
        assert_eq!(stray, "error: {\"code\":400}\n{\n  \"x\": 1\n}\n");
    }

    #[test]
    fn bounded_limits_lines_and_bodies() {
        let limits = BodyLimits { line: 8, body: 64 };
        let (out, _) = frame(&[b"data: 0123", b"456789"], limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "a line exceeded the limit"
        );
        let (out, _) = frame(&[b"data: 0123456789\n"], limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "a line exceeded the limit"
        );
        let many: Vec<&[u8]> = std::iter::repeat_n(&b"d: 1\n\n"[..], 20).collect();
        let (out, _) = frame(&many, limits);
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err(),
            "the body exceeded the limit"
        );
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        let (out, _) = frame(&[b"data: a\xFFb\n\n"], BodyLimits::default());
        assert_eq!(
            out[0].as_ref().unwrap().as_ref(),
            "data: a\u{FFFD}b\n\n".as_bytes()
        );
    }
}
