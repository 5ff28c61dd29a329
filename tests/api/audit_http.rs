//! The audit trail over HTTP: `GET /runs/{run_id}`, `GET /readyz`, and end to end, many
//! concurrent streams landing in the database exactly once with the values they streamed.
//!
//! These run on the real clock: SQLite answers from a worker thread, which a paused clock
//! would race (timeouts would fire while it works). The scripted models wait milliseconds.

use std::{sync::Arc, time::Duration};

use duet::{
    audit::{AuditSink, RunRecord, Store, WriterOptions},
    providers::ErrorType,
};
use futures::future::join_all;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::{
    db::{self, count},
    helpers::*,
};

fn quick_flash() -> Vec<Step> {
    vec![ms(5), Step::Delta("flash: "), Step::EchoQuery, Step::Finish]
}

fn quick_pro() -> Vec<Step> {
    vec![
        ms(30),
        Step::Delta("pro: "),
        Step::EchoQuery,
        Step::Delta(" (final)"),
        Step::Finish,
    ]
}

fn deadletter(dir: &std::path::Path) -> WriterOptions {
    WriterOptions::new(dir.join("deadletter.jsonl"))
}

async fn get(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = app.client.get(app.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

/// Polls `/runs/{id}` until the writer has stored its record.
async fn fetch_run(app: &TestApp, run_id: &str, token: &str) -> Value {
    for _ in 0..200 {
        let (status, _, body) = get(app, &format!("/runs/{run_id}"), Some(token)).await;
        // A `running` row (the start row, written before the record under load) is not
        // the record yet.
        if status == 200 && body["status"] != "running" {
            return body;
        }
        assert!(status == 404 || status == 200, "{body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {run_id} never reached the database");
}

#[tokio::test]
async fn runs_is_404_without_an_admin_token() {
    let db = db::sqlite().await;
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        &[],
        db.store.clone(),
        deadletter(db.dir.path()),
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    let (status, _, body) = get(&app, &format!("/runs/{run_id}"), Some("anything")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found");
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(count(&db.store, "dual_runs").await, 1);
}

#[tokio::test]
async fn runs_needs_the_bearer_token_and_a_valid_id() {
    let db = db::sqlite().await;
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        &[("ADMIN_TOKEN", "s3cret-token")],
        db.store.clone(),
        deadletter(db.dir.path()),
    )
    .await;
    let events = app
        .stream(json!({"query": "who am i", "system": "be brief"}))
        .await;
    let run_id = check_invariants(&events);
    let path = format!("/runs/{run_id}");

    for token in [
        None,
        Some("wrong"),
        Some("s3cret-toke"),
        Some("s3cret-token2"),
    ] {
        let (status, headers, body) = get(&app, &path, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(headers["www-authenticate"], "Bearer realm=\"duet\"");
        assert_eq!(body["error"]["type"], "unauthorized");
    }
    let (status, _, body) = get(&app, "/runs/not-a-uuid", Some("s3cret-token")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request");
    let unknown = uuid::Uuid::now_v7();
    let (status, _, body) = get(&app, &format!("/runs/{unknown}"), Some("s3cret-token")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "not_found");

    let run = fetch_run(&app, &run_id, "s3cret-token").await;
    assert_eq!(run["run_id"], run_id.as_str());
    assert_eq!(run["query"], "who am i");
    assert_eq!(run["system"], "be brief");
    assert_eq!(run["status"], "ok");
    assert_eq!(run["flash"]["text"], "flash: who am i");
    assert_eq!(run["pro"]["text"], "pro: who am i (final)");
    assert_eq!(run["pro"]["model"], "pro-m");
    assert_eq!(run["pro"]["output_tokens"], 3);
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn readyz_is_200_when_the_database_answers() {
    let db = db::sqlite().await;
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        &[],
        db.store.clone(),
        deadletter(db.dir.path()),
    )
    .await;
    let (status, _, body) = get(&app, "/readyz", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"status": "ready", "database": "ok", "audit_queue": "ok", "audit_writes": "ok"})
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn readyz_is_503_when_the_database_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let down = Store::connect_lazy("postgres://postgres@127.0.0.1:1/duet").unwrap();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        &[],
        down,
        deadletter(dir.path()),
    )
    .await;
    let (status, _, body) = get(&app, "/readyz", None).await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        json!({"status": "not_ready", "database": "unavailable", "audit_queue": "ok",
            "audit_writes": "ok", "reason": "database_timeout"})
    );
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn readyz_is_503_while_the_queue_is_above_its_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let store = db::FakeStore::gated(gate.clone());
    let metrics = duet::metrics::Metrics::new().unwrap();
    let mut options = deadletter(dir.path());
    options.high_water = 3;
    let writer = duet::audit::AuditWriter::start(store, options, metrics).unwrap();
    // The first record becomes the writer's (stuck) batch; three more wait behind it.
    writer.submit(db::record(0));
    tokio::task::yield_now().await;
    for i in 1..4 {
        writer.submit(db::record(i));
    }
    assert!(writer.backlogged());
    // Serve with the stuck writer as the sink and no database to ping.
    let flash = Scripted::new("flash-m", quick_flash());
    let pro = Scripted::new("pro-m", quick_pro());
    let app = spawn_sink(flash, pro, Arc::new(writer.clone())).await;
    let (status, _, body) = get(&app, "/readyz", None).await;
    assert_eq!(status, 503);
    assert_eq!(body["audit_queue"], "backlogged");
    gate.add_permits(100);
    // The writer starts its next transaction at most DEFAULT_BATCH_INTERVAL after the last one.
    for _ in 0..100 {
        if !writer.backlogged() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (status, _, _) = get(&app, "/readyz", None).await;
    assert_eq!(status, 200);
    writer.shutdown(Duration::from_secs(5)).await;
}

/// N concurrent streams, some with a failing Flash: exactly N runs and 2N traces, holding
/// what went out on each stream.
async fn concurrent_streams_are_stored_once(store: &Store, dir: &std::path::Path) {
    const N: usize = 30;
    let flash_scripts: Vec<Vec<Step>> = (0..N)
        .map(|i| {
            if i % 4 == 0 {
                vec![ms(5), Step::Fail(ErrorType::ProviderError, false)]
            } else {
                quick_flash()
            }
        })
        .collect();
    let (mut app, writer) = spawn_audited(
        Scripted::attempts("flash-m", flash_scripts),
        Scripted::new("pro-m", quick_pro()),
        &[],
        store.clone(),
        deadletter(dir),
    )
    .await;
    let streams =
        join_all((0..N).map(|i| app.stream(json!({"query": format!("query #{i}")})))).await;
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;

    assert_eq!(count(store, "dual_runs").await, N as i64);
    assert_eq!(count(store, "model_traces").await, 2 * N as i64);
    let mut flash_failures = 0;
    for events in &streams {
        let run_id = check_invariants(events);
        let record: RunRecord = store
            .fetch(run_id.parse().unwrap())
            .await
            .unwrap()
            .expect("every streamed run is stored");
        let done = done(events);
        assert_eq!(done["status"], record.status.as_str());
        assert_eq!(done["total_ms"], record.total_ms);
        assert_eq!(done["flash"], record.flash.outcome.as_str());
        assert_eq!(done["pro"], record.pro.outcome.as_str());
        for ev in events {
            let trace = match ev.event.as_str() {
                "flash" => &record.flash,
                "pro" => &record.pro,
                "error" => {
                    assert_eq!(ev.data["model"], "flash");
                    assert_eq!(
                        record.flash.error_type.as_deref(),
                        ev.data["error_type"].as_str()
                    );
                    flash_failures += 1;
                    continue;
                }
                _ => continue,
            };
            let d = &ev.data;
            assert_eq!(d["text"], trace.text.as_str());
            assert_eq!(d["model_name"], trace.model.as_str());
            assert_eq!(d["provider"], trace.provider.as_str());
            assert_eq!(d["model_version"], json!(trace.model_version));
            assert_eq!(d["finish_reason"], json!(trace.finish_reason));
            assert_eq!(d["latency_ms"], trace.latency_ms);
            assert_eq!(d["ttft_ms"], json!(trace.ttft_ms));
            assert_eq!(d["usage"]["input_tokens"], json!(trace.input_tokens));
            assert_eq!(d["usage"]["output_tokens"], json!(trace.output_tokens));
        }
        let query = record.query.clone();
        assert!(record.pro.text.contains(&query), "{record:?}");
    }
    assert_eq!(flash_failures, N.div_ceil(4));
    assert!(db::dead_letters(&dir.join("deadletter.jsonl")).is_empty());
}

#[tokio::test]
async fn concurrent_streams_are_stored_once_sqlite() {
    let db = db::sqlite().await;
    concurrent_streams_are_stored_once(&db.store, db.dir.path()).await;
}

#[tokio::test]
async fn concurrent_streams_are_stored_once_postgres() {
    let Some(db) = db::postgres("concurrent_streams_are_stored_once").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    concurrent_streams_are_stored_once(&db.store, dir.path()).await;
}
