//! One upstream call as a stream: take a place on a connection, send, classify a non-2xx
//! answer, then read the body through [`Bounded`] into the SSE parser ([`SseEvents`]) and
//! the adapter's [`Decoder`], stopping at the first completion or error.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use eventsource_stream::Event;
use futures::{Stream, StreamExt, stream::BoxStream};
use http::{HeaderMap, HeaderValue, header};
use http_body_util::BodyDataStream;
use serde_json::Value;

use super::{
    CallContext,
    classify::{
        body_error, classify_http, error_chain, malformed, stray_error, too_large, transport_error,
        truncated,
    },
    events::SseEvents,
    framing::Bounded,
};
use crate::providers::{
    Completion, ErrorType, ProviderError, ProviderEvent, ProviderStream,
    pool::{Lease, USER_AGENT, Upstream, UpstreamBody},
};

/// Error bodies are read up to this much; the rest is not worth memory.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

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
pub trait Decoder: Send + Unpin + 'static {
    /// One SSE event of the stream.
    fn event(&mut self, ctx: &CallContext, event: &Event) -> Result<Step, ProviderError>;
    /// The stream ended (EOF or terminator) without a [`Step::Finish`]. A format that can
    /// tell a finished answer from what came so far (OpenAI's finish chunk with no usage
    /// chunk and no `[DONE]` after it) returns its completion; otherwise the error: `stray`
    /// holds the lines no SSE parser sees (Gemini's raw JSON errors, llama.cpp's old
    /// `error:` field), which may say why, and without them the answer was cut short.
    fn ended(&mut self, ctx: &CallContext, stray: &str) -> Result<Completion, ProviderError> {
        Err(unfinished(ctx, stray))
    }
    /// A whole JSON body, for upstreams that answer a streaming request without streaming.
    fn whole(
        &mut self,
        ctx: &CallContext,
        body: &Value,
    ) -> Result<(String, Completion), ProviderError>;
}

/// Why a stream ended without a finish: what its stray lines say, or else cut short.
pub fn unfinished(ctx: &CallContext, stray: &str) -> ProviderError {
    stray_error(ctx, stray).unwrap_or_else(|| truncated(ctx))
}

/// Makes the request with the provider's request builder
/// ([`Upstream::requests`]).
pub type Build = Box<dyn FnOnce(&reqwest::Client) -> reqwest::RequestBuilder + Send>;

/// Starts the call when the stream is first polled, and decodes it.
///
/// The place on an upstream connection is taken then too, not here: taking it may have to
/// build a new client (TLS set-up), which must not happen inside `Provider::stream`.
pub fn call<D: Decoder>(
    ctx: CallContext,
    upstream: Upstream,
    build: Build,
    decoder: D,
) -> ProviderStream {
    let state = Call {
        ctx,
        decoder,
        phase: Phase::Start(Some((upstream, build))),
        stray: Arc::default(),
        queued: None,
        _lease: None,
    };
    state.into_stream()
}

/// Decodes an already open body: the streaming half of [`call`], for tests and tools that
/// have the bytes some other way.
pub fn decode<D: Decoder>(ctx: CallContext, body: Body, decoder: D) -> ProviderStream {
    let stray = Arc::default();
    let bounded = Bounded::new(body, ctx.limits, Arc::clone(&stray));
    let state = Call {
        ctx,
        decoder,
        phase: Phase::Streaming(SseEvents::new(bounded)),
        stray,
        queued: None,
        _lease: None,
    };
    state.into_stream()
}

/// An upstream body: its chunks, or the error that broke it.
pub type Body = BoxStream<'static, reqwest::Result<Bytes>>;

/// An upstream body as the chunk stream the framing reads. reqwest's `Body` wraps it only to
/// give its errors reqwest's type (the source chain is the client's), which is what the
/// framing and the classification take.
fn body_stream(body: UpstreamBody) -> Body {
    BodyDataStream::new(reqwest::Body::wrap(body)).boxed()
}

enum Phase {
    /// Not polled yet.
    Start(Option<(Upstream, Build)>),
    /// Taking a place on a connection, sending, reading the head (and the whole body of an
    /// upstream that answered with one JSON document).
    Opening(Opening),
    Streaming(SseEvents<Body>),
    Done,
}

