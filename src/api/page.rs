//! The browser pages: the page that asks both models (`GET /`) and the operators' console
//! (`GET /admin`), their scripts and stylesheets, the Markdown renderer they share
//! (`markdown.js`) and two vendored libraries (marked renders answers as Markdown, DOMPurify
//! sanitizes the result), all compiled into the binary, so they work with no CDN and no build
//! step. `static/vendor/` holds the libraries as `scripts/vendor-page-libs.sh` fetched them.
//!
//! The console is only HTML and script: what it shows comes from the admin API (`/runs`,
//! `/runs/{run_id}`), which checks the token on every request, so the page itself is served
//! to anyone, like `/`.
//!
//! Caching: the page links every asset as `PATH?v=VERSION`, VERSION a hash of the asset's
//! bytes. An asset asked for with its current version may be cached for good (a new binary
//! with other bytes links another URL); asked for without it, or with a stale one (a page from
//! an older replica during a rollout), it must be revalidated. Either way it carries an `ETag`,
//! so a revalidation costs a 304.

use std::sync::LazyLock;

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use super::AppState;

/// One file the page loads, as compiled into the binary.
struct Asset {
    /// Where the router serves it; also the name the page's HTML links it by.
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
}

const SCRIPT: Asset = Asset {
    path: "/app.js",
    body: include_str!("../../static/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    path: "/app.css",
    body: include_str!("../../static/app.css"),
    content_type: "text/css; charset=utf-8",
};
const MARKED: Asset = Asset {
    path: "/vendor/marked.umd.js",
    body: include_str!("../../static/vendor/marked.umd.js"),
    content_type: "text/javascript; charset=utf-8",
};
const PURIFY: Asset = Asset {
    path: "/vendor/purify.min.js",
    body: include_str!("../../static/vendor/purify.min.js"),
    content_type: "text/javascript; charset=utf-8",
};
const MARKDOWN: Asset = Asset {
    path: "/markdown.js",
    body: include_str!("../../static/markdown.js"),
    content_type: "text/javascript; charset=utf-8",
};
const CONSOLE_SCRIPT: Asset = Asset {
    path: "/admin.js",
    body: include_str!("../../static/admin.js"),
    content_type: "text/javascript; charset=utf-8",
};
const CONSOLE_STYLE: Asset = Asset {
    path: "/admin.css",
    body: include_str!("../../static/admin.css"),
    content_type: "text/css; charset=utf-8",
};
/// Every asset, each served by its index here (see the handlers).
const ASSETS: [&Asset; 7] = [
    &SCRIPT,
    &STYLE,
    &MARKED,
    &PURIFY,
    &MARKDOWN,
    &CONSOLE_SCRIPT,
    &CONSOLE_STYLE,
];

const INDEX: &str = include_str!("../../static/index.html");
const CONSOLE: &str = include_str!("../../static/admin.html");

/// Only our own scripts and styles may run: no inline code, no third parties. Images only
/// from here or `data:` (the page drops images from answers anyway, so that an answer cannot
/// make the browser call out to a tracker).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The version of an asset: FNV-1a of its bytes, in hex. Not a defence against anything,
/// only a name that changes when the bytes do.
fn version(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The versions of [`ASSETS`], in its order, computed once.
static VERSIONS: LazyLock<[String; 7]> = LazyLock::new(|| ASSETS.map(|a| version(a.body)));

/// A page's HTML with every asset link carrying its version (`href="/app.js"` becomes
/// `href="/app.js?v=…"`).
fn linked(html: &str) -> String {
    ASSETS
        .iter()
        .zip(VERSIONS.iter())
        .fold(html.to_owned(), |html, (asset, v)| {
            html.replace(
                &format!("\"{}\"", asset.path),
                &format!("\"{}?v={v}\"", asset.path),
            )
        })
}

/// The page's HTML, linked; the key placeholder is filled per request.
static INDEX_LINKED: LazyLock<String> = LazyLock::new(|| linked(INDEX));

/// The console's HTML, linked.
static CONSOLE_LINKED: LazyLock<String> = LazyLock::new(|| linked(CONSOLE));

fn secured(mut response: Response, content_type: &'static str, cache: &'static str) -> Response {
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
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

/// Serves asset number `index` of [`ASSETS`]: 304 when the client's `If-None-Match` already
/// names it, cached for good only when asked for by its current version.
fn serve(index: usize, uri: &Uri, headers: &HeaderMap) -> Response {
    let asset = ASSETS[index];
    let v = &VERSIONS[index];
    let etag = format!("\"{v}\"");
    let current = uri
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == format!("v={v}")));
    let cache = if current {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    // `If-None-Match` may list several tags, or `*`; weak ones (`W/"…"`) match too (RFC 9110
    // §13.1.2 compares them weakly).
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*");
    let response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let mut response = secured(response, asset.content_type, cache);
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// The browser page.
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200,
    description = "The page that holds a conversation with both models and shows both answers \
        as they stream",
    content_type = "text/html; charset=utf-8", body = String)))]
pub(super) async fn index(State(state): State<AppState>) -> Response {
    // The page needs to know whether to ask for a key; it is told nothing else.
    let auth = if state.guard.keys().current().is_empty() {
        "false"
    } else {
        "true"
    };
    secured(
        INDEX_LINKED
            .replace("__AUTH_REQUIRED__", auth)
            .into_response(),
        "text/html; charset=utf-8",
        "no-cache",
    )
}

/// The page's script.
#[utoipa::path(get, path = "/app.js", tag = "page", params(AssetVersion), responses(
    (status = 200, description = "The page's script",
        content_type = "text/javascript; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn script(uri: Uri, headers: HeaderMap) -> Response {
    serve(0, &uri, &headers)
}

