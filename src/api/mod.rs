//! HTTP interface (contract §3): routes, request parsing and validation, responses.
//!
//! Requests are validated before a run starts: a refused request gets a JSON error and no
//! event stream. Once a run has started every path ends with `done` (see `run`).

mod admin;
mod client_addr;
mod error;
mod guard;
mod openapi;
mod page;
mod rate_limit;
mod request;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{RawQuery, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use self::{error::ApiError, guard::Guard};
use self::{
    error::Context,
    request::{QueryParams, client_request_id, parse_get, parse_post},
};
use crate::{
    audit::{AuditSink, ModelTrace, Outcome, RunRecord, RunStatus, Store},
    config::Config,
    domain::Secret,
    metrics::Metrics,
    resume::{Owner, follow, parse_last_event_id, send_all, stored_frames_after, stored_last_seq},
    run::{AtCapacity, CHANNEL_CAPACITY, Orchestrator, RunHandle, RunRequest},
    sse::{self, EventBody},
};

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub orchestrator: Orchestrator,
    pub metrics: Metrics,
    pub guard: Arc<Guard>,
    /// Where finished runs go; asked whether its queue is backlogged (`/readyz`).
    pub sink: Arc<dyn AuditSink>,
    /// The audit database, for `/runs` and `/readyz`; `None` when records stay in memory.
    pub store: Option<Store>,
}

pub const X_RUN_ID: &str = "x-run-id";

pub const X_REQUEST_ID: &str = "x-request-id";

/// Which configured API key a request authenticated with (its index in `API_KEYS`): put in
/// the request's extensions by the guard; absent without API_KEYS.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuthenticatedKey(pub usize);

/// The whole HTTP app, from its state. Binding a socket is the caller's business.
pub fn router(state: AppState) -> Router {
    // One line per route: the API description's test reads the routes from this source.
    #[rustfmt::skip]
    let queries = Router::new()
        .route("/query/stream", no_head(guarded(&state, post(stream_post).get(stream_get))))
        .route("/query", guarded(&state, post(query_post)));
    let router = Router::new()
        .merge(queries)
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/app.css", get(page::style))
        .route("/runs/{run_id}", get(admin::get_run))
        .route("/healthz", get(healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(error::log_errors))
        .layer(middleware::from_fn_with_state(state.clone(), guard::count));
    let router = match cors(&state.config) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

type Routes = axum::routing::MethodRouter<AppState>;

/// Authentication and rate limits in front of a route's handlers (not its 405s).
fn guarded(state: &AppState, routes: Routes) -> Routes {
    routes.route_layer(middleware::from_fn_with_state(
        state.clone(),
        guard::protect,
    ))
}

/// For a route that starts runs over GET: axum answers HEAD with the GET handler (dropping
/// the body), which would start and audit a run nobody reads and spend the client's limits.
/// [`request::no_head`] refuses HEAD before the guard; the route's own 405 fallback makes
/// every 405 of the route pass it, so each states the same allowed methods.
fn no_head(routes: Routes) -> Routes {
    routes
        .fallback(method_not_allowed)
        .layer(middleware::from_fn(request::no_head))
}

/// CORS for browser clients on other origins; none configured means same-origin only.
fn cors(config: &Config) -> Option<CorsLayer> {
    if config.cors_allowed_origins.is_empty() {
        return None;
    }
    // Every entry is an origin browsers send (or `*`): `Config` refuses any other at start.
    let origins = if config.cors_allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(config.cors_allowed_origins.iter().cloned())
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static(X_REQUEST_ID),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                HeaderName::from_static(X_RUN_ID),
                HeaderName::from_static(X_REQUEST_ID),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// `GET /healthz`: the process runs.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"status": "ok", "version": "0.1.0"}))]
struct Health {
    /// Always `ok`.
    status: &'static str,
    /// The service's version.
    version: &'static str,
}

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process runs", body = Health)),
)]
async fn healthz() -> impl IntoResponse {
    Json(Health {
        status: "ok",
        version: crate::SERVICE_VERSION,
    })
}

/// Prometheus metrics.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition (format 0.0.4)",
        content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = 500, response = openapi::Internal)),
)]
async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let text = state
        .metrics
        .render()
        .context(|| "encoding the metrics".into())?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    ))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

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
        (status = 200, response = openapi::EventStream),
        (status = 204, response = openapi::NothingLeft),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, response = openapi::NotFound),
        (status = 413, response = openapi::TooLarge),
        (status = 415, response = openapi::UnsupportedMediaType),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Overloaded),
    ),
)]
async fn stream_post(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let caller = caller_key(&state, parts.extensions.get().copied())?;
    if let Some(last) = last_event_id(&parts.headers) {
        return resume(&state, last, caller).await;
    }
    let params = parse_post(&parts.headers, body, state.config.max_query_bytes).await?;
    start_stream(&state, &parts.headers, params, caller)
}

