//! The OpenAI-compatible endpoints (contract §7): `POST /v1/chat/completions`, streamed and
//! not, and `GET /v1/models`, over real HTTP with scripted models. Which model answers
//! (`X-Duet-Answer`), the OpenAI error shape, refused fields, auth, cancellation and the audit
//! record of every call.

use std::time::Duration;

use duet::{
    audit::{Outcome, RunStatus, WriterOptions},
    providers::ErrorType,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{
    db::{self, count},
    helpers::*,
};

fn ask(stream: bool) -> Value {
    json!({
        "model": "duet",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "why is the sky blue?"}]},
        ],
    })
}

async fn post(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// The `data:` payloads of a streamed answer, in order (keep-alive comments left out), as
/// JSON but for the closing `[DONE]`, which is returned as the string `[DONE]`.
async fn chunks(resp: reqwest::Response) -> (Vec<Value>, String) {
    assert_eq!(header(&resp, "content-type"), Some("text/event-stream"));
    let text = resp.text().await.unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        if block.starts_with(':') {
            continue;
        }
        let data = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data line: {block:?}"));
        assert!(!data.contains('\n'), "one line per event: {block:?}");
        out.push(if data == "[DONE]" {
            json!("[DONE]")
        } else {
            serde_json::from_str(data).unwrap()
        });
    }
    (out, text)
}

/// The text the content deltas spell.
fn content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_whole_answer_is_pro_s_in_openai_shape() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-request-id", "req-7")
        .json(&ask(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-duet-answer"), Some("pro"));
    assert_eq!(header(&resp, "x-request-id"), Some("req-7"));
    let run_id = header(&resp, "x-run-id").unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    let created = body["created"].as_i64().unwrap();
    assert_eq!(
        body,
        json!({
            "id": format!("chatcmpl-{}", run_id.replace('-', "")),
            "object": "chat.completion",
            "created": created,
            "model": "duet",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                "message": {"role": "assistant", "content": "Careful final answer", "refusal": null}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            "system_fingerprint": null,
        })
    );
    // A full duet run, audited, with the whole conversation.
    let records = app.records(1).await;
    let r = &records[0];
    assert_eq!(r.run_id.to_string(), run_id);
    assert_eq!(r.status, RunStatus::Ok);
    assert_eq!(r.query, "why is the sky blue?");
    assert_eq!(r.system.as_deref(), Some("be brief"));
    assert_eq!(r.client_request_id.as_deref(), Some("req-7"));
    assert_eq!((app.flash.started(), app.pro.started()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_pro_s_chunks_then_usage_then_done() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&app, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-duet-answer"), Some("pro"));
    let run_id = header(&resp, "x-run-id").unwrap().replace('-', "");
    let (chunks, _) = chunks(resp).await;
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let chunks = &chunks[..chunks.len() - 1];
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], format!("chatcmpl-{run_id}"));
        assert_eq!(c["model"], "duet");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(content(chunks), "Careful final answer");
    // Each Pro delta is one chunk, as it came.
    assert_eq!(chunks.len(), 1 + 3 + 1 + 1, "{chunks:#?}");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["usage"], Value::Null);
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    assert_eq!(app.records(1).await[0].status, RunStatus::Ok);
}

#[tokio::test(start_paused = true)]
async fn without_include_usage_chunks_carry_no_usage() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let (chunks, _) = chunks(post(&app, ask(true)).await).await;
    assert_eq!(chunks.len(), 1 + 3 + 1 + 1);
    assert!(chunks[..5].iter().all(|c| c.get("usage").is_none()));
    assert_eq!(content(&chunks), "Careful final answer");
}

#[tokio::test(start_paused = true)]
async fn when_pro_fails_the_answer_is_flash_s() {
    let pro_fails = vec![ms(100), Step::Fail(ErrorType::ProviderError, false)];
    let app = spawn_app(normal_flash(), pro_fails.clone(), &[]).await;
    let resp = post(&app, ask(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-duet-answer"), Some("flash"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Quick answer");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
    );
    assert_eq!(app.records(1).await[0].status, RunStatus::Partial);

    // Streamed: Pro fails (at 0.1 s) before Flash has ended (0.31 s): the answer waits for
    // Flash's, then goes as one chunk.
    let app = spawn_app(normal_flash(), pro_fails, &[]).await;
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&app, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-duet-answer"), Some("flash"));
    let (chunks, _) = chunks(resp).await;
    assert_eq!(content(&chunks), "Quick answer");
    assert_eq!(
        chunks.len(),
        5,
        "role, text, finish, usage, [DONE]: {chunks:#?}"
    );
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
    assert_eq!(app.records(1).await[0].status, RunStatus::Partial);
}

