//! The request boundary's errors and their one mapping to responses.

use std::time::Duration;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

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
    #[error("too many requests; retry later")]
    RateLimited { retry_after: Duration },
    /// The client's address presented too many wrong keys or tokens lately; it is refused
    /// whatever it sends until `retry_after` has passed.
    #[error("too many failed authentication attempts from this address; retry later")]
    AuthThrottled { retry_after: Duration },
    /// The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
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
    /// What went wrong, stable for clients to switch on.
    #[schema(schema_with = kinds_schema)]
    r#type: &'a str,
    /// For people; never carries internal error text.
    message: String,
}

/// Every `error.type` that [`ApiError::kind`] can answer, for the API description.
pub const KINDS: [&str; 9] = [
    "invalid_request",
    "payload_too_large",
    "unsupported_media_type",
    "not_found",
    "method_not_allowed",
    "unauthorized",
    "overloaded",
    "rate_limited",
    "internal",
];

fn kinds_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(KINDS))
        .description(Some("What went wrong, stable for clients to switch on."))
        .build()
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } | ApiError::AuthThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `error.type` clients can switch on.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::RateLimited { .. } | ApiError::AuthThrottled { .. } => "rate_limited",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let status = self.status();
        let body = Body {
            error: Inner {
                r#type: self.kind(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Overloaded { retry_after }
            | ApiError::RateLimited { retry_after }
            | ApiError::AuthThrottled { retry_after } => {
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
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API description lists every `error.type`: a new variant must be added to `KINDS`.
    #[test]
    fn every_kind_is_described() {
        let all = [
            ApiError::BadRequest(String::new()),
            ApiError::PayloadTooLarge(String::new()),
            ApiError::UnsupportedMediaType,
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::Unauthorized,
            ApiError::Overloaded {
                retry_after: Duration::ZERO,
            },
            ApiError::RateLimited {
                retry_after: Duration::ZERO,
            },
            ApiError::AuthThrottled {
                retry_after: Duration::ZERO,
            },
            ApiError::Internal(String::new()),
        ];
        for e in &all {
            assert!(KINDS.contains(&e.kind()), "{} is not in KINDS", e.kind());
        }
        // Two variants share `rate_limited`; every kind is still answered by some variant.
        for kind in KINDS {
            assert!(all.iter().any(|e| e.kind() == kind), "{kind} is never used");
        }
    }
}
