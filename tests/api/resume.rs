//! `Last-Event-ID` resume (contract §4): the rest of the same run, never a new one.

use std::time::Duration;

use eventsource_stream::Eventsource;
use serde_json::json;

use crate::helpers::*;

async fn resume(app: &TestApp, last_event_id: &str) -> reqwest::Response {
    app.client
        .get(app.url("/query/stream?q=would-start-a-new-run"))
        .header("last-event-id", last_event_id)
        .send()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn resume_mid_run_replays_then_follows_live() {
    // A reconnect the server sees before it has noticed the old connection drop (the usual
    // case after a network blip): the run is still going, so the resumed stream replays what
    // was missed and then follows the run live to its end.
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let original = app.post_stream(json!({"query": "q", "deltas": true})).await;
    let run_id = original.headers()["x-run-id"].to_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let resp = resume(&app, &format!("{run_id}:0")).await;
    assert_eq!(resp.status(), 200);
    let resumed = tokio::spawn(read_events(resp));
    let all = read_events(original).await;
    let rest = resumed.await.unwrap();

    // Everything after `start` but the deltas, produced after the resume was asked for.
    let expected: Vec<&Ev> = all[1..].iter().filter(|e| e.event != "delta").collect();
    assert_eq!(names(&rest), ["flash", "pro", "done"]);
    for (got, want) in rest.iter().zip(&expected) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.data, want.data);
    }
    assert_eq!(app.flash.started(), 1, "no new run");
    assert_eq!(app.pro.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn resume_of_a_dropped_run_ends_with_its_cancelled_done() {
    // Once the server has seen the client leave, the run is cancelled at once (contract §4);
    // a later reconnect gets the rest of that run, which ends with `done: cancelled`.
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app.post_stream(json!({"query": "q"})).await;
    let run_id = resp.headers()["x-run-id"].to_str().unwrap().to_owned();
    drop(resp);
    app.records(1).await;
    let rest = read_events(resume(&app, &format!("{run_id}:0")).await).await;
    assert_eq!(names(&rest), ["done"]);
    assert_eq!(rest[0].data["status"], "cancelled");
}

#[tokio::test(start_paused = true)]
async fn resume_after_the_run_and_204_when_nothing_is_left() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);

    let resp = resume(&app, &format!("{run_id}:1")).await;
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp).await;
    assert_eq!(names(&rest), ["pro", "done"]);
    assert_eq!(rest[0].data, events[2].data);
    assert_eq!(rest[1].id, format!("{run_id}:3"));

    let resp = resume(&app, &format!("{run_id}:3")).await;
    assert_eq!(resp.status(), 204, "nothing left: EventSource must stop");
    assert_eq!(app.flash.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn resume_with_a_bad_or_unknown_id() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    // Not an id duet issued, so not one it can find.
    let resp = resume(&app, "garbage").await;
    assert_eq!(resp.status(), 404);
    let resp = resume(&app, "0192d5c4-0000-7000-8000-000000000000:0").await;
    assert_eq!(resp.status(), 404);
    assert_eq!(app.flash.started(), 0);
}

#[tokio::test(start_paused = true)]
async fn ended_runs_leave_memory_after_retention() {
    let app = spawn_app(
        vec![Step::Finish],
        vec![Step::Finish],
        &[("RESUME_RETENTION_S", "30")],
    )
    .await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    assert_eq!(resume(&app, &format!("{run_id}:0")).await.status(), 200);
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(resume(&app, &format!("{run_id}:0")).await.status(), 404);
}

