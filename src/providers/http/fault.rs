//! What an upstream error document says (reason code, numeric code, suggested wait), read
//! from the shapes of all three families and the OpenAI-compatible servers.

use std::time::Duration;

use serde_json::Value;

use super::retry_after::parse_proto_duration;

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

    pub(super) fn reason_suffix(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
