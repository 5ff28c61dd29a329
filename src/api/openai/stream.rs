//! A run's events as OpenAI answers: reading duet's own event frames, deciding which model
//! answers, and the `chat.completion.chunk` stream.
//!
//! The run sends duet's events (contract §4) into its bounded channel; this module reads them
//! back (one `event:` name and one line of JSON each, which `sse` wrote) rather than reaching
//! into the run, so that the run, its audit record, its ordering rules and its cancellation are
//! exactly those of `/query/stream`. Frames are read one at a time and dropped once translated,
//! which gives their bytes back to the run's stream budget: a slow OpenAI client slows the run
//! as a slow `/query/stream` client does, and memory stays bounded by that budget plus Flash's
//! whole answer while Pro has not started (see [`decide`]).
//!
//! **Which answer is streamed.** The response's headers wait for the first decision, so that
//! `X-Duet-Answer` is true when it is sent and a run in which neither model answers is a plain
//! HTTP error rather than a stream that started:
//! - Pro's first token (or its whole answer, if it came without deltas): Pro answers; its
//!   deltas are streamed as they come and Flash is ignored.
//! - Pro failed before its first token: Flash answers, sent as one content chunk once Flash
//!   has ended (its answer event carries the whole text; Flash's deltas are not kept).
//! - Both failed, or the run was cancelled before Flash answered: an error answer in
//!   OpenAI's shape, no stream. (Cancelled by a shutdown after Flash answered: Flash's.)
//!
//! When Pro fails after its first token, its text so far has been sent and cannot be taken
//! back: the stream ends with a `data: {"error": ...}` line (what OpenAI's SDKs raise as an
//! `APIError`) and `data: [DONE]`. Every stream that started ends with `data: [DONE]`.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};

use super::{
    error::{OpenAiError, run_failure_status},
    response::{Chunk, ChunkChoice, ChunkDelta, CompletionUsage, finish_reason},
};
use crate::{events::EventKind, sse};

/// One of the run's events, read back from its frame.
#[derive(Debug)]
pub(in crate::api) enum RunEvent {
    Delta {
        pro: bool,
        text: String,
    },
    Answer {
        pro: bool,
        answer: Answer,
    },
    Error {
        model: Option<bool>,
        failure: Failure,
    },
    Done,
    /// `start`, or anything this endpoint has no use for.
    Other,
}

