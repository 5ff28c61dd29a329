//! HTTP interface (contract §3): routes, request parsing and validation, responses.
//!
//! Requests are validated before a run starts: a refused request gets a JSON error and no
//! event stream. Once a run has started every path ends with `done` (see `orchestrator`).

mod admin;
mod error;
mod request;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;

pub use self::error::ApiError;
use self::request::{QueryParams, client_request_id, parse_get, parse_post};
use crate::{
    audit::{AuditSink, ModelTrace, Outcome, RunRecord, RunStatus, Store},
    config::Config,
    metrics::Metrics,
    orchestrator::{Orchestrator, RunRequest},
    sse::{self, EventBody},
};

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub orchestrator: Orchestrator,
    pub metrics: Metrics,
    /// Where finished runs go; asked whether its queue is backlogged (`/readyz`).
    pub sink: Arc<dyn AuditSink>,
    /// The audit database, for `/runs` and `/readyz`; `None` when records stay in memory.
    pub store: Option<Store>,
}

pub const X_RUN_ID: &str = "x-run-id";
pub const X_REQUEST_ID: &str = "x-request-id";

/// The whole HTTP app, from its state. Binding a socket is the caller's business.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/query/stream", post(stream_post).get(stream_get))
        .route("/query", post(query_post))
        .route("/runs/{run_id}", get(admin::get_run))
        .route("/healthz", get(healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok", "version": crate::SERVICE_VERSION}))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn stream_post(State(state): State<AppState>, request: Request) -> Response {
    let route = "/query/stream";
    let result = async {
        let (parts, body) = request.into_parts();
        let params = parse_post(&parts.headers, body, state.config.max_query_bytes).await?;
        start_stream(&state, &parts.headers, params)
    }
    .await;
    finish(&state.metrics, route, result)
}

async fn stream_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let route = "/query/stream";
    let result = parse_get(query.as_deref(), state.config.max_query_bytes)
        .and_then(|params| start_stream(&state, &headers, params));
    finish(&state.metrics, route, result)
}

pub(super) fn finish(
    metrics: &Metrics,
    route: &str,
    result: Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    metrics
        .requests_total
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}

fn start_stream(
    state: &AppState,
    headers: &HeaderMap,
    params: QueryParams,
) -> Result<Response, ApiError> {
    if headers.contains_key("last-event-id") {
        // Resuming is not built yet; answering with a new run would break the contract's
        // "a reconnect never starts a new run", so say plainly that the id is unknown.
        return Err(ApiError::NotFound(
            "this service cannot resume that event stream".into(),
        ));
    }
    let client_request_id = client_request_id(headers)?;
    let handle = state.orchestrator.start(RunRequest {
        query: params.query.into(),
        system: params.system.map(Into::into),
        deltas: params.deltas,
        client_request_id: client_request_id.clone(),
    });
    let body = EventBody::new(
        Some(sse::retry_field(RECONNECT_AFTER)),
        handle.events,
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
    insert_ids(h, handle.run_id, client_request_id.as_deref());
    Ok(response)
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

async fn query_post(State(state): State<AppState>, request: Request) -> Response {
    let route = "/query";
    let result = async {
        let (parts, body) = request.into_parts();
        let params = parse_post(&parts.headers, body, state.config.max_query_bytes).await?;
        let client_request_id = client_request_id(&parts.headers)?;
        let mut handle = state.orchestrator.start(RunRequest {
            query: params.query.into(),
            system: params.system.map(Into::into),
            deltas: false,
            client_request_id: client_request_id.clone(),
        });
        // Keep draining so the run never waits on a full channel; the record arrives after
        // the last event. If this request is dropped (client gone), so is the receiver, and
        // the run cancels itself.
        while handle.events.recv().await.is_some() {}
        let record = handle
            .record
            .await
            .map_err(|_| ApiError::Internal("the run ended without a record".into()))?;
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
    .await;
    finish(&state.metrics, route, result)
}

/// The answer of `POST /query`: the run as one document.
#[derive(Serialize)]
struct QueryResponse<'a> {
    run_id: uuid::Uuid,
    status: RunStatus,
    total_ms: u64,
    flash: ModelAnswer<'a>,
    pro: ModelAnswer<'a>,
}

#[derive(Serialize)]
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
            usage: crate::providers::Usage {
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
            },
            error_type: t.error_type.as_deref(),
        }
    }
}