/// The same as `POST /query/stream`, for `EventSource` in browsers.
///
/// `EventSource` cannot send headers, so this form suits services without API_KEYS; with
/// keys, browsers use `POST` with `fetch` (keys never go in URLs).
#[utoipa::path(
    get, path = "/query/stream", tag = "query", operation_id = "stream_get",
    params(request::GetQuery, openapi::StreamHeaders),
    security((), ("api_key" = [])),
    responses(
        (status = 200, response = openapi::EventStream),
        (status = 204, response = openapi::NothingLeft),
        (status = 400, response = openapi::BadRequest),
        (status = 401, response = openapi::Unauthorized),
        (status = 404, response = openapi::NotFound),
        (status = 413, response = openapi::TooLarge),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Overloaded),
    ),
)]
async fn stream_get(
    State(state): State<AppState>,
    key: Option<Extension<AuthenticatedKey>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = caller_key(&state, key.map(|Extension(key)| key))?;
    if let Some(last) = last_event_id(&headers) {
        return resume(&state, last, caller).await;
    }
    let params = parse_get(query.as_deref(), state.config.max_query_bytes)?;
    start_stream(&state, &headers, params, caller)
}

/// The `Last-Event-ID` of a reconnect. An empty one is no id at all, as if it were not sent:
/// an `EventSource` only sends the header when it has an id, and many HTTP stacks drop empty
/// headers anyway, so a client cannot rely on an empty value meaning anything else.
fn last_event_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers.get("last-event-id").filter(|v| !v.is_empty())
}

/// The API key the request authenticated with; `None` without API_KEYS. With keys configured
/// a request that reached a handler has one (the guard refuses the rest); if the guard were
/// ever missing from a route, the request is refused rather than run without an owner.
fn caller_key(
    state: &AppState,
    key: Option<AuthenticatedKey>,
) -> Result<Option<&Secret>, ApiError> {
    if state.config.api_keys.is_empty() {
        return Ok(None);
    }
    key.and_then(|key| state.config.api_keys.get(key.0))
        .map(Some)
        .ok_or(ApiError::Unauthorized)
}

fn start_stream(
    state: &AppState,
    headers: &HeaderMap,
    params: QueryParams,
    caller: Option<&Secret>,
) -> Result<Response, ApiError> {
    let client_request_id = client_request_id(headers)?;
    let handle = start_run(state, params, client_request_id.clone(), caller)?;
    Ok(event_stream(
        state,
        handle.events,
        handle.run_id,
        client_request_id.as_deref(),
    ))
}

fn start_run(
    state: &AppState,
    params: QueryParams,
    client_request_id: Option<String>,
    caller: Option<&Secret>,
) -> Result<RunHandle, ApiError> {
    let handle = state
        .orchestrator
        .start(
            RunRequest {
                query: params.query.into(),
                system: params.system.map(Into::into),
                deltas: params.deltas,
                client_request_id,
            },
            caller,
        )
        .inspect_err(|AtCapacity| count_capacity_refusal(state))?;
    Ok(handle)
}

/// `MAX_CONCURRENT_STREAMS` streams are open: the refusal (503 with `Retry-After`, from
/// `AtCapacity`'s conversion) is counted.
fn count_capacity_refusal(state: &AppState) {
    state
        .metrics
        .streams_rejected_total
        .with_label_values(&["capacity"])
        .inc();
}

/// The `text/event-stream` response over a run's (or a resumed run's) frames.
fn event_stream(
    state: &AppState,
    events: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    run_id: uuid::Uuid,
    client_request_id: Option<&str>,
) -> Response {
    let body = EventBody::new(
        Some(sse::retry_field(RECONNECT_AFTER)),
        events,
        state.config.sse_keepalive,
    );
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar proxies buffer responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    insert_ids(h, run_id, client_request_id);
    response
}

