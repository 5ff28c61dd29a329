//! Model providers: the streaming abstraction every upstream family implements.
//!
//! A provider call is a [`ProviderStream`]: text deltas, then exactly one
//! [`ProviderEvent::Finished`] carrying finish reason, usage and model version. A stream that
//! ends without `Finished` is a truncated answer and the orchestrator treats it as an error, so
//! no adapter can report a cut-off answer as a success. Failures are [`ProviderError`]s already
//! classified into the contract's `error_type`s. Deadlines, retries and cancellation live in the
//! orchestrator, not here: dropping the stream cancels the call.

pub mod simulated;

use std::{fmt, sync::Arc, time::Duration};

use futures::stream::BoxStream;
use serde::Serialize;

use crate::config::{ModelConfig, ProviderKind, Role};

/// What one model is asked.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub role: Role,
    pub query: Arc<str>,
    pub system: Option<Arc<str>>,
}

/// Token counts as the provider reports them; `None` when it reports nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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

/// Builds the provider a role is configured for.
pub fn build(config: &ModelConfig) -> Result<Arc<dyn Provider>, BuildError> {
    match config.provider {
        ProviderKind::Simulated => Ok(Arc::new(simulated::Simulated::new(
            config.model.clone(),
            config.simulated,
        ))),
        other => Err(BuildError::Unsupported {
            role: config.role,
            provider: other.as_str(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{role}: provider {provider} is not available in this build")]
    Unsupported { role: Role, provider: &'static str },
}
