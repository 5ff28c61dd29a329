//! The OpenAI answer shapes: `chat.completion` (one document), `chat.completion.chunk` (one
//! streamed piece), the model list, and how a duet answer fills them (usage, `finish_reason`).

use serde::Serialize;

/// Token counts of the model that answered, in OpenAI's names.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[schema(as = CompletionUsage)]
pub(in crate::api) struct CompletionUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl CompletionUsage {
    /// The counts, when the provider reported both; OpenAI's usage has no way to say
    /// "unknown" for one of them, so then there is none.
    pub(in crate::api) fn of(input: Option<u64>, output: Option<u64>) -> Option<Self> {
        let (prompt_tokens, completion_tokens) = (input?, output?);
        Some(CompletionUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        })
    }
}

/// OpenAI's `finish_reason` for a provider's own: the Gemini, Anthropic and OpenAI spellings
/// of "ended", "hit the token limit" and "filtered"; anything else (or none) is `stop`.
pub(in crate::api) fn finish_reason(provider: Option<&str>) -> &'static str {
    match provider.unwrap_or("stop") {
        "length" | "max_tokens" | "MAX_TOKENS" | "model_context_window_exceeded" => "length",
        "content_filter" | "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT"
        | "SPII" | "IMAGE_SAFETY" | "refusal" => "content_filter",
        _ => "stop",
    }
}

/// `POST /v1/chat/completions` without `stream`: the whole answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ChatCompletion)]
pub(in crate::api) struct ChatCompletion<'a> {
    /// `chatcmpl-` and the run's id.
    pub id: &'a str,
    #[schema(value_type = String, example = "chat.completion")]
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    /// `duet`.
    pub model: &'static str,
    pub choices: [Choice<'a>; 1],
    /// Of the model that answered; null when its provider did not report both counts.
    pub usage: Option<CompletionUsage>,
    #[schema(value_type = Option<String>)]
    pub system_fingerprint: Option<&'a str>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ChatCompletionChoice)]
pub(in crate::api) struct Choice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    /// `stop`, `length` or `content_filter`.
    #[schema(value_type = String)]
    pub finish_reason: &'static str,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ChatCompletionAnswer)]
pub(in crate::api) struct AssistantMessage<'a> {
    #[schema(value_type = String, example = "assistant")]
    pub role: &'static str,
    pub content: &'a str,
    #[schema(value_type = Option<String>)]
    pub refusal: Option<&'a str>,
}

/// One `data:` line of a streamed answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ChatCompletionChunk)]
pub(in crate::api) struct Chunk<'a> {
    pub id: &'a str,
    #[schema(value_type = String, example = "chat.completion.chunk")]
    pub object: &'static str,
    pub created: i64,
    pub model: &'static str,
    /// Empty in the usage chunk.
    pub choices: Vec<ChunkChoice<'a>>,
    /// Only with `stream_options.include_usage`: null on every chunk but the last, which
    /// has no choices and the usage of the model that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<CompletionUsage>)]
    pub usage: Option<Option<CompletionUsage>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(in crate::api) struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: ChunkDelta<'a>,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(in crate::api) struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub content: Option<&'a str>,
}

/// `GET /v1/models`.
#[derive(Serialize, utoipa::ToSchema)]
pub(in crate::api) struct ModelList {
    #[schema(value_type = String, example = "list")]
    pub object: &'static str,
    pub data: [Model; 1],
}

/// The one model: `duet`.
#[derive(Serialize, utoipa::ToSchema)]
pub(in crate::api) struct Model {
    #[schema(value_type = String, example = "duet")]
    pub id: &'static str,
    #[schema(value_type = String, example = "model")]
    pub object: &'static str,
    /// Unix seconds: when this build of the service started.
    pub created: i64,
    #[schema(value_type = String, example = "duet")]
    pub owned_by: &'static str,
}

/// The `text/event-stream` answer's schema in the API description, as `api::openapi` does
/// for duet's own stream (one event per schema; tools such as schemathesis check each event
/// against it): every event's `data` is a [`Chunk`], an error object (when Pro fails
/// mid-answer), or `[DONE]`. JSON, since utoipa's types cannot spell `contentSchema`.
pub(in crate::api) fn describe_stream(doc: &mut serde_json::Value) {
    use serde_json::json;
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(serde_json::Value::as_object_mut)
    {
        schemas.insert(
            "ChatCompletionEvent".to_owned(),
            json!({
                "description": "One event of a streamed chat completion: a `data:` line \
                    holding a `chat.completion.chunk`, an error object (the answer was cut off), \
                    or `[DONE]`, always last. Keep-alive comments carry no event.",
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {"oneOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": {"oneOf": [
                                {"$ref": "#/components/schemas/ChatCompletionChunk"},
                                {"$ref": "#/components/schemas/OpenAiErrorBody"},
                            ]},
                        },
                    ]},
                },
            }),
        );
    }
    if let Some(stream) = doc
        .pointer_mut("/paths/~1v1~1chat~1completions/post/responses/200/content/text~1event-stream")
    {
        stream["schema"] = json!({"$ref": "#/components/schemas/ChatCompletionEvent"});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_of_every_provider_map_to_openai_ones() {
        for (theirs, ours) in [
            (Some("stop"), "stop"),
            (Some("end_turn"), "stop"),
            (Some("STOP"), "stop"),
            (None, "stop"),
            (Some("length"), "length"),
            (Some("max_tokens"), "length"),
            (Some("MAX_TOKENS"), "length"),
            (Some("SAFETY"), "content_filter"),
            (Some("content_filter"), "content_filter"),
        ] {
            assert_eq!(finish_reason(theirs), ours, "{theirs:?}");
        }
    }

    #[test]
    fn usage_needs_both_counts() {
        let u = CompletionUsage::of(Some(3), Some(4)).unwrap();
        assert_eq!(u.total_tokens, 7);
        assert!(CompletionUsage::of(Some(3), None).is_none());
    }
}
