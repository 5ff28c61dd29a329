//! The query endpoints (contract §3): `POST` and `GET /query/stream`, which answer with a run's
//! events as Server-Sent Events or resume a run after `Last-Event-ID`, and `POST /query`, which
//! answers with the whole run as one JSON document.
//!
//! What belongs here: the handlers, starting a run on the orchestrator, the event-stream
//! response and its headers, and `POST /query`'s answer type. Resuming (from memory, the
//! store, or another replica's run) is `resume`'s; parsing and validating a request is
//! `request`'s; the router and state are `mod`'s.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Extension, Json,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::openapi::{Ref, RefOr};

use super::{
    ApiError, AppState, AuthenticatedClient, X_REQUEST_ID, X_RUN_ID,
    error::Context,
    openapi,
    request::{self, QueryParams, client_request_id, parse_get, parse_post},
};
use crate::{
    audit::{ModelTrace, Outcome, RunRecord, RunStatus},
    clients::Client,
    domain::Role,
    events::AnswerEvent,
    run::{NotStarted, RunHandle, RunRequest},
    sse::{self, EventBody},
    telemetry::spans,
};

/// Run a query and stream both answers as Server-Sent Events.
///
/// Starts a run (unless `Last-Event-ID` resumes one) and answers with its events. A request
/// refused before its run starts gets a JSON error and no event stream; once the stream has
/// started, every failure is an `error` event and `done` always ends it.
#[utoipa::path(
    post, path = "/query/stream", tag = "query", operation_id = "stream_post",
    request_body(content = request::PostBody, content_type = "application/json"),
    params(openapi::StreamHeaders),
    security((), ("api_key" = [])),
    responses(
        StreamResponses,
        (status = 415, response = openapi::UnsupportedMediaType),
    ),
)]
pub(super) async fn stream_post(
    State(state): State<AppState>,
    key: Option<Extension<AuthenticatedClient>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller_key(&state, key)?;
    let params = parse_post(&headers, body, state.config.max_query_bytes);
    stream(&state, &headers, caller.as_ref(), params).await
}

/// The same as `POST /query/stream`, for `EventSource` in browsers.
///
/// `EventSource` cannot send headers, so this form suits services without API_KEYS; with
/// keys, browsers use `POST` with `fetch` (keys never go in URLs).
#[utoipa::path(
    get, path = "/query/stream", tag = "query", operation_id = "stream_get",
    params(request::GetQuery, openapi::StreamHeaders),
    security((), ("api_key" = [])),
    responses(StreamResponses),
)]
pub(super) async fn stream_get(
    State(state): State<AppState>,
    key: Option<Extension<AuthenticatedClient>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = caller_key(&state, key)?;
    let params = async { parse_get(query.as_deref(), state.config.max_query_bytes) };
    stream(&state, &headers, caller.as_ref(), params).await
}

/// What both forms of `/query/stream` answer (`POST` adds 415 for its body's media type):
/// references to the shared responses, as `(status = .., response = ..)` writes them.
struct StreamResponses;

impl utoipa::IntoResponses for StreamResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        use openapi::{
            BadRequest, EventStream, NotFound, NothingLeft, Overloaded, RateLimited, TooLarge,
            Unauthorized,
        };
        use utoipa::ToResponse;
        [
            ("200", EventStream::response().0),
            ("204", NothingLeft::response().0),
            ("400", BadRequest::response().0),
            ("401", Unauthorized::response().0),
            ("404", NotFound::response().0),
            ("413", TooLarge::response().0),
            ("429", RateLimited::response().0),
            ("503", Overloaded::response().0),
        ]
        .into_iter()
        .map(|(status, name)| (status.to_owned(), Ref::from_response_name(name).into()))
        .collect()
    }
}

/// Both forms of `/query/stream` once the caller is known: a `Last-Event-ID` resumes its run,
/// and then the request's own query is ignored, so `params` is only awaited (parsed) when no
/// run is resumed; otherwise a run starts and the answer streams its events.
async fn stream(
    state: &AppState,
    headers: &HeaderMap,
    caller: Option<&Arc<Client>>,
    params: impl Future<Output = Result<QueryParams, ApiError>>,
) -> Result<Response, ApiError> {
    if let Some(last) = last_event_id(headers) {
        return super::resume::resume(state, last, caller.map(|c| c.key())).await;
    }
    let params = params.await?;
    let client_request_id = client_request_id(headers)?;
    let trace = spans::incoming(headers, "/query/stream");
    let handle = start_run(state, params, client_request_id.clone(), caller, trace).await?;
    Ok(event_stream(
        state,
        handle.events,
        Some(handle.overhead),
        handle.run_id,
        client_request_id.as_deref(),
    ))
}

/// The `Last-Event-ID` of a reconnect. An empty one is no id at all, as if it were not sent:
/// an `EventSource` only sends the header when it has an id, and many HTTP stacks drop empty
/// headers anyway, so a client cannot rely on an empty value meaning anything else.
fn last_event_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers.get("last-event-id").filter(|v| !v.is_empty())
}

