//! Bad input gets a clear JSON error and no run (contract §3).

use serde_json::{Value, json};

use crate::helpers::*;

async fn expect_error(resp: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(resp.status(), status);
    assert!(
        resp.headers().get("x-run-id").is_none(),
        "no run was started"
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    body
}

#[tokio::test]
async fn bad_bodies_are_400_with_json_errors() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let bodies = [
        "",
        "{",
        "not json",
        "[]",
        "\"query\"",
        "null",
        "{}",
        r#"{"query": null}"#,
        r#"{"query": 42}"#,
        r#"{"query": ["a"]}"#,
        r#"{"query": ""}"#,
        r#"{"query": "   \n\t "}"#,
        r#"{"query": "ok", "deltas": "yes"}"#,
        r#"{"query": "ok", "system": 5}"#,
    ];
    for path in ["/query/stream", "/query"] {
        for body in bodies {
            let resp = app
                .client
                .post(app.url(path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            expect_error(resp, 400, "invalid_request").await;
        }
    }
    assert!(app.sink.records().is_empty(), "no run started");
    assert_eq!(app.flash.started(), 0);
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = app
            .client
            .post(app.url("/query/stream"))
            .body(r#"{"query":"q"}"#);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        expect_error(req.send().await.unwrap(), 415, "unsupported_media_type").await;
    }
    // Parameters on the media type are fine.
    let resp = app
        .client
        .post(app.url("/query"))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"query":"q"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn oversized_query_is_413() {
    let app = spawn_app(normal_flash(), normal_pro(), &[("MAX_QUERY_BYTES", "100")]).await;
    let ok = "a".repeat(100);
    let too_big = "a".repeat(101);
    let resp = app.post_stream(json!({"query": too_big})).await;
    expect_error(resp, 413, "payload_too_large").await;
    let resp = app
        .post_stream(json!({"query": "q", "system": too_big}))
        .await;
    expect_error(resp, 413, "payload_too_large").await;
    // A huge body is cut off without reading it all.
    let resp = app
        .post_stream(json!({"query": "a".repeat(1_000_000)}))
        .await;
    expect_error(resp, 413, "payload_too_large").await;
    let resp = app
        .client
        .get(app.url(&format!("/query/stream?q={too_big}")))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "payload_too_large").await;
    let resp = app.post_query(json!({"query": ok})).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bad_get_parameters_are_400() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    for q in [
        "",
        "?",
        "?deltas=1",
        "?q=",
        "?q=%20%20",
        "?q=hi&deltas=maybe",
    ] {
        let resp = app
            .client
            .get(app.url(&format!("/query/stream{q}")))
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, "invalid_request").await;
    }
}

#[tokio::test]
async fn bad_request_id_is_400() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .header("x-request-id", "x".repeat(201))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_request").await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app.client.get(app.url("/nope")).send().await.unwrap();
    expect_error(resp, 404, "not_found").await;
    let resp = app
        .client
        .delete(app.url("/query/stream"))
        .send()
        .await
        .unwrap();
    expect_error(resp, 405, "method_not_allowed").await;
    let resp = app.client.get(app.url("/query")).send().await.unwrap();
    expect_error(resp, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn unknown_last_event_id_is_404_not_a_new_run() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .get(app.url("/query/stream?q=hi"))
        .header("last-event-id", "0192d5c4-0000-7000-8000-000000000000:3")
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found").await;
    assert_eq!(app.flash.started(), 0);
}

#[tokio::test]
async fn healthz_answers() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn unicode_blank_queries_are_400() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    for q in ["\u{85}", "\u{a0}\u{2028}", "\u{feff}", "\u{3000} \t"] {
        let resp = app.post_stream(json!({"query": q})).await;
        expect_error(resp, 400, "invalid_request").await;
    }
}

