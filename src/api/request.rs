//! Parsing and validating what clients send: JSON bodies, query strings, request ids.
//!
//! Every refusal is an [`ApiError`] with duet's JSON shape, never axum's default plain-text
//! rejections (which would also answer 422 where the contract says 400).

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, X_REQUEST_ID};
use crate::conversation::{
    Conversation, ConversationError, GenParams, MAX_TEMPERATURE, MAX_TOKENS_LIMIT, Message,
    RunParams, Speaker, Thinking,
};

/// The methods `/query/stream` takes: HEAD is not one of them, since a request there starts a
/// run and a HEAD answer could show none of it.
const QUERY_STREAM_ALLOW: &str = "GET, POST";

/// Middleware for `/query/stream`: refuses HEAD (405, the usual JSON error) before anything
/// else looks at the request, and gives every 405 of the route its true `Allow` header.
pub(super) async fn no_head(request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::HEAD {
        ApiError::MethodNotAllowed.into_response()
    } else {
        next.run(request).await
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(QUERY_STREAM_ALLOW));
    }
    response
}

/// A validated request: what both models are asked, and how the events are sent.
#[derive(Debug)]
pub(super) struct QueryParams {
    pub conversation: Conversation,
    pub params: RunParams,
    pub deltas: bool,
}

// The API description's view of the body; `parse_body` reads the JSON itself, by hand, so that
// every refusal is a sentence for people naming the field. `document()` in `openapi` adds what
// the derive cannot say: exactly one of `query` and `messages`, no `system` with `messages`,
// no other field, and `maxLength` from `MAX_QUERY_BYTES`.
/// The JSON body of `POST /query/stream` and `POST /query`: an object with `query` (one
/// question) or `messages` (a conversation), exactly one of them, and optional generation
/// parameters. Any other field is refused (400 naming it), so a misspelt or unsupported field
/// is never silently ignored. `maxLength` is the service's `MAX_QUERY_BYTES`, counted in UTF-8
/// bytes; it also bounds all `messages` contents together.
#[derive(utoipa::ToSchema)]
#[schema(as = QueryRequest, example = json!({"query": "Why is the sky blue?", "deltas": true}))]
#[expect(
    dead_code,
    reason = "describes the body for the API document; parse_body reads the JSON itself"
)]
pub(super) struct PostBody {
    /// The question: at least one non-whitespace character. Not with `messages`.
    #[schema(min_length = 1, pattern = r"[^\s\u0085]", nullable = false)]
    query: Option<String>,
    /// A conversation instead of `query`: a `system` message may only come first, the last
    /// message is `user`, no content is blank; all contents together are at most
    /// `MAX_QUERY_BYTES`.
    #[schema(min_items = 1, nullable = false)]
    messages: Option<Vec<Message>>,
    /// An optional system prompt for both models with `query`; blank means none. Not with
    /// `messages` (put a `system` message first instead).
    system: Option<String>,
    /// Also send `delta` events as text arrives (`/query/stream` only; `/query` ignores it).
    deltas: Option<bool>,
    /// The most tokens each answer may have (both models): 1 to 1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    max_tokens: Option<u32>,
    /// Sampling temperature for both models: 0 to 2.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    /// How much both models may think before answering (docs/providers.md says what each
    /// level becomes per provider).
    thinking: Option<Thinking>,
    /// Flash's own `max_tokens`, `temperature`, `thinking`, over the ones for both.
    flash: Option<GenParams>,
    /// Pro's own `max_tokens`, `temperature`, `thinking`, over the ones for both.
    pro: Option<GenParams>,
}

/// The fields [`PostBody`] has, in the order unknown-field messages list them.
const POST_FIELDS: &str =
    "query, messages, system, deltas, max_tokens, temperature, thinking, flash, pro";

/// What a POST body says, before the conversation rules are checked.
#[derive(Debug, Default)]
struct Parsed {
    query: Option<String>,
    messages: Option<Vec<Message>>,
    system: Option<String>,
    /// `system` was present at all (even `null`): refused with `messages`.
    has_system: bool,
    deltas: bool,
    params: RunParams,
}

/// Longest time a client may take to send a request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// JSON escaping can make a body up to six times its text (`\u0000`), so the body limit is
/// looser than the query limit; the query itself is measured after decoding.
fn body_limit(max_query_bytes: usize) -> usize {
    max_query_bytes.saturating_mul(12).saturating_add(64 * 1024)
}

