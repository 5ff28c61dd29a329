//! The OpenAPI 3.1 description of the HTTP interface, served at `GET /openapi.json`.
//!
//! It is generated from the code: handlers carry `#[utoipa::path]`, and the request, response
//! and event types derive `ToSchema`, so a changed field changes the document. What the types
//! cannot say (the shared error responses, headers, security schemes, the event stream) lives
//! here, next to the list of documented operations. `tests/api/openapi.rs` checks that every
//! route the router serves is listed.

use axum::{
    Json,
    extract::State,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use utoipa::{
    IntoParams, Modify, OpenApi,
    openapi::{
        self,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::{AppState, error::Body as ErrorBody};
use crate::events::EventKind;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "duet",
        description = "Answers one query with a fast Flash model and an accurate Pro model at \
            once, streams both as Server-Sent Events, and audits every run. The event stream is \
            explained for client authors in docs/api.md.",
        license(name = "MIT"),
    ),
    paths(
        super::query::stream_post,
        super::query::stream_get,
        super::query::query_post,
        super::runs::list,
        super::admin::get_run,
        super::clients::list,
        super::healthz,
        super::admin::readyz,
        super::metrics,
        super::page::index,
        super::page::script,
        super::page::style,
        super::page::marked,
        super::page::purify,
        super::page::markdown,
        super::page::console,
        super::page::console_script,
        super::page::console_style,
        super::openai::chat_completions,
        super::openai::list_models,
        super::openai::get_model,
        openapi_json,
    ),
    components(schemas(
        crate::events::StartEvent,
        crate::events::DeltaEvent,
        crate::events::AnswerEvent,
        crate::events::ErrorEvent,
        crate::events::DoneEvent,
        super::openai::Chunk,
    ), responses(
        EventStream,
        NothingLeft,
        BadRequest,
        Unauthorized,
        NotFound,
        TooLarge,
        UnsupportedMediaType,
        RateLimited,
        Overloaded,
        Internal,
        super::openai::OpenAiBadRequest,
        super::openai::OpenAiUnauthorized,
        super::openai::OpenAiNotFound,
        super::openai::OpenAiTooLarge,
        super::openai::OpenAiUnsupportedMediaType,
        super::openai::OpenAiRateLimited,
        super::openai::OpenAiInternal,
    )),
    modifiers(&Security),
    tags(
        (name = "query", description = "Run a query on both models"),
        (name = "admin", description = "The audit trail (needs ADMIN_TOKEN)"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
        (name = "page", description = "The browser pages (the page at `/`, the operators' \
            console at `/admin`) and their assets"),
        (name = "openai", description = "OpenAI-compatible Chat Completions (docs/openai.md)"),
    ),
)]
pub(super) struct ApiDoc;

/// Names of the security schemes; the handlers' `security(...)` spell them out (the macro
/// takes only literals).
pub(super) const API_KEY: &str = "api_key";
pub(super) const ADMIN_TOKEN: &str = "admin_token";
pub(super) const METRICS_TOKEN: &str = "metrics_token";

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of the keys in API_KEYS or API_KEYS_FILE. Needed by /query, \
                         /query/stream and /v1 only when keys are set; never put a key in a \
                         URL.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            METRICS_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "METRICS_TOKEN. Needed by /metrics only when it is set; Prometheus \
                         sends it with `authorization: {credentials: ...}` in its scrape config.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            ADMIN_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "ADMIN_TOKEN. Without it configured, /runs/{run_id} and /clients \
                         answer 404.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The schema of each event's `data`. A match, so that a new event kind cannot go undocumented.
fn data_schema(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Start => "StartEvent",
        EventKind::Delta => "DeltaEvent",
        EventKind::Flash | EventKind::Pro => "AnswerEvent",
        EventKind::Error => "ErrorEvent",
        EventKind::Done => "DoneEvent",
    }
}

