//! Reading a `POST /v1/chat/completions` body: OpenAI's request schema, mapped to duet's
//! validated [`Conversation`] and [`RunParams`], or refused in OpenAI's error shape with
//! `param` naming the field.
//!
//! Four kinds of field: the ones duet uses (`model`, `messages`, `stream`,
//! `stream_options.include_usage`, `max_tokens`/`max_completion_tokens`, `temperature`,
//! `reasoning_effort`); the sampling fields providers have too, checked in OpenAI's ranges
//! and passed on ([`Sampling`]: `top_p`, `seed`, `stop`, `frequency_penalty`,
//! `presence_penalty`); the ones that change nothing for duet's answer and are accepted and
//! ignored, type-checked all the same (`user`, `metadata`, `store`, ...); and
//! the ones whose meaning duet cannot honour, refused when they ask for it (`n` > 1, `tools`,
//! `response_format` other than text, `logprobs`, audio). A field OpenAI's schema does not have
//! is refused as OpenAI refuses it: "Unrecognized request argument supplied".

use std::collections::HashMap;

use axum::{body::Body, http::HeaderMap};
use serde::Deserialize;
use serde_json::Value;

use super::error::OpenAiError;
use crate::conversation::{
    Conversation, ConversationError, GenParams, Message, RunParams, Sampling, Speaker, Thinking,
};

/// The one model name this endpoint serves (and `GET /v1/models` lists).
pub(in crate::api) const MODEL: &str = "duet";

/// A validated chat request.
#[derive(Debug)]
pub(in crate::api) struct ChatRequest {
    pub conversation: Conversation,
    pub params: RunParams,
    pub stream: bool,
    pub include_usage: bool,
}

/// The body of `POST /v1/chat/completions`: OpenAI's Chat Completions request. Every field
/// but `model` and `messages` is optional and may be `null` (the same as absent).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatCompletionRequest, example = json!({
    "model": "duet", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}))]
#[expect(
    dead_code,
    reason = "fields read for their type check only are never used"
)]
pub(in crate::api) struct RequestBody {
    /// Always `duet`: one call runs both of the service's models.
    #[schema(value_type = ModelName)]
    model: String,
    /// The conversation: an optional `system` (or `developer`) message first, then `user` and
    /// `assistant` turns, the last one `user`; no content blank.
    #[schema(min_items = 1)]
    messages: Vec<ChatMessage>,
    /// Stream the answer as `chat.completion.chunk` events, ending with `data: [DONE]`.
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    /// The most tokens the answer may have: 1 to 1,000,000 (`max_completion_tokens` wins
    /// when both are given).
    #[schema(minimum = 1, maximum = 1_000_000)]
    max_tokens: Option<u32>,
    #[schema(minimum = 1, maximum = 1_000_000)]
    max_completion_tokens: Option<u32>,
    /// 0 to 2.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    /// Becomes duet's `thinking`: `none` is `off`, `minimal` and `low` are `low`.
    reasoning_effort: Option<ReasoningEffort>,
    /// Only 1: duet gives one answer.
    #[schema(minimum = 1, maximum = 1)]
    n: Option<u32>,
    /// Refused unless empty: duet calls no tools.
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    tools: Option<Vec<serde_json::Map<String, Value>>>,
    /// Refused unless `none`.
    #[schema(schema_with = none_or_null)]
    tool_choice: Option<Value>,
    /// Refused unless empty (the old form of `tools`).
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    functions: Option<Vec<serde_json::Map<String, Value>>>,
    /// Refused unless `none` (the old form of `tool_choice`).
    #[schema(schema_with = none_or_null)]
    function_call: Option<Value>,
    /// Only `{"type": "text"}`.
    response_format: Option<ResponseFormat>,
    /// Refused when true: duet reports no log probabilities.
    #[schema(schema_with = false_or_null)]
    logprobs: Option<bool>,
    /// Refused above 0: duet reports no log probabilities.
    #[schema(maximum = 0)]
    top_logprobs: Option<u32>,
    /// Only `["text"]`.
    modalities: Option<Vec<Modality>>,
    /// Refused unless null: duet answers in text.
    #[schema(schema_with = null_only)]
    audio: Option<Value>,
    /// Refused unless null: duet does not search the web.
    #[schema(schema_with = null_only)]
    web_search_options: Option<Value>,
    // Passed on to the providers that have them (docs/openai.md).
    /// 0 to 1.
    #[schema(minimum = 0, maximum = 1)]
    top_p: Option<f64>,
    seed: Option<i64>,
    /// -2 to 2.
    #[schema(minimum = -2, maximum = 2)]
    frequency_penalty: Option<f64>,
    /// -2 to 2.
    #[schema(minimum = -2, maximum = 2)]
    presence_penalty: Option<f64>,
    #[schema(schema_with = stop_schema)]
    stop: Option<Stop>,
    // Accepted, and changing nothing for duet.
    user: Option<String>,
    metadata: Option<HashMap<String, String>>,
    store: Option<bool>,
    logit_bias: Option<HashMap<String, f64>>,
    service_tier: Option<String>,
    parallel_tool_calls: Option<bool>,
    #[schema(value_type = Option<Object>)]
    prediction: Option<serde_json::Map<String, Value>>,
    prompt_cache_key: Option<String>,
    safety_identifier: Option<String>,
    verbosity: Option<String>,
}

