//! Every way a call can fail, as a [`ProviderError`] with its `error_type` and `retryable`:
//! HTTP statuses (the table in docs/providers.md), error objects inside a 200 stream, errors
//! hidden in stray lines, broken connections, oversized or malformed bodies. Client messages
//! name the family, the status and a reason code at most; the rest goes to `detail`, redacted.

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::{CallContext, clip, fault::Fault, framing::BodyError, retry_after};
use crate::providers::{ErrorType, ProviderError};

/// How much of an upstream body goes into `detail` (log and audit record).
const MAX_DETAIL_BODY_CHARS: usize = 2048;

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

pub(super) fn transport_error(ctx: &CallContext, e: &reqwest::Error) -> ProviderError {
    // The connection broke mid-body: a network fault, not a malformed answer, and worth a
    // retry when no token has been shown yet (the orchestrator decides that).
    ProviderError::new(
        ErrorType::ProviderError,
        true,
        format!("the connection to {} broke mid-answer", ctx.family),
    )
    .with_detail(format!(
        "{} body from {} failed: {}",
        ctx.family,
        ctx.target,
        ctx.redact(&error_chain(e))
    ))
}

pub(super) fn too_large(ctx: &CallContext, what: &str) -> ProviderError {
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

pub(super) fn body_error(ctx: &CallContext, e: BodyError) -> ProviderError {
    match e {
        BodyError::Transport(e) => transport_error(ctx, &e),
        BodyError::LineTooLong => too_large(ctx, "line"),
        BodyError::BodyTooLarge => too_large(ctx, "body"),
    }
}

/// The error and its sources on one line (reqwest's own `Display` stops at the outermost).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
            "{family} HTTP {code} from {}: {}",
            ctx.target,
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

/// The classified error when `v` is an upstream error object (`{"error": …}`), as it comes
/// inside a 200 stream or as a whole body; `raw` is what goes, redacted, into the detail.
pub fn error_object(ctx: &CallContext, v: &Value, raw: &str) -> Result<(), ProviderError> {
    match v.get("error").and_then(|_| Fault::from_value(v)) {
        Some(fault) => Err(classify_midstream(ctx, &fault, raw)),
        None => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::providers::http::BodyLimits;

    fn ctx() -> CallContext {
        CallContext {
            family: "openai",
            secret: "sk-test-PLANTED0123456789".into(),
            target: "api.openai.test/v1/chat/completions".into(),
            limits: BodyLimits::default(),
        }
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
}