/// A `duet serve` process on a free port, with fast simulated models; killed on drop.
struct Replica {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(database_url: &str, retention_s: &str) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let mut child = duet_command(dir.path())
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", database_url)
            .env("RESUME_RETENTION_S", retention_s)
            .env("SIMULATED_FLASH_TTFT_S", "0.05")
            .env("SIMULATED_FLASH_TOKEN_S", "0.001")
            .env("SIMULATED_PRO_TTFT_S", "0.1")
            .env("SIMULATED_PRO_TOKEN_S", "0.001")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (addr, _log) = listening(&mut child);
        Replica {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn another_replica_resumes_from_the_shared_database() {
    let Some(db) = crate::db::postgres("another_replica_resumes_from_the_shared_database").await
    else {
        return;
    };
    let a = Replica::start(&db.url, "300");
    let b = Replica::start(&db.url, "300");
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{}/query/stream", a.addr))
        .json(&json!({"query": "resume me elsewhere", "deltas": true}))
        .send()
        .await
        .unwrap();
    let events = read_events(resp).await;
    let run_id = check_invariants(&events);
    let run_uuid: uuid::Uuid = run_id.parse().unwrap();
    // Wait for the record to reach the database (the writer is asynchronous).
    for _ in 0..200 {
        if db.store.fetch(run_uuid).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let resume_on_b = |id: String| {
        client
            .get(format!("http://{}/query/stream", b.addr))
            .header("last-event-id", id)
            .send()
    };
    let resp = resume_on_b(format!("{run_id}:1")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp).await;
    // Everything after seq 1 except the deltas, with the ids and data replica A sent.
    let expected: Vec<&Ev> = events[2..].iter().filter(|e| e.event != "delta").collect();
    assert_eq!(
        names(&rest),
        expected
            .iter()
            .map(|e| e.event.as_str())
            .collect::<Vec<_>>()
    );
    for (got, want) in rest.iter().zip(&expected) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.data, want.data);
    }
    assert_eq!(rest.last().unwrap().event, "done");

    let last = events.last().unwrap().id.clone();
    assert_eq!(resume_on_b(last).await.unwrap().status(), 204);
    let unknown = format!("{}:0", uuid::Uuid::now_v7());
    assert_eq!(resume_on_b(unknown).await.unwrap().status(), 404);
}

#[tokio::test(start_paused = true)]
async fn an_empty_last_event_id_is_no_id() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .header("last-event-id", "")
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_events(resp).await;
    check_invariants(&events);
    assert_eq!(app.flash.started(), 1, "a new run, as without the header");
}

// ---- Issue 11: owners, limits, positions past the end, bytes, POST, SQLite ----

const KEYS: (&str, &str) = ("API_KEYS", "key-one-k1,key-two-k2");
const K1: &str = "key-one-k1";
const K2: &str = "key-two-k2";

