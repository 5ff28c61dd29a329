//! The operators' console (`GET /admin`): the page and its assets are served with the CSP and
//! their content types whether the admin API is on or off, and the answers the console's
//! script reads (the admin-off message, 401) are the ones it expects. What it does in a
//! browser is e2e/admin.test.mjs.

use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use serde_json::Value;

use crate::helpers::*;

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every `src="…"`/`href="…"` of a page that points at this service.
fn links(html: &str) -> Vec<String> {
    html.split(['"', '\''])
        .filter(|part| part.starts_with('/') && part.contains("?v="))
        .map(str::to_owned)
        .collect()
}

fn assert_secured(resp: &reqwest::Response, content_type: &str, what: &str) {
    let h = resp.headers();
    assert_eq!(h[CONTENT_TYPE], content_type, "{what}");
    let csp = h[CONTENT_SECURITY_POLICY].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{what}: {directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
}

/// Fetches the console and each asset it links, checks their headers, and returns the page.
async fn console(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/admin")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_secured(&resp, HTML, "/admin");
    assert_eq!(resp.headers()[CACHE_CONTROL], "no-cache");
    let html = resp.text().await.unwrap();

    let linked = links(&html);
    let mut paths: Vec<&str> = linked
        .iter()
        .map(|l| l.split_once('?').unwrap().0)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/admin.css",
            "/admin.js",
            "/app.css",
            "/markdown.js",
            "/vendor/marked.umd.js",
            "/vendor/purify.min.js",
        ]
    );
    for link in &linked {
        let resp = app.client.get(app.url(link)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{link}");
        let expected = if link.contains(".css?") { CSS } else { JS };
        assert_secured(&resp, expected, link);
        assert_eq!(
            resp.headers()[CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{link}: linked by its current version"
        );
    }
    for (path, expected) in [("/admin.js", JS), ("/admin.css", CSS), ("/markdown.js", JS)] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_secured(&resp, expected, path);
        assert_eq!(
            resp.headers()[CACHE_CONTROL],
            "no-cache",
            "{path} unversioned"
        );
    }
    html
}

#[tokio::test]
async fn the_console_is_served_with_its_assets_and_the_csp_whether_the_admin_api_is_on_or_off() {
    let mut off = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let mut on = spawn_app(
        normal_flash(),
        normal_pro(),
        &[("ADMIN_TOKEN", "console-t")],
    )
    .await;
    let html_off = console(&off).await;
    let html_on = console(&on).await;
    // The page is the same for everyone: it learns whether the API is on by asking /runs.
    assert_eq!(html_off, html_on);
    // Nothing inline for the CSP to refuse: every script has a src, no style element or
    // attribute.
    assert_eq!(
        html_on.matches("<script").count(),
        html_on.matches("<script src=\"/").count()
    );
    assert!(!html_on.contains("<style") && !html_on.contains(" style="));
    // The token field has no name, so that no form submission can put it in a URL.
    let field = html_on
        .split("<input id=\"token\"")
        .nth(1)
        .and_then(|rest| rest.split('>').next())
        .expect("the token field");
    assert!(field.contains("type=\"password\"") && !field.contains("name="));

    // The console keeps the token in a variable: its script never names browser storage.
    let script = on
        .client
        .get(on.url("/admin.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for api in [
        "localStorage",
        "sessionStorage",
        "document.cookie",
        "indexedDB",
        "console.log",
        "console.debug",
        "console.info",
        "console.warn",
        "console.error",
    ] {
        assert!(!script.contains(api), "admin.js uses {api}");
    }
    off.stop().await;
    on.stop().await;
}

/// The console tells "off" from "wants the token" by these answers of `/runs` to a request
/// without a token: 404 with a message it matches on ("admin API is off"), or 401.
#[tokio::test]
async fn runs_answers_the_console_without_a_token_as_it_expects() {
    let mut off = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = off
        .client
        .get(off.url("/runs?limit=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("admin API is off"), "{message}");
    let script = include_str!("../../static/admin.js");
    assert!(
        script.contains("/admin API is off/"),
        "the script matches it"
    );
    off.stop().await;

    let mut on = spawn_app(
        normal_flash(),
        normal_pro(),
        &[("ADMIN_TOKEN", "console-t")],
    )
    .await;
    let resp = on.client.get(on.url("/runs?limit=1")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = on
        .client
        .get(on.url("/runs?limit=1"))
        .bearer_auth("console-t")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    on.stop().await;
}