/// A JSON request body, read whole: `Content-Type: application/json` (else 415), at most
/// [`body_limit`] bytes (else 413), within [`BODY_READ_TIMEOUT`] (else 400). Every JSON route
/// reads its body through this (`/query*`, `/v1/chat/completions`).
pub(super) async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    max_query_bytes: usize,
) -> Result<bytes::Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = body_limit(max_query_bytes);
    // A body trickled in slowly would hold a connection and a task for as long as the
    // client likes; past this it is refused like any other unreadable body.
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BadRequest("the request body arrived too slowly".into()))?;
    read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge(format!("the request body is larger than {limit} bytes"))
        } else {
            // Aborted, malformed chunking, or too slow (the body read timeout).
            ApiError::BadRequest("the request body could not be read".into())
        }
    })
}

pub(super) async fn parse_post(
    headers: &HeaderMap,
    body: Body,
    max_query_bytes: usize,
) -> Result<QueryParams, ApiError> {
    let bytes = read_json_body(headers, body, max_query_bytes).await?;
    let parsed = parse_body(&bytes)?;
    let conversation = match (parsed.query, parsed.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "\"query\" and \"messages\" cannot both be given: send one of them".into(),
            ));
        }
        (None, None) => {
            return Err(ApiError::BadRequest(
                "the body needs \"query\" (a question) or \"messages\" (a conversation)".into(),
            ));
        }
        (Some(query), None) => Conversation::from_query(query, parsed.system, max_query_bytes)?,
        (None, Some(_)) if parsed.has_system => return Err(ConversationError::SystemTwice.into()),
        (None, Some(messages)) => Conversation::new(messages, max_query_bytes)?,
    };
    parsed.params.check()?;
    Ok(QueryParams {
        conversation,
        params: parsed.params,
        deltas: parsed.deltas,
    })
}

/// Field names are echoed in messages only when short and printable: the message is for
/// people, not a mirror of whatever a client sent.
fn field_name(prefix: &str, name: &str) -> String {
    if name.chars().count() <= 32 && !name.chars().any(char::is_control) {
        format!("\"{prefix}{name}\"")
    } else {
        "(a name too long or unprintable to repeat)".to_owned()
    }
}

/// The body as a [`Parsed`], or a 400 whose message names the field at fault. Read from a
/// [`Value`] by hand rather than through serde's derive: the derive's messages are parser
/// internals (`invalid type: integer, expected a string`), and it reads a struct from an
/// array too (`["hi", "sys"]` would be a query and a system prompt).
fn parse_body(bytes: &[u8]) -> Result<Parsed, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let value = serde_json::from_slice::<Strict>(bytes)
        .map_err(|e| bad(syntax_problem(&e, bytes)))?
        .0;
    let Value::Object(fields) = value else {
        return Err(bad(format!(
            "the body must be a JSON object (with \"query\" or \"messages\"), not {}",
            kind_of(&value)
        )));
    };
    let mut parsed = Parsed::default();
    for (name, value) in fields {
        match name.as_str() {
            "query" => {
                parsed.query = Some(
                    string(value)
                        .ok_or_else(|| bad("\"query\" must be a string: the question".into()))?,
                );
            }
            "system" => {
                parsed.has_system = true;
                parsed.system = optional(value, string)
                    .ok_or_else(|| bad("\"system\" must be a string: the system prompt".into()))?;
            }
            "deltas" => {
                parsed.deltas = optional(value, |v| v.as_bool())
                    .ok_or_else(|| bad("\"deltas\" must be true or false".into()))?
                    .unwrap_or(false);
            }
            "messages" => parsed.messages = Some(messages(value)?),
            "flash" | "pro" => {
                let prefix = format!("{name}.");
                let params = match value {
                    Value::Null => GenParams::default(),
                    Value::Object(inner) => {
                        let mut params = GenParams::default();
                        for (key, value) in inner {
                            if !gen_param(&mut params, &prefix, &key, value)? {
                                return Err(bad(format!(
                                    "unknown field {}; the fields of \"{name}\" are max_tokens, \
                                     temperature, thinking",
                                    field_name(&prefix, &key)
                                )));
                            }
                        }
                        params
                    }
                    _ => {
                        return Err(bad(format!(
                            "\"{name}\" must be an object with \"max_tokens\", \"temperature\" \
                             or \"thinking\""
                        )));
                    }
                };
                if name == "flash" {
                    parsed.params.flash = params;
                } else {
                    parsed.params.pro = params;
                }
            }
            _ => {
                if !gen_param(&mut parsed.params.both, "", &name, value)? {
                    return Err(bad(format!(
                        "unknown field {}; the fields are {POST_FIELDS}",
                        field_name("", &name)
                    )));
                }
            }
        }
    }
    Ok(parsed)
}

