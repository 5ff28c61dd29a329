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
    let app = spawn_app(normal_flash(), normal_pro(), &[]).await;
    let resp = app.post_stream(json!({"query": "q", "deltas": true})).await;
    let mut first = Vec::new();
    {
        use eventsource_stream::Eventsource;
        use futures::StreamExt;
        let mut stream = resp.bytes_stream().eventsource();
        // Read start and the first two events, then drop the connection.
        while first.len() < 3 {
            first.push(stream.next().await.unwrap().unwrap());
        }
    }
    let last = first.last().unwrap().id.clone();
    assert!(last.ends_with(":2"), "{last}");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let resp = resume(&app, &last).await;
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp).await;
    let run_id = last.split(':').next().unwrap();
    for (i, ev) in rest.iter().enumerate() {
        assert_eq!(ev.id, format!("{run_id}:{}", i + 3));
    }
    assert_eq!(rest.last().unwrap().event, "done");
    assert_eq!(app.flash.started(), 1, "no new run");
    assert_eq!(app.pro.started(), 1);
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
    let resp = resume(&app, "garbage").await;
    assert_eq!(resp.status(), 400);
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