/// What opening a call came to, with the lease it was sent on.
type Opening = Pin<Box<dyn Future<Output = (Lease, Result<Opened, ProviderError>)> + Send>>;

enum Opened {
    Streaming(UpstreamBody),
    /// The answer as one JSON document, for upstreams that answer a streaming request
    /// without streaming.
    Whole(Value),
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
    /// The call as the stream of items a provider returns.
    ///
    /// A `Stream` of its own rather than an `unfold` over an `async fn`: `unfold` moves the
    /// whole call (parser, decoder and the future that opened it) into a new future for
    /// every item and back out, a copy of the call per token; here each poll works on the
    /// call in place, and only opening it is a future.
    fn into_stream(self) -> ProviderStream {
        self.boxed()
    }

    fn fail(&mut self, error: ProviderError) -> Poll<Option<Result<ProviderEvent, ProviderError>>> {
        self.phase = Phase::Done;
        Poll::Ready(Some(Err(error)))
    }
}

/// Takes a place on a connection, sends, and reads the answer's head (or all of a JSON
/// answer).
async fn open(
    ctx: CallContext,
    upstream: Upstream,
    build: Build,
) -> (Lease, Result<Opened, ProviderError>) {
    let lease = upstream.lease().await;
    let request = build(upstream.requests());
    let opened = match send(&ctx, &lease, request).await {
        Err(e) => Err(e),
        Ok(response) if is_json(response.headers()) => {
            read_json(&ctx, response).await.map(Opened::Whole)
        }
        Ok(response) => Ok(Opened::Streaming(response.into_body())),
    };
    (lease, opened)
}

impl<D: Decoder> Stream for Call<D> {
    type Item = Result<ProviderEvent, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let call = &mut *self;
        loop {
            if let Some(completion) = call.queued.take() {
                // Finishing ends the call at once: an upstream that never sends `[DONE]` or
                // closes the connection cannot hold it open. What is left of the body is read
                // apart, so that its connection can serve another call.
                if let Phase::Streaming(events) = std::mem::replace(&mut call.phase, Phase::Done) {
                    recycle(events.into_body());
                }
                return Poll::Ready(Some(Ok(ProviderEvent::Finished(completion))));
            }
            match &mut call.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Start(start) => {
                    let Some((upstream, build)) = start.take() else {
                        return Poll::Ready(None);
                    };
                    call.phase = Phase::Opening(Box::pin(open(call.ctx.clone(), upstream, build)));
                }
                Phase::Opening(opening) => {
                    let (lease, opened) = ready!(opening.as_mut().poll(cx));
                    call._lease = Some(lease);
                    match opened {
                        Err(e) => return call.fail(e),
                        Ok(Opened::Whole(body)) => {
                            call.phase = Phase::Done;
                            match call.decoder.whole(&call.ctx, &body) {
                                Ok((text, completion)) => {
                                    call.queued = Some(completion);
                                    return Poll::Ready(Some(Ok(ProviderEvent::Delta(text))));
                                }
                                Err(e) => return call.fail(e),
                            }
                        }
                        Ok(Opened::Streaming(body)) => {
                            let bytes = body_stream(body);
                            let bounded =
                                Bounded::new(bytes, call.ctx.limits, Arc::clone(&call.stray));
                            call.phase = Phase::Streaming(SseEvents::new(bounded));
                        }
                    }
                }
                Phase::Streaming(events) => match ready!(events.poll_event(cx)) {
                    None => {
                        let stray = stray_text(&call.stray);
                        match call.decoder.ended(&call.ctx, &stray) {
                            Ok(completion) => call.queued = Some(completion),
                            Err(error) => return call.fail(error),
                        }
                    }
                    Some(Err(e)) => {
                        let error = body_error(&call.ctx, e);
                        return call.fail(error);
                    }
                    Some(Ok(())) => match call.decoder.event(&call.ctx, events.event()) {
                        Err(e) => return call.fail(e),
                        Ok(Step::Continue) => {}
                        Ok(Step::Delta(text)) => {
                            return Poll::Ready(Some(Ok(ProviderEvent::Delta(text))));
                        }
                        Ok(Step::Finish { delta, completion }) => {
                            call.queued = Some(completion);
                            if let Some(text) = delta {
                                return Poll::Ready(Some(Ok(ProviderEvent::Delta(text))));
                            }
                        }
                        Ok(Step::Ended) => {
                            let stray = stray_text(&call.stray);
                            match call.decoder.ended(&call.ctx, &stray) {
                                Ok(completion) => call.queued = Some(completion),
                                Err(error) => return call.fail(error),
                            }
                        }
                    },
                },
            }
        }
    }
}

