//! Audit retention and privacy (contract §10): `AUDIT_RETENTION_DAYS` and `duet audit purge`
//! delete old ended runs and nothing else, on SQLite and PostgreSQL; `AUDIT_STORE_TEXT=none`
//! leaves no query, system prompt, answer or error message in the database, the journal or
//! the dead-letter file, and a run stored that way can still be resumed.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use chrono::{DateTime, Utc};
use duet::{
    audit::{RunRecord, StartedRun, Store, StoredEvent, WriterOptions, privacy},
    config::StoreText,
    metrics::Metrics,
};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{
    db::{self, count},
    helpers,
};

const QUICK: [(&str, &str); 4] = [
    ("SIMULATED_FLASH_TTFT_S", "0.01"),
    ("SIMULATED_FLASH_TOKEN_S", "0.001"),
    ("SIMULATED_PRO_TTFT_S", "0.02"),
    ("SIMULATED_PRO_TOKEN_S", "0.001"),
];

fn days_ago(days: i64) -> DateTime<Utc> {
    db::now_micros() - chrono::Duration::days(days)
}

fn record_at(i: usize, created_at: DateTime<Utc>) -> RunRecord {
    RunRecord {
        created_at,
        ..db::record(i)
    }
}

/// 2,500 runs 40 days old (more than two purge batches), 3 runs 10 days old, and a
/// `running` row 40 days old; then `duet audit purge --older-than 30`.
async fn purge_deletes_old_ended_runs_only(store: &Store, url: &str) {
    let old: Vec<RunRecord> = (0..2_500).map(|i| record_at(i, days_ago(40))).collect();
    for chunk in old.chunks(250) {
        store.insert(chunk).await.unwrap();
    }
    let recent: Vec<RunRecord> = (0..3).map(|i| record_at(i, days_ago(10))).collect();
    store.insert(&recent).await.unwrap();
    let running = StartedRun {
        run_id: uuid::Uuid::now_v7(),
        client_request_id: None,
        created_at: days_ago(40),
        query: "still going".into(),
        system: None,
        conversation: None,
        params: None,
        owner_fingerprint: None,
        instance_id: None,
        client_id: None,
    };
    store
        .write(Some("some-instance"), std::slice::from_ref(&running), &[])
        .await
        .unwrap();
    assert_eq!(count(store, "dual_runs").await, 2_504);

    let dir = tempfile::tempdir().unwrap();
    let out = helpers::duet_command(dir.path())
        .env("DATABASE_URL", url)
        .args(["audit", "purge", "--older-than", "30"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("purged: 2500 runs created before "),
        "{stdout}"
    );
    assert_eq!(count(store, "dual_runs").await, 4);
    assert_eq!(
        count(store, "model_traces").await,
        6,
        "traces went with their runs"
    );
    for r in &recent {
        assert!(store.fetch(r.run_id).await.unwrap().is_some());
    }
    assert!(store.fetch_stored(running.run_id).await.unwrap().is_some());
    // So nothing older than the cut-off is left but the running row.

    // Again: nothing left to do.
    let out = helpers::duet_command(dir.path())
        .env("DATABASE_URL", url)
        .args(["audit", "purge", "--older-than", "30"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("purged: 0 runs"));
}

#[tokio::test]
async fn purge_deletes_old_ended_runs_only_sqlite() {
    let db = db::sqlite().await;
    purge_deletes_old_ended_runs_only(&db.store, &db.url).await;
}

#[tokio::test]
async fn purge_deletes_old_ended_runs_only_postgres() {
    let Some(db) = db::postgres("purge_deletes_old_ended_runs_only").await else {
        return;
    };
    purge_deletes_old_ended_runs_only(&db.store, &db.url).await;
}

/// `AUDIT_RETENTION_DAYS` purges in the background, soon after start, and counts it.
#[tokio::test]
async fn retention_days_purges_in_the_background() {
    let db = db::sqlite().await;
    let old: Vec<RunRecord> = (0..5).map(|i| record_at(i, days_ago(8))).collect();
    db.store.insert(&old).await.unwrap();
    db.store.insert(&[record_at(9, days_ago(6))]).await.unwrap();
    let mut child = helpers::duet_command(db.dir.path())
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &db.url)
        .env("AUDIT_RETENTION_DAYS", "7")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = helpers::listening(&mut child);
    let client = reqwest::Client::new();
    let mut purged = 0.0;
    for _ in 0..200 {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        purged = metric(&text, "duet_audit_purged_total");
        if purged >= 5.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(purged, 5.0);
    assert_eq!(helpers::terminate(child).await, Some(0));
    assert_eq!(count(&db.store, "dual_runs").await, 1);
}

fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Every byte of every file under `dir` (the database, its WAL, the journal, the dead-letter
/// file): none may hold `needle`.
fn assert_nowhere(dir: &Path, needles: &[&str]) {
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        seen += bytes.len();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} found in {}",
                path.display()
            );
        }
    }
    assert!(seen > 0, "no file to look in");
}

/// A record whose every text field holds a planted secret.
fn planted_record() -> RunRecord {
    let mut r = db::record(1);
    r.query = "PLANTED-QUERY".into();
    r.system = Some("PLANTED-SYSTEM".into());
    r.flash.text = "PLANTED-FLASH-ANSWER".into();
    r.pro.error_message = Some("upstream said PLANTED-UPSTREAM-BODY".into());
    r.events.push(StoredEvent {
        seq: 4,
        event: "error".into(),
        data: serde_json::value::RawValue::from_string(
            r#"{"run_id":"r","model":"pro","error_type":"timeout","retryable":true,"message":"PLANTED-ERROR-EVENT"}"#
                .into(),
        )
        .ok(),
    });
    r
}