/// The API key the request authenticated with; `None` without keys. With keys configured
/// a request that reached a handler has one (the guard refuses the rest); if the guard were
/// ever missing from a route, the request is refused rather than run without an owner.
pub(super) fn caller_key(
    state: &AppState,
    key: Option<Extension<AuthenticatedClient>>,
) -> Result<Option<Arc<Client>>, ApiError> {
    if let Some(Extension(AuthenticatedClient(client))) = key {
        return Ok(Some(client));
    }
    if state.guard.keys().current().is_empty() {
        return Ok(None);
    }
    Err(ApiError::Unauthorized)
}

/// Starts a run for `caller`: refused (429) when its key has used up a daily budget (the
/// run is counted against its budgets otherwise), or when the service is at capacity.
pub(super) async fn start_run(
    state: &AppState,
    params: QueryParams,
    client_request_id: Option<String>,
    caller: Option<&Arc<Client>>,
    trace: Option<spans::Incoming>,
) -> Result<RunHandle, ApiError> {
    let now = chrono::Utc::now();
    if let Some(client) = caller
        && let Err(over) = state.usage.admit(client, now).await
    {
        state
            .metrics
            .streams_rejected_total
            .with_label_values(&["budget_exceeded"])
            .inc();
        return Err(ApiError::BudgetExceeded {
            budget: over.budget.as_str(),
            retry_after: over.retry_after,
        });
    }
    let mut handle = state
        .orchestrator
        .start(
            RunRequest {
                conversation: Arc::new(params.conversation),
                params: params.params,
                deltas: params.deltas,
                client_request_id,
                client_id: caller.and_then(|c| c.name().cloned()),
                trace,
            },
            caller.map(|c| c.key()),
        )
        .inspect_err(|refused| {
            count_refusal(state, *refused);
            // Admitted by its budget but never started: not one of the key's runs.
            if let Some(client) = caller {
                state.usage.release(client, now);
            }
        })?;
    // The response carries the run's id (`X-Run-Id`, then the `start` event): it goes out
    // once the run's `running` row is committed, so that a client never holds the id of a
    // run that a crash (`kill -9`, a lost machine) leaves without any row. The models are
    // already called meanwhile, so their first tokens are not held up; a row that is not
    // coming (dropped while the audit queue is backlogged or writes fail) is not waited
    // for, and a slow commit for at most `START_ROW_WAIT`.
    let confirmed = std::mem::take(&mut handle.start_written)
        .wait(START_ROW_WAIT)
        .await;
    if !confirmed {
        state.metrics.start_rows_unconfirmed_total.inc();
    }
    Ok(handle)
}

/// The longest a response waits for its run's `running` row to be committed: contract §8's
/// "within about 100 ms". A commit slower than that (a stalled disk) delays no response
/// longer; the run goes on, and its record inserts the row as before.
const START_ROW_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// A run refused before it started (503 with `Retry-After`, from `NotStarted`'s
/// conversion) is counted.
pub(super) fn count_refusal(state: &AppState, refused: NotStarted) {
    let reason = match refused {
        NotStarted::AtCapacity => "capacity",
        NotStarted::ShuttingDown => "shutdown",
    };
    state
        .metrics
        .streams_rejected_total
        .with_label_values(&[reason])
        .inc();
}

/// The `text/event-stream` response over a run's (or a resumed run's) frames.
pub(super) fn event_stream(
    state: &AppState,
    events: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    overhead: Option<std::sync::Arc<sse::OverheadProbe>>,
    run_id: uuid::Uuid,
    client_request_id: Option<&str>,
) -> Response {
    let mut body = EventBody::new(
        Some(sse::retry_field(RECONNECT_AFTER)),
        events,
        state.config.sse_keepalive,
    );
    if let Some(probe) = overhead {
        body = body.with_overhead(probe);
    }
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    event_stream_headers(h);
    insert_ids(h, run_id, client_request_id);
    response
}

/// The headers of every event-stream response (`/query/stream`, `/v1/chat/completions`).
pub(super) fn event_stream_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar proxies buffer responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// How long a browser waits before reconnecting a dropped stream (the `retry:` field).
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_millis(2000);

pub(super) fn insert_ids(h: &mut HeaderMap, run_id: uuid::Uuid, client_request_id: Option<&str>) {
    if let Ok(v) = HeaderValue::from_str(&run_id.to_string()) {
        h.insert(X_RUN_ID, v);
    }
    if let Some(v) = client_request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        h.insert(X_REQUEST_ID, v);
    }
}