/// The page's stylesheet.
#[utoipa::path(get, path = "/app.css", tag = "page", params(AssetVersion), responses(
    (status = 200, description = "The page's stylesheet",
        content_type = "text/css; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn style(uri: Uri, headers: HeaderMap) -> Response {
    serve(1, &uri, &headers)
}

/// marked, the Markdown renderer of the page (vendored, see static/vendor/VERSIONS).
#[utoipa::path(get, path = "/vendor/marked.umd.js", tag = "page", params(AssetVersion),
    responses(
    (status = 200, description = "marked, the page's Markdown renderer (MIT licence)",
        content_type = "text/javascript; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn marked(uri: Uri, headers: HeaderMap) -> Response {
    serve(2, &uri, &headers)
}

/// DOMPurify, the HTML sanitizer of the page (vendored, see static/vendor/VERSIONS).
#[utoipa::path(get, path = "/vendor/purify.min.js", tag = "page", params(AssetVersion),
    responses(
    (status = 200, description = "DOMPurify, the page's HTML sanitizer (MPL-2.0 or Apache-2.0)",
        content_type = "text/javascript; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn purify(uri: Uri, headers: HeaderMap) -> Response {
    serve(3, &uri, &headers)
}

/// The Markdown renderer both pages share: marked and DOMPurify set up for model answers.
#[utoipa::path(get, path = "/markdown.js", tag = "page", params(AssetVersion), responses(
    (status = 200, description = "The pages' Markdown renderer: how answers become safe HTML",
        content_type = "text/javascript; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn markdown(uri: Uri, headers: HeaderMap) -> Response {
    serve(4, &uri, &headers)
}

/// The operators' console.
#[utoipa::path(get, path = "/admin", tag = "page", responses((status = 200,
    description = "The operators' console: the runs of the audit trail, filtered and paged, \
        a chart of runs, failures and agreement over time, and each run with both answers \
        and their timings. It asks for the admin token and sends it as a header to /runs \
        and /runs/{run_id}; without ADMIN_TOKEN configured it says the admin API is off.",
    content_type = "text/html; charset=utf-8", body = String)))]
pub(super) async fn console() -> Response {
    secured(
        CONSOLE_LINKED.as_str().into_response(),
        "text/html; charset=utf-8",
        "no-cache",
    )
}

/// The console's script.
#[utoipa::path(get, path = "/admin.js", tag = "page", params(AssetVersion), responses(
    (status = 200, description = "The operators' console's script",
        content_type = "text/javascript; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn console_script(uri: Uri, headers: HeaderMap) -> Response {
    serve(5, &uri, &headers)
}

/// The console's stylesheet (on top of the page's).
#[utoipa::path(get, path = "/admin.css", tag = "page", params(AssetVersion), responses(
    (status = 200, description = "The operators' console's stylesheet",
        content_type = "text/css; charset=utf-8", body = String),
    (status = 304, description = "The copy named in `If-None-Match` is current")))]
pub(super) async fn console_style(uri: Uri, headers: HeaderMap) -> Response {
    serve(6, &uri, &headers)
}

/// The version an asset is linked with, for caching only: any value serves the same bytes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // read from the URI by `serve`; this struct only documents it
struct AssetVersion {
    /// The asset's current version (as the page links it): the answer may then be cached for
    /// good. Without it, or with another, the answer must be revalidated.
    v: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_link_every_asset_by_its_current_version() {
        let index_only = ["/app.js"];
        let console_only = ["/admin.js", "/admin.css"];
        for (asset, v) in ASSETS.iter().zip(VERSIONS.iter()) {
            let linked = format!("\"{}?v={v}\"", asset.path);
            if !console_only.contains(&asset.path) {
                assert!(INDEX_LINKED.contains(&linked), "{linked} missing in /");
            }
            if !index_only.contains(&asset.path) {
                assert!(
                    CONSOLE_LINKED.contains(&linked),
                    "{linked} missing in /admin"
                );
            }
        }
        for html in [&*INDEX_LINKED, &*CONSOLE_LINKED] {
            assert!(!html.contains(".js\""), "an unversioned script link");
            assert!(!html.contains(".css\""), "an unversioned stylesheet link");
        }
        assert_ne!(VERSIONS[0], version("other bytes"));
    }

    #[test]
    fn every_asset_is_served_by_its_own_index() {
        // The handlers name assets by index: a reordered array must fail here, not serve the
        // wrong file.
        let expected = [
            "/app.js",
            "/app.css",
            "/vendor/marked.umd.js",
            "/vendor/purify.min.js",
            "/markdown.js",
            "/admin.js",
            "/admin.css",
        ];
        assert_eq!(ASSETS.map(|a| a.path), expected);
    }

    #[test]
    fn cached_for_good_only_by_current_version_and_304_on_a_matching_tag() {
        let v = &VERSIONS[2];
        let current: Uri = format!("/vendor/marked.umd.js?v={v}").parse().unwrap();
        let stale: Uri = "/vendor/marked.umd.js?v=0000".parse().unwrap();
        let response = serve(2, &current, &HeaderMap::new());
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let response = serve(2, &stale, &HeaderMap::new());
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", W/\"{v}\"")).unwrap(),
        );
        let response = serve(2, &stale, &headers);
        assert_eq!(response.status(), 304);
        assert_eq!(
            response.headers()[header::ETAG],
            format!("\"{v}\"").as_str()
        );
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(serve(2, &stale, &headers).status(), 200);
    }
}