#[tokio::test(start_paused = true)]
async fn when_pro_times_out_after_flash_the_stream_is_flash_s() {
    let app = spawn_app(normal_flash(), vec![Step::Hang], &[("PRO_TIMEOUT_S", "3")]).await;
    let resp = post(&app, ask(true)).await;
    assert_eq!(header(&resp, "x-duet-answer"), Some("flash"));
    let (chunks, _) = chunks(resp).await;
    assert_eq!(content(&chunks), "Quick answer");
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let r = &app.records(1).await[0];
    assert_eq!(r.pro.outcome, Outcome::Timeout);
    assert_eq!(r.status, RunStatus::Partial);
}

#[tokio::test(start_paused = true)]
async fn pro_failing_mid_stream_ends_with_an_error_chunk_and_done() {
    let pro = vec![
        ms(2000),
        Step::Delta("Careful"),
        ms(20),
        Step::Fail(ErrorType::ProviderError, true),
    ];
    let app = spawn_app(normal_flash(), pro, &[]).await;
    let mut body = ask(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&app, body).await;
    assert_eq!(header(&resp, "x-duet-answer"), Some("pro"));
    let (chunks, _) = chunks(resp).await;
    assert_eq!(content(&chunks), "Careful");
    let n = chunks.len();
    assert_eq!(chunks[n - 1], "[DONE]");
    let error = &chunks[n - 2]["error"];
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "provider_error");
    assert!(
        error["message"].as_str().unwrap().contains("pro-m failed"),
        "{error}"
    );
    // No finish and no usage after a cut-off answer.
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    assert!(chunks.iter().all(|c| c["choices"] != json!([])));
    assert_eq!(app.records(1).await[0].status, RunStatus::Partial);
}

