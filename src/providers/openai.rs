//! OpenAI Chat Completions and every server that speaks it (vLLM, Ollama, llama.cpp,
//! OpenRouter, ...): `POST {base}/chat/completions` with `stream: true`,
//! `stream_options.include_usage` and `Authorization: Bearer`.
//!
//! The stream is `data: <chat.completion.chunk>` events ending with `data: [DONE]`. The
//! finish reason comes on one chunk and the usage on a later one with no choices, so the call
//! finishes as soon as it has both, without waiting for `[DONE]` (some proxies never send it).
//! `[DONE]` with no finish reason is a truncated answer. Mid-stream errors are
//! `data: {"error": ...}`, or an `error: {...}` line from older llama.cpp builds.

use std::borrow::Cow;

use eventsource_stream::Event;
use reqwest::header::AUTHORIZATION;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Completion, ModelRequest, Provider, ProviderError, ProviderStream, Usage,
    http::{self, CallContext, Decoder, Endpoint, Step},
    pool::Upstream,
};
use crate::conversation::Thinking;

pub struct OpenAi {
    model: String,
    endpoint: Endpoint,
}

impl OpenAi {
    pub fn new(
        upstream: Upstream,
        base_url: &str,
        model: &str,
        key: &str,
        limits: http::BodyLimits,
    ) -> Result<Self, String> {
        let url = format!("{base_url}/chat/completions");
        let endpoint = Endpoint::new("openai", upstream, &url, key, limits)?
            .key_header(AUTHORIZATION, &format!("Bearer {key}"))?;
        Ok(OpenAi {
            model: model.to_owned(),
            endpoint,
        })
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    /// Not the older `max_tokens`, which OpenAI deprecated and its reasoning models refuse;
    /// vLLM, Ollama and llama.cpp take this name too (docs/providers.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl Provider for OpenAi {
    fn provider_name(&self) -> &str {
        self.endpoint.family()
    }

    fn model_name(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: &ModelRequest) -> ProviderStream {
        let params = request.params;
        let sampling = &request.sampling;
        let body = Body {
            model: &self.model,
            messages: request
                .conversation
                .messages()
                .map(|(role, content)| Message {
                    role: role.as_str(),
                    content,
                })
                .collect(),
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_completion_tokens: params.max_tokens,
            temperature: params.temperature,
            reasoning_effort: params.thinking.and_then(reasoning_effort),
            // The sampling fields are OpenAI's own, sent as the client gave them.
            top_p: sampling.top_p,
            seed: sampling.seed,
            stop: &sampling.stop,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
        };
        self.endpoint
            .call(&body, request.trace.as_ref(), OpenAiDecoder::default())
    }
}

/// `reasoning_effort` for each level of `thinking`. `off` sends none, leaving the model's
/// default: OpenAI has no value that every model takes for "no reasoning" (`minimal` is
/// GPT-5's, `none` GPT-5.1's; o-series models and OpenAI-compatible servers refuse both),
/// and models that do not reason at all refuse the field whatever its value.
pub const fn reasoning_effort(thinking: Thinking) -> Option<&'static str> {
    match thinking {
        Thinking::Off => None,
        Thinking::Low => Some("low"),
        Thinking::Medium => Some("medium"),
        Thinking::High => Some("high"),
    }
}

#[derive(Default)]
pub struct OpenAiDecoder {
    finish_reason: Option<String>,
    usage: Option<Usage>,
    model_version: Option<String>,
}

fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    Some(Usage {
        input_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
        output_tokens: u.get("completion_tokens").and_then(Value::as_u64),
    })
}

/// The usual `chat.completion.chunk`, for the typed fast path of [`OpenAiDecoder::event`].
/// Unknown fields are skipped; a known field of an unexpected type fails the typed parse
/// and sends the chunk down the general path.
#[derive(Deserialize)]
struct FastChunk<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: FirstChoice<'a>,
    #[serde(default)]
    usage: Option<FastUsage>,
    /// Any `error` key at all, whatever its value: the general path decides what it means.
    #[serde(default)]
    error: Present,
}

#[derive(Deserialize)]
struct FastChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<FastDelta<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FastDelta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FastUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// The first of `choices` (the only one duet asks for), read without collecting the array:
/// the rest are checked to be JSON and skipped. `null` or no key is no choice.
#[derive(Default)]
struct FirstChoice<'a>(Option<FastChoice<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<FastChoice<'a>>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of choices or null")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(FirstChoice(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(FirstChoice(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                d.deserialize_seq(self)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<FastChoice<'a>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        d.deserialize_option(Visit(std::marker::PhantomData))
    }
}

