//! Real databases for the audit tests: a fresh SQLite file per test, or a fresh PostgreSQL
//! database per test on the server `TEST_POSTGRES_URL` names (created here, dropped when the
//! handle is dropped, even if the test panicked). Without the variable the PostgreSQL tests
//! print a notice and pass, so `cargo test` works on a machine without PostgreSQL; in CI
//! (`CI` set) they fail instead, since `.ci/run` points them at the local server.

#![allow(dead_code, reason = "each test module uses a different part")]

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use chrono::{DateTime, Utc};
use duet::audit::{
    AuditError, Deadline, ModelTrace, Outcome, RecordStore, RunRecord, RunStatus, Store,
    StoredEvent,
};
use futures::future::BoxFuture;
use sqlx::{Connection, Executor, PgConnection};
use tokio::{sync::Semaphore, time::Instant};
use uuid::Uuid;

/// A migrated SQLite file in a temporary directory (removed on drop).
pub(crate) struct SqliteDb {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub store: Store,
}

pub(crate) async fn sqlite() -> SqliteDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("audit.db").display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    SqliteDb { dir, url, store }
}

/// A migrated, freshly created PostgreSQL database, dropped with this handle.
pub(crate) struct PgDb {
    pub url: String,
    pub store: Store,
    admin_url: String,
    name: String,
}

