//! The request boundary's errors, their one mapping to responses, and the layer that logs them.
//!
//! Handlers return `Result<_, ApiError>` and use `?`. [`ApiError::into_response`] builds the
//! client's answer (status, JSON body, headers) and leaves the error itself in the response's
//! extensions; [`log_errors`], a layer around every route, logs it from there (the pattern of
//! axum's `examples/error-handling`). So the answer and the log line are each made in one
//! place, and an error raised in a middleware (the guard) is treated like one from a handler.

use crate::conversation::{ConversationError, ParamError};
use std::{fmt::Display, sync::Arc, time::Duration};

use axum::{
    Json,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::run::{AtCapacity, NotStarted};

/// Why a request was refused. Each variant's message is written for the client: it never
/// carries internal error text (that goes to the log).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    NotFound(String),
    #[error("this method is not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("the service is at capacity; retry later")]
    Overloaded { retry_after: Duration },
    /// Shutdown has begun: this instance starts no new run.
    #[error("the service is shutting down; retry later")]
    ShuttingDown { retry_after: Duration },
    #[error("too many requests; retry later")]
    RateLimited { retry_after: Duration },
    /// The client's address presented too many wrong keys or tokens lately; it is refused
    /// whatever it sends until `retry_after` has passed.
    #[error("too many failed authentication attempts from this address; retry later")]
    AuthThrottled { retry_after: Duration },
    /// The key's usage today reached one of its daily budgets (`budget`: the key file's
    /// name for it); refused until midnight UTC.
    #[error("this key's {budget} is used up for today; it resets at 00:00 UTC")]
    BudgetExceeded {
        budget: &'static str,
        retry_after: Duration,
    },
    /// The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

/// The stable `error.type` clients can switch on. Its schema in the API description is
/// derived from these variants, so a new kind is described as soon as it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kind {
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    Overloaded,
    RateLimited,
    BudgetExceeded,
    Internal,
}

/// Every refused request's body: `{"error": {"type", "message"}}`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorBody)]
pub(super) struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorDetail)]
pub(super) struct Inner<'a> {
    #[schema(schema_with = kind_schema)]
    r#type: Kind,
    /// For people; never carries internal error text.
    message: &'a str,
}

/// [`Kind`]'s values, inline, with the field's description.
fn kind_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    use utoipa::{
        PartialSchema,
        openapi::{RefOr, Schema},
    };
    let mut schema = Kind::schema();
    if let RefOr::T(Schema::Object(object)) = &mut schema {
        object.description = Some("What went wrong, stable for clients to switch on.".into());
    }
    schema
}

impl ApiError {
    /// The status and the kind of every error, together.
    fn status_and_kind(&self) -> (StatusCode, Kind) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, Kind::InvalidRequest),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, Kind::PayloadTooLarge),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Kind::UnsupportedMediaType,
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, Kind::NotFound),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Kind::MethodNotAllowed),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, Kind::Unauthorized),
            ApiError::Overloaded { .. } | ApiError::ShuttingDown { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, Kind::Overloaded)
            }
            ApiError::RateLimited { .. } | ApiError::AuthThrottled { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, Kind::RateLimited)
            }
            ApiError::BudgetExceeded { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, Kind::BudgetExceeded)
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, Kind::Internal),
        }
    }
}

/// `MAX_CONCURRENT_STREAMS` streams are open. The caller counts the refusal
/// (`api::count_refusal`), since that needs the metrics.
impl From<AtCapacity> for ApiError {
    fn from(AtCapacity: AtCapacity) -> Self {
        ApiError::Overloaded {
            retry_after: Duration::from_secs(1),
        }
    }
}

/// No run started: at capacity, or shutting down. Either way 503 with `Retry-After`. The
/// caller counts the refusal (`api::count_refusal`).
impl From<NotStarted> for ApiError {
    fn from(e: NotStarted) -> Self {
        match e {
            NotStarted::AtCapacity => AtCapacity.into(),
            NotStarted::ShuttingDown => ApiError::ShuttingDown {
                retry_after: Duration::from_secs(1),
            },
        }
    }
}