/// The schema of one event of the stream, as OpenAPI 3.2 and tools such as schemathesis read
/// a `text/event-stream` schema in 3.1 too: an object with `event`, `id` and `data`, where
/// `data` is a string of JSON (`contentMediaType`) whose schema is `contentSchema`. utoipa's
/// schema types cannot spell `contentSchema`, hence JSON.
fn server_sent_event() -> Value {
    let variants: Vec<Value> = EventKind::ALL
        .into_iter()
        .map(|kind| {
            let (event, schema) = (kind.as_str(), data_schema(kind));
            json!({
                "type": "object",
                "title": event,
                "required": ["event", "id", "data"],
                "properties": {
                    "event": {"const": event},
                    "id": {"$ref": "#/components/schemas/EventId"},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": format!("#/components/schemas/{schema}")},
                    },
                    "retry": {"type": "integer", "minimum": 0},
                },
            })
        })
        .collect();
    json!({
        "description": "One event of the stream. Keep-alive comments and the opening \
            `retry:` field carry no event.",
        "oneOf": variants,
    })
}

const EVENT_STREAM: &str = "text/event-stream";

/// The document, with the limits this service was configured with.
pub(super) fn document(max_query_bytes: usize) -> Value {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        // Serializing plain data cannot fail; should it ever, say so rather than panic.
        Err(e) => return json!({"error": format!("cannot build the API description: {e}")}),
    };
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        schemas.insert("ServerSentEvent".to_owned(), server_sent_event());
        schemas.insert(
            "EventId".to_owned(),
            json!({
                "type": "string",
                "description": "`{run_id}:{seq}`; seq counts from 0 with no gaps. Send the \
                    last one received as `Last-Event-ID` to resume.",
                "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:[0-9]+$",
            }),
        );
    }
    if let Some(stream) = doc.pointer_mut(&format!(
        "/components/responses/EventStream/content/{}",
        EVENT_STREAM.replace('/', "~1")
    )) {
        stream["schema"] = json!({"$ref": "#/components/schemas/ServerSentEvent"});
    }
    fix_links(&mut doc);
    add_interrupted(&mut doc);
    super::openai::describe_stream(&mut doc);
    let limit = json!(max_query_bytes);
    query_request_rules(&mut doc, &limit);
    for field in ["query", "system"] {
        if let Some(p) = doc.pointer_mut(&format!(
            "/components/schemas/QueryRequest/properties/{field}"
        )) {
            p["maxLength"] = limit.clone();
        }
    }
    if let Some(params) = doc
        .pointer_mut("/paths/~1query~1stream/get/parameters")
        .and_then(Value::as_array_mut)
    {
        for p in params {
            if matches!(p["name"].as_str(), Some("q" | "system")) {
                p["schema"]["maxLength"] = limit.clone();
            }
        }
    }
    doc
}

/// What `QueryRequest`'s derive cannot say: exactly one of `query` and `messages`, no `system`
/// with `messages`, no field but the listed ones (in the body, in a message, in `flash` and
/// `pro`), and no content longer than `MAX_QUERY_BYTES`. `GenParams` itself stays open, since
/// the audit record's `params` extends it (`allOf`) with `flash` and `pro`; the body's
/// `flash` and `pro` use a closed copy, `ModelParams`.
fn query_request_rules(doc: &mut Value, limit: &Value) {
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if let Some(mut closed) = schemas.get("GenParams").cloned() {
        closed["additionalProperties"] = json!(false);
        closed["description"] = json!(
            "One model's own `max_tokens`, `temperature` and `thinking`, over the ones for both."
        );
        schemas.insert("ModelParams".to_owned(), closed);
    }
    if let Some(message) = schemas.get_mut("ChatMessage") {
        message["additionalProperties"] = json!(false);
        message["properties"]["content"]["maxLength"] = limit.clone();
    }
    let Some(body) = schemas.get_mut("QueryRequest") else {
        return;
    };
    body["additionalProperties"] = json!(false);
    body["oneOf"] = json!([
        {"required": ["query"], "not": {"required": ["messages"]}},
        {"required": ["messages"], "not": {"anyOf": [{"required": ["query"]}, {"required": ["system"]}]}},
    ]);
    for model in ["flash", "pro"] {
        body["properties"][model] = json!({
            "oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/ModelParams"}],
        });
    }
}

