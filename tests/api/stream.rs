//! The event stream: ordering, deadlines, failures, cancellation (contract §4).

use std::time::Duration;

use duet::{audit::Outcome, audit::RunStatus};
use serde_json::json;

use crate::helpers::*;

#[tokio::test(start_paused = true)]
async fn normal_run_streams_start_flash_pro_done() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "why is the sky blue?"})).await;
    let run_id = check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "pro", "done"]);

    let start = &events[0].data;
    assert_eq!(
        start["models"]["flash"],
        json!({"provider": "scripted", "model": "flash-m"})
    );
    assert_eq!(
        start["models"]["pro"],
        json!({"provider": "scripted", "model": "pro-m"})
    );

    let flash = &events[1].data;
    assert_eq!(flash["model"], "flash");
    assert_eq!(flash["provider"], "scripted");
    assert_eq!(flash["model_name"], "flash-m");
    assert_eq!(flash["model_version"], "flash-m-v1");
    assert_eq!(flash["text"], "Quick answer");
    assert_eq!(flash["finish_reason"], "stop");
    assert_eq!(flash["ttft_ms"], 300);
    assert_eq!(flash["latency_ms"], 310);
    assert_eq!(
        flash["usage"],
        json!({"input_tokens": 7, "output_tokens": 2})
    );

    let pro = &events[2].data;
    assert_eq!(pro["model"], "pro");
    assert_eq!(pro["text"], "Careful final answer");
    assert_eq!(pro["ttft_ms"], 2000);
    assert_eq!(pro["latency_ms"], 2040);

    assert_eq!(
        done(&events),
        &json!({"run_id": run_id, "status": "ok", "flash": "ok", "pro": "ok", "total_ms": 2040,
                "cost_usd": null, "agreement": 0.4})
    );

    let records = app.records(1).await;
    let r = &records[0];
    assert_eq!(r.run_id.to_string(), run_id);
    assert_eq!(r.run_id.get_version_num(), 7, "run ids are UUIDv7");
    assert_eq!(r.status, RunStatus::Ok);
    assert_eq!(r.query, "why is the sky blue?");
    assert_eq!(r.total_ms, 2040);
    assert_eq!(r.flash.text, "Quick answer");
    assert_eq!(r.flash.outcome, Outcome::Ok);
    assert_eq!(r.pro.text, "Careful final answer");
    assert_eq!(r.pro.output_tokens, Some(3));
    assert_eq!(r.pro.model_version.as_deref(), Some("pro-m-v1"));
    assert_eq!(r.service_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test(start_paused = true)]
async fn flash_timeout_then_pro_ok() {
    let slow_pro = vec![ms(7000), Step::Delta("final"), Step::Finish];
    let app = spawn_app(vec![Step::Hang], slow_pro, &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "pro", "done"]);
    let err = &events[1].data;
    assert_eq!(err["model"], "flash");
    assert_eq!(err["error_type"], "timeout");
    assert_eq!(err["retryable"], true);
    assert_eq!(
        err["message"],
        "flash did not finish within its deadline (5.0 s)"
    );
    let d = done(&events);
    assert_eq!(
        (d["status"].as_str(), d["flash"].as_str(), d["pro"].as_str()),
        (Some("ok"), Some("timeout"), Some("ok"))
    );
    assert_eq!(d["total_ms"], 7000);
    let r = &app.records(1).await[0];
    assert_eq!(r.flash.outcome, Outcome::Timeout);
    assert_eq!(r.flash.latency_ms, 5000);
    assert_eq!(r.flash.error_type.as_deref(), Some("timeout"));
}

#[tokio::test(start_paused = true)]
async fn pro_timeout_flash_ok_is_partial() {
    let app = spawn_app(
        normal_flash(),
        vec![Step::Hang],
        &[("PRO_TIMEOUT_S", "2.5")],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "error", "done"]);
    assert_eq!(events[2].data["model"], "pro");
    assert_eq!(events[2].data["error_type"], "timeout");
    let d = done(&events);
    assert_eq!(d["status"], "partial");
    assert_eq!(d["flash"], "ok");
    assert_eq!(d["pro"], "timeout");
    assert_eq!(d["total_ms"], 2500);
}