const PLANTED: [&str; 5] = [
    "PLANTED-QUERY",
    "PLANTED-SYSTEM",
    "PLANTED-FLASH-ANSWER",
    "PLANTED-UPSTREAM-BODY",
    "PLANTED-ERROR-EVENT",
];

/// The writer strips before queuing: a record in retry is journaled, then dead-lettered,
/// and neither file holds its texts, only their lengths and hashes.
#[tokio::test(start_paused = true)]
async fn store_text_none_keeps_texts_out_of_the_journal_and_the_dead_letter_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = db::FakeStore::failing(usize::MAX);
    let options =
        WriterOptions::new(dir.path().join("deadletter.jsonl")).with_store_text(StoreText::None);
    let dl_path = options.deadletter_path.clone();
    let writer =
        duet::audit::AuditWriter::start(store.clone(), options, Metrics::new().unwrap()).unwrap();
    let record = planted_record();
    duet::audit::AuditSink::submit(&writer, record.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::resume();
    let journal = duet::audit::deadletter::journal_path(&dl_path);
    for _ in 0..100 {
        if journal.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(db::dead_letters(&journal).len(), 1);
    assert_nowhere(dir.path(), &PLANTED);
    tokio::time::pause();
    writer.shutdown(Duration::from_secs(60)).await;
    let kept = db::dead_letters(&dl_path);
    assert_eq!(kept.len(), 1);
    assert_nowhere(dir.path(), &PLANTED);
    // What is kept instead: the length and SHA-256 of each, in the same fields.
    assert_eq!(kept[0].query, privacy::redact("PLANTED-QUERY"));
    assert_eq!(kept[0].flash.text, privacy::redact("PLANTED-FLASH-ANSWER"));
    assert_eq!(kept[0].pro.text, privacy::redact(""));
    // Everything else is as the run made it.
    assert_eq!(kept[0].run_id, record.run_id);
    assert_eq!(kept[0].flash.output_tokens, record.flash.output_tokens);
    assert_eq!(kept[0].pro.error_type, record.pro.error_type);
}

async fn start_duet(dir: &Path, env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = helpers::duet_command(dir)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", "sqlite://audit.db")
        .env("AUDIT_DEADLETTER_PATH", "dl.jsonl")
        .env("AUDIT_STORE_TEXT", "none")
        .envs(QUICK)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (addr, _log) = helpers::listening(&mut child);
    (child, addr)
}

/// The real binary with `AUDIT_STORE_TEXT=none`: the SQLite file and the dead-letter file
/// hold neither the query, the system prompt nor the answers; a resume from the database
/// still sends the answer events (their `text` is the placeholder) and `done`.
#[tokio::test]
async fn store_text_none_leaves_no_text_in_the_database_or_the_dead_letter_file() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let (child, addr) = start_duet(dir.path(), &[]).await;
    let query = "PLANTED-QUERY-stored-none";
    let system = "PLANTED-SYSTEM-stored-none";
    let resp =
        helpers::post_query_to(&client, &addr, json!({"query": query, "system": system})).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let run_id = answer["run_id"].as_str().unwrap().to_owned();
    let flash = answer["flash"]["text"].as_str().unwrap().to_owned();
    let pro = answer["pro"]["text"].as_str().unwrap().to_owned();
    let pro_usage = answer["pro"]["usage"].clone();
    assert!(!flash.is_empty() && !pro.is_empty());
    assert_eq!(helpers::terminate(child).await, Some(0));
    assert_nowhere(dir.path(), &[query, system, &flash, &pro]);

    // A record that does not fit the queue goes to the dead-letter file: stripped too. The
    // same process resumes the first run from the database (it is not in its memory).
    let (child, addr) = start_duet(dir.path(), &[("AUDIT_QUEUE_MAX_BYTES", "1")]).await;
    let second = "PLANTED-QUERY-dead-lettered";
    let resp = helpers::post_query_to(&client, &addr, json!({"query": second})).await;
    let second_answer: Value = resp.json().await.unwrap();
    let second_pro = second_answer["pro"]["text"].as_str().unwrap().to_owned();

    let resp = client
        .get(format!(
            "http://{addr}/query/stream?q=would-start-a-new-run"
        ))
        .header("last-event-id", format!("{run_id}:0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events: Vec<_> = resp
        .bytes_stream()
        .eventsource()
        .map(|e| e.unwrap())
        .collect()
        .await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["flash", "pro", "done"]);
    let pro_event: Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(pro_event["text"], privacy::redact(&pro));
    assert_eq!(pro_event["usage"], pro_usage);
    let done: Value = serde_json::from_str(&events[2].data).unwrap();
    assert_eq!(done["status"], "ok");

    assert_eq!(helpers::terminate(child).await, Some(0));
    let dead = db::dead_letters(&dir.path().join("dl.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].query, privacy::redact(second));
    assert_nowhere(
        dir.path(),
        &[query, system, &flash, &pro, second, &second_pro],
    );
}

#[test]
fn a_bad_store_text_or_retention_value_stops_the_binary_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("AUDIT_STORE_TEXT", "hashed"),
        ("AUDIT_RETENTION_DAYS", "0"),
        ("AUDIT_RETENTION_DAYS", "a week"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_duet"))
            .current_dir(dir.path())
            .env_clear()
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
    }
}