/// Run a query and answer with both models' results as one JSON document.
///
/// The run is the same as on `/query/stream` (and audited the same way); the answer comes
/// when both models have ended. `deltas` is ignored.
#[utoipa::path(
    post, path = "/query", tag = "query", operation_id = "query",
    request_body(content = request::PostBody, content_type = "application/json"),
    params(openapi::QueryHeaders),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "Pro answered (`status` `ok`) or only Flash did (`partial`)",
            body = QueryResponse, headers(
                ("X-Run-Id" = uuid::Uuid, description = "The run's id (a UUIDv7)"),
                ("X-Request-Id" = String, description = "The caller's X-Request-Id, when it sent one"),
            ), links(("GetRun" = (operation_id = "get_run",
                parameters(("run_id" = "$response.body#/run_id")),
                description = "The run's audit record (shortly after the answer; needs ADMIN_TOKEN)")))),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 413, response = openapi::TooLarge),
        (status = 415, response = openapi::UnsupportedMediaType),
        (status = 429, response = openapi::RateLimited),
        (status = 502, description = "Neither model answered (`status` `failed`); the run is audited",
            body = QueryResponse),
        (status = 503, description = "The service is at capacity (an `overloaded` error with \
            `Retry-After`, no run started), or it shut down during the run (the run, with `status` \
            `cancelled`)", body = openapi::Unavailable, headers(
                ("Retry-After" = u64, description = "Seconds to wait, when overloaded"),
            )),
        (status = 500, response = openapi::Internal),
    ),
)]
pub(super) async fn query_post(
    State(state): State<AppState>,
    key: Option<Extension<AuthenticatedClient>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = caller_key(&state, key)?;
    let params = parse_post(&headers, body, state.config.max_query_bytes).await?;
    let client_request_id = client_request_id(&headers)?;
    let params = QueryParams {
        deltas: false,
        ..params
    };
    let trace = spans::incoming(&headers, "/query");
    let mut handle = start_run(
        &state,
        params,
        client_request_id.clone(),
        caller.as_ref(),
        trace,
    )
    .await?;
    // Keep draining so the run never waits on a full channel; the record arrives after
    // the last event. If this request is dropped (client gone), so is the receiver, and
    // the run cancels itself.
    while handle.events.recv().await.is_some() {}
    let record = handle
        .record
        .await
        .context(|| "the run ended without a record".into())?;
    let status = match record.status {
        RunStatus::Ok | RunStatus::Partial => StatusCode::OK,
        RunStatus::Failed => StatusCode::BAD_GATEWAY,
        RunStatus::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = (status, Json(QueryResponse::from(&record))).into_response();
    // 503: shutdown cut the run short; another instance can take the retry.
    super::error::retry_after_if_transient(&mut response);
    insert_ids(
        response.headers_mut(),
        record.run_id,
        client_request_id.as_deref(),
    );
    Ok(response)
}

/// The answer of `POST /query`: the run as one document.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct QueryResponse<'a> {
    run_id: uuid::Uuid,
    status: RunStatus,
    total_ms: u64,
    /// The run's cost in USD, as in `done`; `null` when it is not known.
    cost_usd: Option<f64>,
    /// How far the Flash preview agreed with the Pro answer, as in `done`; `null` unless
    /// both answered `ok`.
    #[schema(minimum = 0, maximum = 1)]
    agreement: Option<f64>,
    flash: ModelAnswer<'a>,
    pro: ModelAnswer<'a>,
}

// The fields of the `flash` and `pro` events (`AnswerEvent`) but `run_id` and `model`, which
// the document states once, between `outcome` and `error_type`. They are listed again rather
// than embedded: `#[serde(flatten)]` would keep the JSON, but utoipa (5.5) publishes any
// flattened struct as `allOf` (even with `#[schema(inline)]`) and never merges its properties,
// which would change /openapi.json. What keeps the two alike is `ModelAnswer::new`: it takes
// every field of the answer event by an exhaustive pattern, so a field added to `AnswerEvent`
// does not compile until it is placed here too. (Plain `//`: a `///` line would be published
// as the schema's description.)
/// One model's part of a `POST /query` answer.
#[derive(Serialize, utoipa::ToSchema)]
struct ModelAnswer<'a> {
    outcome: Outcome,
    provider: &'a str,
    model_name: &'a str,
    model_version: Option<&'a str>,
    text: &'a str,
    finish_reason: Option<&'a str>,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    usage: crate::providers::Usage,
    cost_usd: Option<f64>,
    error_type: Option<&'a str>,
}

impl<'a> From<&'a RunRecord> for QueryResponse<'a> {
    fn from(r: &'a RunRecord) -> Self {
        QueryResponse {
            run_id: r.run_id,
            status: r.status,
            total_ms: r.total_ms,
            cost_usd: r.cost_usd,
            agreement: r.agreement,
            flash: ModelAnswer::new(Role::Flash, &r.flash),
            pro: ModelAnswer::new(Role::Pro, &r.pro),
        }
    }
}

impl<'a> ModelAnswer<'a> {
    /// The model's answer event as a stream would carry it, with the trace's outcome and error.
    fn new(role: Role, t: &'a ModelTrace) -> Self {
        let AnswerEvent {
            // The document's own `run_id` and the field it sits in say these.
            run_id: _,
            model: _,
            provider,
            model_name,
            model_version,
            text,
            finish_reason,
            latency_ms,
            ttft_ms,
            usage,
            cost_usd,
        } = AnswerEvent::from_trace("", role, t);
        ModelAnswer {
            outcome: t.outcome,
            provider,
            model_name,
            model_version,
            text,
            finish_reason,
            latency_ms,
            ttft_ms,
            usage,
            cost_usd,
            error_type: t.error_type.as_deref(),
        }
    }
}