#[tokio::test(start_paused = true)]
async fn both_time_out_is_failed() {
    let app = spawn_app(
        vec![ms(900), Step::Finish],
        vec![Step::Hang],
        &[("FLASH_TIMEOUT_S", "0.5"), ("PRO_TIMEOUT_S", "1.25")],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "error", "done"]);
    assert_eq!(events[1].data["model"], "flash");
    assert_eq!(
        events[1].data["message"],
        "flash did not finish within its deadline (0.5 s)"
    );
    assert_eq!(events[2].data["model"], "pro");
    let d = done(&events);
    assert_eq!(
        (
            d["status"].as_str(),
            d["flash"].as_str(),
            d["pro"].as_str(),
            d["total_ms"].as_u64()
        ),
        (Some("failed"), Some("timeout"), Some("timeout"), Some(1250))
    );
    let r = &app.records(1).await[0];
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(app.flash.dropped(), 1);
    assert_eq!(app.pro.dropped(), 1);
}

#[tokio::test(start_paused = true)]
async fn pro_first_skips_flash_and_drops_its_call() {
    let flash = vec![ms(3000), Step::Delta("too late"), Step::Finish];
    let pro = vec![ms(1000), Step::Delta("final"), Step::Finish];
    let app = spawn_app(flash, pro, &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "pro", "done"]);
    let d = done(&events);
    assert_eq!(
        (d["status"].as_str(), d["flash"].as_str(), d["pro"].as_str()),
        (Some("ok"), Some("skipped"), Some("ok"))
    );
    assert_eq!(d["total_ms"], 1000, "the run ends with Pro, not with Flash");
    assert_eq!(app.flash.dropped(), 1, "the Flash call was dropped");
    let r = &app.records(1).await[0];
    assert_eq!(r.flash.outcome, Outcome::Skipped);
    assert_eq!(r.flash.text, "");
}

#[tokio::test(start_paused = true)]
async fn provider_error_is_an_error_event() {
    let pro = vec![
        ms(100),
        Step::Fail(duet::providers::ErrorType::ProviderError, false),
    ];
    let app = spawn_app(normal_flash(), pro, &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "flash", "done"]);
    let err = &events[1].data;
    assert_eq!(err["model"], "pro");
    assert_eq!(err["error_type"], "provider_error");
    assert_eq!(err["retryable"], false);
    assert_eq!(err["message"], "pro-m failed (provider_error)");
    assert_eq!(done(&events)["status"], "partial");
    assert_eq!(done(&events)["pro"], "error");
    let r = &app.records(1).await[0];
    // The record keeps the detail that clients never see.
    assert_eq!(
        r.pro.error_message.as_deref(),
        Some("upstream said no to pro-m")
    );
    assert_eq!(app.pro.started(), 1, "a non-retryable error is not retried");
}

#[tokio::test(start_paused = true)]
async fn retryable_error_before_first_token_is_retried() {
    let pro = Scripted::attempts(
        "pro-m",
        vec![
            vec![
                ms(50),
                Step::Fail(duet::providers::ErrorType::RateLimited, true),
            ],
            vec![ms(500), Step::Delta("second try"), Step::Finish],
        ],
    );
    let app = spawn_with(Scripted::new("flash-m", normal_flash()), pro, &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "pro", "done"]);
    assert_eq!(events[2].data["text"], "second try");
    assert_eq!(app.pro.started(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_retry_after_the_first_token() {
    let pro = Scripted::attempts(
        "pro-m",
        vec![
            vec![
                ms(50),
                Step::Delta("half"),
                Step::Fail(duet::providers::ErrorType::ProviderError, true),
            ],
            vec![Step::Delta("never"), Step::Finish],
        ],
    );
    let app = spawn_with(Scripted::new("flash-m", normal_flash()), pro, &[]).await;
    let events = app.stream(json!({"query": "q", "deltas": true})).await;
    check_invariants(&events);
    assert_eq!(
        names(&events),
        ["start", "delta", "error", "delta", "delta", "flash", "done"]
    );
    assert_eq!(app.pro.started(), 1);
    let r = &app.records(1).await[0];
    assert_eq!(r.pro.text, "half", "the partial text is kept in the record");
}

#[tokio::test(start_paused = true)]
async fn truncated_stream_is_invalid_response() {
    let pro = vec![ms(100), Step::Delta("cut"), Step::End];
    let app = spawn_app(normal_flash(), pro, &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "flash", "done"]);
    assert_eq!(events[1].data["error_type"], "invalid_response");
}

#[tokio::test(start_paused = true)]
async fn provider_panic_is_contained() {
    let app = spawn_app(vec![ms(100), Step::Panic], normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "pro", "done"]);
    let err = &events[1].data;
    assert_eq!(err["model"], "flash");
    assert_eq!(err["error_type"], "internal");
    assert!(
        !err["message"].as_str().unwrap().contains("panic"),
        "no internals leak"
    );
    assert_eq!(done(&events)["status"], "ok");
    assert_eq!(done(&events)["flash"], "error");

    // The service is still healthy afterwards.
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn provider_that_never_answers_times_out() {
    let app = spawn_app(vec![Step::Hang], vec![Step::Hang], &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "error", "done"]);
    assert_eq!(
        done(&events)["total_ms"],
        45_000,
        "the default Pro deadline"
    );
    assert_eq!(done(&events)["status"], "failed");
}