/// Whether a key was there at all (even as `null`).
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Present(true))
    }
}

impl OpenAiDecoder {
    /// One usual chunk: the same rules as the general path, on typed fields.
    fn step(&mut self, chunk: FastChunk<'_>) -> Step {
        if let Some(model) = chunk.model
            && self.model_version.as_deref() != Some(&*model)
        {
            self.model_version = Some(model.into_owned());
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens,
            });
        }
        let choice = chunk.choices.0;
        let (text, reason) = match choice {
            Some(c) => (
                c.delta
                    .and_then(|d| d.content)
                    .filter(|t| !t.is_empty())
                    .map(Cow::into_owned),
                c.finish_reason,
            ),
            None => (None, None),
        };
        if let Some(reason) = reason {
            self.finish_reason = Some(reason.into_owned());
        }
        if self.finish_reason.is_some() && self.usage.is_some() {
            return Step::Finish {
                delta: text,
                completion: self.completion(),
            };
        }
        text.map_or(Step::Continue, Step::Delta)
    }

    fn completion(&self) -> Completion {
        Completion {
            finish_reason: self.finish_reason.clone(),
            usage: self.usage.unwrap_or_default(),
            model_version: self.model_version.clone(),
        }
    }
}

impl Decoder for OpenAiDecoder {
    fn event(&mut self, ctx: &CallContext, event: &Event) -> Result<Step, ProviderError> {
        if event.data.trim() == "[DONE]" {
            if self.finish_reason.is_some() {
                // Finished without a usage chunk (a server that ignores include_usage).
                return Ok(Step::Finish {
                    delta: None,
                    completion: self.completion(),
                });
            }
            return Ok(Step::Ended);
        }
        // The hot path: nearly every chunk has the usual shape and goes through typed,
        // borrowing deserialization (no `Value` tree, no allocation per field). Anything
        // else (an error object, a field of another type, broken JSON) takes the general
        // path below, so its handling and messages stay exactly as they were.
        // Only objects: serde would also read a struct from a JSON array.
        let object = event.data.trim_start().starts_with('{');
        if let Some(chunk) = serde_json::from_str::<FastChunk>(&event.data)
            .ok()
            .filter(|_| object)
            && !chunk.error.0
        {
            return Ok(self.step(chunk));
        }
        let v = http::json(ctx, &event.data)?;
        http::error_object(ctx, &v, &event.data)?;
        if !v.is_object() {
            return Err(http::malformed(
                ctx,
                "a chunk that is not an object",
                &event.data,
            ));
        }
        if let Some(model) = v.get("model").and_then(Value::as_str)
            && self.model_version.as_deref() != Some(model)
        {
            self.model_version = Some(model.to_owned());
        }
        if let Some(usage) = usage_of(&v) {
            self.usage = Some(usage);
        }
        let choice = v.get("choices").and_then(|c| c.get(0));
        let text = choice
            .and_then(|c| c.pointer("/delta/content"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        if let Some(reason) = choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
        {
            self.finish_reason = Some(reason.to_owned());
        }
        if self.finish_reason.is_some() && self.usage.is_some() {
            return Ok(Step::Finish {
                delta: text,
                completion: self.completion(),
            });
        }
        Ok(text.map_or(Step::Continue, Step::Delta))
    }

    fn whole(
        &mut self,
        ctx: &CallContext,
        body: &Value,
    ) -> Result<(String, Completion), ProviderError> {
        if body.get("error").is_some() {
            http::error_object(ctx, body, &body.to_string())?;
        }
        let choice = body.pointer("/choices/0");
        let finish = choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str);
        let (Some(choice), Some(finish)) = (choice, finish) else {
            return Err(http::malformed(
                ctx,
                "a body without a finished choice",
                &body.to_string(),
            ));
        };
        let text = choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .unwrap_or("");
        Ok((
            text.to_owned(),
            Completion {
                finish_reason: Some(finish.to_owned()),
                usage: usage_of(body).unwrap_or_default(),
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
    fn every_ok_variant_at_every_split() {
        let cases = [
            (
                "openai_stream_ok.sse",
                HAIKU,
                "gpt-4.1-mini-2025-04-14",
                (27, 20),
            ),
            (
                "openai_stream_ok_2024.sse",
                "Gray waves fold.",
                "gpt-4.1-mini-2025-04-14",
                (27, 4),
            ),
            (
                "vllm_stream_ok.sse",
                "Gray waves fold to foam.",
                "Qwen/Qwen2.5-7B-Instruct",
                (31, 6),
            ),
            (
                "ollama_stream_ok.sse",
                "Gray waves fold to foam.",
                "llama3.2",
                (33, 7),
            ),
            (
                "llamacpp_stream_ok.sse",
                "Gray waves fold to foam.",
                "Qwen2.5-7B-Instruct-Q4_K_M",
                (30, 7),
            ),
        ];
        for (file, text, version, (input, output)) in cases {
            for out in decode_fixture("openai", &wire(file), OpenAiDecoder::default) {
                let (got, c) = out.unwrap_or_else(|e| panic!("{file}: {e:?}"));
                assert_eq!(got, text, "{file}");
                assert_eq!(c.finish_reason.as_deref(), Some("stop"), "{file}");
                assert_eq!(c.model_version.as_deref(), Some(version), "{file}");
                assert_eq!(c.usage.input_tokens, Some(input), "{file}");
                assert_eq!(c.usage.output_tokens, Some(output), "{file}");
            }
        }
    }

    #[test]
    fn finishes_without_done() {
        let body = String::from_utf8(wire("openai_stream_ok.sse")).unwrap();
        let cut = body.trim_end().trim_end_matches("data: [DONE]");
        for out in decode_fixture("openai", cut.as_bytes(), OpenAiDecoder::default) {
            assert_eq!(out.unwrap().0, HAIKU);
        }
    }

    #[test]
    fn midstream_errors_are_classified() {
        let cases = [
            (
                "openai_stream_midstream_error.sse",
                ErrorType::ProviderError,
                true,
                "server_error",
            ),
            (
                "vllm_stream_midstream_error.sse",
                ErrorType::ProviderError,
                true,
                "InternalServerError",
            ),
            (
                "llamacpp_stream_midstream_error.sse",
                ErrorType::ProviderError,
                true,
                "server_error",
            ),
            (
                "llamacpp_stream_midstream_error_legacy.sse",
                ErrorType::ProviderError,
                false,
                "invalid_request_error",
            ),
        ];
        for (file, kind, retryable, reason) in cases {
            for out in decode_fixture("openai", &wire(file), OpenAiDecoder::default) {
                let e = out.unwrap_err();
                assert_eq!((e.error_type, e.retryable), (kind, retryable), "{file}");
                assert!(e.message.contains(reason), "{file}: {}", e.message);
                assert!(!e.message.contains("help.openai.com"), "{}", e.message);
            }
        }
    }

    #[test]
    fn done_without_finish_and_malformed_chunks_fail() {
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Gray\"}}]}\n\ndata: [DONE]\n\n";
        for out in decode_fixture("openai", body.as_bytes(), OpenAiDecoder::default) {
            assert_eq!(out.unwrap_err().error_type, ErrorType::InvalidResponse);
        }
        let body = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Gray\"}}]}\n\ndata: {\"choices\": [\n\n";
        for out in decode_fixture("openai", body.as_bytes(), OpenAiDecoder::default) {
            let e = out.unwrap_err();
            assert_eq!(
                (e.error_type, e.retryable),
                (ErrorType::InvalidResponse, false)
            );
            assert_eq!(e.message, "openai sent a malformed answer");
        }
    }

    #[test]
    fn fast_and_general_paths_agree_on_odd_chunks() {
        let ctx = ctx("openai");
        let event = |data: &str| Event {
            data: data.to_owned(),
            ..Event::default()
        };
        // An array is not a chunk, even if serde could read a struct from it.
        let e = OpenAiDecoder::default()
            .event(&ctx, &event("[null, [], null]"))
            .unwrap_err();
        assert_eq!(e.error_type, ErrorType::InvalidResponse);
        // A field of an unexpected type takes the general path, which ignores it.
        let step = OpenAiDecoder::default()
            .event(
                &ctx,
                &event(r#"{"model":7,"choices":[{"delta":{"content":"Hi"}}]}"#),
            )
            .unwrap();
        assert!(matches!(step, Step::Delta(t) if t == "Hi"));
        // Escaped text is unescaped on the fast path too.
        let step = OpenAiDecoder::default()
            .event(
                &ctx,
                &event(r#"{"choices":[{"delta":{"content":"a\nb"}}]}"#),
            )
            .unwrap();
        assert!(matches!(step, Step::Delta(t) if t == "a\nb"));
    }

    #[test]
    fn whole_body() {
        let body: Value = serde_json::from_slice(&wire("openai_chat_ok.json")).unwrap();
        let (text, c) = OpenAiDecoder::default()
            .whole(&ctx("openai"), &body)
            .unwrap();
        assert_eq!(text, HAIKU);
        assert_eq!(c.usage.output_tokens, Some(20));
        assert_eq!(c.model_version.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
    }
}