/// The top-level fields of [`RequestBody`], to tell an unknown field from a mistyped one.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "reasoning_effort",
    "n",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "modalities",
    "audio",
    "web_search_options",
    "user",
    "metadata",
    "store",
    "seed",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "logit_bias",
    "service_tier",
    "parallel_tool_calls",
    "prediction",
    "prompt_cache_key",
    "safety_identifier",
    "verbosity",
];

/// The model names this endpoint takes, for the API description.
#[derive(utoipa::ToSchema)]
#[schema(as = ModelName)]
#[expect(dead_code, reason = "described, never built")]
enum ModelName {
    #[schema(rename = "duet")]
    Duet,
}

/// One message of the conversation.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatCompletionMessage)]
#[expect(
    dead_code,
    reason = "fields read for their type check only are never used"
)]
pub(in crate::api) struct ChatMessage {
    /// `developer` is taken as `system`; `tool` and `function` messages are refused.
    #[schema(value_type = ChatRole)]
    role: String,
    /// A string, or an array of `{"type": "text", "text": "..."}` parts (joined with a line
    /// break); other part types are refused.
    #[schema(value_type = MessageContent)]
    content: Option<Value>,
    /// Accepted and ignored.
    name: Option<String>,
    /// Refused: duet calls no tools.
    #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
    tool_calls: Option<Vec<serde_json::Map<String, Value>>>,
    /// Accepted and ignored (it belongs to `tool` messages, which are refused).
    tool_call_id: Option<String>,
    /// Refused unless null: duet calls no tools.
    #[schema(schema_with = null_only)]
    function_call: Option<Value>,
    /// Accepted and ignored.
    refusal: Option<String>,
    /// Refused unless null: duet takes text only.
    #[schema(schema_with = null_only)]
    audio: Option<Value>,
}

/// Who speaks a message.
#[derive(utoipa::ToSchema)]
#[schema(as = ChatRole)]
#[expect(dead_code, reason = "described, never built")]
enum ChatRole {
    #[schema(rename = "system")]
    System,
    #[schema(rename = "developer")]
    Developer,
    #[schema(rename = "user")]
    User,
    #[schema(rename = "assistant")]
    Assistant,
}

/// A message's content: text, or text parts. (Deserialize only so that the serde attributes,
/// which utoipa reads, are allowed: `message` reads content by hand, naming the part at fault.)
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = MessageContent)]
#[expect(dead_code, reason = "described, never built")]
enum MessageContent {
    Text(String),
    Parts(Vec<TextPart>),
}

/// One text part of a message's content.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "described, never built")]
struct TextPart {
    #[schema(value_type = TextPartType)]
    r#type: String,
    text: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum TextPartType {
    #[schema(rename = "text")]
    Text,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields read for their type check only are never used"
)]
pub(in crate::api) struct StreamOptions {
    /// Send a last chunk, before `[DONE]`, with the usage of the model that answered.
    include_usage: Option<bool>,
    /// Accepted and ignored.
    include_obfuscation: Option<bool>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::api) struct ResponseFormat {
    #[schema(value_type = TextPartType)]
    r#type: String,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(in crate::api) enum ReasoningEffort {
    None,
    Minimal,
    Low,
    Medium,
    High,
}