#[tokio::test(start_paused = true)]
async fn first_token_and_stall_deadlines() {
    let flash = vec![ms(800), Step::Delta("slow start"), Step::Finish];
    let pro = vec![ms(100), Step::Delta("starts"), ms(20_000), Step::Finish];
    let app = spawn_app(
        flash,
        pro,
        &[("FLASH_TTFT_TIMEOUT_S", "0.5"), ("STALL_TIMEOUT_S", "3")],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "error", "error", "done"]);
    assert_eq!(
        events[1].data["message"],
        "flash sent no first token within its deadline (0.5 s)"
    );
    assert_eq!(events[2].data["message"], "pro stalled mid-answer (3.0 s)");
    assert_eq!(done(&events)["total_ms"], 3100);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"duet_model_timeouts_total{kind="first_token",model="flash",model_name="flash-m",provider="scripted"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"duet_model_timeouts_total{kind="stall",model="pro",model_name="pro-m",provider="scripted"} 1"#));
}

/// The stall deadline runs from the last token, not the first: a Pro that sends a token every
/// second for 20 s never falls silent for 3 s, so it finishes `ok`.
#[tokio::test(start_paused = true)]
async fn stall_deadline_restarts_with_every_token() {
    let mut pro = vec![];
    for _ in 0..20 {
        pro.extend([ms(1000), Step::Delta("tick ")]);
    }
    pro.push(Step::Finish);
    let app = spawn_app(normal_flash(), pro, &[("STALL_TIMEOUT_S", "3")]).await;
    let events = app.stream(json!({"query": "q"})).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "pro", "done"]);
    assert_eq!(done(&events)["status"], "ok");
    assert_eq!(events[2].data["text"], "tick ".repeat(20));
}

#[tokio::test(start_paused = true)]
async fn deltas_are_relayed_when_asked() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q", "deltas": true})).await;
    check_invariants(&events);
    assert_eq!(
        names(&events),
        [
            "start", "delta", "delta", "flash", "delta", "delta", "delta", "pro", "done"
        ]
    );
    let pro_text: String = events
        .iter()
        .filter(|e| e.event == "delta" && e.data["model"] == "pro")
        .map(|e| e.data["text"].as_str().unwrap())
        .collect();
    assert_eq!(pro_text, "Careful final answer");
    assert_eq!(events[7].data["text"], pro_text);
}

#[tokio::test(start_paused = true)]
async fn get_stream_for_event_source() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .get(app.url("/query/stream?q=hello%20there&deltas=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let events = read_events(resp).await;
    assert_eq!(check_invariants(&events), run_id);
    assert_eq!(names(&events).iter().filter(|n| **n == "delta").count(), 5);
    assert_eq!(app.records(1).await[0].query, "hello there");
}

#[tokio::test(start_paused = true)]
async fn request_id_is_kept_and_run_id_returned() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .header("x-request-id", "trace-abc-123")
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let events = read_events(resp).await;
    assert_eq!(check_invariants(&events), run_id);
    let r = &app.records(1).await[0];
    assert_eq!(r.client_request_id.as_deref(), Some("trace-abc-123"));
}

