//! Model providers: the streaming abstraction every upstream family implements.
//!
//! A provider call is a [`ProviderStream`]: text deltas, then exactly one
//! [`ProviderEvent::Finished`] carrying finish reason, usage and model version. A stream that
//! ends without `Finished` is a truncated answer and the orchestrator treats it as an error, so
//! no adapter can report a cut-off answer as a success. Failures are [`ProviderError`]s already
//! classified into the contract's `error_type`s. Deadlines, retries and cancellation live in the
//! orchestrator, not here: dropping the stream cancels the call.
//!
//! Families: [`gemini`], [`openai`] (any OpenAI-compatible server), [`anthropic`], all built
//! on [`http`] (endpoint, call, classification, body limits, redaction) and [`pool`] (their
//! upstream connections); [`simulated`] needs no network. The local upstream behind
//! `duet mock-provider` is a development tool: `crate::devtools::mock`.

pub mod anthropic;
pub mod gemini;
pub mod h1;
pub mod http;
pub mod openai;
pub mod pool;
pub mod proxy;
pub mod simulated;

use std::{fmt, sync::Arc, time::Duration};

use futures::stream::BoxStream;
use serde::Serialize;

use crate::{
    config::{ModelConfig, ProviderKind},
    conversation::{Conversation, GenParams, Sampling},
    domain::Role,
    telemetry::spans::TraceHeaders,
};

/// What one model is asked.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub role: Role,
    /// The whole conversation; shared by both models' calls.
    pub conversation: Arc<Conversation>,
    /// This model's parameters (its overrides over the ones for both).
    pub params: GenParams,
    /// The run's sampling fields (the same for both models).
    pub sampling: Sampling,
    /// The W3C trace context the upstream request carries; `None` while traces are off.
    pub trace: Option<TraceHeaders>,
}

/// Token counts as the provider reports them; `None` when it reports nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// How a successful call ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    pub finish_reason: Option<String>,
    pub usage: Usage,
    /// The exact model version the provider says answered (Gemini `modelVersion`, OpenAI
    /// `model`, Anthropic `message.model`).
    pub model_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    Delta(String),
    Finished(Completion),
}

/// The contract's `error_type`s (§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    Timeout,
    RateLimited,
    ProviderError,
    InvalidResponse,
    Cancelled,
    Internal,
}

impl ErrorType {
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorType::Timeout => "timeout",
            ErrorType::RateLimited => "rate_limited",
            ErrorType::ProviderError => "provider_error",
            ErrorType::InvalidResponse => "invalid_response",
            ErrorType::Cancelled => "cancelled",
            ErrorType::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure of one model call.
///
/// `message` is safe for clients: no upstream body, key, URL or internal address. `detail` is
/// for the log and the audit record, with keys already redacted by whoever built it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error_type}: {message}")]
pub struct ProviderError {
    pub error_type: ErrorType,
    pub retryable: bool,
    pub message: String,
    pub detail: String,
    /// The upstream's own `Retry-After`, honoured by the retry loop when it fits the deadline.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(error_type: ErrorType, retryable: bool, message: impl Into<String>) -> Self {
        let message = message.into();
        ProviderError {
            error_type,
            retryable,
            detail: message.clone(),
            message,
            retry_after: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }
}

/// One model call in flight. Dropping it cancels the call.
pub type ProviderStream = BoxStream<'static, Result<ProviderEvent, ProviderError>>;

/// An upstream family, configured for one role.
pub trait Provider: Send + Sync + 'static {
    /// Provider name as reported in events and records (`simulated`, `gemini`, ...).
    fn provider_name(&self) -> &str;
    /// Model name sent upstream.
    fn model_name(&self) -> &str;
    /// Starts one call. Must not block; all work happens when the stream is polled.
    fn stream(&self, request: &ModelRequest) -> ProviderStream;
}

