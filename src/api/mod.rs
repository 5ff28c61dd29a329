//! HTTP interface (contract §3): routes, request parsing and validation, responses.
//!
//! Requests are validated before a run starts: a refused request gets a JSON error and no
//! event stream. Once a run has started every path ends with `done` (see `run`).
//!
//! What belongs here: the router (every route on one line, with its guard, CORS and the
//! error-logging layer), the state handlers share, the names shared by several submodules,
//! and the small operational handlers (`/healthz`, `/metrics`, the 404 and 405 fallbacks).
//! Each other job has its module: `query` the query endpoints, `request` parsing them,
//! `guard` authentication and rate limits, `admin` `/runs` and `/readyz`, `clients`
//! `/clients`, `page` the browser pages (`/` and the operators' console `/admin`), `error`
//! the error answers, `openapi` the API description, `openai` the OpenAI-compatible `/v1`
//! endpoints.

mod admin;
mod client_addr;
mod clients;
mod error;
mod guard;
mod openai;
mod openapi;
mod page;
mod query;
mod rate_limit;
mod request;
mod resume;
mod runs;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderName, HeaderValue, Method, header},
    middleware,
    response::IntoResponse,
    routing::{get, post},
};
use serde::Serialize;
use tower_http::cors::{AllowOrigin, CorsLayer};

use self::error::Context;
pub use self::{error::ApiError, guard::Guard};
use crate::{
    audit::{AuditSink, Store},
    config::Config,
    metrics::Metrics,
    run::Orchestrator,
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
    /// Wakes resumes waiting for a run another replica runs (PostgreSQL only).
    pub run_ends: Option<Arc<crate::audit::notify::RunEnds>>,
    /// Whether this process still holds its instance id (`/readyz`); `None` outside `serve`.
    pub instance: Option<Arc<crate::audit::instance::IdClaim>>,
    /// Each named key's usage today, and its daily budgets (contract §11).
    pub usage: Arc<crate::clients::usage::Usage>,
}

pub const X_RUN_ID: &str = "x-run-id";

pub const X_REQUEST_ID: &str = "x-request-id";

/// Which configured API key a request authenticated with: put in the request's extensions
/// by the guard; absent without keys. It holds the client itself, not its place in the key
/// set, so a reload during the request changes nothing for it.
#[derive(Debug, Clone)]
pub(crate) struct AuthenticatedClient(pub Arc<crate::clients::Client>);

/// The whole HTTP app, from its state. Binding a socket is the caller's business.
pub fn router(state: AppState) -> Router {
    // One line per route: the API description's test reads the routes from this source.
    #[rustfmt::skip]
    let queries = Router::new()
        .route("/query/stream", no_head(guarded(&state, post(query::stream_post).get(query::stream_get))))
        .route("/query", guarded(&state, post(query::query_post)));
    // The OpenAI-compatible routes answer every error in OpenAI's shape (the guard's too).
    #[rustfmt::skip]
    let openai = Router::new()
        .route("/v1/chat/completions", guarded(&state, post(openai::chat_completions)))
        .route("/v1/models", guarded(&state, get(openai::list_models)))
        .route("/v1/models/{model}", guarded(&state, get(openai::get_model)))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(openai::errors));
    let router = Router::new()
        .merge(queries)
        .merge(openai)
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .route("/app.css", get(page::style))
        .route("/vendor/marked.umd.js", get(page::marked))
        .route("/vendor/purify.min.js", get(page::purify))
        .route("/markdown.js", get(page::markdown))
        .route("/admin", get(page::console))
        .route("/admin.js", get(page::console_script))
        .route("/admin.css", get(page::console_style))
        .route("/runs", get(runs::list))
        .route("/runs/{run_id}", get(admin::get_run))
        .route("/clients", get(clients::list))
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
                HeaderName::from_static(openai::X_DUET_ANSWER),
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
        (status = 401, response = openapi::Unauthorized),
        (status = 429, response = openapi::RateLimited),
        (status = 500, response = openapi::Internal)),
    security((), ("metrics_token" = [])),
)]
async fn metrics(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    // The exposition names each `API_KEYS_FILE` client and counts its requests: an operator
    // who cannot keep the endpoint on a private network sets METRICS_TOKEN.
    if let Some(token) = &state.config.metrics_token {
        admin::token_auth(&state, &extensions, &headers, token, guard::Realm::Metrics)?;
    }
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