/// A model's whole answer, as its `flash`/`pro` event carries it.
#[derive(Debug, Clone, Deserialize)]
pub(in crate::api) struct Answer {
    pub text: String,
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub usage: Tokens,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(in crate::api) struct Tokens {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl Answer {
    pub(in crate::api) fn usage(&self) -> Option<CompletionUsage> {
        CompletionUsage::of(self.usage.input_tokens, self.usage.output_tokens)
    }
}

/// A model's (or the run's) failure, as its `error` event carries it.
#[derive(Debug, Clone, Deserialize)]
pub(in crate::api) struct Failure {
    pub error_type: String,
    pub message: String,
}

#[derive(Deserialize)]
struct DeltaData {
    model: String,
    text: String,
}

#[derive(Deserialize)]
struct ErrorData {
    model: Option<String>,
    #[serde(flatten)]
    failure: Failure,
}

/// Reads one frame `sse::frame` wrote: `event: NAME\nid: ...\ndata: JSON\n\n`. A frame this
/// cannot read is a bug in duet, not the client's doing; it reads as [`RunEvent::Other`] and
/// is logged.
pub(in crate::api) fn read(frame: &[u8]) -> RunEvent {
    let parsed = (|| {
        let text = std::str::from_utf8(frame).ok()?;
        let name = text.strip_prefix("event: ")?.split('\n').next()?;
        let data = text.split("\ndata: ").nth(1)?.trim_end_matches('\n');
        let kind = EventKind::from_wire(name)?;
        let is_pro = |m: &str| m == "pro";
        Some(match kind {
            EventKind::Start => RunEvent::Other,
            EventKind::Delta => {
                let d: DeltaData = serde_json::from_str(data).ok()?;
                RunEvent::Delta {
                    pro: is_pro(&d.model),
                    text: d.text,
                }
            }
            EventKind::Flash | EventKind::Pro => RunEvent::Answer {
                pro: kind == EventKind::Pro,
                answer: serde_json::from_str(data).ok()?,
            },
            EventKind::Error => {
                let e: ErrorData = serde_json::from_str(data).ok()?;
                RunEvent::Error {
                    model: e.model.as_deref().map(is_pro),
                    failure: e.failure,
                }
            }
            EventKind::Done => RunEvent::Done,
        })
    })();
    parsed.unwrap_or_else(|| {
        tracing::error!(
            frame = %String::from_utf8_lossy(frame).chars().take(200).collect::<String>(),
            "an event of the run could not be read back for /v1/chat/completions"
        );
        RunEvent::Other
    })
}

/// Which model's answer the client gets, decided before the response's headers go out.
#[derive(Debug)]
pub(in crate::api) enum Decision {
    /// Pro's first token arrived: stream Pro from it.
    ProStarted(String),
    /// Pro answered without deltas (an empty answer, say): its whole answer.
    ProWhole(Answer),
    /// Pro failed before its first token and Flash answered.
    Flash(Answer),
}

/// Reads the run's events until the answer is decided (see the module's notes). Both models
/// failing, or the run being cut short, is the error to answer with; the rest of the run's
/// events (its `done`) are read first, so the run is never cancelled by the answer.
pub(in crate::api) async fn decide(
    rx: &mut mpsc::Receiver<Bytes>,
) -> Result<Decision, OpenAiError> {
    let mut flash: Option<Answer> = None;
    let mut flash_failed: Option<Failure> = None;
    let mut pro_failed: Option<Failure> = None;
    let mut run_failed: Option<Failure> = None;
    while let Some(frame) = rx.recv().await {
        match read(&frame) {
            RunEvent::Delta { pro: true, text } => return Ok(Decision::ProStarted(text)),
            RunEvent::Answer { pro: true, answer } => return Ok(Decision::ProWhole(answer)),
            RunEvent::Answer { pro: false, answer } => {
                if pro_failed.is_some() {
                    return Ok(Decision::Flash(answer));
                }
                flash = Some(answer);
            }
            RunEvent::Error {
                model: Some(true),
                failure,
            } => {
                if let Some(answer) = flash.take() {
                    return Ok(Decision::Flash(answer));
                }
                pro_failed = Some(failure);
            }
            RunEvent::Error {
                model: Some(false),
                failure,
            } => flash_failed = Some(failure),
            // The run cut short (a shutdown) before Pro's first token: Pro failed, and
            // Flash's answer, if it came, is the answer.
            RunEvent::Error {
                model: None,
                failure,
            } => {
                if let Some(answer) = flash.take() {
                    return Ok(Decision::Flash(answer));
                }
                run_failed = Some(failure);
            }
            RunEvent::Done => break,
            RunEvent::Delta { pro: false, .. } | RunEvent::Other => {}
        }
    }
    Err(failure(pro_failed, flash_failed, run_failed))
}

/// The error answer of a run in which neither model answered: its status and `code` follow
/// Pro's error type (Flash's when Pro has none; the run's own, such as a shutdown, first).
pub(in crate::api) fn failure(
    pro: Option<Failure>,
    flash: Option<Failure>,
    run: Option<Failure>,
) -> OpenAiError {
    let deciding = run.as_ref().or(pro.as_ref()).or(flash.as_ref());
    let Some(deciding) = deciding else {
        return OpenAiError::RunFailed {
            status: run_failure_status("internal"),
            code: "internal".into(),
            message: "the run ended without an answer".into(),
        };
    };
    let mut message = String::from("neither model answered");
    for (name, f) in [("the run", &run), ("pro", &pro), ("flash", &flash)] {
        if let Some(f) = f {
            message.push_str(&format!("; {name}: {} ({})", f.message, f.error_type));
        }
    }
    OpenAiError::RunFailed {
        status: run_failure_status(&deciding.error_type),
        code: deciding.error_type.clone(),
        message,
    }
}

/// What every chunk of one answer shares.
pub(in crate::api) struct ChunkHead {
    pub id: String,
    pub created: i64,
    pub include_usage: bool,
}

impl ChunkHead {
    fn chunk(&self, role: bool, content: Option<&str>, finish: Option<&'static str>) -> Bytes {
        self.line(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: super::request::MODEL,
            choices: vec![ChunkChoice {
                index: 0,
                delta: ChunkDelta {
                    role: role.then_some("assistant"),
                    content,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage: self.include_usage.then_some(None),
        })
    }

    fn usage(&self, usage: Option<CompletionUsage>) -> Bytes {
        self.line(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: super::request::MODEL,
            choices: vec![],
            usage: Some(usage),
        })
    }

    fn line(&self, data: &impl serde::Serialize) -> Bytes {
        let mut line = b"data: ".to_vec();
        line.extend_from_slice(&sse::encode_data(data));
        line.extend_from_slice(b"\n\n");
        Bytes::from(line)
    }

    fn error(&self, failure: &Failure) -> Bytes {
        self.line(&super::error::Body::new(
            format!("the answer was cut off: {}", failure.message),
            "server_error",
            None,
            &failure.error_type,
        ))
    }
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// The body of a streamed answer: the chunks of the decided answer, then the rest of the
/// run's events translated as they come, keep-alive comments in silences, and `[DONE]`.
/// Dropping it (the client went away) drops the run's receiver, which cancels the run, as
/// on `/query/stream`.
pub(in crate::api) struct ChunkStream {
    head: ChunkHead,
    rx: mpsc::Receiver<Bytes>,
    /// Lines ready to go: at most the four of a decided answer's opening.
    ready: std::collections::VecDeque<Bytes>,
    /// Still translating Pro's deltas (false once its answer, an error, or Flash's answer went).
    streaming_pro: bool,
    usage: Option<CompletionUsage>,
    failed: bool,
    finished: bool,
    keepalive: Pin<Box<Sleep>>,
    interval: Duration,
    last_sent: Instant,
}

impl ChunkStream {
    pub(in crate::api) fn new(
        head: ChunkHead,
        decision: Decision,
        rx: mpsc::Receiver<Bytes>,
        interval: Duration,
    ) -> Self {
        let mut ready = std::collections::VecDeque::with_capacity(4);
        ready.push_back(head.chunk(true, Some(""), None));
        let mut streaming_pro = false;
        let mut usage = None;
        match decision {
            Decision::ProStarted(text) => {
                ready.push_back(head.chunk(false, Some(&text), None));
                streaming_pro = true;
            }
            Decision::ProWhole(answer) | Decision::Flash(answer) => {
                if !answer.text.is_empty() {
                    ready.push_back(head.chunk(false, Some(&answer.text), None));
                }
                let reason = finish_reason(answer.finish_reason.as_deref());
                ready.push_back(head.chunk(false, None, Some(reason)));
                usage = answer.usage();
            }
        }
        ChunkStream {
            head,
            rx,
            ready,
            streaming_pro,
            usage,
            failed: false,
            finished: false,
            keepalive: Box::pin(tokio::time::sleep(interval)),
            interval,
            last_sent: Instant::now(),
        }
    }

    /// The lines one of the run's events becomes (none for most).
    fn translate(&mut self, event: RunEvent) {
        match event {
            RunEvent::Delta { pro: true, text } if self.streaming_pro => {
                self.ready
                    .push_back(self.head.chunk(false, Some(&text), None));
            }
            RunEvent::Answer { pro: true, answer } if self.streaming_pro => {
                self.streaming_pro = false;
                let reason = finish_reason(answer.finish_reason.as_deref());
                self.ready
                    .push_back(self.head.chunk(false, None, Some(reason)));
                self.usage = answer.usage();
            }
            // Pro's failure after its first token, or the run's own (shutdown) while Pro streams.
            RunEvent::Error {
                model: Some(true) | None,
                failure,
            } if self.streaming_pro => {
                self.streaming_pro = false;
                self.failed = true;
                self.ready.push_back(self.head.error(&failure));
            }
            RunEvent::Done => self.finish(),
            _ => {}
        }
    }

    /// The closing lines: usage when asked for (and an answer ended well), then `[DONE]`.
    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.streaming_pro {
            // The run ended without Pro's answer or error: it cannot, but say so if it does.
            self.failed = true;
            self.ready.push_back(self.head.error(&Failure {
                error_type: "internal".into(),
                message: "the run ended early".into(),
            }));
        }
        if self.head.include_usage && !self.failed {
            self.ready.push_back(self.head.usage(self.usage));
        }
        self.ready.push_back(Bytes::from_static(DONE));
    }
}

impl Stream for ChunkStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(line) = this.ready.pop_front() {
                this.last_sent = Instant::now();
                return Poll::Ready(Some(Ok(line)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(frame)) => {
                    let event = read(&frame);
                    // Dropped here: its bytes go back to the run's budget.
                    drop(frame);
                    this.translate(event);
                }
                Poll::Ready(None) => this.finish(),
                Poll::Pending => loop {
                    // As `sse::EventBody`: a comment after `interval` of silence.
                    match this.keepalive.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => {
                            let due = this.last_sent + this.interval;
                            let now = Instant::now();
                            if now >= due {
                                this.last_sent = now;
                                this.keepalive.as_mut().reset(now + this.interval);
                                return Poll::Ready(Some(Ok(Bytes::from_static(sse::KEEPALIVE))));
                            }
                            this.keepalive.as_mut().reset(due);
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_as_the_events_they_are() {
        let frame = sse::encode(
            EventKind::Delta,
            "r",
            3,
            &serde_json::json!({"run_id": "r", "model": "pro", "text": "a\n\ndata: x"}),
        );
        assert!(
            matches!(read(&frame), RunEvent::Delta { pro: true, text } if text == "a\n\ndata: x")
        );
        let frame = sse::encode(
            EventKind::Error,
            "r",
            4,
            &serde_json::json!({"run_id": "r", "model": null, "error_type": "cancelled",
                "retryable": true, "message": "bye"}),
        );
        assert!(matches!(
            read(&frame),
            RunEvent::Error { model: None, failure } if failure.error_type == "cancelled"
        ));
        let frame = sse::encode(
            EventKind::Flash,
            "r",
            5,
            &serde_json::json!({"run_id": "r", "model": "flash", "text": "t",
                "finish_reason": "MAX_TOKENS", "usage": {"input_tokens": 1, "output_tokens": null}}),
        );
        let RunEvent::Answer { pro: false, answer } = read(&frame) else {
            panic!("an answer")
        };
        assert_eq!(answer.text, "t");
        assert!(answer.usage().is_none());
        assert!(matches!(read(b"garbage"), RunEvent::Other));
    }

    #[test]
    fn the_deciding_error_is_pro_s_unless_the_run_failed() {
        let f = |t: &str| {
            Some(Failure {
                error_type: t.into(),
                message: format!("{t} happened"),
            })
        };
        let OpenAiError::RunFailed {
            status,
            code,
            message,
        } = failure(f("timeout"), f("rate_limited"), None)
        else {
            panic!()
        };
        assert_eq!((status.as_u16(), code.as_str()), (504, "timeout"));
        assert_eq!(
            message,
            "neither model answered; pro: timeout happened (timeout); flash: rate_limited happened (rate_limited)"
        );
        let OpenAiError::RunFailed { status, .. } = failure(None, f("timeout"), f("cancelled"))
        else {
            panic!()
        };
        assert_eq!(status.as_u16(), 503);
    }
}
