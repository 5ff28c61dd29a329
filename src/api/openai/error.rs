//! Errors of the OpenAI-compatible endpoints in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Two sources: refusals made here ([`OpenAiError`]: a field duet cannot honour, an unknown
//! model, a run in which neither model answered), and duet's own [`ApiError`]s, raised by code
//! these routes share with `/query*` (the guard, body reading, capacity). Those keep their
//! status and headers (`Retry-After`, `WWW-Authenticate`) and get their body rewritten by
//! [`openai_errors`], a layer on these routes only, so `/query*` keeps duet's shape.

use std::sync::Arc;

use axum::{
    Json,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Serialize;

use crate::api::ApiError;

/// `error.type` values, as OpenAI spells them.
pub(in crate::api) const INVALID_REQUEST: &str = "invalid_request_error";
const AUTHENTICATION: &str = "authentication_error";
const RATE_LIMIT: &str = "rate_limit_error";
const SERVER: &str = "server_error";

/// A refusal or failure of a `/v1` request, answered in OpenAI's error shape.
#[derive(Debug, thiserror::Error)]
pub(in crate::api) enum OpenAiError {
    /// 400: a field duet refuses, names it in `param`.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// 404: OpenAI's answer to an unknown model.
    #[error("The model `{0}` does not exist; this service serves `duet`")]
    ModelNotFound(String),
    /// A run in which neither model answered (or that shutdown cut short): the status and
    /// `code` follow the error type, see [`run_failure_status`].
    #[error("{message}")]
    RunFailed {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// Any of duet's own errors: its status and headers, in OpenAI's shape.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl OpenAiError {
    pub(in crate::api) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        OpenAiError::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }

    pub(in crate::api) fn unsupported(
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        OpenAiError::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: "unsupported_parameter",
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiErrorBody)]
pub(in crate::api) struct Body {
    error: Detail,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = OpenAiErrorDetail)]
pub(in crate::api) struct Detail {
    /// For people; never carries internal error text, keys or upstream bodies.
    message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or `server_error`.
    r#type: &'static str,
    /// The request field at fault, when one is.
    param: Option<String>,
    /// A stable code to switch on: duet's error kind (`unauthorized`, `overloaded`, ...), a
    /// model error type (`timeout`, `provider_error`, ...), or `unsupported_parameter`,
    /// `invalid_value`, `unknown_parameter`, `model_not_found`.
    code: Option<String>,
}

impl Body {
    pub(in crate::api) fn new(
        message: String,
        r#type: &'static str,
        param: Option<String>,
        code: &str,
    ) -> Self {
        Body {
            error: Detail {
                message,
                r#type,
                param,
                code: Some(code.to_owned()),
            },
        }
    }
}

/// The HTTP status of a run in which neither model answered, from the error type of the
/// model that decides it (Pro's; Flash's when Pro has none): a deadline is 504, an upstream
/// rate limit 429, a service shutting down (`cancelled`) 503, a bug of duet's 500, anything
/// else the upstream did 502.
pub(in crate::api) fn run_failure_status(error_type: &str) -> StatusCode {
    match error_type {
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "cancelled" => StatusCode::SERVICE_UNAVAILABLE,
        "internal" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// `error.type` and `code` of one of duet's own errors. Exhaustive, so a new kind of
/// [`ApiError`] cannot reach an OpenAI client without a mapping.
fn api_type_and_code(e: &ApiError) -> (&'static str, &'static str) {
    match e {
        ApiError::BadRequest(_) => (INVALID_REQUEST, "invalid_request"),
        ApiError::PayloadTooLarge(_) => (INVALID_REQUEST, "payload_too_large"),
        ApiError::UnsupportedMediaType => (INVALID_REQUEST, "unsupported_media_type"),
        ApiError::NotFound(_) => (INVALID_REQUEST, "not_found"),
        ApiError::MethodNotAllowed => (INVALID_REQUEST, "method_not_allowed"),
        ApiError::Unauthorized => (AUTHENTICATION, "unauthorized"),
        ApiError::Overloaded { .. } => (SERVER, "overloaded"),
        ApiError::ShuttingDown { .. } => (SERVER, "shutting_down"),
        ApiError::RateLimited { .. } | ApiError::AuthThrottled { .. } => {
            (RATE_LIMIT, "rate_limited")
        }
        // OpenAI's own answer when an account's quota is spent: 429, `insufficient_quota`,
        // which its SDKs tell apart from a rate limit (no quick retry).
        ApiError::BudgetExceeded { .. } => ("insufficient_quota", "insufficient_quota"),
        ApiError::Internal(_) => (SERVER, "internal"),
    }
}

/// The `error.type` of a run failure's status.
fn run_failure_type(status: StatusCode) -> &'static str {
    if status == StatusCode::TOO_MANY_REQUESTS {
        RATE_LIMIT
    } else {
        SERVER
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, body) = match self {
            OpenAiError::Api(e) => return e.into_response(),
            OpenAiError::Invalid { param, code, .. } => (
                StatusCode::BAD_REQUEST,
                Body::new(message, INVALID_REQUEST, param, code),
            ),
            OpenAiError::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                Body::new(
                    message,
                    INVALID_REQUEST,
                    Some("model".into()),
                    "model_not_found",
                ),
            ),
            OpenAiError::RunFailed { status, code, .. } => (
                status,
                Body::new(message, run_failure_type(status), None, &code),
            ),
        };
        let mut response = (status, Json(body)).into_response();
        crate::api::error::retry_after_if_transient(&mut response);
        response
    }
}