/// Issue 11, item 7: axum answers HEAD with the GET handler, so `HEAD /query/stream?q=...`
/// started a real run (200, an audit row `cancelled`, a rate-limit token spent). HEAD is
/// refused before anything else looks at the request.
#[tokio::test(start_paused = true)]
async fn head_starts_no_run_and_spends_no_token() {
    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[("RATE_LIMIT_PER_MINUTE", "1"), ("RATE_LIMIT_BURST", "1")],
    )
    .await;
    for _ in 0..3 {
        let resp = app
            .client
            .head(app.url("/query/stream?q=hello"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()["allow"], "GET, POST");
        assert!(resp.headers().get("x-run-id").is_none(), "no run started");
        assert_eq!(resp.headers()["content-type"], "application/json");
    }
    // A HEAD that would resume is refused the same way.
    let resp = app
        .client
        .head(app.url("/query/stream"))
        .header("last-event-id", "0192d5c4-0000-7000-8000-000000000000:3")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(app.flash.started(), 0);
    assert!(app.sink.records().is_empty(), "no audit record");
    // The one token of the bucket is still there.
    let resp = app
        .client
        .get(app.url("/query/stream?q=hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the HEADs spent no rate-limit token");
    read_events(resp).await;

    // Every 405 of the route names the same methods; the JSON error shape is the usual one.
    let resp = app
        .client
        .delete(app.url("/query/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "GET, POST");
    expect_error(resp, 405, "method_not_allowed").await;
    let resp = app.client.head(app.url("/query")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    // Routes that start nothing keep answering HEAD like GET.
    for path in ["/healthz", "/readyz", "/metrics", "/", "/openapi.json"] {
        let resp = app.client.head(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "HEAD {path}");
    }
    assert_eq!(app.flash.started(), 1);
}

/// Issue 11, item 9: the query string was percent-decoded lossily, so `q=%FF%FE` ran (and was
/// audited) as U+FFFD U+FFFD, a query the client never sent.
#[tokio::test]
async fn invalid_utf8_in_the_query_string_is_400() {
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &[]).await;
    for (q, named) in [
        ("?q=%FF%FE", Some("\"q\"")),
        ("?q=caf%C3", Some("\"q\"")),
        ("?q=hi&system=%C3%28", Some("\"system\"")),
        ("?q=hi&deltas=%FF", Some("\"deltas\"")),
        ("?q=hi&other=%E2%82", Some("\"other\"")),
        ("?q=hi&%FF=1", None),
    ] {
        let resp = app
            .client
            .get(app.url(&format!("/query/stream{q}")))
            .send()
            .await
            .unwrap();
        let body = expect_error(resp, 400, "invalid_request").await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("UTF-8"), "{q}: {message}");
        if let Some(name) = named {
            assert!(message.contains(name), "{q}: {message}");
        }
    }
    assert_eq!(app.flash.started(), 0);
    assert!(app.sink.records().is_empty());
    // Well-formed UTF-8, percent-encoded or as `+` for spaces, is taken as sent.
    let resp = app
        .client
        .get(app.url("/query/stream?q=%C3%A9t%C3%A9+%F0%9F%8C%9E&system=be%20brief"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_events(resp).await;
    let records = app.records(1).await;
    assert_eq!(records[0].query, "été 🌞");
    assert_eq!(records[0].system.as_deref(), Some("be brief"));
}

/// Issue 11, item 11: serde reads a struct from an array by position, so `["hello","sys"]`
/// ran as query "hello" with system "sys". Contract §7: only an object is a body, an unknown
/// field is refused by name, and a wrong-typed field is named.
#[tokio::test]
async fn arrays_unknown_fields_and_wrong_types_are_400_naming_the_problem() {
    let app = spawn_app(vec![Step::Finish], vec![Step::Finish], &[]).await;
    let cases = [
        (r#"["hello","sys"]"#, "must be a JSON object"),
        (" \n [\"hello\"]", "must be a JSON object"),
        (r#"["hello","sys",true]"#, "must be a JSON object"),
        (r#"{"query": "hi", "temprature": 0.5}"#, "temprature"),
        (r#"{"query": "hi", "Query": "hi"}"#, "Query"),
        (r#"{"query": 42}"#, "\"query\""),
        (r#"{"query": "hi", "system": 5}"#, "\"system\""),
        (r#"{"query": "hi", "deltas": "yes"}"#, "\"deltas\""),
        (
            r#"{"query": "hi"} {"query": "again"}"#,
            "more after the JSON value",
        ),
    ];
    for path in ["/query/stream", "/query"] {
        for (body, named) in cases {
            let resp = app
                .client
                .post(app.url(path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let err = expect_error(resp, 400, "invalid_request").await;
            let message = err["error"]["message"].as_str().unwrap();
            assert!(message.contains(named), "{path} {body}: {message}");
        }
    }
    assert_eq!(app.flash.started(), 0);
    assert!(app.sink.records().is_empty(), "no run started");
    // The fields the contract names still work, null included where a field is optional.
    let resp = app
        .client
        .post(app.url("/query"))
        .header("content-type", "application/json")
        .body(r#" {"query": "hi", "system": null, "deltas": null} "#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
