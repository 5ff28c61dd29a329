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

use super::{ApiError, X_REQUEST_ID};
use crate::conversation::{Conversation, RunParams};

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

/// The JSON body of `POST /query/stream` and `POST /query`: an object; any other field is
/// refused (400 naming it), so a misspelt or unsupported field is never silently ignored.
/// `maxLength` is the service's `MAX_QUERY_BYTES`, counted in UTF-8 bytes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = QueryRequest, example = json!({"query": "Why is the sky blue?", "deltas": true}))]
pub(super) struct PostBody {
    /// The question: at least one non-whitespace character.
    #[schema(min_length = 1, pattern = r"[^\s\u0085]")]
    query: String,
    /// An optional system prompt for both models; blank means none.
    #[serde(default)]
    system: Option<String>,
    /// Also send `delta` events as text arrives (`/query/stream` only; `/query` ignores it).
    #[serde(default)]
    deltas: Option<bool>,
}

/// Longest time a client may take to send a request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// JSON escaping can make a body up to six times its text (`\u0000`), so the body limit is
/// looser than the query limit; the query itself is measured after decoding.
fn body_limit(max_query_bytes: usize) -> usize {
    max_query_bytes.saturating_mul(12).saturating_add(64 * 1024)
}

pub(super) async fn parse_post(
    headers: &HeaderMap,
    body: Body,
    max_query_bytes: usize,
) -> Result<QueryParams, ApiError> {
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
    let bytes = read.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge(format!("the request body is larger than {limit} bytes"))
        } else {
            // Aborted, malformed chunking, or too slow (the body read timeout).
            ApiError::BadRequest("the request body could not be read".into())
        }
    })?;
    let parsed = parse_body(&bytes)?;
    validate(
        parsed.query,
        parsed.system,
        parsed.deltas.unwrap_or(false),
        max_query_bytes,
    )
}

/// The body as a [`PostBody`], or a 400 whose message names the field at fault.
fn parse_body(bytes: &[u8]) -> Result<PostBody, ApiError> {
    let refuse = |problem: String| {
        ApiError::BadRequest(format!(
            "the body must be a JSON object with a string \"query\": {problem}"
        ))
    };
    // serde reads a struct from an array too, field by field in order (`["hi", "sys"]` would
    // be a query and a system prompt); the contract takes objects only.
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first.is_some_and(|&b| b != b'{') {
        return Err(refuse("it is not an object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed: PostBody = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let problem = json_problem(e.inner());
        // The path is `.` for the body itself (syntax errors); an unknown field's own message
        // names it; otherwise the path names the field whose value is wrong.
        refuse(if path == "." || problem.starts_with("unknown field") {
            problem
        } else {
            format!("\"{path}\": {problem}")
        })
    })?;
    // Trailing characters after the object (`{...} x`), as `serde_json::from_slice` checks.
    de.end().map_err(|e| refuse(json_problem(&e)))?;
    Ok(parsed)
}

/// serde_json's message without the line/column noise for one-line bodies.
fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) if e.line() <= 1 => text[..i].to_owned(),
        _ => text,
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

    /// The API description lists these spellings of `deltas`; each must be accepted.
    #[test]
    fn every_described_deltas_value_is_accepted() {
        for v in DELTAS_VALUES {
            let parsed = parse_get(Some(&format!("q=hi&deltas={v}")), 100);
            assert!(parsed.is_ok(), "deltas={v:?}");
        }
    }
}
