//! Runs visible while they run, and never lost to a crash (contract §8): the `running` row,
//! its finalization, `kill -9` on SQLite (the next start finalizes `interrupted`) and on
//! PostgreSQL (two replicas; the survivor finalizes only the dead one's run), the kill -9
//! window, and the store's upsert rules.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use chrono::Utc;
use duet::audit::{OpenStatus, RunRecord, StartedRun, Store, StoredRun};
use serde_json::json;
use uuid::Uuid;

use crate::{db, helpers::*};

/// A replica whose Pro takes `pro_ttft_s`, with the admin routes on.
fn replica(dir: &std::path::Path, url: &str, pro_ttft_s: &str, lease_s: &str) -> (Child, String) {
    crate::helpers::replica(dir, url, pro_ttft_s, lease_s, &[("ADMIN_TOKEN", "admin")])
}

/// Starts a streamed run and returns its id and the open response (dropping it would
/// cancel the run).
async fn start_run(client: &reqwest::Client, addr: &str, query: &str) -> (Uuid, reqwest::Response) {
    let resp = client
        .post(format!("http://{addr}/query/stream"))
        .json(&json!({"query": query}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-run-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (id, resp)
}

/// The run's status as stored (`running`, `interrupted`, `ok`, ...), or `None` without a row.
async fn status(store: &Store, run_id: Uuid) -> Option<String> {
    Some(match store.fetch_stored(run_id).await.unwrap()? {
        StoredRun::Ended(r) => r.record.status.as_str().to_owned(),
        StoredRun::Open(r) => r.status.as_str().to_owned(),
    })
}

/// Waits up to `within` for the run's stored status to be `want`; returns how long it took.
async fn wait_status(store: &Store, run_id: Uuid, want: &str, within: Duration) -> Duration {
    let began = Instant::now();
    loop {
        let now = status(store, run_id).await;
        if now.as_deref() == Some(want) {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "run {run_id}: still {now:?} after {within:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn metric_of(client: &reqwest::Client, addr: &str, name: &str) -> f64 {
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l[name.len() + 1..].parse().ok())
        .unwrap_or(0.0)
}

async fn get_run(client: &reqwest::Client, addr: &str, run_id: Uuid) -> serde_json::Value {
    let resp = client
        .get(format!("http://{addr}/runs/{run_id}"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn kill_9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// SQLite: a slow run's row is `running` within a second (and `GET /runs/{id}` says so);
/// after `kill -9` and a restart it is `interrupted`, counted by the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_killed_run_is_interrupted_at_the_next_start() {
    let db = db::sqlite().await;
    let dir = db.dir.path();
    let client = direct_client();
    let (child, addr) = replica(dir, &db.url, "60", "30");
    let (run_id, _open) = start_run(&client, &addr, "slow").await;
    let took = wait_status(&db.store, run_id, "running", Duration::from_secs(1)).await;
    eprintln!("running row after {took:?}");
    let row = get_run(&client, &addr, run_id).await;
    assert_eq!(row["status"], "running");
    assert_eq!(row["total_ms"], 0);
    assert!(row["flash"].is_null() && row["pro"].is_null(), "{row}");
    let instance = row["instance_id"].as_str().unwrap().to_owned();

    kill_9(child);
    assert_eq!(status(&db.store, run_id).await.as_deref(), Some("running"));
    let (child, addr) = replica(dir, &db.url, "60", "30");
    // Finalized before the new process listens.
    assert_eq!(
        status(&db.store, run_id).await.as_deref(),
        Some("interrupted")
    );
    let row = get_run(&client, &addr, run_id).await;
    assert_eq!(row["status"], "interrupted");
    assert_eq!(row["instance_id"], instance.as_str());
    assert_eq!(
        metric_of(&client, &addr, "duet_runs_interrupted_total").await,
        1.0
    );
    assert_eq!(terminate(child).await, Some(0));
}

/// A run that ends is finalized in place: one row, `running` and then its status, with both
/// traces and the same instance id; `POST /query` and streams alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_running_row_is_finalized_once_when_the_run_ends() {
    let db = db::sqlite().await;
    let client = direct_client();
    let (child, addr) = replica(db.dir.path(), &db.url, "0.6", "30");
    let (run_id, open) = start_run(&client, &addr, "q").await;
    wait_status(&db.store, run_id, "running", Duration::from_secs(1)).await;
    let instance = get_run(&client, &addr, run_id).await["instance_id"].clone();
    let events = read_events(open).await;
    assert_eq!(done(&events)["status"], "ok");
    wait_status(&db.store, run_id, "ok", Duration::from_secs(2)).await;
    let row = get_run(&client, &addr, run_id).await;
    assert_eq!(row["instance_id"], instance);
    assert_eq!(row["pro"]["outcome"], "ok");
    assert_eq!(db::count(&db.store, "dual_runs").await, 1);
    assert_eq!(db::count(&db.store, "model_traces").await, 2);
    assert_eq!(terminate(child).await, Some(0));
    assert_eq!(status(&db.store, run_id).await.as_deref(), Some("ok"));
}

/// PostgreSQL, two replicas on one database with a 2 s lease, a slow run on each; one is
/// killed. The survivor finalizes the dead one's run `interrupted` within the lease and a
/// heartbeat or two, never touches its own live run, which ends `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_survivor_finalizes_only_the_dead_replicas_runs() {
    let Some(pg) =
        db::postgres("postgres_the_survivor_finalizes_only_the_dead_replicas_runs").await
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    let (a, a_addr) = replica(tmp.path(), &pg.url, "10", "2");
    let (b, b_addr) = replica(tmp.path(), &pg.url, "10", "2");
    let (a_run, _a_open) = start_run(&client, &a_addr, "on a").await;
    let (b_run, b_open) = start_run(&client, &b_addr, "on b").await;
    let b_reader = tokio::spawn(read_events(b_open));
    wait_status(&pg.store, a_run, "running", Duration::from_secs(1)).await;
    wait_status(&pg.store, b_run, "running", Duration::from_secs(1)).await;
    let a_instance = get_run(&client, &b_addr, a_run).await["instance_id"].clone();
    let b_instance = get_run(&client, &b_addr, b_run).await["instance_id"].clone();
    assert_ne!(a_instance, b_instance);
    assert_eq!(db::count(&pg.store, "duet_instances").await, 2);

    let killed = Instant::now();
    kill_9(a);
    // Lease 2 s, heartbeats every 0.67 s: interrupted within about 3 s.
    wait_status(&pg.store, a_run, "interrupted", Duration::from_secs(8)).await;
    eprintln!(
        "dead replica's run interrupted {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        status(&pg.store, b_run).await.as_deref(),
        Some("running"),
        "a live run is never touched"
    );
    assert_eq!(db::count(&pg.store, "duet_instances").await, 1);
    assert_eq!(
        metric_of(&client, &b_addr, "duet_runs_interrupted_total").await,
        1.0
    );

    let events = tokio::time::timeout(Duration::from_secs(30), b_reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done(&events)["status"], "ok");
    wait_status(&pg.store, b_run, "ok", Duration::from_secs(2)).await;
    assert_eq!(
        status(&pg.store, a_run).await.as_deref(),
        Some("interrupted")
    );
    assert_eq!(terminate(b).await, Some(0));
    // A graceful stop deregisters.
    assert_eq!(db::count(&pg.store, "duet_instances").await, 0);
}

/// `INSTANCE_ID`: a replica restarted under the same id after `kill -9` (within the lease)
/// watches the old incarnation's heartbeat for 1.5 beats, sees it stopped, takes the id over
/// and finalizes the old runs at once, without waiting for the lease to run out. Without
/// `INSTANCE_ID` the id is the host name and the bound port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_replica_restarted_under_its_id_interrupts_its_old_runs_at_once() {
    let Some(pg) = db::postgres("postgres_a_replica_restarted_under_its_id").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    let id = [("ADMIN_TOKEN", "admin"), ("INSTANCE_ID", "edge-1")];
    // Lease 6 s (a beat every 2 s, a 3 s watch): the sweep cannot be what finalizes the run
    // before the restarted replica is listening.
    let (a, a_addr) = crate::helpers::replica(tmp.path(), &pg.url, "30", "6", &id);
    let (run, _open) = start_run(&client, &a_addr, "slow").await;
    wait_status(&pg.store, run, "running", Duration::from_secs(1)).await;
    assert_eq!(
        get_run(&client, &a_addr, run).await["instance_id"],
        "edge-1"
    );
    let killed = Instant::now();
    kill_9(a);

    let (again, again_addr) = crate::helpers::replica(tmp.path(), &pg.url, "0.01", "6", &id);
    let restarted = killed.elapsed();
    assert!(
        restarted < Duration::from_secs(6),
        "the restart took {restarted:?}: the lease, not the takeover, may have freed the id"
    );
    assert_eq!(
        status(&pg.store, run).await.as_deref(),
        Some("interrupted"),
        "finalized by the takeover, before the new incarnation serves"
    );
    assert_eq!(
        metric_of(&client, &again_addr, "duet_runs_interrupted_total").await,
        1.0
    );
    // The new incarnation's own runs carry the same id.
    let answered = post_query_to(&client, &again_addr, json!({"query": "after"})).await;
    let after: Uuid = answered.headers()["x-run-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    wait_status(&pg.store, after, "ok", Duration::from_secs(5)).await;
    assert_eq!(
        get_run(&client, &again_addr, after).await["instance_id"],
        "edge-1"
    );
    assert_eq!(terminate(again).await, Some(0));

    // Unset: host name and port.
    let (plain, plain_addr) = replica(tmp.path(), &pg.url, "0.01", "6");
    let answered = post_query_to(&client, &plain_addr, json!({"query": "plain"})).await;
    let plain_run: Uuid = answered.headers()["x-run-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    wait_status(&pg.store, plain_run, "ok", Duration::from_secs(5)).await;
    let port = plain_addr.rsplit(':').next().unwrap();
    let instance = get_run(&client, &plain_addr, plain_run).await["instance_id"].clone();
    let instance = instance.as_str().unwrap();
    assert!(instance.ends_with(&format!(":{port}")), "{instance}");
    assert!(instance.len() > port.len() + 1, "{instance}");
    assert_eq!(terminate(plain).await, Some(0));
}

/// A run left `running` under an id that is not registered (its process stopped cleanly
/// while the run's record went to the dead-letter file, so it deregistered) belongs to a
/// process that is gone. A replica that then registers that id afresh (a restart on the
/// same host and port) finalizes it as it would a dead predecessor's: otherwise no sweep
/// ever would, since the id is live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_fresh_registration_interrupts_runs_left_under_its_id() {
    let Some(pg) = db::postgres("postgres_a_fresh_registration_interrupts_runs_left").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let left = Uuid::now_v7();
    pg.store
        .write(
            Some("edge-2"),
            &[StartedRun {
                instance_id: Some("edge-2".into()),
                ..started(left)
            }],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status(&pg.store, left).await.as_deref(), Some("running"));
    let (again, again_addr) = crate::helpers::replica(
        tmp.path(),
        &pg.url,
        "0.01",
        "30",
        &[("INSTANCE_ID", "edge-2")],
    );
    assert_eq!(
        status(&pg.store, left).await.as_deref(),
        Some("interrupted"),
        "finalized before the new incarnation serves"
    );
    assert_eq!(
        metric_of(&direct_client(), &again_addr, "duet_runs_interrupted_total").await,
        1.0
    );
    assert_eq!(terminate(again).await, Some(0));
}

/// Two live replicas given one `INSTANCE_ID`: the second sees the first's heartbeat move and
/// refuses to start, with one line naming the variable; the first's run is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_live_replicas_cannot_share_an_instance_id() {
    let Some(pg) = db::postgres("postgres_two_live_replicas_cannot_share_an_instance_id").await
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    let id = [("INSTANCE_ID", "twin")];
    let (first, addr) = crate::helpers::replica(tmp.path(), &pg.url, "3", "3", &id);
    let (run, open) = start_run(&client, &addr, "slow").await;
    wait_status(&pg.store, run, "running", Duration::from_secs(1)).await;

    let out = duet_command(tmp.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &pg.url)
        .env("INSTANCE_LEASE_S", "3")
        .env("INSTANCE_ID", "twin")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("INSTANCE_ID \"twin\" is in use by a live replica"),
        "{stderr}"
    );
    assert_eq!(status(&pg.store, run).await.as_deref(), Some("running"));
    let body = open.text().await.unwrap();
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    wait_status(&pg.store, run, "ok", Duration::from_secs(5)).await;
    assert_eq!(terminate(first).await, Some(0));
}

/// A replica paused (SIGSTOP) while a twin starts under its `INSTANCE_ID` loses the id: the
/// twin sees the heartbeat stand still and takes it over. Resumed, the paused one does not
/// take it back (each would mark the other's runs interrupted in turn) and says it is not
/// ready (`instance_id_taken`), so a load balancer sends it no more runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_paused_replica_whose_id_was_taken_over_is_not_ready() {
    let Some(pg) = db::postgres("postgres_a_paused_replica_whose_id_was_taken_over").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let client = direct_client();
    let id = [("INSTANCE_ID", "paused")];
    let (paused, paused_addr) = crate::helpers::replica(tmp.path(), &pg.url, "0.01", "3", &id);
    let signal = |sig: &str, pid: u32| {
        let sent = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP", paused.id());
    let (twin, twin_addr) = crate::helpers::replica(tmp.path(), &pg.url, "0.01", "3", &id);
    signal("-CONT", paused.id());
    let readyz = |addr: String| {
        let client = client.clone();
        async move {
            let resp = client
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let began = Instant::now();
    let (status, body) = loop {
        let (status, body) = readyz(paused_addr.clone()).await;
        if status == 503 || began.elapsed() > Duration::from_secs(10) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["reason"], "instance_id_taken");
    assert_eq!(
        readyz(twin_addr.clone()).await.0,
        200,
        "the twin holds the id"
    );
    assert_eq!(terminate(paused).await, Some(0));
    assert_eq!(terminate(twin).await, Some(0));
}

/// A bad `INSTANCE_ID` stops the service at start with one line naming it.
#[test]
fn a_bad_instance_id_stops_the_service_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = duet_command(dir.path())
        .env("INSTANCE_ID", "two words")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("INSTANCE_ID"), "{stderr}");
}

/// No kill -9 window for what clients saw: a response (and with it the run's id) goes out
/// only once the run's `running` row is committed. A client starts runs every 2 ms while the
/// process is killed; after a restart every run whose id the client got has a row
/// (`interrupted`), however far apart the writer's batches are. Before, runs started in the
/// last batch interval had none: their start message was still in the writer's queue.
/// Prints how recent the youngest run was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_kill_9_leaves_no_run_a_client_saw_without_a_row() {
    let db = db::sqlite().await;
    let dir = db.dir.path();
    let client = direct_client();
    // Batches 50 ms apart: without the wait for the row, the runs of the last 50 ms
    // before the kill would have none (checked: about ten of them).
    let (child, addr) = crate::helpers::replica(
        dir,
        &db.url,
        "60",
        "30",
        &[("ADMIN_TOKEN", "admin"), ("AUDIT_BATCH_INTERVAL_MS", "50")],
    );
    // A request every 2 ms, each on a task of its own (a response waits for its row, up to
    // a batch interval): every id a client got, with when, and the responses held open.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let starter = {
        let (client, seen, addr) = (client.clone(), std::sync::Arc::clone(&seen), addr.clone());
        tokio::spawn(async move {
            let mut requests = Vec::new();
            for i in 0..400 {
                let (client, seen, addr) =
                    (client.clone(), std::sync::Arc::clone(&seen), addr.clone());
                requests.push(tokio::spawn(async move {
                    let sent = client
                        .post(format!("http://{addr}/query/stream"))
                        .json(&json!({"query": format!("q{i}")}))
                        .send()
                        .await;
                    let Ok(resp) = sent else { return None };
                    let id: Uuid = resp.headers()["x-run-id"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    seen.lock().unwrap().push((id, Instant::now()));
                    Some(resp)
                }));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            requests
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Responses that went out without their row confirmed (a commit slowed past the wait's
    // bound on a loaded machine, or a write counted as stalled): by design, so not counted.
    let unconfirmed = metric_of(&client, &addr, "duet_start_rows_unconfirmed_total").await;
    let killed = Instant::now();
    kill_9(child);
    let mut open = Vec::new();
    for request in starter.await.unwrap() {
        open.push(request.await.unwrap());
    }
    let runs = std::mem::take(&mut *seen.lock().unwrap());
    assert!(runs.len() > 20, "{} runs", runs.len());
    let (child, _) = replica(dir, &db.url, "60", "30");
    let mut youngest_with_row: Option<Duration> = None;
    let mut oldest_without_row: Option<Duration> = None;
    let mut without = 0;
    for (id, seen) in &runs {
        let age = killed.saturating_duration_since(*seen);
        match status(&db.store, *id).await {
            Some(s) => {
                assert_eq!(s, "interrupted");
                youngest_with_row = Some(youngest_with_row.map_or(age, |y| y.min(age)));
            }
            None => {
                without += 1;
                oldest_without_row = Some(oldest_without_row.map_or(age, |o| o.max(age)));
            }
        }
    }
    eprintln!(
        "kill -9: {} runs seen, {without} without a row ({unconfirmed} responses went out \
         unconfirmed); youngest with a row {youngest_with_row:?} old, oldest without \
         {oldest_without_row:?}",
        runs.len()
    );
    assert!(
        unconfirmed < runs.len() as f64 / 2.0,
        "{unconfirmed} of {} responses went out before their row was confirmed",
        runs.len()
    );
    assert!(
        without as f64 <= unconfirmed,
        "{without} runs whose id the client had are without a row, {unconfirmed} went out \
         unconfirmed (oldest {oldest_without_row:?} before the kill)"
    );
    assert_eq!(terminate(child).await, Some(0));
}

/// A second `duet serve` on the same SQLite file stops at start, before it touches the
/// rows: the first one's live run stays `running` and ends `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_process_on_the_file_stops_without_touching_live_runs() {
    let db = db::sqlite().await;
    let dir = db.dir.path();
    let client = direct_client();
    let (first, addr) = replica(dir, &db.url, "1.5", "30");
    let (run_id, open) = start_run(&client, &addr, "slow").await;
    wait_status(&db.store, run_id, "running", Duration::from_secs(1)).await;

    // A port of its own: the lock, not a taken address, must be what stops it.
    let out = duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("another duet serve already uses"),
        "{stderr}"
    );
    assert_eq!(status(&db.store, run_id).await.as_deref(), Some("running"));

    let body = open.text().await.unwrap();
    assert!(body.contains("event: done"), "{body}");
    wait_status(&db.store, run_id, "ok", Duration::from_secs(5)).await;
    assert_eq!(terminate(first).await, Some(0));
    // The lock goes with the process: the file serves again.
    let (again, _) = replica(dir, &db.url, "0.01", "30");
    assert_eq!(terminate(again).await, Some(0));
}

/// A bad `INSTANCE_LEASE_S` stops the service at start with one line naming it.
#[test]
fn a_bad_instance_lease_stops_the_service_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0.2", "thirty"] {
        let out = duet_command(dir.path())
            .env("INSTANCE_LEASE_S", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("INSTANCE_LEASE_S"), "{stderr}");
    }
}

/// A start row as a run would send it; `record` its record, when there is one (a start row
/// and its record describe the same run).
fn started_of(record: &RunRecord) -> StartedRun {
    StartedRun {
        params: None,
        owner_fingerprint: None,
        client_id: None,
        instance_id: Some("i-1".into()),
        ..StartedRun::of(record)
    }
}

fn started(run_id: Uuid) -> StartedRun {
    StartedRun {
        run_id,
        client_request_id: None,
        created_at: Utc::now(),
        query: "q".into(),
        system: None,
        conversation: None,
        params: None,
        owner_fingerprint: None,
        instance_id: Some("i-1".into()),
        client_id: None,
    }
}

/// The store's rules, on both backends: a start row never replaces anything; a record
/// finalizes a `running` row (or an `interrupted` one: the real record says more) and is
/// stored once however often it is replayed; the start row's instance id is kept.
async fn upsert_rules(store: &Store) {
    let record = db::record(1);
    let id = record.run_id;
    store
        .write(None, &[started_of(&record)], &[])
        .await
        .unwrap();
    match store.fetch_stored(id).await.unwrap() {
        Some(StoredRun::Open(r)) => {
            assert_eq!(r.status, OpenStatus::Running);
            assert_eq!(r.instance_id.as_deref(), Some("i-1"));
        }
        other => panic!("{other:?}"),
    }
    assert!(store.fetch(id).await.unwrap().is_none(), "no record yet");
    let n = store
        .write(Some("i-2"), &[], std::slice::from_ref(&record))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let stored = store.fetch(id).await.unwrap().unwrap();
    assert_eq!(stored, record);
    match store.fetch_stored(id).await.unwrap() {
        Some(StoredRun::Ended(e)) => assert_eq!(e.instance_id.as_deref(), Some("i-1")),
        other => panic!("{other:?}"),
    }
    // A second replay, and a late start row, change nothing.
    assert_eq!(
        store.insert(std::slice::from_ref(&record)).await.unwrap(),
        0
    );
    store
        .write(None, &[started_of(&record)], &[])
        .await
        .unwrap();
    assert_eq!(store.fetch(id).await.unwrap().unwrap(), stored);

    // Start and record in one batch, twice over: one row, the record.
    let other = db::record(2);
    let n = store
        .write(
            Some("i-1"),
            &[started_of(&other)],
            &[other.clone(), other.clone()],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(store.fetch(other.run_id).await.unwrap().unwrap(), other);

    // An interrupted run whose record turns up (the journal, a replay) gets it.
    let late = db::record(3);
    store.write(None, &[started_of(&late)], &[]).await.unwrap();
    assert_eq!(store.interrupt_all_running().await.unwrap(), 1);
    assert!(matches!(
        store.fetch_stored(late.run_id).await.unwrap(),
        Some(StoredRun::Open(r)) if r.status == OpenStatus::Interrupted
    ));
    assert_eq!(store.insert(std::slice::from_ref(&late)).await.unwrap(), 1);
    assert_eq!(
        store.fetch(late.run_id).await.unwrap().unwrap().status,
        late.status
    );
    assert_eq!(db::count(store, "dual_runs").await, 3);
    assert_eq!(db::count(store, "model_traces").await, 6);
}

#[tokio::test]
async fn sqlite_upsert_rules() {
    upsert_rules(&db::sqlite().await.store).await;
}

#[tokio::test]
async fn postgres_upsert_rules() {
    let Some(pg) = db::postgres("postgres_upsert_rules").await else {
        return;
    };
    upsert_rules(&pg.store).await;
}

/// Migration 0005 reverts and applies again, keeping ended runs (SQLite rebuilds both
/// tables to change the status CHECK).
#[tokio::test]
async fn migration_0005_reverts_and_reapplies_keeping_ended_runs() {
    let db = db::sqlite().await;
    let record = db::record(7);
    db.store
        .insert(std::slice::from_ref(&record))
        .await
        .unwrap();
    let running = Uuid::now_v7();
    db.store
        .write(None, &[started(running)], &[])
        .await
        .unwrap();
    assert_eq!(
        db.store.revert_to(4).await.unwrap(),
        vec![5, 6, 7, 8, 9, 10, 11]
    );
    assert_eq!(
        db::count(&db.store, "dual_runs").await,
        1,
        "the running row is gone"
    );
    assert_eq!(db::count(&db.store, "model_traces").await, 2);
    db.store.migrate().await.unwrap();
    let back = db.store.fetch(record.run_id).await.unwrap().unwrap();
    // Reverting 0007 dropped the cost columns, and their values with them.
    let mut without_cost = record;
    without_cost.cost_usd = None;
    without_cost.flash.cost_usd = None;
    without_cost.pro.cost_usd = None;
    assert_eq!(back, without_cost);
}