#[tokio::test(start_paused = true)]
async fn both_failing_is_an_openai_error_with_the_run_id() {
    // Both past their deadlines: 504, streamed or not, and never a stream that started.
    for stream in [false, true] {
        let app = spawn_app(
            vec![Step::Hang],
            vec![Step::Hang],
            &[("PRO_TIMEOUT_S", "1")],
        )
        .await;
        let resp = post(&app, ask(stream)).await;
        assert_eq!(resp.status(), 504, "stream: {stream}");
        assert_eq!(header(&resp, "content-type"), Some("application/json"));
        assert!(header(&resp, "x-duet-answer").is_none());
        let run_id = header(&resp, "x-run-id").unwrap().to_owned();
        let body: Value = resp.json().await.unwrap();
        let e = &body["error"];
        assert_eq!(e["type"], "server_error");
        assert_eq!(e["code"], "timeout");
        assert_eq!(e["param"], Value::Null);
        let message = e["message"].as_str().unwrap();
        assert!(
            message.starts_with("neither model answered; pro: "),
            "{message}"
        );
        assert!(message.contains("flash: "), "{message}");
        let r = &app.records(1).await[0];
        assert_eq!(r.run_id.to_string(), run_id);
        assert_eq!(r.status, RunStatus::Failed);
    }
    // Upstream errors are a 502; an upstream rate limit on Pro is a 429.
    for (pro, status, code) in [
        (ErrorType::ProviderError, 502, "provider_error"),
        (ErrorType::RateLimited, 429, "rate_limited"),
    ] {
        let app = spawn_app(
            vec![Step::Fail(ErrorType::InvalidResponse, false)],
            vec![Step::Fail(pro, false)],
            &[],
        )
        .await;
        for stream in [false, true] {
            let resp = post(&app, ask(stream)).await;
            assert_eq!(resp.status(), status, "{code} stream: {stream}");
            // A rate limit passes: the client is told when to come back.
            let retry_after = (status == 429).then_some("1");
            assert_eq!(header(&resp, "retry-after"), retry_after, "{code}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], code);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_run_s_error_tells_what_the_events_tell_never_the_audit_detail() {
    // The audit's detail of an upstream failure (its URL, its response body) is for the
    // operator; the client reads the message the run's `error` events carry, streamed or not.
    let app = spawn_app(
        vec![Step::Fail(ErrorType::ProviderError, false)],
        vec![Step::Fail(ErrorType::ProviderError, false)],
        &[],
    )
    .await;
    for stream in [false, true] {
        let resp = post(&app, ask(stream)).await;
        assert_eq!(resp.status(), 502, "stream: {stream}");
        let body: Value = resp.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            !message.contains("upstream said no"),
            "stream: {stream}: {message}"
        );
        assert!(
            message.contains("failed (provider_error)"),
            "stream: {stream}: {message}"
        );
    }
    let records = app.records(2).await;
    assert!(
        records.iter().all(|r| r
            .pro
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("upstream said no"))),
        "the audit keeps the detail"
    );
}

#[tokio::test(start_paused = true)]
async fn fields_duet_cannot_honour_are_refused_naming_them_and_start_no_run() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let user = json!([{"role": "user", "content": "q"}]);
    for (field, value, code) in [
        ("n", json!(2), "unsupported_parameter"),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
            "unsupported_parameter",
        ),
        ("tool_choice", json!("auto"), "unsupported_parameter"),
        (
            "response_format",
            json!({"type": "json_object"}),
            "unsupported_parameter",
        ),
        ("logprobs", json!(true), "unsupported_parameter"),
        ("top_logprobs", json!(3), "unsupported_parameter"),
        ("temperature", json!(2.5), "invalid_value"),
        ("top_p", json!(1.5), "invalid_value"),
        ("frequency_penalty", json!(-3), "invalid_value"),
        ("presence_penalty", json!(2.5), "invalid_value"),
        ("stop", json!(["a", "b", "c", "d", "e"]), "invalid_value"),
        ("stop", json!(["a", ""]), "invalid_value"),
        ("seed", json!(0.5), "invalid_value"),
        ("max_tokens", json!(0), "invalid_value"),
        ("stream", json!("yes"), "invalid_value"),
        ("frobnicate", json!(1), "unknown_parameter"),
    ] {
        let mut body = json!({"model": "duet", "messages": user});
        body[field] = value;
        let resp = post(&app, body).await;
        assert_eq!(resp.status(), 400, "{field}");
        assert!(header(&resp, "x-run-id").is_none());
        let body: Value = resp.json().await.unwrap();
        let e = &body["error"];
        assert_eq!(e["type"], "invalid_request_error", "{field}");
        assert_eq!(e["param"], field, "{body}");
        assert_eq!(e["code"], code, "{field}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    // Accepted: passed on where a provider has them, or changing nothing.
    let mut body = json!({"model": "duet", "messages": user, "n": 1, "user": "u-1",
        "metadata": {"k": "v"}, "store": false, "seed": 7, "top_p": 0.5, "stop": "\n",
        "frequency_penalty": 0.1, "presence_penalty": null, "response_format": {"type": "text"},
        "logprobs": false, "tools": [], "tool_choice": "none", "reasoning_effort": "low",
        "max_completion_tokens": 100, "temperature": 0.2});
    let resp = post(&app, body.clone()).await;
    assert_eq!(resp.status(), 200);
    // Messages: a tool message, an image, a bad conversation, an unknown model.
    body = json!({"model": "duet", "messages": [{"role": "user", "content": "q"},
        {"role": "tool", "content": "r", "tool_call_id": "c1"}]});
    let resp = post(&app, body).await;
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["param"], "messages[1].role");
    let body = json!({"model": "duet", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]});
    let e: Value = post(&app, body).await.json().await.unwrap();
    assert_eq!(e["error"]["param"], "messages[0].content[0].type");
    let body = json!({"model": "duet", "messages": [{"role": "user", "content": "  "}]});
    let e: Value = post(&app, body).await.json().await.unwrap();
    assert_eq!(e["error"]["param"], "messages[0].content");
    let resp = post(&app, json!({"model": "gpt-4o", "messages": user})).await;
    assert_eq!(resp.status(), 404);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(e["error"]["param"], "model");
    // Not JSON, and not an object.
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("[\"duet\"]")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "unsupported_media_type");
    // Only the one accepted request ran.
    assert_eq!((app.flash.started(), app.pro.started()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn keys_are_required_as_on_query_and_errors_are_openai_shaped() {
    let app = spawn_app(normal_flash(), normal_pro(), &[("API_KEYS", "k-one,k-two")]).await;
    for path in ["/v1/chat/completions", "/v1/models"] {
        let req = if path == "/v1/models" {
            app.client.get(app.url(path))
        } else {
            app.client.post(app.url(path)).json(&ask(false))
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert_eq!(
            header(&resp, "www-authenticate"),
            Some("Bearer realm=\"duet\"")
        );
        let e: Value = resp.json().await.unwrap();
        assert_eq!(
            e,
            json!({"error": {"message": "a valid bearer token is required",
                "type": "authentication_error", "param": null, "code": "unauthorized"}})
        );
    }
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("k-three")
        .json(&ask(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth("k-two")
        .json(&ask(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.records(1).await.len(), 1);
    let models: Value = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth("k-one")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "duet");
    assert_eq!(models["data"][0]["object"], "model");
    let one = app
        .client
        .get(app.url("/v1/models/duet"))
        .bearer_auth("k-one")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let other = app
        .client
        .get(app.url("/v1/models/gpt-4o"))
        .bearer_auth("k-one")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let e: Value = other.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_before_pro_answers_gives_flash_s_answer() {
    // Pro cut off by the shutdown has failed as surely as by its deadline: Flash had
    // answered, so that is the answer, not "neither model answered".
    for stream in [false, true] {
        let mut app = spawn_app(
            normal_flash(),
            vec![Step::Hang],
            &[("SHUTDOWN_GRACE_S", "2")],
        )
        .await;
        let request = tokio::spawn(
            app.client
                .post(app.url("/v1/chat/completions"))
                .json(&ask(stream))
                .send(),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stop = tokio::spawn({
            let server = app.server.take().unwrap();
            async move { server.stop().await }
        });
        let resp = request.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200, "stream: {stream}");
        assert_eq!(
            header(&resp, "x-duet-answer"),
            Some("flash"),
            "stream: {stream}"
        );
        let text = if stream {
            let (chunks, _) = chunks(resp).await;
            assert_eq!(chunks.last(), Some(&json!("[DONE]")));
            content(&chunks)
        } else {
            let body: Value = resp.json().await.unwrap();
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        stop.await.unwrap().unwrap();
        let r = &app.records(1).await[0];
        assert_eq!(r.status, RunStatus::Cancelled);
        assert_eq!(text, r.flash.text, "stream: {stream}");
        assert!(!text.is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_named_twice_is_refused_naming_it_and_starts_no_run() {
    // As `/query*` does: a JSON reader that keeps the first and one that keeps the last (a
    // gateway in front, duet behind) must never see two different requests.
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let user = r#"{"role":"user","content":"hi"}"#;
    for (body, param, key) in [
        (
            format!(r#"{{"model":"duet","messages":[{user}],"messages":[{user}]}}"#),
            Value::Null,
            "messages",
        ),
        (
            format!(r#"{{"model":"duet","model":"gpt-4o","messages":[{user}]}}"#),
            Value::Null,
            "model",
        ),
        (
            r#"{"model":"duet","messages":[{"role":"system","role":"user","content":"hi"}]}"#
                .to_owned(),
            json!("messages[0]"),
            "role",
        ),
    ] {
        let resp = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(e["error"]["param"], param, "{body}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("\"{key}\" twice")), "{message}");
    }
    assert_eq!((app.flash.started(), app.pro.started()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_model_name_that_is_not_utf_8_is_an_openai_error() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .get(app.url("/v1/models/%FF%00"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(header(&resp, "content-type"), Some("application/json"));
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "model");
}

#[tokio::test(start_paused = true)]
async fn at_capacity_is_503_with_retry_after_in_openai_shape() {
    let app = spawn_app(
        vec![Step::Hang],
        vec![Step::Hang],
        &[("MAX_CONCURRENT_STREAMS", "1")],
    )
    .await;
    let hold = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": "duet", "messages": [{"role": "user", "content": "hold"}]}))
        .send();
    let open = tokio::spawn(hold);
    // Let the first request start its run.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = post(&app, ask(false)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), Some("1"));
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "overloaded");
    assert_eq!(e["error"]["type"], "server_error");
    open.abort();
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_mid_stream_cancels_the_run() {
    let pro = vec![ms(2000), Step::Delta("Careful"), Step::Hang];
    let app = spawn_app(normal_flash(), pro, &[]).await;
    let resp = post(&app, ask(true)).await;
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("Careful") {
        seen.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    assert_eq!(app.pro.dropped(), 0);
    drop(body);
    let r = &app.records(1).await[0];
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.pro.outcome, Outcome::Cancelled);
    assert_eq!(r.pro.text, "Careful");
    assert_eq!(app.pro.dropped(), 1, "the upstream call is dropped");
    assert!(r.total_ms < 3000, "cancelled at once: {}", r.total_ms);
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_before_the_answer_is_decided_cancels_the_run() {
    // The headers wait for Pro's first token; a client that leaves meanwhile is noticed.
    let app = spawn_app(normal_flash(), vec![Step::Hang], &[]).await;
    let request = post(&app, ask(true));
    let _ = tokio::time::timeout(Duration::from_secs(2), request).await;
    let r = &app.records(1).await[0];
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.pro.outcome, Outcome::Cancelled);
    assert!(r.total_ms < 3000, "cancelled at once: {}", r.total_ms);
}

#[tokio::test(start_paused = true)]
async fn keepalive_comments_fill_pro_s_silences() {
    let pro = vec![
        ms(2000),
        Step::Delta("Careful"),
        ms(3500),
        Step::Delta(" answer"),
        Step::Finish,
    ];
    let app = spawn_app(normal_flash(), pro, &[("SSE_KEEPALIVE_S", "1")]).await;
    let (chunks, text) = chunks(post(&app, ask(true)).await).await;
    assert_eq!(content(&chunks), "Careful answer");
    // 3.5 s of silence after the first token: comments at 1, 2 and 3 s.
    assert_eq!(text.matches(": keep-alive\n\n").count(), 3, "{text}");
}

/// `top_p`, `seed`, `stop` and the penalties reach both models as the run's sampling, and
/// the record's `params` keeps them beside the rest.
#[tokio::test(start_paused = true)]
async fn sampling_fields_reach_both_models_and_the_record() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let mut body = ask(false);
    let sampling = json!({"top_p": 0.5, "seed": -7, "stop": ["\n\n", "END"],
        "frequency_penalty": 0.25, "presence_penalty": -2.0});
    for (k, v) in sampling.as_object().unwrap() {
        body[k] = v.clone();
    }
    body["temperature"] = json!(0.2);
    body["user"] = json!("u-1");
    let resp = post(&app, body).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let expected = duet::conversation::Sampling {
        top_p: Some(0.5),
        seed: Some(-7),
        stop: vec!["\n\n".into(), "END".into()],
        frequency_penalty: Some(0.25),
        presence_penalty: Some(-2.0),
    };
    for model in [&app.flash, &app.pro] {
        let asked = model.requests();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].sampling, expected);
        assert_eq!(asked[0].params.temperature, Some(0.2));
    }
    let mut stored = sampling;
    stored["temperature"] = json!(0.2);
    let records = app.records(1).await;
    assert_eq!(serde_json::to_value(&records[0].params).unwrap(), stored);
    // A single string is one stop sequence.
    let mut body = ask(false);
    body["stop"] = json!("END");
    post(&app, body).await.bytes().await.unwrap();
    assert_eq!(app.pro.requests()[1].sampling.stop, ["END"]);
}

/// Every call is a run in the audit database: SQLite, through the real writer.
#[tokio::test]
async fn every_call_is_an_audited_run() {
    let db = db::sqlite().await;
    let quick = |text: &'static str| vec![ms(5), Step::Delta(text), Step::Finish];
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick("quick")),
        Scripted::new("pro-m", vec![ms(30), Step::Delta("careful"), Step::Finish]),
        &[],
        db.store.clone(),
        WriterOptions::new(db.dir.path().join("deadletter.jsonl")),
    )
    .await;
    let mut run_ids = Vec::new();
    for stream in [false, true, false] {
        let mut body = ask(stream);
        body["top_p"] = json!(0.5);
        body["stop"] = json!("END");
        let resp = post(&app, body).await;
        assert_eq!(resp.status(), 200);
        run_ids.push(
            header(&resp, "x-run-id")
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap(),
        );
        resp.bytes().await.unwrap();
    }
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(count(&db.store, "dual_runs").await, 3);
    for run_id in run_ids {
        let r = db
            .store
            .fetch(run_id)
            .await
            .unwrap()
            .expect("the run's record");
        assert_eq!(r.status, RunStatus::Ok);
        assert_eq!(r.query, "why is the sky blue?");
        assert_eq!(r.pro.text, "careful");
        // The sampling fields round-trip through the `params` column.
        assert_eq!(
            serde_json::to_value(&r.params).unwrap(),
            json!({"top_p": 0.5, "stop": ["END"]})
        );
    }
}