/// Reads one of `max_tokens`, `temperature`, `thinking` into `params`; `prefix` is where they
/// sit (`""`, `"flash."`, `"pro."`). `null` means unset, as OpenAI-style clients send it.
/// `Ok(false)` when `key` is none of the three: the caller names the unknown field.
fn gen_param(
    params: &mut GenParams,
    prefix: &str,
    key: &str,
    value: Value,
) -> Result<bool, ApiError> {
    let bad = |range: &str| ApiError::BadRequest(format!("\"{prefix}{key}\" must be {range}"));
    match key {
        "max_tokens" => {
            params.max_tokens = optional(value, |v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| (1..=MAX_TOKENS_LIMIT).contains(n))
            })
            .ok_or_else(|| bad("an integer from 1 to 1000000"))?;
        }
        "temperature" => {
            params.temperature = optional(value, |v| {
                v.as_f64().filter(|t| (0.0..=MAX_TEMPERATURE).contains(t))
            })
            .ok_or_else(|| bad("a number from 0 to 2"))?;
        }
        "thinking" => {
            params.thinking = optional(value, |v| match v.as_str()? {
                "off" => Some(Thinking::Off),
                "low" => Some(Thinking::Low),
                "medium" => Some(Thinking::Medium),
                "high" => Some(Thinking::High),
                _ => None,
            })
            .ok_or_else(|| bad("one of \"off\", \"low\", \"medium\", \"high\""))?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// `messages`: an array of `{"role", "content"}` objects, each field checked and named.
fn messages(value: Value) -> Result<Vec<Message>, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let Value::Array(items) = value else {
        return Err(bad(
            "\"messages\" must be an array of {\"role\", \"content\"} objects".into(),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(fields) = item else {
            return Err(bad(format!(
                "\"messages[{i}]\" must be an object with \"role\" and \"content\""
            )));
        };
        let (mut role, mut content) = (None, None);
        for (name, value) in fields {
            match name.as_str() {
                "role" => {
                    role = Some(match value.as_str() {
                        Some("system") => Speaker::System,
                        Some("user") => Speaker::User,
                        Some("assistant") => Speaker::Assistant,
                        _ => {
                            return Err(bad(format!(
                                "\"messages[{i}].role\" must be \"system\", \"user\" or \
                                 \"assistant\""
                            )));
                        }
                    });
                }
                "content" => {
                    content = Some(string(value).ok_or_else(|| {
                        bad(format!("\"messages[{i}].content\" must be a string"))
                    })?);
                }
                _ => {
                    return Err(bad(format!(
                        "unknown field {}; a message has \"role\" and \"content\"",
                        field_name(&format!("messages[{i}]."), &name)
                    )));
                }
            }
        }
        let missing = |field: &str| bad(format!("\"messages[{i}].{field}\" is missing"));
        out.push(Message {
            role: role.ok_or_else(|| missing("role"))?,
            content: content.ok_or_else(|| missing("content"))?,
        });
    }
    Ok(out)
}

fn string(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// `null` is `Some(None)`; a value `read` takes is `Some(Some(..))`; anything else `None`.
fn optional<T>(value: Value, read: impl FnOnce(Value) -> Option<T>) -> Option<Option<T>> {
    match value {
        Value::Null => Some(None),
        v => read(v).map(Some),
    }
}

/// What a JSON value is, in words.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What [`Strict`] says of a name given twice; [`syntax_problem`] turns it into the message.
const DUPLICATE: &str = "duplicate field ";

/// A JSON value, read like [`Value`] except that an object naming a field twice is refused:
/// `Value` keeps the last, while a proxy, a log reader or a person may read the first, so the
/// question a run answers could differ from the one everyone else sees.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never hands over a non-finite number; `Null` would be the fallback.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = serde_json::Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if fields.contains_key(&name) {
                return Err(serde::de::Error::custom(format!(
                    "{DUPLICATE}{}",
                    field_name("", &name)
                )));
            }
            let Strict(value) = map.next_value()?;
            fields.insert(name, value);
        }
        Ok(Value::Object(fields))
    }
}