/// A reconnect to a run whose replica died ends with `error` (`interrupted`) and `done`
/// (`interrupted`) (`resume::remote`): values no run of this process sends, so they are not
/// in the types the events are built from. The events' schemas list them beside those types'
/// values, read from the document so the lists never drift apart.
fn add_interrupted(doc: &mut Value) {
    for (event, field, of) in [
        ("DoneEvent", "status", "RunStatus"),
        ("ErrorEvent", "error_type", "ErrorType"),
    ] {
        let Some(mut values) = doc
            .pointer(&format!("/components/schemas/{of}/enum"))
            .and_then(Value::as_array)
            .cloned()
        else {
            continue;
        };
        values.push(json!("interrupted"));
        if let Some(p) = doc.pointer_mut(&format!("/components/schemas/{event}/properties/{field}"))
        {
            *p = json!({
                "type": "string",
                "enum": values,
                "description": format!(
                    "The values of {of}, and `interrupted` when a reconnect finds that the \
                     replica running the run died before it ended."
                ),
            });
        }
    }
}

/// utoipa 5.5 writes a link's `operationId` as `operation_id`, which OpenAPI does not know
/// (and tools then find no target); rename it.
fn fix_links(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let responses = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(Value::as_object_mut))
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(Value::as_object_mut) else {
            continue;
        };
        for link in links.values_mut().filter_map(Value::as_object_mut) {
            if let Some(id) = link.remove("operation_id") {
                link.insert("operationId".to_owned(), id);
            }
        }
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description of this service",
        content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi_json(State(state): State<AppState>) -> Response {
    Json(document(state.config.max_query_bytes)).into_response()
}

/// Headers a query request may carry.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub(super) struct QueryHeaders {
    /// Kept as the run's `client_request_id` and echoed back: 1 to 200 printable ASCII
    /// characters, no spaces.
    #[param(rename = "X-Request-Id", value_type = String, required = false, pattern = "^[!-~]{1,200}$")]
    _x_request_id: Option<String>,
}

/// Headers a stream request may carry.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub(super) struct StreamHeaders {
    /// Resume a run instead of starting one: `{run_id}:{seq}`, the `id` of the last event
    /// received. The answer holds the events after `seq` (204 when the run has ended and
    /// nothing is left; 404 when this service does not know the run). Any body or query
    /// string is then ignored. An empty value is the same as no header.
    #[param(
        rename = "Last-Event-ID",
        value_type = String,
        required = false,
        pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}:[0-9]{1,9})?$"
    )]
    _last_event_id: Option<String>,
    /// Kept as the run's `client_request_id` and echoed back: 1 to 200 printable ASCII
    /// characters, no spaces.
    #[param(rename = "X-Request-Id", value_type = String, required = false, pattern = "^[!-~]{1,200}$")]
    _x_request_id: Option<String>,
}

pub(super) use responses::*;

/// Responses several operations share. They are only described, never built: the handlers
/// answer through `ApiError` and the SSE body.
#[expect(dead_code, reason = "described for the document, never built")]
mod responses {
    use utoipa::ToResponse;

    use super::ErrorBody;