/// `None` (after a printed notice) when `TEST_POSTGRES_URL` is unset.
pub(crate) async fn postgres(test: &str) -> Option<PgDb> {
    let Ok(admin_url) = std::env::var("TEST_POSTGRES_URL") else {
        crate::helpers::skip(&format!(
            "TEST_POSTGRES_URL is unset, so PostgreSQL test {test} cannot run"
        ));
        return None;
    };
    let name = format!("duet_test_{}", Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .expect("TEST_POSTGRES_URL answers");
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    admin.close().await.unwrap();
    let url = with_database(&admin_url, &name);
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some(PgDb {
        url,
        store,
        admin_url,
        name,
    })
}

/// The same server URL with another database name.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{server}/{name}{query}")
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any async context we could await in: do it on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// `SELECT COUNT(*) FROM table`.
/// The record of a run once the writer has stored it (the stream's `done` goes out before
/// the record is written); waits up to five seconds.
pub(crate) async fn ended(store: &Store, run_id: &str) -> duet::audit::RunRecord {
    let id = run_id.parse().unwrap();
    for _ in 0..500 {
        if let Some(record) = store.fetch(id).await.unwrap() {
            return record;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("run {run_id} never ended in the database");
}

pub(crate) async fn count(store: &Store, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    match store {
        Store::Sqlite(s) => sqlx::query_scalar(&sql).fetch_one(s.pool()).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
    }
}

/// Runs one statement of SQL that both backends understand.
pub(crate) async fn execute(store: &Store, sql: &str) {
    match store {
        Store::Sqlite(s) => drop(sqlx::query(sql).execute(s.pool()).await.unwrap()),
        Store::Postgres(pool) => drop(sqlx::query(sql).execute(pool).await.unwrap()),
    }
}

/// One text column of one row, e.g. `SELECT error_message FROM ... WHERE ...`.
pub(crate) async fn text(store: &Store, sql: &str) -> Option<String> {
    match store {
        Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(s.pool()).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

/// Now, at the microsecond precision both databases keep.
pub(crate) fn now_micros() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn trace(model: &str, text: &str) -> ModelTrace {
    ModelTrace {
        provider: "scripted".into(),
        model: model.into(),
        model_version: Some(format!("{model}-v1")),
        outcome: Outcome::Ok,
        error_type: None,
        error_message: None,
        deadline: None,
        text: text.into(),
        finish_reason: Some("stop".into()),
        latency_ms: 310,
        ttft_ms: Some(300),
        input_tokens: Some(7),
        output_tokens: Some(2),
        cost_usd: Some(TRACE_COST_USD),
    }
}

/// The cost of [`trace`]: 7 input tokens at $0.3 and 2 output tokens at $2.5 per million, a
/// float with no short decimal form, so that a round trip that loses a bit shows.
pub(crate) const TRACE_COST_USD: f64 = 7.0 * 0.3 / 1e6 + 2.0 * 2.5 / 1e6;

fn raw(json: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(json.to_owned()).unwrap()
}

/// A plausible record with a fresh id; `i` makes its texts distinct.
pub(crate) fn record(i: usize) -> RunRecord {
    RunRecord {
        run_id: Uuid::now_v7(),
        client_request_id: Some(format!("req-{i}")),
        created_at: now_micros(),
        query: format!("question {i} with \"quotes\", émoji 🦀 and\nnewlines"),
        system: None,
        messages: None,
        params: None,
        status: RunStatus::Partial,
        total_ms: 2040,
        service_version: "0.0.0-test".into(),
        events: vec![
            StoredEvent {
                seq: 0,
                event: "start".into(),
                data: Some(raw(&format!(
                    r#"{{"run_id":"r","n":{i},"text":"\u0000 \"é\"\n🦀"}}"#
                ))),
            },
            StoredEvent {
                seq: 3,
                event: "flash".into(),
                data: None,
            },
        ],
        owner_fingerprint: None,
        client_id: None,
        flash: trace("flash-m", &format!("quick {i}")),
        pro: ModelTrace {
            outcome: Outcome::Timeout,
            error_type: Some("timeout".into()),
            error_message: Some("pro did not finish within its deadline".into()),
            deadline: Some(Deadline::Total),
            text: String::new(),
            finish_reason: None,
            ttft_ms: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            ..trace("pro-m", "")
        },
        // Pro reported no tokens: the run costs what Flash did.
        cost_usd: Some(TRACE_COST_USD),
        // Pro timed out: there is no final answer to compare the preview with.
        agreement: None,
    }
}

/// A store that fails, hangs or succeeds on command, and remembers every call, for
/// checking the writer's batching and retry timing on tokio's paused clock.
pub(crate) struct FakeStore {
    /// Calls that fail before the store starts succeeding (`usize::MAX`: never).
    fail_first: usize,
    /// Each call takes a permit first: with none available, calls wait.
    gate: Option<Arc<Semaphore>>,
    calls: AtomicUsize,
    pub attempts: Mutex<Vec<(Instant, usize)>>,
    pub stored: Mutex<Vec<RunRecord>>,
}

impl FakeStore {
    fn new(fail_first: usize, gate: Option<Arc<Semaphore>>) -> Arc<FakeStore> {
        Arc::new(FakeStore {
            fail_first,
            gate,
            calls: AtomicUsize::new(0),
            attempts: Mutex::default(),
            stored: Mutex::default(),
        })
    }

    pub(crate) fn failing(fail_first: usize) -> Arc<FakeStore> {
        FakeStore::new(fail_first, None)
    }

    /// Succeeds, but each call waits for a permit of `gate`.
    pub(crate) fn gated(gate: Arc<Semaphore>) -> Arc<FakeStore> {
        FakeStore::new(0, Some(gate))
    }

    pub(crate) fn attempts(&self) -> Vec<(Instant, usize)> {
        self.attempts.lock().unwrap().clone()
    }

    pub(crate) fn stored(&self) -> Vec<RunRecord> {
        self.stored.lock().unwrap().clone()
    }
}

impl RecordStore for FakeStore {
    fn insert_batch<'a>(
        &'a self,
        records: &'a [RunRecord],
    ) -> BoxFuture<'a, Result<u64, AuditError>> {
        Box::pin(async move {
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            self.attempts
                .lock()
                .unwrap()
                .push((Instant::now(), records.len()));
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
                return Err(AuditError::Timeout(std::time::Duration::from_secs(1)));
            }
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(records.len() as u64)
        })
    }
}

/// Every record in a dead-letter file (not the start rows a failed batch leaves there too,
/// one `{"started": ...}` line each).
pub(crate) fn dead_letters(path: &std::path::Path) -> Vec<RunRecord> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .lines()
            .filter(|l| !l.starts_with("{\"started\":"))
            .map(|l| serde_json::from_str(l).expect("one record per line"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}
