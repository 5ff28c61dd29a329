//! The browser page (`GET /`): one HTML page, its script and stylesheet, compiled into the
//! binary, so it works with no CDN and no build step.

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

use super::AppState;

const INDEX: &str = include_str!("../../static/index.html");
const SCRIPT: &str = include_str!("../../static/app.js");
const STYLE: &str = include_str!("../../static/app.css");

/// Only our own script and styles may run: no inline code, no third parties.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(body: String, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The browser page.
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200,
    description = "The page that runs a query and shows both answers as they stream",
    content_type = "text/html; charset=utf-8", body = String)))]
pub(super) async fn index(State(state): State<AppState>) -> Response {
    // The page needs to know whether to ask for a key; it is told nothing else.
    let auth = if state.config.api_keys.is_empty() {
        "false"
    } else {
        "true"
    };
    asset(
        INDEX.replace("__AUTH_REQUIRED__", auth),
        "text/html; charset=utf-8",
    )
}

/// The page's script.
#[utoipa::path(get, path = "/app.js", tag = "page", responses((status = 200,
    description = "The page's script", content_type = "text/javascript; charset=utf-8",
    body = String)))]
pub(super) async fn script() -> Response {
    asset(SCRIPT.to_owned(), "text/javascript; charset=utf-8")
}

/// The page's stylesheet.
#[utoipa::path(get, path = "/app.css", tag = "page", responses((status = 200,
    description = "The page's stylesheet", content_type = "text/css; charset=utf-8",
    body = String)))]
pub(super) async fn style() -> Response {
    asset(STYLE.to_owned(), "text/css; charset=utf-8")
}