/// Builds the provider a role is configured for, with its own upstream connections
/// ([`pool::Upstream`]).
pub fn build(
    config: &ModelConfig,
    pool: pool::PoolConfig,
) -> Result<Arc<dyn Provider>, BuildError> {
    let key = || {
        config
            .api_key
            .as_ref()
            .map(|k| k.expose())
            .ok_or(BuildError::MissingKey {
                role: config.role,
                provider: config.provider.as_str(),
            })
    };
    let invalid = |problem: String| BuildError::Invalid {
        role: config.role,
        provider: config.provider.as_str(),
        problem,
    };
    let limits = http::BodyLimits::default();
    let (base, model) = (config.base_url.as_str(), config.model.as_str());
    // A plain-HTTP upstream without prior knowledge speaks HTTP/1.1: one connection per call
    // in flight, opened by the client itself, so one client is all it needs.
    let pool = if config.base_url.starts_with("http://") && !pool.http2_prior_knowledge {
        pool::PoolConfig {
            streams_per_connection: usize::MAX,
            ..pool
        }
    } else {
        pool
    };
    let upstream = || pool::Upstream::new(pool).map_err(BuildError::from);
    Ok(match config.provider {
        ProviderKind::Simulated => Arc::new(simulated::Simulated::new(
            config.model.clone(),
            config.simulated,
        )),
        ProviderKind::Gemini => Arc::new(
            gemini::Gemini::new(upstream()?, base, model, key()?, limits).map_err(invalid)?,
        ),
        ProviderKind::OpenAi => Arc::new(
            openai::OpenAi::new(upstream()?, base, model, key()?, limits).map_err(invalid)?,
        ),
        ProviderKind::Anthropic => Arc::new(
            anthropic::Anthropic::new(upstream()?, base, model, key()?, limits).map_err(invalid)?,
        ),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{role}: provider {provider} needs an API key")]
    MissingKey { role: Role, provider: &'static str },
    #[error("{role}: provider {provider}: {problem}")]
    Invalid {
        role: Role,
        provider: &'static str,
        problem: String,
    },
    #[error("cannot create the HTTP client: {0}")]
    Client(#[from] pool::ClientError),
}

/// Fixtures and helpers for the adapters' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::PathBuf;

    use bytes::Bytes;
    use futures::StreamExt;

    use super::{
        Completion, ProviderError, ProviderEvent,
        http::{self, BodyLimits, CallContext, Decoder},
    };

    /// `tests/fixtures/wire`: byte-exact provider bodies, kept in the repository.
    pub(crate) fn wire_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire")
    }

    pub(crate) fn wire(name: &str) -> Vec<u8> {
        let path = wire_dir().join(name);
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "wire fixture {} is missing ({e}): the fixtures live in tests/fixtures/wire",
                path.display()
            )
        })
    }

    pub(crate) fn ctx(family: &'static str) -> CallContext {
        CallContext {
            family,
            secret: "test-secret-key-123".into(),
            target: "upstream.test/v1".into(),
            limits: BodyLimits::default(),
        }
    }

    /// The same bytes cut in several ways: whole, one byte per read (which splits every line,
    /// CRLF pair and multi-byte character), and in odd-sized pieces.
    pub(crate) fn splits(body: &[u8]) -> Vec<Vec<Bytes>> {
        let pieces = |n: usize| body.chunks(n).map(Bytes::copy_from_slice).collect();
        vec![
            vec![Bytes::copy_from_slice(body)],
            pieces(1),
            pieces(2),
            pieces(7),
            pieces(61),
        ]
    }

    /// Decodes `body` under every split; each result is the text and completion, or the
    /// error. All splits must agree, which is checked here.
    pub(crate) fn decode_fixture<D: Decoder>(
        family: &'static str,
        body: &[u8],
        make: impl Fn() -> D,
    ) -> Vec<Result<(String, Completion), ProviderError>> {
        let results: Vec<_> = splits(body)
            .into_iter()
            .map(|chunks| {
                let items = chunks.into_iter().map(Ok::<_, reqwest::Error>);
                let stream =
                    http::decode(ctx(family), futures::stream::iter(items).boxed(), make());
                let events: Vec<_> = futures::executor::block_on(stream.collect());
                let mut text = String::new();
                for (i, event) in events.iter().enumerate() {
                    let last = i + 1 == events.len();
                    match event {
                        Ok(ProviderEvent::Delta(t)) => text.push_str(t),
                        Ok(ProviderEvent::Finished(c)) if last => return Ok((text, c.clone())),
                        Err(e) if last => return Err(e.clone()),
                        other => panic!("{other:?} before the end"),
                    }
                }
                panic!("stream ended with neither a finish nor an error")
            })
            .collect();
        let shown: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok((t, c)) => format!("{t:?} {c:?}"),
                Err(e) => format!("{:?} {} {}", e.error_type, e.retryable, e.message),
            })
            .collect();
        assert!(
            shown.windows(2).all(|w| w[0] == w[1]),
            "splits disagree: {shown:#?}"
        );
        results
    }
}