impl ReasoningEffort {
    fn thinking(self) -> Thinking {
        match self {
            ReasoningEffort::None => Thinking::Off,
            ReasoningEffort::Minimal | ReasoningEffort::Low => Thinking::Low,
            ReasoningEffort::Medium => Thinking::Medium,
            ReasoningEffort::High => Thinking::High,
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(in crate::api) enum Modality {
    Text,
}

/// Stop sequences: one string or up to 4, none empty.
#[derive(Deserialize)]
#[serde(untagged)]
pub(in crate::api) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stop`: null, a non-empty string, or an array of at most 4 of them.
fn stop_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::{ArrayBuilder, ObjectBuilder, OneOfBuilder, schema::Type};
    let text = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
    };
    let one_of = OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(text())
        .item(ArrayBuilder::new().items(text()).max_items(Some(4)))
        .description(Some(
            "Where the answer ends: one string or up to 4, none empty. Passed on as each \
             provider's stop sequences.",
        ))
        .build();
    utoipa::openapi::Schema::OneOf(one_of)
}

/// The schema of a field that is refused unless it is null (or absent).
fn null_only() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Null)
        .build()
}

/// `false` or null: what duet takes of `logprobs`.
fn false_or_null() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
        .enum_values(Some([Value::Bool(false), Value::Null]))
        .build()
}

/// `"none"` or null: what duet takes of `tool_choice` and `function_call`.
fn none_or_null() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([Value::from("none"), Value::Null]))
        .build()
}

/// Reads (as on `/query*`: `request::read_json_body`), parses and validates a request; the
/// text is bounded by `MAX_QUERY_BYTES` once decoded.
pub(in crate::api) async fn parse(
    headers: &HeaderMap,
    body: Body,
    max_query_bytes: usize,
) -> Result<ChatRequest, OpenAiError> {
    let bytes = super::super::request::read_json_body(headers, body, max_query_bytes).await?;
    from_json(&bytes, max_query_bytes)
}

/// The body's JSON to a validated request.
pub(in crate::api) fn from_json(
    bytes: &[u8],
    max_query_bytes: usize,
) -> Result<ChatRequest, OpenAiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| OpenAiError::Invalid {
        message: format!("the body is not valid JSON: {}", json_problem(&e)),
        param: None,
        code: "invalid_json",
    })?;
    no_duplicate_keys(bytes)?;
    let Value::Object(fields) = &value else {
        return Err(OpenAiError::Invalid {
            message: "the body must be a JSON object".into(),
            param: None,
            code: "invalid_request",
        });
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        let name: String = unknown.chars().take(64).collect();
        return Err(OpenAiError::Invalid {
            message: format!("Unrecognized request argument supplied: {name}"),
            param: Some(name),
            code: "unknown_parameter",
        });
    }
    objects_only(fields)?;
    let body: RequestBody = serde_path_to_error::deserialize(value).map_err(|e| {
        let problem = e.inner().to_string();
        refusal(e.path().to_string(), problem.clone(), &problem)
    })?;
    validate(body, max_query_bytes)
}

/// serde reads a struct from an array too, field by field (`"stream_options": [true]`); the
/// fields OpenAI's schema makes objects must be objects.
fn objects_only(fields: &serde_json::Map<String, Value>) -> Result<(), OpenAiError> {
    let must_be_object = |param: String, v: &Value| match v {
        Value::Object(_) => Ok(()),
        _ => Err(OpenAiError::invalid(
            param.clone(),
            format!("Invalid value for '{param}': it must be an object"),
        )),
    };
    for field in ["stream_options", "response_format"] {
        match fields.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => must_be_object(field.to_owned(), v)?,
        }
    }
    if let Some(Value::Array(messages)) = fields.get("messages") {
        for (i, m) in messages.iter().enumerate() {
            must_be_object(format!("messages[{i}]"), m)?;
        }
    }
    Ok(())
}

/// Refuses an object that names a key twice. `Value` silently keeps the last, where
/// `/query*` refuses it; and a gateway in front of duet that reads the first must not see
/// another request than duet does.
fn no_duplicate_keys(bytes: &[u8]) -> Result<(), OpenAiError> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize::<_, NoDuplicateKeys>(&mut json).map_err(|e| {
        let problem = json_problem(e.inner());
        refusal(
            e.path().to_string(),
            format!("the body {problem}"),
            &problem,
        )
    })?;
    Ok(())
}

/// A value refused at `path` (serde_path_to_error's, `.` for the body itself): an
/// `invalid_value` naming the field, or, for the body, `invalid_request` saying `whole`.
fn refusal(path: String, whole: String, problem: &str) -> OpenAiError {
    if path == "." {
        OpenAiError::Invalid {
            message: whole,
            param: None,
            code: "invalid_request",
        }
    } else {
        let message = format!("Invalid value for '{path}': {problem}");
        OpenAiError::invalid(path, message)
    }
}

/// Any JSON, read only to find an object with a key twice (see [`no_duplicate_keys`]).
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                let key: String = key.chars().take(64).collect();
                return Err(serde::de::Error::custom(format!("names \"{key}\" twice")));
            }
            map.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(self)
    }
}

/// serde_json's message without the position for one-line bodies.
fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) if e.line() <= 1 => text[..i].to_owned(),
        _ => text,
    }
}

fn validate(body: RequestBody, max_query_bytes: usize) -> Result<ChatRequest, OpenAiError> {
    if body.model != MODEL {
        return Err(OpenAiError::ModelNotFound(
            body.model.chars().take(64).collect(),
        ));
    }
    refuse_what_duet_cannot_honour(&body)?;
    let messages = body
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let conversation = Conversation::new(messages, max_query_bytes).map_err(|e| {
        let param = match &e {
            ConversationError::BlankContent(i) => Some(format!("messages[{i}].content")),
            ConversationError::LateSystem(i) => Some(format!("messages[{i}].role")),
            ConversationError::TooLarge { .. } => return OpenAiError::Api(e.into()),
            _ => Some("messages".to_owned()),
        };
        OpenAiError::Invalid {
            message: e.to_string(),
            param,
            code: "invalid_value",
        }
    })?;
    // Both token limits are checked, each under its own name; the newer one wins.
    let refuse = |field: &str, e: crate::conversation::ParamError| {
        OpenAiError::invalid(field, format!("\"{field}\" must be {}", e.range))
    };
    for (field, n) in [
        ("max_tokens", body.max_tokens),
        ("max_completion_tokens", body.max_completion_tokens),
    ] {
        let alone = GenParams {
            max_tokens: n,
            ..GenParams::default()
        };
        alone.check("").map_err(|e| refuse(field, e))?;
    }
    let both = GenParams {
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
        thinking: body.reasoning_effort.map(ReasoningEffort::thinking),
    };
    both.check("").map_err(|e| {
        let field = e.field.clone();
        refuse(&field, e)
    })?;
    let sampling = Sampling {
        top_p: body.top_p,
        seed: body.seed,
        stop: body.stop.map(Stop::into_vec).unwrap_or_default(),
        frequency_penalty: body.frequency_penalty,
        presence_penalty: body.presence_penalty,
    };
    sampling.check().map_err(|e| {
        let field = e.field.clone();
        refuse(&field, e)
    })?;
    let stream = body.stream.unwrap_or(false);
    Ok(ChatRequest {
        conversation,
        params: RunParams {
            both,
            sampling,
            ..RunParams::default()
        },
        stream,
        include_usage: body
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn refuse_what_duet_cannot_honour(body: &RequestBody) -> Result<(), OpenAiError> {
    let no_tools = "duet calls no tools";
    match body.n {
        Some(0) => return Err(OpenAiError::invalid("n", "\"n\" must be 1")),
        Some(n) if n > 1 => {
            return Err(OpenAiError::unsupported(
                "n",
                format!("duet gives one answer per request; \"n\" must be 1, not {n}"),
            ));
        }
        _ => {}
    }
    if body.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OpenAiError::unsupported("tools", no_tools));
    }
    if body.functions.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(OpenAiError::unsupported("functions", no_tools));
    }
    for (field, value) in [
        ("tool_choice", &body.tool_choice),
        ("function_call", &body.function_call),
    ] {
        if value.as_ref().is_some_and(|v| v.as_str() != Some("none")) {
            return Err(OpenAiError::unsupported(
                field,
                format!("{no_tools}; \"{field}\" may only be \"none\""),
            ));
        }
    }
    if let Some(format) = &body.response_format
        && format.r#type != "text"
    {
        return Err(OpenAiError::unsupported(
            "response_format",
            "duet answers in plain text; \"response_format\" may only be {\"type\": \"text\"}",
        ));
    }
    if body.logprobs == Some(true) {
        return Err(OpenAiError::unsupported(
            "logprobs",
            "duet reports no log probabilities",
        ));
    }
    if body.top_logprobs.is_some_and(|n| n > 0) {
        return Err(OpenAiError::unsupported(
            "top_logprobs",
            "duet reports no log probabilities",
        ));
    }
    if body.audio.is_some() {
        return Err(OpenAiError::unsupported(
            "audio",
            "duet answers in text only",
        ));
    }
    if body.web_search_options.is_some() {
        return Err(OpenAiError::unsupported(
            "web_search_options",
            "duet does not search the web",
        ));
    }
    Ok(())
}

/// One OpenAI message as a duet [`Message`].
fn message(i: usize, m: ChatMessage) -> Result<Message, OpenAiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => Speaker::System,
        "user" => Speaker::User,
        "assistant" => Speaker::Assistant,
        "tool" | "function" => {
            return Err(OpenAiError::unsupported(
                format!("messages[{i}].role"),
                format!(
                    "duet calls no tools, so it takes no \"{}\" messages",
                    m.role
                ),
            ));
        }
        _ => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].role"),
                "the role must be system, developer, user or assistant",
            ));
        }
    };
    if m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) || m.function_call.is_some() {
        return Err(OpenAiError::unsupported(
            format!("messages[{i}].tool_calls"),
            "duet calls no tools",
        ));
    }
    if m.audio.is_some() {
        return Err(OpenAiError::unsupported(
            format!("messages[{i}].audio"),
            "duet takes text only",
        ));
    }
    let content = match m.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(i, parts)?,
        Some(_) => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].content"),
                "the content must be a string or an array of text parts",
            ));
        }
    };
    Ok(Message { role, content })
}

/// Text parts joined with a line break; any other part is refused, naming it.
fn text_parts(i: usize, parts: Vec<Value>) -> Result<String, OpenAiError> {
    let mut text = String::new();
    for (j, part) in parts.into_iter().enumerate() {
        let param = || format!("messages[{i}].content[{j}]");
        let Value::Object(mut part) = part else {
            return Err(OpenAiError::invalid(
                param(),
                "a content part must be an object",
            ));
        };
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(other) => {
                let other: String = other.chars().take(32).collect();
                return Err(OpenAiError::unsupported(
                    format!("{}.type", param()),
                    format!("duet takes text parts only, not \"{other}\""),
                ));
            }
            None => {
                return Err(OpenAiError::invalid(
                    format!("{}.type", param()),
                    "a content part needs a \"type\"",
                ));
            }
        }
        if let Some(extra) = part.keys().find(|k| !matches!(k.as_str(), "type" | "text")) {
            let extra: String = extra.chars().take(32).collect();
            return Err(OpenAiError::invalid(
                param(),
                format!("a text part has only \"type\" and \"text\", not \"{extra}\""),
            ));
        }
        let Some(Value::String(t)) = part.remove("text") else {
            return Err(OpenAiError::invalid(
                format!("{}.text", param()),
                "a text part needs a string \"text\"",
            ));
        };
        if j > 0 {
            text.push('\n');
        }
        text.push_str(&t);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<ChatRequest, OpenAiError> {
        from_json(&serde_json::to_vec(&body).unwrap(), 1000)
    }

    fn param(body: Value) -> (Option<String>, String) {
        match parse(body).unwrap_err() {
            OpenAiError::Invalid { param, message, .. } => (param, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_conversation_and_its_parameters_map_to_duet() {
        let r = parse(serde_json::json!({
            "model": "duet",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "hi", "name": "bot", "tool_calls": []},
                {"role": "user", "content": "why?"},
            ],
            "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0.5,
            "reasoning_effort": "minimal",
            "n": 1, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "logprobs": false, "user": "u", "metadata": {"k": "v"}, "store": false, "seed": 3,
            "top_p": 0.9, "stop": ["x"], "frequency_penalty": 0, "presence_penalty": null,
        }))
        .unwrap();
        assert_eq!(r.conversation.system(), Some("be brief"));
        assert_eq!(r.conversation.turns()[0].content, "a\nb");
        assert_eq!(r.conversation.last_user(), "why?");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.params.both.max_tokens, Some(20));
        assert_eq!(r.params.both.temperature, Some(0.5));
        assert_eq!(r.params.both.thinking, Some(Thinking::Low));
        assert_eq!(
            r.params.sampling,
            Sampling {
                top_p: Some(0.9),
                seed: Some(3),
                stop: vec!["x".into()],
                frequency_penalty: Some(0.0),
                presence_penalty: None,
            }
        );
        let one = parse(serde_json::json!({"model": "duet", "stop": "\n",
            "messages": [{"role": "user", "content": "q"}]}))
        .unwrap();
        assert_eq!(one.params.sampling.stop, ["\n"]);
    }

    #[test]
    fn what_duet_cannot_honour_is_refused_naming_the_field() {
        let user = serde_json::json!([{"role": "user", "content": "q"}]);
        let with = |k: &str, v: Value| {
            let mut body = serde_json::json!({"model": "duet", "messages": user});
            body[k] = v;
            param(body).0.unwrap()
        };
        assert_eq!(with("n", 2.into()), "n");
        assert_eq!(
            with("tools", serde_json::json!([{"type": "function"}])),
            "tools"
        );
        assert_eq!(with("tool_choice", "auto".into()), "tool_choice");
        assert_eq!(
            with(
                "response_format",
                serde_json::json!({"type": "json_object"})
            ),
            "response_format"
        );
        assert_eq!(with("logprobs", true.into()), "logprobs");
        assert_eq!(with("top_logprobs", 2.into()), "top_logprobs");
        assert_eq!(with("audio", serde_json::json!({})), "audio");
        assert_eq!(
            with("stream_options", serde_json::json!([true])),
            "stream_options"
        );
        assert_eq!(
            with("messages", serde_json::json!([["user", "q"]])),
            "messages[0]"
        );
        assert_eq!(
            with("web_search_options", serde_json::json!({})),
            "web_search_options"
        );
        assert_eq!(with("temperature", 3.into()), "temperature");
        assert_eq!(
            with("max_completion_tokens", 0.into()),
            "max_completion_tokens"
        );
        assert_eq!(with("top_p", "high".into()), "top_p");
        assert_eq!(with("top_p", 1.5.into()), "top_p");
        assert_eq!(
            with("frequency_penalty", (-2.5).into()),
            "frequency_penalty"
        );
        assert_eq!(with("presence_penalty", 3.into()), "presence_penalty");
        assert_eq!(with("stop", "".into()), "stop");
        assert_eq!(
            with("stop", serde_json::json!(["a", "b", "c", "d", "e"])),
            "stop"
        );
        assert_eq!(with("seed", 1.5.into()), "seed");
        assert_eq!(with("frobnicate", 1.into()), "frobnicate");
        let (p, message) = param(serde_json::json!({"model": "duet", "messages": [
            {"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]}));
        assert_eq!(p.as_deref(), Some("messages[1].role"));
        assert!(message.contains("no tools"), "{message}");
        let (p, _) = param(serde_json::json!({"model": "duet", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}));
        assert_eq!(p.as_deref(), Some("messages[0].content[0].type"));
        let (p, _) = param(serde_json::json!({"model": "duet", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": null}, {"role": "user", "content": "r"}]}));
        assert_eq!(p.as_deref(), Some("messages[1].content"));
        let (p, _) = param(serde_json::json!({"model": "duet", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}));
        assert_eq!(p.as_deref(), Some("messages"));
        assert!(matches!(
            parse(serde_json::json!({"model": "gpt-4o", "messages": user})),
            Err(OpenAiError::ModelNotFound(m)) if m == "gpt-4o"
        ));
        assert!(matches!(
            parse(serde_json::json!(["duet", []])),
            Err(OpenAiError::Invalid { param: None, .. })
        ));
    }

    #[test]
    fn every_field_of_the_body_is_known() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(RequestBody::schema()).unwrap();
        let mut described: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        described.sort_unstable();
        let mut known = FIELDS.to_vec();
        known.sort_unstable();
        assert_eq!(described, known);
    }
}