    /// The run's events as Server-Sent Events. Each event has `event:`, `id:` (`{run_id}:{seq}`,
    /// seq from 0 with no gaps) and one `data:` line of JSON carrying `run_id`. In order:
    /// `start` ([StartEvent](#/components/schemas/StartEvent)), always first; `delta`
    /// ([DeltaEvent](#/components/schemas/DeltaEvent)), only when deltas were asked for; `flash`
    /// and `pro` ([AnswerEvent](#/components/schemas/AnswerEvent)), a `flash` never after `pro`;
    /// `error` ([ErrorEvent](#/components/schemas/ErrorEvent)), per failed model or for the run;
    /// `done` ([DoneEvent](#/components/schemas/DoneEvent)), always last. A `: keep-alive`
    /// comment goes out after SSE_KEEPALIVE_S of silence; the stream starts with a `retry:` field.
    /// The schema is that of one event ([ServerSentEvent](#/components/schemas/ServerSentEvent)).
    #[derive(ToResponse)]
    #[response(
        content_type = "text/event-stream",
        headers(
            ("X-Run-Id" = uuid::Uuid, description = "The run's id (a UUIDv7)"),
            ("X-Request-Id" = String, description = "The caller's X-Request-Id, when it sent one"),
            ("Cache-Control" = String, description = "no-cache"),
        ),
    )]
    pub(in crate::api) struct EventStream(String);

    /// The resumed run has ended and every event after `Last-Event-ID` was sent already: nothing
    /// is left. An `EventSource` stops reconnecting on 204.
    #[derive(ToResponse)]
    #[response(headers(("X-Run-Id" = uuid::Uuid, description = "The resumed run's id")))]
    pub(in crate::api) struct NothingLeft;

    /// The request is malformed: the body is not a JSON object with a non-blank string `query`,
    /// a parameter or header has the wrong form.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"type": "invalid_request", "message": "\"query\" must not be blank"}}))]
    pub(in crate::api) struct BadRequest(ErrorBody<'static>);

    /// A valid bearer token is required (API_KEYS or ADMIN_TOKEN is set) and was missing or wrong.
    #[derive(ToResponse)]
    #[response(
        headers(("WWW-Authenticate" = String, description = "Bearer realm=\"duet\"")),
        example = json!({"error": {"type": "unauthorized", "message": "a valid bearer token is required"}})
    )]
    pub(in crate::api) struct Unauthorized(ErrorBody<'static>);

    /// Not found (for `/query/stream`: a `Last-Event-ID` of a run this service cannot resume).
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"type": "not_found", "message": "no run with that id can be resumed here"}}))]
    pub(in crate::api) struct NotFound(ErrorBody<'static>);

    /// The query, the system prompt or the whole request is larger than the service takes
    /// (MAX_QUERY_BYTES).
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"type": "payload_too_large", "message": "\"query\" is 40000 bytes; the limit is 32768"}}))]
    pub(in crate::api) struct TooLarge(ErrorBody<'static>);

    /// The body is not sent as `application/json`.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"type": "unsupported_media_type", "message": "send the body as application/json"}}))]
    pub(in crate::api) struct UnsupportedMediaType(ErrorBody<'static>);

    /// Too many requests from this client (RATE_LIMIT_PER_MINUTE, or its key's own
    /// rate_limit_per_minute), or too many wrong keys or tokens from its address
    /// (AUTH_FAILURE_LIMIT): `rate_limited`; or the key's daily budget is used up
    /// (`budget_exceeded`, the message naming `daily_token_budget` or
    /// `daily_cost_budget_usd`, `Retry-After` the seconds to midnight UTC). Retry after the
    /// given seconds.
    #[derive(ToResponse)]
    #[response(
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
        example = json!({"error": {"type": "rate_limited", "message": "too many requests; retry later"}})
    )]
    pub(in crate::api) struct RateLimited(ErrorBody<'static>);

    /// The service is at capacity (MAX_CONCURRENT_STREAMS), or shutting down; retry after the
    /// given seconds. No run was started.
    #[derive(ToResponse)]
    #[response(
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying")),
        example = json!({"error": {"type": "overloaded", "message": "the service is at capacity; retry later"}})
    )]
    pub(in crate::api) struct Overloaded(ErrorBody<'static>);

    /// An internal error; the detail is in the service's log, never in the answer.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"type": "internal", "message": "internal error"}}))]
    pub(in crate::api) struct Internal(ErrorBody<'static>);
}

/// What a 503 from `POST /query` carries: a refusal, or a run cut short by shutdown.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[expect(
    dead_code,
    reason = "only described, never built: the handler builds each part"
)]
pub(super) enum Unavailable<'a> {
    Refused(ErrorBody<'a>),
    Run(Box<super::query::QueryResponse<'a>>),
}