/// The name of the field whose value ends just before byte `end` of `bytes`, when that value
/// is a bare number (`"max_tokens": 1e400`): what a "number out of range" error is about.
fn field_before(bytes: &[u8], end: usize) -> Option<String> {
    let head = bytes.get(..end)?;
    let is_number = |b: &u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
    let head = head.trim_ascii_end();
    let head = &head[..head.len() - head.iter().rev().take_while(|b| is_number(b)).count()];
    let head = head.trim_ascii_end().strip_suffix(b":")?.trim_ascii_end();
    let head = head.strip_suffix(b"\"")?;
    let start = head.iter().rposition(|&b| b == b'"')?;
    let name = std::str::from_utf8(&head[start + 1..]).ok()?;
    // A name with escapes or quotes is not worth echoing; "the body" says enough then.
    (!name.contains('\\')).then(|| field_name("", name))
}

/// The byte offset of a 1-based line and column (serde_json counts columns in bytes).
fn offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let line_start = bytes
        .split_inclusive(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(<[u8]>::len)
        .sum::<usize>();
    line_start + column
}

/// Why a body is not JSON, for people: where it went wrong, without serde_json's own words
/// (`expected ident`, `trailing characters`) that mean nothing to someone writing a request.
fn syntax_problem(e: &serde_json::Error, bytes: &[u8]) -> String {
    let at = if e.line() <= 1 {
        format!("at character {}", e.column())
    } else {
        format!("at line {}, character {}", e.line(), e.column())
    };
    let said = e.to_string();
    if let Some(name) = said.strip_prefix(DUPLICATE) {
        let name = name
            .strip_suffix(&format!(" at line {} column {}", e.line(), e.column()))
            .unwrap_or(name);
        return format!("the field {name} is given twice");
    }
    if said.starts_with("number out of range") {
        return match field_before(bytes, offset(bytes, e.line(), e.column())) {
            Some(name) => format!("{name} is a number out of range ({at})"),
            None => format!("the body holds a number out of range ({at})"),
        };
    }
    match e.classify() {
        serde_json::error::Category::Eof => {
            "the body is not valid JSON: it ends before the JSON is complete".into()
        }
        serde_json::error::Category::Syntax => {
            if e.to_string().starts_with("trailing characters") {
                format!("the body is not valid JSON: there is more after the JSON value ({at})")
            } else if e.to_string().starts_with("recursion limit") {
                "the body is not valid JSON: it nests too deeply".into()
            } else {
                format!("the body is not valid JSON: a syntax error {at}")
            }
        }
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            format!("the body is not valid JSON {at}")
        }
    }
}

/// The query string of `GET /query/stream`. `maxLength` is the service's `MAX_QUERY_BYTES`,
/// counted in UTF-8 bytes.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct GetQuery {
    /// The question: at least one non-whitespace character. Not needed (and ignored) when the
    /// request resumes a run with `Last-Event-ID`.
    #[param(value_type = String, required = true, min_length = 1, pattern = r"[^\s\u0085]")]
    q: Option<String>,
    /// An optional system prompt for both models; blank means none.
    #[param(value_type = String, required = false)]
    system: Option<String>,
    /// Also send `delta` events as text arrives.
    #[param(schema_with = deltas_schema)]
    deltas: Option<String>,
}

/// The spellings `parse_get` accepts for `deltas`.
const DELTAS_VALUES: [&str; 9] = ["", "0", "1", "false", "true", "no", "yes", "off", "on"];

fn deltas_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(DELTAS_VALUES))
        .default(Some(serde_json::json!("0")))
        .build()
}

pub(super) fn parse_get(
    raw: Option<&str>,
    max_query_bytes: usize,
) -> Result<QueryParams, ApiError> {
    let raw = raw.unwrap_or("");
    if raw.len() > body_limit(max_query_bytes) {
        return Err(ApiError::PayloadTooLarge(
            "the query string is too long".into(),
        ));
    }
    check_utf8(raw)?;
    let parsed: GetQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let Some(query) = parsed.q else {
        return Err(ApiError::BadRequest(
            "the query parameter \"q\" is required".into(),
        ));
    };
    let deltas = match parsed.deltas.as_deref().map(str::trim) {
        None | Some("" | "0" | "false" | "no" | "off") => false,
        Some("1" | "true" | "yes" | "on") => true,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "\"deltas\" must be 1, 0, true or false".into(),
            ));
        }
    };
    validate(query, parsed.system, deltas, max_query_bytes)
}

