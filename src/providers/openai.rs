//! OpenAI Chat Completions and every server that speaks it (vLLM, Ollama, llama.cpp,
//! OpenRouter, ...): `POST {base}/chat/completions` with `stream: true`,
//! `stream_options.include_usage` and `Authorization: Bearer`.
//!
//! The stream is `data: <chat.completion.chunk>` events ending with `data: [DONE]`. The
//! finish reason comes on one chunk and the usage on a later one with no choices, so the call
//! finishes as soon as it has both, without waiting for `[DONE]` (some proxies never send it).
//! A finish reason followed by `[DONE]` or the body's end, with no usage, finishes with the
//! token counts unknown. `[DONE]` or the end with no finish reason is a truncated answer.
//! Mid-stream errors are
//! `data: {"error": ...}`, or an `error: {...}` line from older llama.cpp builds.

use std::borrow::Cow;

use eventsource_stream::Event;
use reqwest::header::AUTHORIZATION;
use serde::Serialize;
use serde_json::Value;

use super::{
    Completion, ModelRequest, Provider, ProviderError, ProviderStream, Usage,
    http::{self, CallContext, Decoder, Endpoint, Step, scan::Scanner},
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

/// What the decoder reads from a chunk, however it was read.
#[derive(Debug, Default, PartialEq)]
struct Chunk<'a> {
    model: Option<Cow<'a, str>>,
    usage: Option<Usage>,
    /// The first choice's `delta.content`.
    text: Option<Cow<'a, str>>,
    /// The first choice's `finish_reason`.
    finish_reason: Option<Cow<'a, str>>,
}

/// The hot path: the usual chunk, walked in place by [`Scanner`] (the text borrowed unless
/// it has escapes, everything else skipped unread). `None` for anything else, which
/// [`read_chunk`] then reads from a parsed `Value` with the messages it always had: an
/// `error` key (whatever its value), a field of another type than usual, a key we read
/// given twice (serde keeps the last), broken JSON, or what [`Scanner`] leaves to serde.
fn scan_chunk(data: &str) -> Option<Chunk<'_>> {
    let mut s = Scanner::new(data);
    let mut chunk = Chunk::default();
    let mut seen = [false; 3];
    s.object(|s, key| match key {
        "model" => {
            once(&mut seen[0])?;
            chunk.model = s.opt_string()?;
            Some(())
        }
        "choices" => {
            once(&mut seen[1])?;
            if s.null() {
                return Some(());
            }
            s.array(|s, i| match i {
                0 => scan_choice(s, &mut chunk),
                _ => s.skip(),
            })
        }
        "usage" => {
            once(&mut seen[2])?;
            chunk.usage = scan_usage(s)?;
            Some(())
        }
        "error" => None,
        _ => s.skip(),
    })?;
    s.end()?;
    Some(chunk)
}

/// The first choice, an object: its `delta.content` and `finish_reason`.
fn scan_choice<'a>(s: &mut Scanner<'a>, chunk: &mut Chunk<'a>) -> Option<()> {
    let mut seen = [false; 3];
    s.object(|s, key| match key {
        "delta" => {
            once(&mut seen[0])?;
            if s.null() {
                return Some(());
            }
            s.object(|s, key| match key {
                "content" => {
                    once(&mut seen[2])?;
                    chunk.text = s.opt_string()?;
                    Some(())
                }
                _ => s.skip(),
            })
        }
        "finish_reason" => {
            once(&mut seen[1])?;
            chunk.finish_reason = s.opt_string()?;
            Some(())
        }
        _ => s.skip(),
    })
}

/// `usage`: `null`, or an object with integer (or `null`) token counts.
fn scan_usage(s: &mut Scanner<'_>) -> Option<Option<Usage>> {
    if s.null() {
        return Some(None);
    }
    let mut usage = Usage::default();
    let mut seen = [false; 2];
    s.object(|s, key| match key {
        "prompt_tokens" => {
            once(&mut seen[0])?;
            usage.input_tokens = s.opt_u64()?;
            Some(())
        }
        "completion_tokens" => {
            once(&mut seen[1])?;
            usage.output_tokens = s.opt_u64()?;
            Some(())
        }
        _ => s.skip(),
    })?;
    Some(Some(usage))
}