/// Rewrites the body of any response built from an [`ApiError`] (it rides in the response's
/// extensions) into OpenAI's shape, keeping status and headers. The error stays in the
/// extensions for the logging layer outside this one.
pub(in crate::api) async fn openai_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let Some(error) = response.extensions().get::<Arc<ApiError>>().cloned() else {
        return response;
    };
    let (r#type, code) = api_type_and_code(&error);
    let body = Body::new(error.to_string(), r#type, None, code);
    let (mut parts, _) = response.into_parts();
    let json = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_failures_map_to_statuses_and_types() {
        for (error_type, status, r#type) in [
            ("timeout", 504, SERVER),
            ("rate_limited", 429, RATE_LIMIT),
            ("provider_error", 502, SERVER),
            ("invalid_response", 502, SERVER),
            ("cancelled", 503, SERVER),
            ("internal", 500, SERVER),
        ] {
            let s = run_failure_status(error_type);
            assert_eq!(s.as_u16(), status, "{error_type}");
            assert_eq!(run_failure_type(s), r#type, "{error_type}");
        }
    }

    #[test]
    fn duet_errors_keep_their_message_in_openai_shape() {
        let e = ApiError::Unauthorized;
        assert_eq!(api_type_and_code(&e), (AUTHENTICATION, "unauthorized"));
        let body = serde_json::to_value(Body::new(e.to_string(), "t", None, "c")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "a valid bearer token is required",
                "type": "t", "param": null, "code": "c"}})
        );
    }
}

pub(in crate::api) use responses::*;

/// The error answers of the `/v1` operations, for the API description: only described, the
/// handlers build them through [`OpenAiError`] and [`openai_errors`].
#[expect(dead_code, reason = "described for the document, never built")]
mod responses {
    use utoipa::ToResponse;

    use super::Body;

    /// A field duet refuses or cannot read; `param` names it.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"message": "duet gives one answer per request; \"n\" must be 1, not 2",
        "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}}))]
    pub(in crate::api) struct OpenAiBadRequest(Body);

    /// A valid bearer token is required (API_KEYS is set) and was missing or wrong.
    #[derive(ToResponse)]
    #[response(
        headers(("WWW-Authenticate" = String, description = "Bearer realm=\"duet\"")),
        example = json!({"error": {"message": "a valid bearer token is required",
            "type": "authentication_error", "param": null, "code": "unauthorized"}})
    )]
    pub(in crate::api) struct OpenAiUnauthorized(Body);

    /// No such model: this service serves `duet` only.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"message": "The model `gpt-4o` does not exist; this service serves `duet`",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}))]
    pub(in crate::api) struct OpenAiNotFound(Body);

    /// The conversation's text is larger than MAX_QUERY_BYTES, or the body larger than the
    /// service reads.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"message": "the text of the request is 40000 bytes; the limit is 32768",
        "type": "invalid_request_error", "param": null, "code": "payload_too_large"}}))]
    pub(in crate::api) struct OpenAiTooLarge(Body);

    /// The body is not sent as `application/json`.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"message": "send the body as application/json",
        "type": "invalid_request_error", "param": null, "code": "unsupported_media_type"}}))]
    pub(in crate::api) struct OpenAiUnsupportedMediaType(Body);

    /// Too many requests from this client (`code` `rate_limited`, with `Retry-After`), its
    /// key's daily budget used up (`type` and `code` `insufficient_quota`, `Retry-After` the
    /// seconds to midnight UTC), or both models were rate limited upstream.
    #[derive(ToResponse)]
    #[response(
        headers(("Retry-After" = u64, description = "Seconds to wait, when this service limits the client")),
        example = json!({"error": {"message": "too many requests; retry later",
            "type": "rate_limit_error", "param": null, "code": "rate_limited"}})
    )]
    pub(in crate::api) struct OpenAiRateLimited(Body);

    /// An internal error; the detail is in the service's log, never in the answer.
    #[derive(ToResponse)]
    #[response(example = json!({"error": {"message": "internal error",
        "type": "server_error", "param": null, "code": "internal"}}))]
    pub(in crate::api) struct OpenAiInternal(Body);
}
