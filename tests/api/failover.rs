//! Resume on any replica (contract §8): two `duet serve` processes on one fresh PostgreSQL
//! database. A `Last-Event-ID` reconnect that lands on the replica not running the run waits
//! for its end (keep-alives meanwhile) and gets the answer events after its seq and `done`;
//! when the running replica is killed, the wait ends with `error` (`interrupted`) and `done`
//! (`interrupted`); another key's reconnect is 404 like an unknown id. On SQLite, a reconnect
//! to a run the previous process left is answered the same way.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use duet::audit::{Store, StoredRun};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{db, helpers::*};

const OWNER: &str = "sk-test-owner";
const OTHER: &str = "sk-test-other";

/// A replica whose Pro model takes `pro_ttft_s` to answer, with both keys and quick
/// A replica whose Pro takes `pro_ttft_s`, knowing both keys, with frequent keep-alives.
fn replica(dir: &std::path::Path, url: &str, pro_ttft_s: &str, lease_s: &str) -> (Child, String) {
    let keys = format!("{OWNER},{OTHER}");
    crate::helpers::replica(
        dir,
        url,
        pro_ttft_s,
        lease_s,
        &[("API_KEYS", &keys), ("SSE_KEEPALIVE_S", "0.5")],
    )
}

/// Starts a streamed run with the owner's key; returns its id, its `start` event, and a task
/// that reads the rest of its events (keeping the run's client there, so the run goes on).
/// The reading task returns the events and when the last one came.
async fn start_run(
    client: &reqwest::Client,
    addr: &str,
) -> (Uuid, Ev, tokio::task::JoinHandle<(Vec<Ev>, Instant)>) {
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .bearer_auth(OWNER)
        .json(&json!({"query": "a slow one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let run_id = resp.headers()["x-run-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut stream = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let to_ev = |e: eventsource_stream::Event| Ev {
        event: e.event,
        id: e.id,
        data: serde_json::from_str(&e.data).unwrap(),
    };
    let start = to_ev(stream.next().await.unwrap().unwrap());
    assert_eq!(start.event, "start");
    let rest = tokio::spawn(async move {
        let mut events = Vec::new();
        // An error is the connection cut (the replica killed): the events so far.
        while let Some(Ok(e)) = stream.next().await {
            events.push(to_ev(e));
        }
        (events, Instant::now())
    });
    (run_id, start, rest)
}

/// A reconnect with `Last-Event-ID` through `addr` with `key`: the status and the raw body.
async fn resume(
    client: &reqwest::Client,
    addr: &str,
    key: &str,
    last_event_id: &str,
) -> (u16, String) {
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .bearer_auth(key)
        .header("last-event-id", last_event_id)
        .json(&json!({"query": "ignored on a resume"}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The events of a raw `text/event-stream` body (comments and `retry:` left out).
fn parse(body: &str) -> Vec<Ev> {
    body.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::to_owned)
            };
            Some(Ev {
                event: field("event: ")?,
                id: field("id: ")?,
                data: serde_json::from_str(&field("data: ")?).unwrap(),
            })
        })
        .collect()
}

async fn wait_status(store: &Store, run_id: Uuid, want: &str, within: Duration) {
    let began = Instant::now();
    loop {
        let now = match store.fetch_stored(run_id).await.unwrap() {
            Some(StoredRun::Ended(r)) => Some(r.record.status.as_str().to_owned()),
            Some(StoredRun::Open(r)) => Some(r.status.as_str().to_owned()),
            None => None,
        };
        if now.as_deref() == Some(want) {
            return;
        }
        assert!(
            began.elapsed() < within,
            "run {run_id}: {now:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn data_without_deltas(events: &[Ev]) -> Vec<(String, String, Value)> {
    events
        .iter()
        .filter(|e| e.event != "delta")
        .map(|e| (e.event.clone(), e.id.clone(), e.data.clone()))
        .collect()
}

/// A run live on A, resumed through B after its `start`: B holds the stream open with
/// keep-alives until the run ends on A, then sends what A's client got after seq 0 (its
/// answer events and `done`, deltas aside). Another key gets 404, during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_run_resumed_through_the_other_replica_waits_for_its_end() {
    let Some(pg) = db::postgres("a_live_run_resumed_through_the_other_replica").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    // Pro answers after 4 s: not near a multiple of the waiter's 3 s re-check, so an end
    // seen within a second is the notification's doing.
    let (a, a_addr) = replica(tmp.path(), &pg.url, "4", "30");
    let (b, b_addr) = replica(tmp.path(), &pg.url, "4", "30");
    let (run_id, start, a_rest) = start_run(&client, &a_addr).await;
    wait_status(&pg.store, run_id, "running", Duration::from_secs(2)).await;

    let (status, body) = resume(&client, &b_addr, OTHER, &start.id).await;
    assert_eq!((status, body.contains("not_found")), (404, true), "{body}");

    let began = Instant::now();
    let (status, body) = resume(&client, &b_addr, OWNER, &start.id).await;
    let (ended, waited) = (Instant::now(), began.elapsed());
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(": keep-alive"),
        "no keep-alive while waiting: {body}"
    );
    let (a_events, a_ended) = a_rest.await.unwrap();
    let late = ended.saturating_duration_since(a_ended);
    eprintln!("B's resume ended {late:?} after A's stream");
    assert!(late < Duration::from_secs(1), "B saw the end {late:?} late");
    let mut all = vec![start];
    all.extend(a_events);
    check_invariants(&all);
    assert_eq!(done(&all)["status"], "ok");
    // What A's client got after seq 0, deltas aside (they are not stored), in order.
    let b_events = parse(&body);
    assert_eq!(
        data_without_deltas(&b_events),
        data_without_deltas(&all[1..]),
        "B's resume is not A's stream after seq 0"
    );
    assert_eq!(names(&b_events), ["flash", "pro", "done"]);
    assert!(
        waited > Duration::from_secs(1),
        "B answered at once: {waited:?}"
    );

    // After the end, B answers from the record at once; the other key still gets 404.
    let (status, _) = resume(&client, &b_addr, OWNER, &all[all.len() - 1].id).await;
    assert_eq!(status, 204);
    let (status, _) = resume(&client, &b_addr, OTHER, &all[0].id).await;
    assert_eq!(status, 404);

    assert_eq!(terminate(a).await, Some(0));
    assert_eq!(terminate(b).await, Some(0));
}

/// `kill -9` of the replica running the run while B waits for it: B's resume ends, within
/// the lease and a heartbeat, with `error` (`interrupted`) and `done` (`interrupted`),
/// numbered after the client's seq; a later reconnect gets the same at once, another key 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_ends_the_wait_with_interrupted() {
    let Some(pg) = db::postgres("a_killed_owner_ends_the_wait_with_interrupted").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    let (mut a, a_addr) = replica(tmp.path(), &pg.url, "60", "1");
    let (b, b_addr) = replica(tmp.path(), &pg.url, "60", "1");
    let (run_id, start, _a_rest) = start_run(&client, &a_addr).await;
    wait_status(&pg.store, run_id, "running", Duration::from_secs(2)).await;

    let waiting = {
        let (client, b_addr, id) = (client.clone(), b_addr.clone(), start.id.clone());
        tokio::spawn(async move { resume(&client, &b_addr, OWNER, &id).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "B's resume did not wait");
    let killed = Instant::now();
    a.kill().unwrap();
    a.wait().unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("B's resume ends after the kill")
        .unwrap();
    eprintln!("B's resume ended {:?} after the kill", killed.elapsed());
    assert_eq!(status, 200, "{body}");
    let events = parse(&body);
    assert_eq!(names(&events), ["error", "done"], "{body}");
    assert_eq!(events[0].id, format!("{run_id}:1"));
    assert_eq!(events[0].data["error_type"], "interrupted");
    assert_eq!(events[0].data["model"], Value::Null);
    assert_eq!(events[0].data["run_id"], run_id.to_string());
    assert_eq!(events[1].id, format!("{run_id}:2"));
    assert_eq!(events[1].data["status"], "interrupted");
    wait_status(&pg.store, run_id, "interrupted", Duration::from_secs(1)).await;

    let (status, body) = resume(&client, &b_addr, OWNER, &start.id).await;
    assert_eq!(status, 200);
    assert_eq!(names(&parse(&body)), ["error", "done"]);
    let (status, _) = resume(&client, &b_addr, OTHER, &start.id).await;
    assert_eq!(status, 404);
    assert_eq!(terminate(b).await, Some(0));
}

/// SQLite (one process): a run whose process was killed is `interrupted` after the next
/// start, and a reconnect to it there gets `error` (`interrupted`) and `done` at once, as on
/// PostgreSQL; its owner check still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_reconnect_to_an_interrupted_run_gets_error_and_done() {
    let db = db::sqlite().await;
    let client = direct_client();
    let (mut a, a_addr) = replica(db.dir.path(), &db.url, "60", "30");
    let (run_id, start, _a_rest) = start_run(&client, &a_addr).await;
    wait_status(&db.store, run_id, "running", Duration::from_secs(2)).await;
    a.kill().unwrap();
    a.wait().unwrap();
    let (b, b_addr) = replica(db.dir.path(), &db.url, "60", "30");
    wait_status(&db.store, run_id, "interrupted", Duration::from_secs(1)).await;
    let (status, body) = resume(&client, &b_addr, OWNER, &start.id).await;
    assert_eq!(status, 200, "{body}");
    let events = parse(&body);
    assert_eq!(names(&events), ["error", "done"], "{body}");
    assert_eq!(events[0].data["error_type"], "interrupted");
    assert_eq!(events[1].data["status"], "interrupted");
    let (status, _) = resume(&client, &b_addr, OTHER, &start.id).await;
    assert_eq!(status, 404);
    assert_eq!(terminate(b).await, Some(0));
}
