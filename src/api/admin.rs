//! Operator endpoints that read the audit trail: `GET /runs/{run_id}` and `GET /readyz`.

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;
use tracing::warn;
use uuid::Uuid;

use super::{ApiError, AppState, finish};
use crate::config::Secret;

/// `GET /runs/{run_id}`: the whole audit record. Without `ADMIN_TOKEN` the route does not
/// exist as far as clients can tell (the same 404 as any unknown path).
pub(super) async fn get_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Response {
    let result = async {
        let Some(token) = &state.config.admin_token else {
            return Err(ApiError::NotFound("no such endpoint".into()));
        };
        // Authenticate before looking at the id, so that nothing about ids leaks to callers
        // without the token.
        if !bearer_matches(&headers, token) {
            return Err(ApiError::Unauthorized);
        }
        let run_id = Uuid::parse_str(&run_id)
            .map_err(|_| ApiError::BadRequest("run_id must be a UUID".into()))?;
        let Some(store) = &state.store else {
            return Err(ApiError::NotFound("no run with this id".into()));
        };
        match store.fetch(run_id).await {
            Ok(Some(record)) => Ok(Json(record).into_response()),
            // A run that just ended may still be in the writer's queue: 404 for now.
            Ok(None) => Err(ApiError::NotFound("no run with this id".into())),
            Err(e) => Err(ApiError::Internal(format!("reading run {run_id}: {e}"))),
        }
    }
    .await;
    finish(result)
}

/// True when `Authorization: Bearer X` carries the token. The comparison takes the same time
/// wherever the first differing byte is; only the token's length can be learnt from timing.
fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    super::guard::bearer(headers)
        .is_some_and(|presented| bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())))
}

/// `GET /readyz`: 200 when the database answers and the audit queue is below its high-water
/// mark, else 503. The body says which check failed.
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let database = match &state.store {
        None => "ok",
        Some(store) => match store.ping().await {
            Ok(()) => "ok",
            Err(e) => {
                warn!(error = %e, "readiness: the audit database does not answer");
                "unavailable"
            }
        },
    };
    let queue = if state.sink.backlogged() {
        "backlogged"
    } else {
        "ok"
    };
    let ready = database == "ok" && queue == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "database": database,
        "audit_queue": queue,
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = Secret::new("s3cret");
        assert!(bearer_matches(&headers("Bearer s3cret"), &token));
        assert!(bearer_matches(&headers("bearer s3cret"), &token));
        assert!(!bearer_matches(&headers("Bearer s3cre"), &token));
        assert!(!bearer_matches(&headers("Bearer s3cret2"), &token));
        assert!(!bearer_matches(&headers("Basic s3cret"), &token));
        assert!(!bearer_matches(&headers("s3cret"), &token));
        assert!(!bearer_matches(&HeaderMap::new(), &token));
    }
}
