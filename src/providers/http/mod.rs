//! What the real adapters share, one job per file:
//!
//! - `endpoint`: one adapter's URL, headers and connection pool, and how it starts a call;
//! - `call`: the call itself: send, classify a non-2xx answer, decode the body, stop at the
//!   first completion or error ([`Decoder`] is what each wire format implements);
//! - `framing`: [`Bounded`], the line and body limits in front of the SSE parser;
//! - `events`: the SSE parser itself, whole lines in, one reused event out;
//! - `classify`: HTTP failures, mid-stream errors and broken bodies as [`ProviderError`]s;
//! - `fault`: reading an upstream's error document;
//! - `retry_after`: how long an upstream asks to be left alone;
//! - `redact`: keeping keys out of logs and records;
//! - `scan`: a small in-place JSON reader for the decoders' hot paths.
//!
//! Each adapter only knows its wire format: it builds a request body and implements
//! [`Decoder`] (one upstream SSE event in, deltas or a completion out); [`Endpoint::call`]
//! does the rest. Deadlines and retries are the orchestrator's: errors here only say what
//! happened and whether trying again could help.
//!
//! [`ProviderError`]: super::ProviderError

use std::sync::Arc;

mod call;
mod classify;
mod endpoint;
mod events;
mod fault;
mod framing;
mod redact;
mod retry_after;
pub mod scan;

pub use call::{Body, Build, Decoder, Step, call, decode, unfinished};
pub use classify::{
    classify_http, classify_midstream, error_object, json, malformed, stray_error, truncated,
};
pub use endpoint::Endpoint;
pub use fault::Fault;
pub use framing::{BodyError, Bounded};
pub use redact::{clip, redact, url_for_log};
pub use retry_after::retry_after;

/// Longest single line (one SSE field) accepted from an upstream. Gemini thought signatures
/// and inline images exceed the 64 KiB caps of common line readers, so the cap is large; it
/// only has to stop a line that never ends.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Longest body accepted from an upstream: far above any text answer, far below trouble.
pub const MAX_BODY_BYTES: usize = 16 << 20;

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
    /// Host, port and path of the call (never the query, which may carry a key): named in
    /// the detail of every failure, so a wrong base URL shows in the log as what it is.
    pub target: Arc<str>,
    pub limits: BodyLimits,
}

impl CallContext {
    pub fn redact(&self, text: &str) -> String {
        redact(text, &[&self.secret])
    }
}
