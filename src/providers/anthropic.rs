//! Anthropic Messages: `POST {base}/v1/messages` with `stream: true`, `x-api-key` and
//! `anthropic-version: 2023-06-01`.
//!
//! Every event is named, and its data's `type` repeats the name: `message_start` (model and
//! input usage), content blocks with `text_delta`s, `message_delta` (stop reason, cumulative
//! usage), `message_stop` (the end). `ping` and unknown events are ignored, as the API asks.
//! `error` may come mid-stream, after which the connection closes with no `message_stop`.

use eventsource_stream::Event;
use reqwest::header::HeaderName;
use serde::Serialize;
use serde_json::Value;

use super::{
    Completion, ModelRequest, Provider, ProviderError, ProviderStream, Usage,
    http::{self, CallContext, Decoder, Endpoint, Fault, Step},
    pool::Upstream,
};
use crate::conversation::{GenParams, Thinking};

/// Anthropic requires `max_tokens`; this is room for a long answer from every current model.
pub const MAX_TOKENS: u32 = 4096;
pub const API_VERSION: &str = "2023-06-01";

pub struct Anthropic {
    model: String,
    endpoint: Endpoint,
}

impl Anthropic {
    pub fn new(
        upstream: Upstream,
        base_url: &str,
        model: &str,
        key: &str,
        limits: http::BodyLimits,
    ) -> Result<Self, String> {
        let url = format!("{base_url}/v1/messages");
        let endpoint = Endpoint::new("anthropic", upstream, &url, key, limits)?
            .key_header(HeaderName::from_static("x-api-key"), key)?
            .header(HeaderName::from_static("anthropic-version"), API_VERSION);
        Ok(Anthropic {
            model: model.to_owned(),
            endpoint,
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<Message<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<ThinkingBody>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
struct ThinkingBody {
    #[serde(rename = "type")]
    kind: &'static str,
    budget_tokens: u32,
}

/// Anthropic's least `budget_tokens`.
pub const MIN_THINKING_BUDGET: u32 = 1024;

/// `budget_tokens` for each level of `thinking`; `off` sends no `thinking` (Claude's default
/// is not to think).
pub const fn thinking_budget(thinking: Thinking) -> Option<u32> {
    match thinking {
        Thinking::Off => None,
        Thinking::Low => Some(MIN_THINKING_BUDGET),
        Thinking::Medium => Some(4096),
        Thinking::High => Some(16_384),
    }
}

/// What `max_tokens`, `thinking` and `temperature` become, within Anthropic's rules: the
/// thinking budget is at least 1024 and below `max_tokens` (which counts thinking too), and
/// thinking takes no `temperature` but 1.
///
/// - `max_tokens` unset: [`MAX_TOKENS`] for the answer, plus the budget when thinking, so
///   thinking never eats the answer's room.
/// - `max_tokens` set: sent as is; the budget shrinks to `max_tokens - 1` to fit, and when
///   that is below 1024 the model does not think (a too-small `max_tokens` cannot hold both).
/// - With thinking on, `temperature` is not sent.
fn generation(params: GenParams) -> (u32, Option<ThinkingBody>, Option<f64>) {
    let budget = params.thinking.and_then(thinking_budget);
    let (max_tokens, budget) = match (params.max_tokens, budget) {
        (None, None) => (MAX_TOKENS, None),
        (None, Some(b)) => (MAX_TOKENS + b, Some(b)),
        (Some(max), b) => (
            max,
            b.map(|b| b.min(max.saturating_sub(1)))
                .filter(|&b| b >= MIN_THINKING_BUDGET),
        ),
    };
    let thinking = budget.map(|budget_tokens| ThinkingBody {
        kind: "enabled",
        budget_tokens,
    });
    let temperature = if thinking.is_some() {
        None
    } else {
        params.temperature
    };
    (max_tokens, thinking, temperature)
}

/// The least `top_p` Anthropic takes with thinking on.
const MIN_TOP_P_THINKING: f64 = 0.95;

/// What of `top_p` is sent, given the `temperature` and `thinking` that are: Anthropic's
/// recent models refuse `top_p` beside `temperature` (a 400, "cannot both be specified"), so
/// `temperature` wins, as Anthropic advises changing one of the two; and with thinking on,
/// only a `top_p` from 0.95 to 1 is taken, so a smaller one is not sent, as `temperature`
/// is not. Either way the model samples as it would have with no `top_p`, rather than fail.
fn top_p(top_p: Option<f64>, thinking: bool, temperature: Option<f64>) -> Option<f64> {
    if thinking {
        top_p.filter(|&p| p >= MIN_TOP_P_THINKING)
    } else if temperature.is_some() {
        None
    } else {
        top_p
    }
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl Provider for Anthropic {
    fn provider_name(&self) -> &str {
        self.endpoint.family()
    }

    fn model_name(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: &ModelRequest) -> ProviderStream {
        let (max_tokens, thinking, temperature) = generation(request.params);
        let body = Body {
            model: &self.model,
            max_tokens,
            system: request.conversation.system(),
            messages: request
                .conversation
                .turns()
                .iter()
                .map(|m| Message {
                    role: m.role.as_str(),
                    content: &m.content,
                })
                .collect(),
            stream: true,
            temperature,
            // Anthropic has no `seed`, `frequency_penalty` or `presence_penalty`: those are
            // not sent (docs/providers.md).
            top_p: top_p(request.sampling.top_p, thinking.is_some(), temperature),
            // Anthropic refuses a stop sequence of only white space (a 400, "each stop
            // sequence must contain non-whitespace"), which OpenAI clients often send
            // (`"\n"`): those are left out, so the call answers instead of failing.
            stop_sequences: request
                .sampling
                .stop
                .iter()
                .map(String::as_str)
                .filter(|s| !s.trim().is_empty())
                .collect(),
            thinking,
        };
        self.endpoint
            .call(&body, request.trace.as_ref(), AnthropicDecoder::default())
    }
}

#[derive(Default)]
pub struct AnthropicDecoder {
    usage: Usage,
    stop_reason: Option<String>,
    model_version: Option<String>,
}

impl AnthropicDecoder {
    /// Usage is cumulative: later counts replace earlier ones, missing ones keep theirs.
    fn add_usage(&mut self, usage: Option<&Value>) {
        let Some(u) = usage else { return };
        if let Some(n) = u.get("input_tokens").and_then(Value::as_u64) {
            self.usage.input_tokens = Some(n);
        }
        if let Some(n) = u.get("output_tokens").and_then(Value::as_u64) {
            self.usage.output_tokens = Some(n);
        }
    }
}

impl Decoder for AnthropicDecoder {
    fn event(&mut self, ctx: &CallContext, event: &Event) -> Result<Step, ProviderError> {
        let v = http::json(ctx, &event.data)?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.event);
        match kind {
            "message_start" => {
                let message = v.get("message");
                self.model_version = message
                    .and_then(|m| m.get("model"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                self.add_usage(message.and_then(|m| m.get("usage")));
                Ok(Step::Continue)
            }
            "content_block_delta" => {
                let delta = v.get("delta");
                let is_text =
                    delta.and_then(|d| d.get("type")).and_then(Value::as_str) == Some("text_delta");
                let text = delta
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                // Thinking, signatures and tool-input deltas are not answer text.
                Ok(if is_text && !text.is_empty() {
                    Step::Delta(text.to_owned())
                } else {
                    Step::Continue
                })
            }
            "message_delta" => {
                if let Some(reason) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.add_usage(v.get("usage"));
                Ok(Step::Continue)
            }
            "message_stop" => {
                if self.stop_reason.is_none() {
                    return Ok(Step::Ended);
                }
                Ok(Step::Finish {
                    delta: None,
                    completion: Completion {
                        finish_reason: self.stop_reason.clone(),
                        usage: self.usage,
                        model_version: self.model_version.clone(),
                    },
                })
            }
            "error" => {
                let fault = Fault::from_value(&v).unwrap_or_default();
                Err(http::classify_midstream(ctx, &fault, &event.data))
            }
            // ping, content_block_start/stop and event types added after this was written.
            _ => Ok(Step::Continue),
        }
    }

    fn whole(
        &mut self,
        ctx: &CallContext,
        body: &Value,
    ) -> Result<(String, Completion), ProviderError> {
        if body.get("type").and_then(Value::as_str) == Some("error") {
            let fault = Fault::from_value(body).unwrap_or_default();
            return Err(http::classify_midstream(ctx, &fault, &body.to_string()));
        }
        let Some(reason) = body.get("stop_reason").and_then(Value::as_str) else {
            return Err(http::malformed(
                ctx,
                "a message without a stop reason",
                &body.to_string(),
            ));
        };
        let text: String = body
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect();
        self.add_usage(body.get("usage"));
        Ok((
            text,
            Completion {
                finish_reason: Some(reason.to_owned()),
                usage: self.usage,
                model_version: body.get("model").and_then(Value::as_str).map(str::to_owned),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{
        ErrorType,
        testing::{ctx, decode_fixture, wire},
    };

    const HAIKU: &str = "Gray waves fold to foam\u{2014}\nsalt wind combs the restless tide,\nthe moon keeps its count.";

    #[test]
    fn stream_ok_at_every_split() {
        for out in decode_fixture(
            "anthropic",
            &wire("anthropic_stream_ok.sse"),
            AnthropicDecoder::default,
        ) {
            let (text, c) = out.unwrap();
            assert_eq!(text, HAIKU);
            assert_eq!(c.finish_reason.as_deref(), Some("end_turn"));
            assert_eq!(
                c.model_version.as_deref(),
                Some("claude-sonnet-4-5-20250929")
            );
            assert_eq!(
                c.usage,
                Usage {
                    input_tokens: Some(21),
                    output_tokens: Some(22)
                }
            );
        }
    }

    #[test]
    fn midstream_error_is_retryable_overload() {
        for out in decode_fixture(
            "anthropic",
            &wire("anthropic_stream_midstream_error.sse"),
            AnthropicDecoder::default,
        ) {
            let e = out.unwrap_err();
            assert_eq!(
                (e.error_type, e.retryable),
                (ErrorType::ProviderError, true)
            );
            assert_eq!(
                e.message,
                "anthropic reported an error mid-answer (overloaded_error)"
            );
        }
    }

    #[test]
    fn unknown_events_are_ignored_and_eof_before_stop_is_truncated() {
        let body = String::from_utf8(wire("anthropic_stream_ok.sse")).unwrap();
        let extra = body.replacen(
            "event: ping\n",
            "event: brand_new_thing\ndata: {\"type\":\"brand_new_thing\",\"x\":1}\n\nevent: ping\n",
            1,
        );
        for out in decode_fixture("anthropic", extra.as_bytes(), AnthropicDecoder::default) {
            assert_eq!(out.unwrap().0, HAIKU);
        }
        let cut = body.split("event: message_stop").next().unwrap();
        for out in decode_fixture("anthropic", cut.as_bytes(), AnthropicDecoder::default) {
            assert_eq!(out.unwrap_err().error_type, ErrorType::InvalidResponse);
        }
    }

    #[test]
    fn whole_body() {
        let body: Value = serde_json::from_slice(&wire("anthropic_message_ok.json")).unwrap();
        let (text, c) = AnthropicDecoder::default()
            .whole(&ctx("anthropic"), &body)
            .unwrap();
        assert_eq!(text, HAIKU);
        assert_eq!(c.usage.output_tokens, Some(22));
    }
}