/// How long, and how much, the rest of a finished call's body is read for.
const RECYCLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
const RECYCLE_MAX_BYTES: usize = 64 << 10;

/// Reads the rest of a finished call's body (the terminator, `[DONE]`, the end of a chunked
/// body: a few bytes, usually already on their way) and drops it: what is on hand at once,
/// the rest in the background.
///
/// Why: an HTTP/1.1 connection goes back to the pool only once its response body was
/// read to the end. A body dropped at the finish event closed the connection instead, so
/// every call opened a new one: a TCP handshake for duet and the upstream, a TLS handshake
/// for an `https://` one, and a socket left in TIME_WAIT per call — at 800 calls a second,
/// about 48,000 of them, close to the ~28,000 local ports a client has towards one upstream.
/// An HTTP/2 stream read to its end closes cleanly instead of being reset.
///
/// Bounded in time and bytes: an upstream that keeps the body open or keeps sending loses
/// its connection as before.
fn recycle(mut body: Body) {
    // What is on hand is read now, without waiting: most upstreams send the terminator and
    // the body's end with the last chunk, so most calls end here, with no task.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut read = 0;
    loop {
        match body.poll_next_unpin(&mut cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                read += chunk.len();
                if read > RECYCLE_MAX_BYTES {
                    return;
                }
            }
            Poll::Ready(_) => return,
            Poll::Pending => break,
        }
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "bounded: ends within RECYCLE_WITHIN, and holds nothing a shutdown waits for"
    )]
    tokio::spawn(async move {
        let _ = tokio::time::timeout(RECYCLE_WITHIN, async {
            while let Some(Ok(chunk)) = body.next().await {
                read += chunk.len();
                if read > RECYCLE_MAX_BYTES {
                    break;
                }
            }
        })
        .await;
    });
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

/// Sends the request on the lease's connection; anything but 2xx becomes a classified error.
async fn send(
    ctx: &CallContext,
    lease: &Lease,
    request: reqwest::RequestBuilder,
) -> Result<http::Response<UpstreamBody>, ProviderError> {
    // Nothing was received, so nothing was shown: trying again is always safe.
    let unreachable = |e: &dyn std::error::Error| {
        ProviderError::new(
            ErrorType::ProviderError,
            true,
            format!("could not reach {}", ctx.family),
        )
        .with_detail(format!(
            "{} request to {} failed: {}",
            ctx.family,
            ctx.target,
            ctx.redact(&error_chain(e))
        ))
    };
    // What reqwest's `send` did before handing the request to hyper: the request as
    // `http` types, the client's default headers (only the user agent: `Accept` is set
    // by every call).
    let mut request = request
        .build()
        .and_then(http::Request::<reqwest::Body>::try_from)
        .map_err(|e| unreachable(&e))?;
    request
        .headers_mut()
        .entry(header::USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT));
    let response = lease.send(request).await.map_err(|e| unreachable(&*e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = read_capped(body, MAX_ERROR_BODY_BYTES).await;
    Err(classify_http(ctx, status, &parts.headers, &body))
}

/// Reads at most `cap` bytes of a body; a broken body just ends early (it is only evidence).
async fn read_capped(body: UpstreamBody, cap: usize) -> Vec<u8> {
    let mut body_read = Vec::new();
    let mut chunks = body_stream(body);
    while let Some(Ok(chunk)) = chunks.next().await {
        let room = cap.saturating_sub(body_read.len());
        body_read.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body_read.len() >= cap {
            break;
        }
    }
    body_read
}

async fn read_json(
    ctx: &CallContext,
    response: http::Response<UpstreamBody>,
) -> Result<Value, ProviderError> {
    let mut body = Vec::new();
    let mut chunks = body_stream(response.into_body());
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