/// A reconnect: the events after `seq` of the same run, never a new run. 204 when the run
/// has ended and nothing is left, which tells an `EventSource` to stop reconnecting.
///
/// - Only the API key that started a run may resume it; for any other caller the run does
///   not exist: the very answer an unknown id gets (404), so ids cannot be probed.
/// - A resumed stream is a stream: it takes a place under `MAX_CONCURRENT_STREAMS` (503 with
///   `Retry-After` when there is none) and counts in `duet_streams_active` until it ends.
/// - A `seq` past the last event the run has sent names no event, so it is answered like an
///   id this service cannot find (404), whether the run is live or ended; nothing at or
///   before `seq` is ever sent again.
async fn resume(
    state: &AppState,
    last_event_id: &HeaderValue,
    caller: Option<&Secret>,
) -> Result<Response, ApiError> {
    let (run_id, seq) = last_event_id
        .to_str()
        .ok()
        .and_then(parse_last_event_id)
        // Not an id this service issued, so not one it can find (contract §4: 404).
        .ok_or_else(cannot_resume)?;
    // Taken before the run is looked for: a refusal then says nothing about whether the run
    // exists, and a request that would be refused costs no database read.
    let slot = state
        .orchestrator
        .stream_slot()
        .inspect_err(|AtCapacity| count_capacity_refusal(state))?;
    // Another key's run in memory is looked for in the store like an unknown one, where the
    // same check refuses it: the same answer, by the same path.
    let Some(log) = state
        .orchestrator
        .registry()
        .get(&run_id)
        .filter(|log| log.allows(run_id, caller))
    else {
        return resume_from_store(state, run_id, seq, caller, slot).await;
    };
    if seq > log.issued() {
        return Err(cannot_resume());
    }
    let (rest, ended) = log.frames_after(seq);
    if ended && rest.is_empty() {
        return Ok(nothing_left(run_id));
    }
    let events = follow(
        log,
        seq,
        CHANNEL_CAPACITY,
        state.config.client_write_timeout,
        state.orchestrator.tracker(),
        slot,
    );
    Ok(event_stream(state, events, run_id, None))
}

/// The one answer for every `Last-Event-ID` that cannot be resumed here: malformed, unknown,
/// another key's run, or past the run's end.
fn cannot_resume() -> ApiError {
    ApiError::NotFound("no run with that id can be resumed here".into())
}

/// 204: the run has ended and the client has all of it.
fn nothing_left(run_id: uuid::Uuid) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    insert_ids(response.headers_mut(), run_id, None);
    response
}

/// A run that has left this process's memory (or ran on another replica): replay its stored
/// events after `seq`. The deltas are not stored; the answer events carry the whole texts.
async fn resume_from_store(
    state: &AppState,
    run_id: uuid::Uuid,
    seq: u32,
    caller: Option<&Secret>,
    slot: crate::run::StreamSlot,
) -> Result<Response, ApiError> {
    let store = state.store.as_ref().ok_or_else(cannot_resume)?;
    let record = store
        .fetch(run_id)
        .await
        .context(|| format!("reading run {run_id} to resume it"))?
        .ok_or_else(cannot_resume)?;
    if !Owner::allows_stored(record.owner_fingerprint.as_deref(), run_id, caller) {
        return Err(cannot_resume());
    }
    // No events stored (a record from before they were kept), or `seq` past the last one.
    if stored_last_seq(&record).is_none_or(|last| seq > last) {
        return Err(cannot_resume());
    }
    let frames = stored_frames_after(&record, seq);
    if frames.is_empty() {
        return Ok(nothing_left(run_id));
    }
    let events = send_all(
        frames,
        state.config.client_write_timeout,
        state.orchestrator.tracker(),
        slot,
    );
    Ok(event_stream(state, events, run_id, None))
}

/// How long a browser waits before reconnecting a dropped stream (the `retry:` field).
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_millis(2000);

fn insert_ids(h: &mut HeaderMap, run_id: uuid::Uuid, client_request_id: Option<&str>) {
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
async fn query_post(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let caller = caller_key(&state, parts.extensions.get().copied())?;
    let params = parse_post(&parts.headers, body, state.config.max_query_bytes).await?;
    let client_request_id = client_request_id(&parts.headers)?;
    let params = QueryParams {
        deltas: false,
        ..params
    };
    let mut handle = start_run(&state, params, client_request_id.clone(), caller)?;
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
    insert_ids(
        response.headers_mut(),
        record.run_id,
        client_request_id.as_deref(),
    );
    Ok(response)
}

/// The answer of `POST /query`: the run as one document.
#[derive(Serialize, utoipa::ToSchema)]
struct QueryResponse<'a> {
    run_id: uuid::Uuid,
    status: RunStatus,
    total_ms: u64,
    flash: ModelAnswer<'a>,
    pro: ModelAnswer<'a>,
}

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
    error_type: Option<&'a str>,
}

impl<'a> From<&'a RunRecord> for QueryResponse<'a> {
    fn from(r: &'a RunRecord) -> Self {
        QueryResponse {
            run_id: r.run_id,
            status: r.status,
            total_ms: r.total_ms,
            flash: ModelAnswer::from(&r.flash),
            pro: ModelAnswer::from(&r.pro),
        }
    }
}

impl<'a> From<&'a ModelTrace> for ModelAnswer<'a> {
    fn from(t: &'a ModelTrace) -> Self {
        ModelAnswer {
            outcome: t.outcome,
            provider: &t.provider,
            model_name: &t.model,
            model_version: t.model_version.as_deref(),
            text: &t.text,
            finish_reason: t.finish_reason.as_deref(),
            latency_ms: t.latency_ms,
            ttft_ms: t.ttft_ms,
            usage: t.usage(),
            error_type: t.error_type.as_deref(),
        }
    }
}