/// Every name and value of the query string must be UTF-8 once percent-decoded. The
/// decoding behind `serde_urlencoded` is lossy: `%FF%FE` would become U+FFFD, and the run (and
/// its audit record) would answer a query the client never sent.
fn check_utf8(raw: &str) -> Result<(), ApiError> {
    let decodes = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .is_ok()
    };
    for pair in raw.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !decodes(name) {
            return Err(ApiError::BadRequest(
                "a parameter name in the query string is not UTF-8 once percent-decoded".into(),
            ));
        }
        if !decodes(value) {
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            // Names are echoed only when short: the message is for people, not a mirror.
            let named = if name.chars().count() <= 32 {
                format!("\"{name}\"")
            } else {
                "a parameter".to_owned()
            };
            return Err(ApiError::BadRequest(format!(
                "{named} is not UTF-8 once percent-decoded"
            )));
        }
    }
    Ok(())
}

fn validate(
    query: String,
    system: Option<String>,
    deltas: bool,
    max_query_bytes: usize,
) -> Result<QueryParams, ApiError> {
    Ok(QueryParams {
        conversation: Conversation::from_query(query, system, max_query_bytes)?,
        params: RunParams::default(),
        deltas,
    })
}

/// The caller's `X-Request-Id`, kept as the run's `client_request_id`. It ends up in logs,
/// headers and the database, so only short printable ASCII is taken.
pub(super) fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(X_REQUEST_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 200 && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::BadRequest(
                "X-Request-Id must be 1 to 200 printable ASCII characters without spaces".into(),
            )
        })?;
    Ok(Some(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of 20 messages (a system message, then alternating user and assistant turns)
    /// holding `bytes` of text, with parameters.
    fn conversation_body(bytes: usize) -> Vec<u8> {
        let each = bytes / 20;
        let text: String = "The quick brown fox jumps over the lazy dog. "
            .chars()
            .cycle()
            .take(each)
            .collect();
        let messages: Vec<Value> = (0..20)
            .map(|i| {
                let role = match i {
                    0 => "system",
                    i if i % 2 == 1 => "user",
                    _ => "assistant",
                };
                serde_json::json!({"role": role, "content": text})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "messages": messages, "max_tokens": 500, "pro": {"thinking": "high"}
        }))
        .unwrap()
    }

    /// Parses and validates a body as `parse_post` does once it has the bytes.
    fn parse_and_validate(bytes: &[u8], limit: usize) -> (usize, RunParams) {
        let parsed = parse_body(bytes).unwrap();
        let conversation = Conversation::new(parsed.messages.unwrap(), limit).unwrap();
        parsed.params.check().unwrap();
        (conversation.turns().len(), parsed.params)
    }

    #[test]
    fn a_32_kib_conversation_parses() {
        let body = conversation_body(32_000);
        let (turns, params) = parse_and_validate(&body, 32_768);
        assert_eq!(turns, 19, "the system message is not a turn");
        assert_eq!(params.both.max_tokens, Some(500));
        assert_eq!(params.pro.thinking, Some(Thinking::High));
    }

    /// Not a check but a measurement, for docs/benchmarks.md ("Conversations"): what parsing
    /// and validating a 20-message, 32 KB body costs at a run's start. Run it with
    /// `cargo test --release --lib -- --ignored --nocapture parse_cost`.
    #[test]
    #[ignore = "a measurement: run by hand in a release build"]
    fn parse_cost() {
        for (name, body) in [
            (
                "query, 28 bytes",
                br#"{"query": "Why is the sky blue?"}"#.to_vec(),
            ),
            ("20 messages, 32,000 bytes", conversation_body(32_000)),
        ] {
            let rounds = 20_000u32;
            let start = std::time::Instant::now();
            let mut turns = 0;
            for _ in 0..rounds {
                let parsed = parse_body(std::hint::black_box(&body)).unwrap();
                let conversation = match (parsed.query, parsed.messages) {
                    (Some(q), _) => Conversation::from_query(q, None, 32_768),
                    (None, Some(m)) => Conversation::new(m, 32_768),
                    (None, None) => unreachable!(),
                }
                .unwrap();
                turns += conversation.turns().len();
            }
            let per = start.elapsed() / rounds;
            println!(
                "{name} ({} body bytes): {per:?} per parse+validate ({turns} turns)",
                body.len()
            );
        }
    }

    /// The API description lists these spellings of `deltas`; each must be accepted.
    #[test]
    fn every_described_deltas_value_is_accepted() {
        for v in DELTAS_VALUES {
            let parsed = parse_get(Some(&format!("q=hi&deltas={v}")), 100);
            assert!(parsed.is_ok(), "deltas={v:?}");
        }
    }
}