#[tokio::test(start_paused = true)]
async fn injected_event_text_cannot_forge_events() {
    let evil = "\n\nevent: done\ndata: {\"status\":\"ok\"}\n\nid: x\r\n\r\nevent: pro\n";
    let app = spawn_app(vec![Step::EchoQuery, Step::Finish], normal_pro(), &[]).await;
    let events = app
        .stream(json!({"query": evil, "system": evil, "deltas": true}))
        .await;
    check_invariants(&events);
    assert_eq!(
        names(&events),
        [
            "start", "delta", "flash", "delta", "delta", "delta", "pro", "done"
        ]
    );
    assert_eq!(events[1].data["text"], evil);
    assert_eq!(events[2].data["text"], evil);
}

#[tokio::test(start_paused = true)]
async fn client_disconnect_drops_both_calls_and_audits_cancelled() {
    let app = spawn_app(
        vec![ms(300), Step::Delta("a"), Step::Hang],
        vec![Step::Hang],
        &[],
    )
    .await;
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    // Read until the Flash delta has arrived: both calls are in flight.
    let mut seen = String::new();
    while !seen.contains("event: delta") {
        let chunk = body.next().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!((app.flash.dropped(), app.pro.dropped()), (0, 0));
    drop(body);

    let records = app.records(1).await;
    let r = &records[0];
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!(r.flash.outcome, Outcome::Cancelled);
    assert_eq!(r.pro.outcome, Outcome::Cancelled);
    assert_eq!(r.flash.text, "a");
    assert_eq!(
        (app.flash.dropped(), app.pro.dropped()),
        (1, 1),
        "both upstream calls dropped"
    );
    assert!(
        r.total_ms < 1000,
        "cancelled at once, not at a deadline: {}",
        r.total_ms
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("duet_client_disconnects_total 1"));
    assert!(metrics.contains("duet_streams_active 0"));
}

#[tokio::test(start_paused = true)]
async fn keepalive_comments_fill_silence() {
    let app = spawn_app(
        normal_flash(),
        vec![ms(3500), Step::Finish],
        &[("SSE_KEEPALIVE_S", "1")],
    )
    .await;
    let text = app
        .post_stream(json!({"query": "q"}))
        .await
        .text()
        .await
        .unwrap();
    // Silence runs from Flash (0.31 s) to Pro (3.5 s): keep-alives at 1.31, 2.31 and 3.31 s.
    assert_eq!(text.matches(": keep-alive\n\n").count(), 3, "{text}");
    assert!(text.starts_with("retry: 2000\n\nevent: start\n"));
}

/// Keep-alives fill silence only: events every 0.5 s with `SSE_KEEPALIVE_S=1` leave no
/// second without an event, so no keep-alive goes out (a keep-alive on a plain timer would
/// send one each second).
#[tokio::test(start_paused = true)]
async fn no_keepalive_while_events_flow() {
    let mut pro = vec![];
    for _ in 0..6 {
        pro.extend([ms(500), Step::Delta("tick ")]);
    }
    pro.extend([ms(500), Step::Finish]);
    let app = spawn_app(
        vec![ms(250), Step::Delta("quick"), Step::Finish],
        pro,
        &[("SSE_KEEPALIVE_S", "1")],
    )
    .await;
    let text = app
        .post_stream(json!({"query": "q", "deltas": true}))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("event: done\n"), "{text}");
    assert_eq!(text.matches("event: delta\n").count(), 7, "{text}");
    assert_eq!(text.matches(": keep-alive").count(), 0, "{text}");
}

#[tokio::test(start_paused = true)]
async fn slow_reader_does_not_make_the_service_buffer() {
    // 64 KiB per delta: a reader that does not read fills the bounded channel and the
    // socket buffers, and then the run stops pulling from the upstream.
    const BIG: &str = include_str!("big_delta.txt");
    let mut flash = vec![];
    for _ in 0..2000 {
        flash.push(Step::Delta(BIG));
    }
    flash.push(Step::Finish);
    let app = spawn_app(flash, vec![Step::Hang], &[]).await;
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pulled = app.flash.yielded.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        pulled < 300,
        "pulled {pulled} of 2000 deltas for a client that reads nothing"
    );
    drop(resp);
}

