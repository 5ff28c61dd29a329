//! Operator endpoints that read the audit trail: `GET /runs/{run_id}` and `GET /readyz`.

use axum::{
    Json,
    extract::{Path, State},
    http::{Extensions, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use tracing::warn;
use uuid::Uuid;

use super::{
    ApiError, AppState,
    error::Context,
    guard::{self, Realm},
};
use crate::{audit::StoredRun, domain::Secret};

/// `GET /runs/{run_id}`: the whole audit record. Without `ADMIN_TOKEN` a 404 saying that
/// the admin API is off.
#[utoipa::path(
    get, path = "/runs/{run_id}", tag = "admin", operation_id = "get_run",
    summary = "One run's audit record",
    description = "The record as stored. A run in progress has a row with status `running` \
        (no traces yet: `flash` and `pro` are null) from a few milliseconds after its start \
        until its record replaces it; a run whose process died is `interrupted`, also \
        without traces. A run started in the last few milliseconds may not be stored yet \
        (404 for a moment). Without ADMIN_TOKEN configured this answers 404 saying the \
        admin API is off.",
    params(("run_id" = uuid::Uuid, Path, description = "The run's id, as in `X-Run-Id` or \
        any event's `run_id`")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The audit record, or the row of a run that is running \
            or was interrupted", body = crate::audit::StoredRun),
        (status = 400, response = super::openapi::BadRequest),
        (status = 401, response = super::openapi::Unauthorized),
        (status = 404, response = super::openapi::NotFound),
        (status = 429, response = super::openapi::RateLimited),
        (status = 500, response = super::openapi::Internal),
    ),
)]
pub(super) async fn get_run(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Json<StoredRun>, ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(admin_off());
    };
    // Authenticate before looking at the id, so that nothing about ids leaks to callers
    // without the token.
    admin_auth(&state, &extensions, &headers, token)?;
    let run_id = Uuid::parse_str(&run_id)
        .map_err(|_| ApiError::BadRequest("run_id must be a UUID".into()))?;
    let no_such_run = || ApiError::NotFound("no run with this id".into());
    let store = state.store.as_ref().ok_or_else(no_such_run)?;
    let record = store
        .fetch_stored(run_id)
        .await
        .context(|| format!("reading run {run_id}"))?
        // A run that just started may still be in the writer's queue: 404 for now.
        .ok_or_else(no_such_run)?;
    Ok(Json(record))
}

/// What the admin endpoints (`/runs*`, `/clients`) answer while ADMIN_TOKEN is not set: they
/// exist but are off.
pub(super) fn admin_off() -> ApiError {
    ApiError::NotFound("the admin API is off: set ADMIN_TOKEN to enable /runs and /clients".into())
}

/// Lets the request through when it carries the admin token. An address that presented too
/// many wrong tokens (or API keys) lately is refused before the token is compared.
pub(super) fn admin_auth(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
    token: &Secret,
) -> Result<(), ApiError> {
    token_auth(state, extensions, headers, token, Realm::Admin)
}

/// [`admin_auth`] for any one token (`realm` names it in the auth metrics): the one budget
/// of guesses per address covers every secret.
pub(super) fn token_auth(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
    token: &Secret,
    realm: Realm,
) -> Result<(), ApiError> {
    let ip = state.guard.client(extensions, headers);
    state.guard.admit(ip, realm, &state.metrics)?;
    if guard::bearer_secret(headers, std::slice::from_ref(token)).is_some() {
        return Ok(());
    }
    // Only a token that was presented is a guess (see `guard::protect`).
    if guard::bearer(headers).is_some() {
        state.guard.failed(ip, realm, &state.metrics);
    }
    Err(ApiError::Unauthorized)
}

/// The body of `GET /readyz`.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"status": "ready", "database": "ok", "audit_queue": "ok",
    "audit_writes": "ok"}))]
pub(super) struct Readiness {
    #[schema(value_type = String, pattern = "^(ready|not_ready)$")]
    status: &'static str,
    #[schema(value_type = String, pattern = "^(ok|unavailable)$")]
    database: &'static str,
    #[schema(value_type = String, pattern = "^(ok|backlogged)$")]
    audit_queue: &'static str,
    /// `failing` while audit writes fail (a batch in retry, or a failure in the last 10 s
    /// with no success since).
    #[schema(value_type = String, pattern = "^(ok|failing)$")]
    audit_writes: &'static str,
    /// Why the service is not ready, when it is not: `database_unavailable`,
    /// `database_timeout`, `schema_missing`, `database_file_replaced`, `disk_full`,
    /// `database_io_error`, `database_locked` (SQLite: another process held the write lock
    /// past the busy timeout), `database_error`, `audit_queue_backlogged`,
    /// `instance_id_taken` (another process took this replica's `INSTANCE_ID` over).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    reason: Option<&'static str>,
}

/// `GET /readyz`: 200 when the database answers with the audit tables in place (on SQLite:
/// the file at the path is still the one open), recent audit writes succeeded, and the
/// audit queue is below its high-water marks; else 503, with the reason in the body.
/// `duet_ready` is set to match each time.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    summary = "Readiness: can the service take and audit runs?",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; the body says which check failed and why",
            body = Readiness),
    ),
)]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let mut reason = None;
    let database = match &state.store {
        None => "ok",
        Some(store) => match store.probe().await {
            Ok(()) => "ok",
            Err(e) => {
                warn!(error = %e, reason = e.reason(), "readiness: the audit database is not usable");
                reason = Some(e.reason());
                "unavailable"
            }
        },
    };
    let writes = match state.sink.write_failure() {
        Some(why) => {
            reason.get_or_insert(why);
            "failing"
        }
        None => "ok",
    };
    let queue = if state.sink.backlogged() {
        reason.get_or_insert("audit_queue_backlogged");
        "backlogged"
    } else {
        "ok"
    };
    if state.instance.as_ref().is_some_and(|claim| claim.lost()) {
        reason.get_or_insert("instance_id_taken");
    }
    let ready = reason.is_none();
    state.metrics.ready.set(i64::from(ready));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        database,
        audit_queue: queue,
        audit_writes: writes,
        reason,
    };
    (status, Json(body)).into_response()
}
