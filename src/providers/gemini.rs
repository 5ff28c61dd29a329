//! Google Gemini: `POST {base}/models/{model}:streamGenerateContent?alt=sse` with
//! `x-goog-api-key`.
//!
//! The stream is `data: <GenerateContentResponse>` events (CRLF on the real API) with no
//! terminator: the chunk carrying `candidates[0].finishReason` is the last, so the call
//! finishes there. `usageMetadata` is cumulative on every chunk, so the last one seen counts.
//! Thought parts (`"thought": true`) are not answer text. A blocked prompt is a 200 with
//! `promptFeedback.blockReason` and no candidates. Errors come as `data: {"error": ...}` or,
//! on Vertex, as raw JSON after the events, which only the stray-line capture of
//! [`http::Bounded`] sees.

use eventsource_stream::Event;
use reqwest::header::HeaderName;
use serde::Serialize;
use serde_json::Value;

use super::{
    Completion, ErrorType, ModelRequest, Provider, ProviderError, ProviderStream, Usage,
    http::{self, CallContext, Decoder, Endpoint, Step},
    pool::Upstream,
};
use crate::conversation::{Speaker, Thinking};

pub struct Gemini {
    model: String,
    endpoint: Endpoint,
}

impl Gemini {
    pub fn new(
        upstream: Upstream,
        base_url: &str,
        model: &str,
        key: &str,
        limits: http::BodyLimits,
    ) -> Result<Self, String> {
        let model = model.trim_start_matches("models/").to_owned();
        let url = format!("{base_url}/models/{model}:streamGenerateContent?alt=sse");
        let endpoint = Endpoint::new("gemini", upstream, &url, key, limits)?
            .key_header(HeaderName::from_static("x-goog-api-key"), key)?;
        Ok(Gemini { model, endpoint })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig<'a>,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    parts: [Part<'a>; 1],
}

#[derive(Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    /// Gemini's `seed` is an int32 (OpenAI's an int64).
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<ThinkingConfig>,
}