/// A key read a second time sends the chunk to the general path, which keeps the last.
fn once(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

/// The general path: the same fields from any object serde parsed.
fn read_chunk(v: &Value) -> Chunk<'_> {
    let choice = v.get("choices").and_then(|c| c.get(0));
    Chunk {
        model: v.get("model").and_then(Value::as_str).map(Cow::Borrowed),
        usage: usage_of(v),
        text: choice
            .and_then(|c| c.pointer("/delta/content"))
            .and_then(Value::as_str)
            .map(Cow::Borrowed),
        finish_reason: choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
            .map(Cow::Borrowed),
    }
}

impl OpenAiDecoder {
    /// One chunk, however it was read.
    fn step(&mut self, chunk: Chunk<'_>) -> Step {
        if let Some(model) = chunk.model
            && self.model_version.as_deref() != Some(&*model)
        {
            self.model_version = Some(model.into_owned());
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        if let Some(reason) = chunk.finish_reason {
            self.finish_reason = Some(reason.into_owned());
        }
        let text = chunk.text.filter(|t| !t.is_empty()).map(Cow::into_owned);
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
        if let Some(chunk) = scan_chunk(&event.data) {
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
        Ok(self.step(read_chunk(&v)))
    }

    /// The body ended after a finish chunk with neither a usage chunk nor `[DONE]` (a
    /// server that ignores `include_usage` and closes without the terminator): the answer is
    /// whole, its token counts unknown. Recording it as cut short would call a complete
    /// answer a failure.
    fn ended(&mut self, ctx: &CallContext, stray: &str) -> Result<Completion, ProviderError> {
        if self.finish_reason.is_some() {
            return Ok(self.completion());
        }
        Err(http::unfinished(ctx, stray))
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

    /// The fast path agrees with the general one wherever it reads a chunk at all: serde
    /// parses the same text to an object without an `error` key, with the same fields.
    fn agree(data: &str) -> bool {
        let Some(fast) = scan_chunk(data) else {
            return false;
        };
        let v: Value = serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("fast path read what serde refuses ({e}): {data}"));
        assert!(v.is_object() && v.get("error").is_none(), "{data}");
        assert_eq!(fast, read_chunk(&v), "{data}");
        true
    }

    /// Every OpenAI-format fixture's chunks: the usual ones all take the fast path, with
    /// the general path's result; error chunks all go to the general path.
    #[test]
    fn fast_path_reads_every_fixture_chunk_as_the_general_path_does() {
        let files = [
            "openai_stream_ok.sse",
            "openai_stream_ok_2024.sse",
            "vllm_stream_ok.sse",
            "ollama_stream_ok.sse",
            "llamacpp_stream_ok.sse",
            "openai_stream_midstream_error.sse",
            "vllm_stream_midstream_error.sse",
            "llamacpp_stream_midstream_error.sse",
            "llamacpp_stream_midstream_error_legacy.sse",
        ];
        let mut read = 0;
        for file in files {
            let body = String::from_utf8(wire(file)).unwrap();
            for data in body.lines().filter_map(|l| l.strip_prefix("data:")) {
                let data = data.strip_prefix(' ').unwrap_or(data);
                if data == "[DONE]" {
                    continue;
                }
                let is_error = serde_json::from_str::<Value>(data)
                    .ok()
                    .is_some_and(|v| v.get("error").is_some());
                assert_eq!(agree(data), !is_error, "{file}: {data}");
                read += usize::from(!is_error);
            }
        }
        assert!(read > 60, "only {read} chunks read");
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }
    }

    /// `text` as a JSON string, escaped in one of the ways upstreams do it.
    fn encode(rng: &mut Rng, text: &str) -> String {
        match rng.below(3) {
            0 => serde_json::to_string(text).unwrap(),
            // Everything outside ASCII as `\u` escapes (surrogate pairs above the BMP),
            // upper- or lowercase hex, `/` escaped too.
            n => {
                let mut out = String::from("\"");
                for c in text.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '/' => out.push_str("\\/"),
                        '\n' => out.push_str("\\n"),
                        c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
                        c => {
                            let mut units = [0; 2];
                            for u in c.encode_utf16(&mut units) {
                                if n == 1 {
                                    out.push_str(&format!("\\u{u:04x}"));
                                } else {
                                    out.push_str(&format!("\\u{u:04X}"));
                                }
                            }
                        }
                    }
                }
                out.push('"');
                out
            }
        }
    }

    fn text(rng: &mut Rng) -> String {
        const PIECES: &[&str] = &[
            "Gray", " waves", "", "\"", "\\", "\n", "\t", "\r", "/", "\u{1}", "\u{1f}", "é", "中",
            "😀", "\u{2028}", "\u{feff}", "\u{7f}", "{", "}", "[", ",", ":", "null",
        ];
        (0..rng.below(5)).map(|_| rng.pick(PIECES)).collect()
    }

    /// A value nobody reads, of any kind.
    fn ignored(rng: &mut Rng, depth: u32) -> String {
        match rng.below(if depth > 2 { 6 } else { 8 }) {
            0 => "null".into(),
            1 => rng.pick(&["true", "false"]).to_string(),
            2 => rng
                .pick(&[
                    "0",
                    "-0",
                    "1759312284",
                    "-7",
                    "0.5",
                    "-1.25e-3",
                    "6E+2",
                    "1e300",
                ])
                .to_string(),
            3 => rng
                .pick(&["18446744073709551616", "123456789012345678901234", "1e-400"])
                .to_string(),
            4 | 5 => {
                let t = text(rng);
                encode(rng, &t)
            }
            6 => {
                let items: Vec<String> =
                    (0..rng.below(4)).map(|_| ignored(rng, depth + 1)).collect();
                format!("[{}]", items.join(","))
            }
            _ => {
                let items: Vec<String> = (0..rng.below(4))
                    .map(|i| format!("\"k{i}\":{}", ignored(rng, depth + 1)))
                    .collect();
                format!("{{{}}}", items.join(","))
            }
        }
    }

    /// Fields in a random order, with random spacing around every token.
    fn object(rng: &mut Rng, mut fields: Vec<(String, String)>) -> String {
        for i in (1..fields.len()).rev() {
            fields.swap(i, rng.below(i + 1));
        }
        let ws = |rng: &mut Rng| rng.pick(&["", "", " ", "\n", "\t ", "\r\n  "]).to_string();
        let mut out = format!("{{{}", ws(rng));
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push_str(&format!(",{}", ws(rng)));
            }
            out.push_str(&format!(
                "\"{key}\"{}:{}{value}{}",
                ws(rng),
                ws(rng),
                ws(rng)
            ));
        }
        out.push('}');
        out.push_str(&ws(rng));
        out
    }

    fn chunk(rng: &mut Rng) -> String {
        let mut fields = vec![
            (
                "id".into(),
                "\"chatcmpl-CKq0nZ8pQ1rT5vX7yB9dF3hJ6kL2m\"".into(),
            ),
            ("object".into(), "\"chat.completion.chunk\"".into()),
            ("created".into(), "1759312284".into()),
        ];
        if rng.below(5) > 0 {
            let model = if rng.below(6) == 0 {
                "null".into()
            } else {
                let t = text(rng);
                encode(rng, &format!("gpt-{t}"))
            };
            fields.push(("model".into(), model));
        }
        for _ in 0..rng.below(3) {
            let key = rng.pick(&["system_fingerprint", "service_tier", "obfuscation", "x"]);
            fields.push((key.to_string(), ignored(rng, 0)));
        }
        match rng.below(6) {
            0 => {}
            1 => fields.push(("choices".into(), rng.pick(&["null", "[]"]).to_string())),
            _ => {
                let mut delta = Vec::new();
                match rng.below(4) {
                    0 => {}
                    1 => delta.push(("content".into(), "null".into())),
                    _ => {
                        let t = text(rng);
                        delta.push(("content".into(), encode(rng, &t)));
                    }
                }
                if rng.below(2) == 0 {
                    delta.push(("role".into(), "\"assistant\"".into()));
                }
                if rng.below(3) == 0 {
                    delta.push(("refusal".into(), ignored(rng, 1)));
                }
                if rng.below(4) == 0 {
                    delta.push(("tool_calls".into(), ignored(rng, 1)));
                }
                let mut choice = vec![("index".into(), "0".into())];
                match rng.below(5) {
                    0 => {}
                    1 => choice.push(("delta".into(), "null".into())),
                    _ => choice.push(("delta".into(), object(rng, delta))),
                }
                match rng.below(3) {
                    0 => {}
                    1 => choice.push(("finish_reason".into(), "null".into())),
                    _ => {
                        let reason = rng.pick(&["stop", "length", "tool_calls", "content_filter"]);
                        choice.push(("finish_reason".into(), format!("\"{reason}\"")));
                    }
                }
                choice.push(("logprobs".into(), ignored(rng, 1)));
                let mut choices = vec![object(rng, choice)];
                for _ in 0..rng.below(2) {
                    choices.push(ignored(rng, 1));
                }
                fields.push(("choices".into(), format!("[{}]", choices.join(","))));
            }
        }
        match rng.below(4) {
            0 => {}
            1 => fields.push(("usage".into(), "null".into())),
            _ => {
                let count = |rng: &mut Rng| {
                    rng.pick(&["0", "27", "null", "18446744073709551615"])
                        .to_string()
                };
                let mut usage = vec![
                    ("prompt_tokens".into(), count(rng)),
                    ("completion_tokens".into(), count(rng)),
                    ("total_tokens".into(), "47".into()),
                ];
                if rng.below(2) == 0 {
                    usage.push(("prompt_tokens_details".into(), ignored(rng, 1)));
                }
                fields.push(("usage".into(), object(rng, usage)));
            }
        }
        object(rng, fields)
    }

    /// Generated chunks of the usual shape (every field order, spacing, escape style,
    /// unicode, ignored values of every kind) take the fast path with the general path's
    /// result; the same chunks broken or made unusual in small ways either still do or go
    /// to the general path, never to a different result.
    #[test]
    fn fast_path_agrees_with_the_general_path_on_generated_chunks() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        const EDITS: &[&str] = &[
            "\"",
            "\\",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "0",
            "-",
            ".",
            "e",
            "n",
            "null",
            "\\u",
            "\\uD83D",
            "\\uDE00",
            "\u{1}",
            "\"error\":1,",
            "\"model\":1,",
            "\"usage\":2,",
            "\"choices\":{},",
        ];
        let (mut usual, mut mutated, mut mutated_fast, mut refused) = (0, 0, 0, 0);
        for _ in 0..4000 {
            let data = chunk(&mut rng);
            // Only chunks with a number beyond f64's edge go to serde.
            if agree(&data) {
                usual += 1;
            } else {
                assert!(data.contains("1e300"), "{data}");
            }
            for _ in 0..4 {
                let mut broken = data.clone();
                let mut at = rng.below(broken.len() + 1);
                while !broken.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.below(3) {
                    0 => broken.insert_str(at, rng.pick(EDITS)),
                    1 => broken.truncate(at),
                    _ => {
                        if let Some(c) = broken[at..].chars().next() {
                            broken.replace_range(at..at + c.len_utf8(), "");
                        }
                    }
                }
                mutated += 1;
                mutated_fast += usize::from(agree(&broken));
                refused += usize::from(serde_json::from_str::<Value>(&broken).is_err());
            }
        }
        assert!(usual > 3000, "only {usual} of 4000 took the fast path");
        // Many edits leave a valid chunk (a letter less in an id), many do not: both kinds
        // were tried.
        assert!(
            mutated_fast > mutated / 10 && refused > mutated / 5,
            "{mutated} edited: {mutated_fast} read fast, {refused} refused by serde"
        );
    }

    /// Odd chunks the generator does not make: the fast path leaves them to serde.
    #[test]
    fn unusual_chunks_take_the_general_path() {
        let cases = [
            r#"{"choices":[{"delta":{"content":"a"}}],"model":"m","model":"n"}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[null]}"#,
            r#"{"choices":{"0":{"delta":{"content":"a"}}}}"#,
            r#"{"choices":[{"delta":"a"}]}"#,
            r#"{"choices":[{"delta":{"content":7}}]}"#,
            r#"{"choices":[{"finish_reason":1}]}"#,
            r#"{"usage":{"prompt_tokens":1.0}}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":7}"#,
            r#"{"model":7}"#,
            r#"{"mod\u0065l":"m"}"#,
            r#"{"error":null}"#,
            r#"{"x":"\uD800"}"#,
            r#"{"x":1e400}"#,
            "{\"x\":\"a\u{1}b\"}",
            r#"{} {}"#,
            r#"[{}]"#,
            r#""#,
        ];
        for data in cases {
            assert!(scan_chunk(data).is_none(), "{data}");
        }
        // And what the fast path does read, the way serde reads it.
        for data in [
            r#"{"choices":[{"delta":{"content":"a\u00e9\uD83D\uDE00\n\"\\\/"}},{"x":[1,{"y":[]}]}]}"#,
            r#" { "usage" : { "prompt_tokens" : 0 , "completion_tokens" : null } } "#,
            r#"{"choices":[{"delta":null,"finish_reason":"stop"}],"usage":null}"#,
            r#"{"choices":null,"model":null}"#,
            "{}",
        ] {
            assert!(agree(data), "{data}");
        }
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