#[tokio::test(start_paused = true)]
async fn post_query_answers_one_document() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app.post_query(json!({"query": "q"})).await;
    assert_eq!(resp.status(), 200);
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["run_id"], run_id.as_str());
    assert_eq!(body["status"], "ok");
    assert_eq!(body["flash"]["text"], "Quick answer");
    assert_eq!(body["flash"]["outcome"], "ok");
    assert_eq!(body["pro"]["text"], "Careful final answer");
    assert_eq!(body["pro"]["usage"]["output_tokens"], 3);
    assert_eq!(body["total_ms"], 2040);

    let app = spawn_app(
        vec![Step::Hang],
        vec![Step::Hang],
        &[("PRO_TIMEOUT_S", "1")],
    )
    .await;
    let resp = app.post_query(json!({"query": "q"})).await;
    assert_eq!(resp.status(), 502);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["pro"]["error_type"], "timeout");
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_open_streams_with_done() {
    let mut app = spawn_app(
        normal_flash(),
        vec![Step::Hang],
        &[("SHUTDOWN_GRACE_S", "2")],
    )
    .await;
    let resp = app.post_stream(json!({"query": "q"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = tokio::spawn({
        let server = app.server.take().unwrap();
        async move { server.stop().await }
    });
    let events = read_events(resp).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "error", "done"]);
    assert_eq!(events[2].data["model"], serde_json::Value::Null);
    assert_eq!(events[2].data["error_type"], "cancelled");
    let d = done(&events);
    assert_eq!(
        (d["status"].as_str(), d["flash"].as_str(), d["pro"].as_str()),
        (Some("cancelled"), Some("ok"), Some("cancelled"))
    );
    assert_eq!(
        d["total_ms"], 2500,
        "cancelled when the grace period ran out"
    );
    stop.await.unwrap().unwrap();
    assert_eq!(app.records(1).await[0].status, RunStatus::Cancelled);
}

/// `POST /query` whose run the shutdown cut short: 503, and when to retry (elsewhere).
#[tokio::test(start_paused = true)]
async fn a_whole_answer_cut_by_shutdown_is_503_with_retry_after() {
    let mut app = spawn_app(
        vec![Step::Hang],
        vec![Step::Hang],
        &[("SHUTDOWN_GRACE_S", "2")],
    )
    .await;
    let request = tokio::spawn(
        app.client
            .post(format!("http://{}/query", app.addr))
            .json(&json!({"query": "q"}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = tokio::spawn({
        let server = app.server.take().unwrap();
        async move { server.stop().await }
    });
    let resp = request.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "cancelled");
    stop.await.unwrap().unwrap();
}

/// A request still arriving when shutdown begins starts no run: 503 with `Retry-After`, so
/// its client goes elsewhere, rather than a stream the hard stop might cut before `done`.
#[tokio::test(start_paused = true)]
async fn a_request_that_finishes_arriving_after_shutdown_began_starts_no_run() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = spawn_app(
        normal_flash(),
        vec![Step::Hang],
        &[("SHUTDOWN_GRACE_S", "2")],
    )
    .await;
    let body = br#"{"query": "late"}"#;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /query/stream HTTP/1.1\r\nhost: duet\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop = tokio::spawn({
        let server = app.server.take().unwrap();
        async move { server.stop().await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    socket.write_all(&body[5..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer))
        .await
        .expect("answered, then closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("the service is shutting down"), "{answer}");
    assert!(!answer.contains("event:"), "no stream: {answer}");
    stop.await.unwrap().unwrap();
    assert!(
        app.sink.records().is_empty(),
        "no run started, so no record"
    );
    assert_eq!(app.flash.started(), 0, "no model was called");
}

#[tokio::test(start_paused = true)]
async fn simulated_provider_streams_by_default() {
    // No scripted parts: the configured (simulated) providers, as `cargo run` has them.
    let sink = duet::audit::MemorySink::new();
    let parts =
        duet::server::Parts::from_config(config(&[]), std::sync::Arc::new(sink.clone())).unwrap();
    let server = duet::server::Server::start(parts).await.unwrap();
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{}/query/stream", server.addr))
        .json(&json!({"query": "What is duet?"}))
        .send()
        .await
        .unwrap();
    let events = read_events(resp).await;
    check_invariants(&events);
    assert_eq!(names(&events), ["start", "flash", "pro", "done"]);
    assert_eq!(
        events[0].data["models"]["flash"],
        json!({"provider": "simulated", "model": "simulated-flash"})
    );
    assert_eq!(events[1].data["ttft_ms"], 300);
    assert_eq!(events[2].data["ttft_ms"], 2000);
    assert!(
        events[2].data["text"]
            .as_str()
            .unwrap()
            .starts_with("Considered answer on \u{201c}What is duet?\u{201d}:")
    );
    server.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_reading_cannot_hold_the_run_or_shutdown() {
    const BIG: &str = include_str!("big_delta.txt");
    let mut flash = vec![];
    for _ in 0..2000 {
        flash.push(Step::Delta(BIG));
    }
    flash.push(Step::Finish);
    let mut app = spawn_app(flash, vec![Step::Hang], &[("SHUTDOWN_GRACE_S", "1")]).await;
    // Keep the connection open and never read from it.
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(120), app.stop())
        .await
        .expect("shutdown finishes despite the stalled reader");
    let r = &app.records(1).await[0];
    assert_eq!(r.status, RunStatus::Cancelled);
    assert_eq!((app.flash.dropped(), app.pro.dropped()), (1, 1));
    drop(resp);
}

/// A reader that stopped reading, then reads again after the shutdown's grace ran out, is
/// still told why its stream ends: the shutdown's `error` has a channel slot of its own, as
/// `done` has, so a full buffer no longer drops it.
#[tokio::test(start_paused = true)]
async fn a_stalled_reader_still_gets_the_shutdown_error_before_done() {
    const BIG: &str = include_str!("big_delta.txt");
    let mut flash = vec![];
    for _ in 0..2000 {
        flash.push(Step::Delta(BIG));
    }
    flash.push(Step::Finish);
    let mut app = spawn_app(
        flash,
        vec![Step::Hang],
        &[("SHUTDOWN_GRACE_S", "1"), ("CLIENT_WRITE_TIMEOUT_S", "60")],
    )
    .await;
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    // Not read: the run's buffer fills.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = tokio::spawn({
        let server = app.server.take().unwrap();
        async move { server.stop().await }
    });
    // The grace period runs out while nothing is read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = read_events(resp).await;
    let tail: Vec<&str> = events
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|e| e.event.as_str())
        .collect();
    assert_eq!(tail, ["error", "done"]);
    let error = &events[events.len() - 2];
    assert_eq!(error.data["error_type"], "cancelled");
    check_invariants(&events);
    stop.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_stops_reading_is_let_go_after_the_write_timeout() {
    const BIG: &str = include_str!("big_delta.txt");
    let mut flash = vec![];
    for _ in 0..2000 {
        flash.push(Step::Delta(BIG));
    }
    flash.push(Step::Finish);
    let app = spawn_app(
        flash,
        vec![Step::Hang],
        &[("CLIENT_WRITE_TIMEOUT_S", "5"), ("FLASH_TIMEOUT_S", "60")],
    )
    .await;
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    let r = &app.records(1).await[0];
    assert_eq!(r.status, RunStatus::Cancelled);
    assert!(r.total_ms >= 5000 && r.total_ms < 6000, "{}", r.total_ms);
    assert_eq!(
        (app.flash.dropped(), app.pro.dropped()),
        (1, 1),
        "upstream calls freed"
    );
    // The connection is cut too, not kept until the reader drains it: reading now gets what
    // the kernel had buffered, then a broken body, never the rest of the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = tokio::time::timeout(Duration::from_secs(120), resp.bytes())
        .await
        .expect("the server closed the connection");
    assert!(body.is_err(), "the stream was cut off, not delivered");
}