impl GenerationConfig<'_> {
    fn is_empty(&self) -> bool {
        self.max_output_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.seed.is_none()
            && self.stop_sequences.is_empty()
            && self.frequency_penalty.is_none()
            && self.presence_penalty.is_none()
            && self.thinking_config.is_none()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ThinkingConfig {
    thinking_budget: u32,
}

/// `thinkingBudget` for each level of `thinking`. `off` is 0, which Flash models take and
/// 2.5 Pro refuses (it cannot stop thinking; its least budget is 128): Google answers that
/// with a 400, reported as a provider error (docs/providers.md). The others fit every 2.5
/// model's range (Flash up to 24,576 tokens, Pro up to 32,768).
pub const fn thinking_budget(thinking: Thinking) -> u32 {
    match thinking {
        Thinking::Off => 0,
        Thinking::Low => 1024,
        Thinking::Medium => 8192,
        Thinking::High => 24_576,
    }
}

impl Provider for Gemini {
    fn provider_name(&self) -> &str {
        self.endpoint.family()
    }

    fn model_name(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: &ModelRequest) -> ProviderStream {
        let conversation = &request.conversation;
        let params = request.params;
        let sampling = &request.sampling;
        let body = Body {
            system_instruction: conversation.system().map(|text| Content {
                role: None,
                parts: [Part { text }],
            }),
            contents: conversation
                .turns()
                .iter()
                .map(|m| Content {
                    // Gemini calls the assistant "model".
                    role: Some(match m.role {
                        Speaker::Assistant => "model",
                        Speaker::User | Speaker::System => "user",
                    }),
                    parts: [Part { text: &m.content }],
                })
                .collect(),
            generation_config: GenerationConfig {
                max_output_tokens: params.max_tokens,
                temperature: params.temperature,
                top_p: sampling.top_p,
                // A wider seed is sent as its low 32 bits: still the same seed every time,
                // which is what a client asks a seed for (docs/providers.md).
                seed: sampling.seed.map(|s| s as i32),
                stop_sequences: &sampling.stop,
                frequency_penalty: sampling.frequency_penalty,
                presence_penalty: sampling.presence_penalty,
                thinking_config: params.thinking.map(|t| ThinkingConfig {
                    thinking_budget: thinking_budget(t),
                }),
            },
        };
        self.endpoint
            .call(&body, request.trace.as_ref(), GeminiDecoder::default())
    }
}

#[derive(Default)]
pub struct GeminiDecoder {
    usage: Usage,
    model_version: Option<String>,
}

impl GeminiDecoder {
    /// Reads one `GenerateContentResponse`: its text, and its finish reason if it has one.
    fn chunk(
        &mut self,
        ctx: &CallContext,
        v: &Value,
        raw: &str,
    ) -> Result<(String, Option<String>), ProviderError> {
        http::error_object(ctx, v, raw)?;
        if let Some(meta) = v.get("usageMetadata") {
            let get = |k: &str| meta.get(k).and_then(Value::as_u64);
            // Thinking tokens are billed as output, as OpenAI's and Anthropic's counts include
            // reasoning tokens.
            let output = match (get("candidatesTokenCount"), get("thoughtsTokenCount")) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            self.usage = Usage {
                input_tokens: get("promptTokenCount").or(self.usage.input_tokens),
                output_tokens: output.or(self.usage.output_tokens),
            };
        }
        if let Some(version) = v.get("modelVersion").and_then(Value::as_str)
            && self.model_version.as_deref() != Some(version)
        {
            self.model_version = Some(version.to_owned());
        }
        let candidate = v.get("candidates").and_then(|c| c.get(0));
        let Some(candidate) = candidate else {
            if let Some(reason) = v
                .pointer("/promptFeedback/blockReason")
                .and_then(Value::as_str)
            {
                let code = reason
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
                return Err(ProviderError::new(
                    ErrorType::ProviderError,
                    false,
                    format!(
                        "gemini blocked the prompt ({})",
                        if code { reason } else { "blocked" }
                    ),
                )
                .with_detail(format!("gemini blocked the prompt: {}", ctx.redact(raw))));
            }
            if v.is_object() {
                return Ok((String::new(), None));
            }
            return Err(http::malformed(ctx, "a chunk that is not an object", raw));
        };
        let mut text = String::new();
        if let Some(parts) = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
        {
            for part in parts {
                if part.get("thought").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
        }
        let finish = candidate
            .get("finishReason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok((text, finish))
    }

    fn completion(&self, finish_reason: String) -> Completion {
        Completion {
            finish_reason: Some(finish_reason),
            usage: self.usage,
            model_version: self.model_version.clone(),
        }
    }
}

impl Decoder for GeminiDecoder {
    fn event(&mut self, ctx: &CallContext, event: &Event) -> Result<Step, ProviderError> {
        let v = http::json(ctx, &event.data)?;
        let (text, finish) = self.chunk(ctx, &v, &event.data)?;
        Ok(match finish {
            Some(reason) => Step::Finish {
                delta: (!text.is_empty()).then_some(text),
                completion: self.completion(reason),
            },
            None if text.is_empty() => Step::Continue,
            None => Step::Delta(text),
        })
    }

    fn whole(
        &mut self,
        ctx: &CallContext,
        body: &Value,
    ) -> Result<(String, Completion), ProviderError> {
        // `:generateContent` gives one object; `:streamGenerateContent` without `alt=sse` one
        // array of them.
        let chunks = match body {
            Value::Array(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        let mut text = String::new();
        let mut finish = None;
        for chunk in chunks {
            let (t, f) = self.chunk(ctx, chunk, &chunk.to_string())?;
            text.push_str(&t);
            finish = f.or(finish);
        }
        match finish {
            Some(reason) => Ok((text, self.completion(reason))),
            None => Err(http::truncated(ctx)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::testing::{decode_fixture, wire};

    fn decoder() -> GeminiDecoder {
        GeminiDecoder::default()
    }

    #[test]
    fn stream_ok_crlf_and_lf_at_every_split() {
        for file in ["gemini_stream_ok.sse", "gemini_stream_ok_lf.sse"] {
            for out in decode_fixture("gemini", &wire(file), decoder) {
                let (text, completion) = out.unwrap();
                assert_eq!(
                    text,
                    "Gray waves fold to foam\u{2014}\nsalt wind combs the restless tide,\nthe moon keeps its count."
                );
                assert_eq!(completion.finish_reason.as_deref(), Some("STOP"));
                assert_eq!(
                    completion.model_version.as_deref(),
                    Some("gemini-2.5-flash")
                );
                assert_eq!(completion.usage.input_tokens, Some(14));
                assert_eq!(completion.usage.output_tokens, Some(19 + 371));
            }
        }
    }

    #[test]
    fn midstream_errors_data_and_raw() {
        for out in decode_fixture(
            "gemini",
            &wire("gemini_stream_midstream_error_data.sse"),
            decoder,
        ) {
            let e = out.unwrap_err();
            assert_eq!(
                (e.error_type, e.retryable),
                (ErrorType::ProviderError, true)
            );
            assert!(e.message.contains("UNAVAILABLE"), "{}", e.message);
        }
        for out in decode_fixture(
            "gemini",
            &wire("gemini_stream_midstream_error_raw.sse"),
            decoder,
        ) {
            let e = out.unwrap_err();
            assert_eq!(
                (e.error_type, e.retryable),
                (ErrorType::ProviderError, false)
            );
            assert!(e.message.contains("CANCELLED"), "{}", e.message);
        }
    }

    #[test]
    fn thoughts_and_empty_parts_are_not_text_and_blocked_prompts_fail() {
        let body = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"hmm\",\"thought\": true},{\"text\": \"\",\"thoughtSignature\": \"abc\"}],\"role\": \"model\"},\"index\": 0}]}\r\n\r\n\
                    data: {\"candidates\": [{\"content\": {\"role\": \"model\"},\"index\": 0}]}\r\n\r\n\
                    data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"ok\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"modelVersion\": \"m\"}\r\n\r\n";
        for out in decode_fixture("gemini", body.as_bytes(), decoder) {
            assert_eq!(out.unwrap().0, "ok");
        }
        let blocked = "data: {\"promptFeedback\": {\"blockReason\": \"SAFETY\"},\"usageMetadata\": {\"promptTokenCount\": 9},\"modelVersion\": \"m\"}\r\n\r\n";
        for out in decode_fixture("gemini", blocked.as_bytes(), decoder) {
            let e = out.unwrap_err();
            assert_eq!(
                (e.error_type, e.retryable),
                (ErrorType::ProviderError, false)
            );
            assert_eq!(e.message, "gemini blocked the prompt (SAFETY)");
        }
    }

    #[test]
    fn stream_without_finish_is_truncated() {
        let body = wire("gemini_stream_ok.sse");
        let cut = &body[..body.len() / 2];
        for out in decode_fixture("gemini", cut, decoder) {
            assert_eq!(out.unwrap_err().error_type, ErrorType::InvalidResponse);
        }
    }

    #[test]
    fn whole_body() {
        let ctx = crate::providers::testing::ctx("gemini");
        let body: Value = serde_json::from_slice(&wire("gemini_generate_ok.json")).unwrap();
        let (text, c) = decoder().whole(&ctx, &body).unwrap();
        assert!(text.starts_with("Gray waves fold to foam\u{2014}\n"));
        assert_eq!(c.usage.output_tokens, Some(19 + 371));
        let array = Value::Array(vec![body.clone()]);
        assert_eq!(decoder().whole(&ctx, &array).unwrap().0, text);
    }
}