/// A reconnect as an `EventSource`-like client with a key sends it (GET, `Last-Event-ID`).
async fn resume_as(app: &TestApp, key: Option<&str>, last_event_id: &str) -> reqwest::Response {
    let mut req = app
        .client
        .get(app.url("/query/stream?q=would-start-a-new-run"))
        .header("last-event-id", last_event_id);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

/// Status, the headers a client could tell apart (all but `date`), and the body.
async fn answer(resp: reqwest::Response) -> (u16, Vec<(String, String)>, String) {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    (status, headers, resp.text().await.unwrap())
}

async fn stream_as(app: &TestApp, key: &str, body: serde_json::Value) -> reqwest::Response {
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

/// `duet_streams_active` as `/metrics` shows it.
async fn streams_active(app: &TestApp) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("duet_streams_active "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts that k2 asking for k1's run gets exactly what an unknown id gets, and that k1
/// gets the rest of its run.
async fn only_the_owner_resumes(app: &TestApp, run_id: &str, all: &[Ev]) {
    let unknown = format!("{}:0", uuid::Uuid::now_v7());
    let not_found = answer(resume_as(app, Some(K2), &unknown).await).await;
    assert_eq!(not_found.0, 404);
    assert_eq!(
        answer(resume_as(app, Some(K2), &format!("{run_id}:0")).await).await,
        not_found,
        "another key's run must look exactly like an unknown one"
    );
    // The owner's key also finds nothing under an id it does not own: no difference there.
    assert_eq!(
        answer(resume_as(app, Some(K1), &unknown).await).await,
        not_found
    );

    let resp = resume_as(app, Some(K1), &format!("{run_id}:0")).await;
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp).await;
    let expected: Vec<&Ev> = all[1..].iter().filter(|e| e.event != "delta").collect();
    assert_eq!(rest.len(), expected.len());
    for (got, want) in rest.iter().zip(&expected) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.data, want.data);
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_is_resumed_only_with_the_key_that_started_it_from_memory() {
    let app = spawn_app(normal_flash(), normal_pro(), &[KEYS]).await;

    // While the run is live: k2 gets the unknown-id answer, k1 follows it.
    let original = stream_as(&app, K1, json!({"query": "mine", "deltas": true})).await;
    let run_id = original.headers()["x-run-id"].to_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let unknown =
        answer(resume_as(&app, Some(K2), &format!("{}:0", uuid::Uuid::now_v7())).await).await;
    assert_eq!(
        answer(resume_as(&app, Some(K2), &format!("{run_id}:0")).await).await,
        unknown
    );
    let live = tokio::spawn(read_events(
        resume_as(&app, Some(K1), &format!("{run_id}:0")).await,
    ));
    let all = read_events(original).await;
    assert_eq!(names(&live.await.unwrap()), ["flash", "pro", "done"]);

    // Once it has ended, still in memory.
    only_the_owner_resumes(&app, &run_id, &all).await;
    assert_eq!(app.flash.started(), 1, "no resume started a run");
}

#[tokio::test(start_paused = true)]
async fn without_api_keys_anyone_may_resume() {
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    let records = app.records(1).await;
    assert_eq!(records[0].owner_fingerprint, None);
    let resp = resume_as(&app, Some("whatever"), &format!("{run_id}:0")).await;
    assert_eq!(resp.status(), 200);
}

/// Resume from the audit store (the run has left memory at once: `RESUME_STORE_MAX_BYTES=0`),
/// with owners: on whichever backend `store` is.
async fn resume_from_the_store_checks_the_owner(store: duet::audit::Store) {
    let dir = tempfile::tempdir().unwrap();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", vec![ms(5), Step::Delta("quick"), Step::Finish]),
        Scripted::new("pro-m", vec![ms(30), Step::Delta("careful"), Step::Finish]),
        &[KEYS, ("RESUME_STORE_MAX_BYTES", "0")],
        store.clone(),
        duet::audit::WriterOptions::new(dir.path().join("dl.jsonl")),
    )
    .await;
    let resp = stream_as(&app, K1, json!({"query": "stored", "deltas": true})).await;
    let all = read_events(resp).await;
    let run_id = check_invariants(&all);
    let uuid: uuid::Uuid = run_id.parse().unwrap();
    let mut record = None;
    for _ in 0..400 {
        record = store.fetch(uuid).await.unwrap();
        if record.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let record = record.expect("the record reached the database");
    // The owner is stored as a fingerprint, never as the key.
    let fingerprint = record.owner_fingerprint.expect("an owner");
    assert_eq!(fingerprint.len(), 64);
    assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
    let events = serde_json::to_string(&record.events).unwrap();
    assert!(!events.contains(K1) && !fingerprint.contains(K1));

    only_the_owner_resumes(&app, &run_id, &all).await;
    // The owner, at the end: 204; past the end: the unknown-id answer.
    let last = all.last().unwrap().id.clone();
    assert_eq!(resume_as(&app, Some(K1), &last).await.status(), 204);
    let unknown =
        answer(resume_as(&app, Some(K1), &format!("{}:0", uuid::Uuid::now_v7())).await).await;
    assert_eq!(
        answer(resume_as(&app, Some(K1), &format!("{run_id}:99999")).await).await,
        unknown
    );
    assert_eq!(app.flash.started(), 1);
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn resume_from_the_store_checks_the_owner_sqlite() {
    let db = crate::db::sqlite().await;
    resume_from_the_store_checks_the_owner(db.store.clone()).await;
}

#[tokio::test]
async fn resume_from_the_store_checks_the_owner_postgres() {
    let Some(db) = crate::db::postgres("resume_from_the_store_checks_the_owner").await else {
        return;
    };
    resume_from_the_store_checks_the_owner(db.store.clone()).await;
}

#[tokio::test(start_paused = true)]
async fn resumed_streams_count_against_the_stream_limit() {
    let app = spawn_app(
        normal_flash(),
        normal_pro(),
        &[("MAX_CONCURRENT_STREAMS", "2")],
    )
    .await;
    let original = app.post_stream(json!({"query": "q"})).await;
    let run_id = original.headers()["x-run-id"].to_str().unwrap().to_owned();
    let original = tokio::spawn(read_events(original));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let first = resume(&app, &format!("{run_id}:0")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(streams_active(&app).await, 2.0, "the follower is a stream");

    // Full: a second follower is refused like a new run, before any lookup.
    for id in [format!("{run_id}:0"), format!("{}:0", uuid::Uuid::now_v7())] {
        let refused = resume(&app, &id).await;
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers()["retry-after"], "1");
    }
    assert_eq!(app.post_stream(json!({"query": "q"})).await.status(), 503);

    // A follower that leaves gives its place back.
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(streams_active(&app).await, 1.0);
    let second = resume(&app, &format!("{run_id}:0")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(names(&read_events(second).await), ["flash", "pro", "done"]);
    original.await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(streams_active(&app).await, 0.0, "every place given back");
    assert_eq!(app.flash.started(), 1);
}

#[tokio::test]
async fn replays_from_the_store_count_against_the_stream_limit() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", vec![ms(5), Step::Delta("quick"), Step::Finish]),
        Scripted::new("pro-m", vec![ms(300), Step::Delta("careful"), Step::Finish]),
        &[
            ("MAX_CONCURRENT_STREAMS", "1"),
            ("RESUME_STORE_MAX_BYTES", "0"),
        ],
        db.store.clone(),
        duet::audit::WriterOptions::new(dir.path().join("dl.jsonl")),
    )
    .await;
    let events = app.stream(json!({"query": "first"})).await;
    let run_id = check_invariants(&events);
    let uuid: uuid::Uuid = run_id.parse().unwrap();
    for _ in 0..400 {
        if db.store.fetch(uuid).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A live run holds the only place: a replay from the database is refused.
    let live = app.post_stream(json!({"query": "second"})).await;
    assert_eq!(live.status(), 200);
    let refused = resume(&app, &format!("{run_id}:0")).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    read_events(live).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let replay = resume(&app, &format!("{run_id}:0")).await;
    assert_eq!(replay.status(), 200);
    assert_eq!(names(&read_events(replay).await), ["flash", "pro", "done"]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(streams_active(&app).await, 0.0);
    app.stop().await;
    writer.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_seq_past_the_end_of_a_live_run_resends_nothing() {
    // A seq after the last event the run has sent names no event: 404, as for an unknown
    // id, whether the run is live or has ended. Never the events the client already has.
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let original = app.post_stream(json!({"query": "q", "deltas": true})).await;
    let run_id = original.headers()["x-run-id"].to_str().unwrap().to_owned();
    let mut stream = original.bytes_stream().eventsource();
    // Up to the first Flash delta (seq 1): the run is live, its log holds only `start`.
    let mut seen = Vec::new();
    while let Some(ev) = futures::StreamExt::next(&mut stream).await {
        let ev = ev.unwrap();
        seen.push(ev.id.clone());
        if ev.event == "delta" {
            break;
        }
    }
    assert_eq!(seen, [format!("{run_id}:0"), format!("{run_id}:1")]);
    let resp = resume(&app, &format!("{run_id}:99999")).await;
    assert_eq!(resp.status(), 404);
    let resp = resume(&app, &format!("{run_id}:2")).await;
    assert_eq!(resp.status(), 404, "seq 2 has not been sent yet");

    // From the delta it has (not kept for resumes): only what comes after it.
    let resp = resume(&app, &format!("{run_id}:1")).await;
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp).await;
    assert_eq!(names(&rest), ["flash", "pro", "done"]);
    for ev in &rest {
        let seq: u32 = ev.id.rsplit_once(':').unwrap().1.parse().unwrap();
        assert!(seq > 1, "{ev:?} was sent before");
    }
    while futures::StreamExt::next(&mut stream).await.is_some() {}
    // Ended: the same request is still the unknown-id answer.
    assert_eq!(resume(&app, &format!("{run_id}:99999")).await.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn the_resume_store_is_bounded_in_bytes() {
    // One short run's events take about 1 KB here, 2 KB with the per-run overhead counted: a
    // bound of 3,000 bytes keeps one ended run, not two.
    let app = spawn_app(
        vec![Step::Delta("flash"), Step::Finish],
        vec![Step::Delta("pro"), Step::Finish],
        &[("RESUME_STORE_MAX_BYTES", "3000")],
    )
    .await;
    let first = check_invariants(&app.stream(json!({"query": "one"})).await);
    assert_eq!(resume(&app, &format!("{first}:0")).await.status(), 200);
    let second = check_invariants(&app.stream(json!({"query": "two"})).await);
    assert_eq!(
        resume(&app, &format!("{first}:0")).await.status(),
        404,
        "the older run left memory (no database here)"
    );
    assert_eq!(resume(&app, &format!("{second}:0")).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn post_with_last_event_id_resumes_and_starts_no_run() {
    // The page reconnects over POST (with its body again): the header wins over the body.
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let events = app.stream(json!({"query": "q"})).await;
    let run_id = check_invariants(&events);
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .header("last-event-id", format!("{run_id}:1"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-run-id"], run_id.as_str());
    let rest = read_events(resp).await;
    assert_eq!(names(&rest), ["pro", "done"]);
    assert_eq!(rest[0].id, events[2].id);
    assert_eq!(rest[0].data, events[2].data);
    assert_eq!(app.flash.started(), 1, "no new run");
    let resp = app
        .client
        .post(app.url("/query/stream"))
        .header("last-event-id", format!("{run_id}:3"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}
