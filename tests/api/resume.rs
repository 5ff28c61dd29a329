//! `Last-Event-ID` resume (contract §4): the rest of the same run, never a new one.

use std::time::Duration;

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
