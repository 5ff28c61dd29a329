//! The audit trail under database and disk faults (issue 11): an immutable SQLite file, a
//! full file system, the SQLite file deleted under the service, a PostgreSQL table renamed
//! away, `kill -9` during an outage. Every test counts rows against runs: a metric that says
//! `ok` proves nothing.
//!
//! The file-system faults need root (`chattr`, `mount`). Where they are not possible the
//! test prints a notice and passes; with `CI` set it fails instead, since CI runs as root on
//! a machine where both work.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use duet::{
    audit::{Store, WriterOptions, replay::replay},
    metrics::Metrics,
};
use futures::future::join_all;
use serde_json::json;

use crate::{
    db::{self, count, dead_letters},
    helpers::*,
};

/// Skips (notice) or, in CI, fails.
fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run here ({why}), and CI must run it");
    }
    let notice = format!("notice: skipping {test}: {why}\n");
    let _ = std::io::stderr().write_all(notice.as_bytes());
}

fn quick_flash() -> Vec<Step> {
    vec![ms(2), Step::Delta("flash"), Step::Finish]
}

fn quick_pro() -> Vec<Step> {
    vec![ms(5), Step::Delta("pro: "), Step::EchoQuery, Step::Finish]
}

/// Retries short enough for a test: the same code path, a second of outage ridden out.
fn fast_options(dir: &Path) -> WriterOptions {
    let mut options = WriterOptions::new(dir.join("deadletter.jsonl"));
    options.retry.base = Duration::from_millis(50);
    options.retry.cap = Duration::from_millis(200);
    options.retry.retries = 3;
    options
}

fn writes(metrics: &Metrics, outcome: &str) -> u64 {
    metrics
        .audit_writes_total
        .with_label_values(&[outcome])
        .get()
}

/// `chattr +i` on files, undone on drop (also when the test panics).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        for p in paths {
            let ok = Command::new("chattr").arg("+i").arg(p).status().unwrap();
            assert!(ok.success(), "chattr +i {}", p.display());
        }
        Immutable(paths.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(p).status();
        }
        self.0.clear();
    }
}

/// True when `chattr +i` works on a file in `dir` (root, and a file system that has it).
fn chattr_works(dir: &Path) -> bool {
    let probe = dir.join("chattr-probe");
    if std::fs::write(&probe, b"x").is_err() {
        return false;
    }
    let set = Command::new("chattr")
        .arg("+i")
        .arg(&probe)
        .status()
        .is_ok_and(|s| s.success());
    let _guard = set.then(|| Immutable(vec![probe.clone()]));
    let blocked = set
        && std::fs::OpenOptions::new()
            .append(true)
            .open(&probe)
            .is_err();
    drop(_guard);
    let _ = std::fs::remove_file(&probe);
    blocked
}

async fn run_queries(app: &TestApp, from: usize, n: usize) -> Vec<String> {
    let streams =
        join_all((from..from + n).map(|i| app.stream(json!({"query": format!("q{i}")})))).await;
    streams
        .iter()
        .map(|events| check_invariants(events))
        .collect()
}

/// Waits until the writer has no record left in its queue or in a retry.
async fn settle(metrics: &Metrics, runs: u64) {
    for _ in 0..300 {
        let ok = writes(metrics, "ok");
        let dl = writes(metrics, "deadletter");
        if ok + dl >= runs {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_immutable_sqlite_file_loses_no_record() {
    let db = db::sqlite().await;
    if !chattr_works(db.dir.path()) {
        return skip(
            "an_immutable_sqlite_file_loses_no_record",
            "chattr +i is not permitted",
        );
    }
    let options = fast_options(db.dir.path());
    let dl_path = options.deadletter_path.clone();
    let (mut app, writer) = spawn_audited(
        Scripted::new("flash-m", quick_flash()),
        Scripted::new("pro-m", quick_pro()),
        &[],
        db.store.clone(),
        options,
    )
    .await;
    let metrics_probe = app.server.as_ref().unwrap().state.metrics.clone();
    let mut runs = run_queries(&app, 0, 6).await;
    settle(&metrics_probe, 6).await;
    let db_file = db.dir.path().join("audit.db");
    let wal = db.dir.path().join("audit.db-wal");
    {
        let _frozen = Immutable::set(&[db_file.clone(), wal.clone()]);
        runs.extend(run_queries(&app, 6, 12).await);
        settle(&metrics_probe, 18).await;
    }
    runs.extend(run_queries(&app, 18, 6).await);
    app.stop().await;
    writer.shutdown(Duration::from_secs(10)).await;

    let in_db = count(&db.store, "dual_runs").await as u64;
    let dead = dead_letters(&dl_path);
    eprintln!(
        "runs {} in_db {in_db} dead {} ok {} retry {} deadletter {}",
        runs.len(),
        dead.len(),
        writes(&metrics_probe, "ok"),
        writes(&metrics_probe, "retry"),
        writes(&metrics_probe, "deadletter")
    );
    assert_eq!(
        writes(&metrics_probe, "ok"),
        in_db,
        "ok counts only what is in the database"
    );
    // Reopen, as an operator would after the fault, and replay.
    let fresh = Store::connect(&db.url).await.unwrap();
    let report = replay(&fresh, &dl_path).await.unwrap();
    eprintln!("{report}");
    assert_eq!(count(&fresh, "dual_runs").await as usize, runs.len());
    for run in &runs {
        assert!(
            fresh.fetch(run.parse().unwrap()).await.unwrap().is_some(),
            "{run}"
        );
    }
}