/// A conversation the contract's rules refuse (§7): 400 naming the field, 413 when its text
/// is over `MAX_QUERY_BYTES`.
impl From<ConversationError> for ApiError {
    fn from(e: ConversationError) -> Self {
        match e {
            ConversationError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            _ => ApiError::BadRequest(e.to_string()),
        }
    }
}

/// A generation parameter out of its range: 400 naming it.
impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// `.context(..)` for a failure the client can do nothing about: it becomes a 500 whose
/// detail (`context: error`) goes to the log and never to the client.
pub(super) trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ApiError>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, ApiError> {
        self.map_err(|e| ApiError::Internal(format!("{}: {e}", context())))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        let message = self.to_string();
        let body = Body {
            error: Inner {
                r#type: kind,
                message: &message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Overloaded { retry_after }
            | ApiError::ShuttingDown { retry_after }
            | ApiError::RateLimited { retry_after }
            | ApiError::AuthThrottled { retry_after }
            | ApiError::BudgetExceeded { retry_after, .. } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"duet\""),
                );
            }
            _ => {}
        }
        // For `log_errors`; extensions never reach the wire.
        response.extensions_mut().insert(Arc::new(self));
        response
    }
}

/// A run that failed for a reason that passes (the upstreams' rate limits: 429; a shutdown:
/// 503) says when to come back, as every other 429 and 503 of duet does: a second, the
/// same hint as a refusal at capacity. OpenAI's SDKs and HTTP clients wait that long before
/// their retry instead of guessing.
pub(super) fn retry_after_if_transient(response: &mut Response) {
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
}

/// Logs the error a response was built from, if any. Only internal errors are logged: the
/// others are the client's doing, answered and counted (`duet_requests_total`), and an
/// attacker could flood the log with them.
pub(super) async fn log_errors(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(error) = response.extensions_mut().remove::<Arc<ApiError>>()
        && let ApiError::Internal(detail) = &*error
    {
        tracing::error!(%detail, "request failed");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ApiError> {
        vec![
            ApiError::BadRequest(String::new()),
            ApiError::PayloadTooLarge(String::new()),
            ApiError::UnsupportedMediaType,
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::Unauthorized,
            ApiError::Overloaded {
                retry_after: Duration::ZERO,
            },
            ApiError::ShuttingDown {
                retry_after: Duration::ZERO,
            },
            ApiError::RateLimited {
                retry_after: Duration::ZERO,
            },
            ApiError::AuthThrottled {
                retry_after: Duration::ZERO,
            },
            ApiError::BudgetExceeded {
                budget: "daily_token_budget",
                retry_after: Duration::ZERO,
            },
            ApiError::Internal(String::new()),
        ]
    }

    /// The kinds the API description lists, read from the schema it is generated from.
    fn described_kinds() -> Vec<String> {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(Kind::schema()).unwrap();
        schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    /// The API description lists every `error.type` an error can answer, and no other.
    #[test]
    fn every_kind_is_described() {
        let described = described_kinds();
        assert_eq!(described.len(), 10, "{described:?}");
        let answered: Vec<String> = all()
            .iter()
            .map(|e| serde_json::to_value(e.status_and_kind().1).unwrap())
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        for kind in &answered {
            assert!(described.contains(kind), "{kind} is not described");
        }
        // Two variants share `rate_limited`; every kind is still answered by some variant.
        for kind in &described {
            assert!(answered.contains(kind), "{kind} is never used");
        }
    }

    #[test]
    fn context_names_what_failed_for_the_log() {
        let failed: Result<(), &str> = Err("connection reset");
        let error = failed.context(|| "reading run 7".into()).unwrap_err();
        assert!(
            matches!(&error, ApiError::Internal(d) if d == "reading run 7: connection reset"),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "internal error");
    }
}
