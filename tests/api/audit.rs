//! The audit store and writer (contract §5): idempotent batched inserts on real SQLite files
//! and a real PostgreSQL database, retry timing on the paused clock, dead-lettering, the
//! shutdown drain, and replay.

use std::{sync::Arc, time::Duration};

use duet::{
    audit::{
        AuditSink, AuditWriter, Deadline, RecordStore, RunRecord, StartedRun, Store, WriterOptions,
        replay::{ReplayReport, replay},
    },
    metrics::Metrics,
};
use tokio::sync::Semaphore;

use crate::db::{self, FakeStore, count, dead_letters, record};

fn options(dir: &tempfile::TempDir) -> WriterOptions {
    WriterOptions::new(dir.path().join("deadletter.jsonl"))
}

/// A trigger that makes the database refuse the rows `when` matches, as it may refuse a
/// record for what is in it.
async fn refuse_rows(store: &Store, name: &str, when: &str) {
    let sql = format!(
        "CREATE TRIGGER {name} BEFORE INSERT ON dual_runs WHEN {when} \
         BEGIN SELECT RAISE(ABORT, 'refused by {name}'); END"
    );
    db::execute(store, &sql).await;
}

/// Retries short enough for a test whose batches fail on every attempt.
fn quick_retries(dir: &tempfile::TempDir) -> WriterOptions {
    let mut options = options(dir);
    options.retry.base = Duration::from_millis(10);
    options.retry.cap = Duration::from_millis(20);
    options.retry.retries = 2;
    options
}

/// An audit writer, with quick retries, on a fresh SQLite database that refuses the rows
/// `when` matches (see [`refuse_rows`]): the database, the writer's directory (its
/// dead-letter file and journal), the writer and its metrics.
async fn writer_refusing(
    name: &str,
    when: &str,
) -> (db::SqliteDb, tempfile::TempDir, AuditWriter, Metrics) {
    let db = db::sqlite().await;
    refuse_rows(&db.store, name, when).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(
        Arc::new(db.store.clone()),
        quick_retries(&dir),
        metrics.clone(),
    )
    .unwrap();
    (db, dir, writer, metrics)
}

fn writes(metrics: &Metrics, outcome: &str) -> u64 {
    metrics
        .audit_writes_total
        .with_label_values(&[outcome])
        .get()
}

// ---- the store, on both backends -------------------------------------------------------

async fn same_record_twice_is_one_row(store: &Store) {
    let r = record(1);
    assert_eq!(store.insert(std::slice::from_ref(&r)).await.unwrap(), 1);
    assert_eq!(
        store.insert(std::slice::from_ref(&r)).await.unwrap(),
        0,
        "a replay is ignored"
    );
    // Twice in one batch, next to a new one.
    let other = record(2);
    assert_eq!(
        store
            .insert(&[r.clone(), other.clone(), other.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(count(store, "dual_runs").await, 2);
    assert_eq!(count(store, "model_traces").await, 4);
    assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(&r));
    assert_eq!(
        store.fetch(other.run_id).await.unwrap().as_ref(),
        Some(&other)
    );
    assert_eq!(store.fetch(uuid::Uuid::now_v7()).await.unwrap(), None);
}

#[tokio::test]
async fn same_record_twice_is_one_row_sqlite() {
    let db = db::sqlite().await;
    same_record_twice_is_one_row(&db.store).await;
}

/// `sqlite::memory:`: the writer's own connection (rusqlite) and sqlx's read pool must open
/// the same in-memory database, or records would be written where no read finds them.
#[tokio::test]
async fn an_in_memory_sqlite_database_is_one_database_for_writes_and_reads() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    let records: Vec<RunRecord> = (0..3).map(record).collect();
    let starts: Vec<StartedRun> = (3..5).map(record).map(|r| start_of(&r)).collect();
    assert_eq!(
        store.write(Some("i-1"), &starts, &records).await.unwrap(),
        3
    );
    assert_eq!(count(&store, "dual_runs").await, 5);
    assert_eq!(count(&store, "model_traces").await, 6);
    assert_eq!(
        store.fetch(records[1].run_id).await.unwrap().as_ref(),
        Some(&records[1])
    );
    store.close().await;
}

#[tokio::test]
async fn same_record_twice_is_one_row_postgres() {
    let Some(db) = db::postgres("same_record_twice_is_one_row").await else {
        return;
    };
    same_record_twice_is_one_row(&db.store).await;
}

/// Large batches cross SQLite's chunking and PostgreSQL's array binds; odd text survives.
async fn big_batch_round_trips(store: &Store) {
    let mut records: Vec<RunRecord> = (0..1203).map(record).collect();
    records[7].query = "nul \u{0} inside".into();
    records[8].system = Some("be brief".into());
    records[9].client_request_id = None;
    assert_eq!(store.insert(&records).await.unwrap(), 1203);
    assert_eq!(count(store, "dual_runs").await, 1203);
    assert_eq!(count(store, "model_traces").await, 2406);
    for r in &records[8..12] {
        assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
    let nul = store.fetch(records[7].run_id).await.unwrap().unwrap();
    assert!(nul.query == "nul \u{0} inside" || nul.query == "nul \u{FFFD} inside");
}

#[tokio::test]
async fn big_batch_round_trips_sqlite() {
    let db = db::sqlite().await;
    big_batch_round_trips(&db.store).await;
}

#[tokio::test]
async fn big_batch_round_trips_postgres() {
    let Some(db) = db::postgres("big_batch_round_trips").await else {
        return;
    };
    big_batch_round_trips(&db.store).await;
}

/// The audit writer has a SQLite connection of its own: readers holding every connection
/// of the shared pool (slow `/runs` searches, say) neither keep a batch waiting for one
/// until it times out nor take the writer's.
#[tokio::test]
async fn readers_holding_every_connection_do_not_block_the_sqlite_writer() {
    let db = db::sqlite().await;
    let Store::Sqlite(s) = &db.store else {
        unreachable!("db::sqlite() opens SQLite")
    };
    let mut held = Vec::new();
    for _ in 0..s.pool().options().get_max_connections() {
        held.push(s.pool().acquire().await.unwrap());
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.pool().acquire())
            .await
            .is_err(),
        "every read connection is taken"
    );
    let r = record(1);
    let written = tokio::time::timeout(
        Duration::from_secs(10),
        db.store
            .write(Some("i-1"), &[start_of(&r)], std::slice::from_ref(&r)),
    )
    .await
    .expect("the writer does not wait for a read connection");
    assert_eq!(written.unwrap(), 1);
    // The readers still see it, on the connections they hold.
    let mut conn = held.pop().unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dual_runs")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// Two batches at once on one SQLite store (the service's writer never does this; tools and
/// tests may): the second finds the writer's connection taken and opens one of its own,
/// SQLite's write lock orders the two, and the connection kept for later still works.
#[tokio::test]
async fn two_sqlite_batches_at_once_both_commit() {
    let db = db::sqlite().await;
    let (a, b): (Vec<RunRecord>, Vec<RunRecord>) = (
        (0..40).map(record).collect(),
        (40..90).map(record).collect(),
    );
    let starts: Vec<StartedRun> = b.iter().map(start_of).collect();
    let (written_a, written_b) = tokio::join!(
        db.store.write(Some("i-1"), &[], &a),
        db.store.write(Some("i-1"), &starts, &[])
    );
    assert_eq!(written_a.unwrap(), 40);
    assert_eq!(written_b.unwrap(), 0, "start rows alone finalize nothing");
    assert_eq!(db.store.write(Some("i-1"), &[], &b).await.unwrap(), 50);
    assert_eq!(count(&db.store, "dual_runs").await, 90);
    assert_eq!(
        count_where(&db.store, "dual_runs", "status = 'running'").await,
        0
    );
}

/// A run's start row, as this process (instance `i-1`) would send it.
fn start_of(r: &RunRecord) -> StartedRun {
    StartedRun {
        instance_id: Some("i-1".into()),
        ..StartedRun::of(r)
    }
}

async fn count_where(store: &Store, table: &str, condition: &str) -> i64 {
    count(store, &format!("{table} WHERE {condition}")).await
}

/// A large batch of start rows and records: every row once, the starts `running`, the
/// records final.
async fn a_large_mixed_batch_writes_every_row_once(store: &Store) {
    let records: Vec<RunRecord> = (0..300).map(record).collect();
    let running: Vec<RunRecord> = (300..601).map(record).collect();
    let starts: Vec<StartedRun> = running.iter().map(start_of).collect();
    // One run's start and record in the same batch: the record wins, no start row.
    let mut both = starts.clone();
    both.push(start_of(&records[5]));
    assert_eq!(
        store.write(Some("i-1"), &both, &records).await.unwrap(),
        300
    );
    assert_eq!(count(store, "dual_runs").await, 601);
    assert_eq!(
        count_where(store, "dual_runs", "status = 'running'").await,
        301
    );
    assert_eq!(count(store, "model_traces").await, 600);
    for r in [&records[0], &records[149], &records[150], &records[299]] {
        assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
    // Their records finalize the running rows, again in one large batch.
    assert_eq!(store.write(Some("i-1"), &[], &running).await.unwrap(), 301);
    assert_eq!(count(store, "dual_runs").await, 601);
    assert_eq!(
        count_where(store, "dual_runs", "status = 'running'").await,
        0
    );
    assert_eq!(count(store, "model_traces").await, 1202);
}

#[tokio::test]
async fn a_large_mixed_batch_writes_every_row_once_sqlite() {
    let db = db::sqlite().await;
    a_large_mixed_batch_writes_every_row_once(&db.store).await;
}

#[tokio::test]
async fn a_large_mixed_batch_writes_every_row_once_postgres() {
    let Some(db) = db::postgres("a_large_mixed_batch").await else {
        return;
    };
    a_large_mixed_batch_writes_every_row_once(&db.store).await;
}

/// PostgreSQL writes a batch as one statement: when part of it is refused nothing of it is
/// stored, and the retry of the whole batch stores each record once.
#[tokio::test]
async fn a_failed_batch_stores_nothing_and_is_retried_whole_postgres() {
    let Some(db) = db::postgres("a_failed_batch").await else {
        return;
    };
    let store = &db.store;
    let mut records: Vec<RunRecord> = (0..300).map(record).collect();
    let starts: Vec<StartedRun> = (300..310).map(record).map(|r| start_of(&r)).collect();
    // Refused by the column's CHECK: fails the whole statement.
    records[299].cost_usd = Some(-1.0);
    assert!(store.write(Some("i-1"), &starts, &records).await.is_err());
    assert_eq!(
        count(store, "dual_runs").await,
        0,
        "nothing of it committed"
    );
    assert_eq!(count(store, "model_traces").await, 0);
    records[299].cost_usd = Some(0.5);
    assert_eq!(
        store.write(Some("i-1"), &starts, &records).await.unwrap(),
        300
    );
    assert_eq!(count(store, "dual_runs").await, 310);
    assert_eq!(count(store, "model_traces").await, 600);
    for r in [&records[0], &records[150], &records[299]] {
        assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
}

/// On SQLite a batch is one transaction of many statements (BEGIN, start rows, run rows,
/// traces, COMMIT). One failing after the others ran (a trace refused by its CHECK, after
/// the start rows and run rows went in) leaves nothing behind: no row, and no transaction
/// left open on the writer's connection, which would hold the write lock from every other
/// connection and turn the next batch's BEGIN into an error.
#[tokio::test]
async fn a_batch_failing_at_its_last_statement_stores_nothing_sqlite() {
    let db = db::sqlite().await;
    let store = &db.store;
    let mut records: Vec<RunRecord> = (0..20).map(record).collect();
    let starts: Vec<StartedRun> = (20..25).map(record).map(|r| start_of(&r)).collect();
    records[19].pro.cost_usd = Some(-1.0);
    assert!(store.write(Some("i-1"), &starts, &records).await.is_err());
    assert_eq!(
        count(store, "dual_runs").await,
        0,
        "nothing of it committed"
    );
    assert_eq!(count(store, "model_traces").await, 0);
    // Another connection can take the write lock: the failed batch's transaction is gone.
    assert_eq!(store.interrupt_all_running().await.unwrap(), 0);
    records[19].pro.cost_usd = Some(0.5);
    assert_eq!(
        store.write(Some("i-1"), &starts, &records).await.unwrap(),
        20
    );
    assert_eq!(count(store, "dual_runs").await, 25);
    assert_eq!(count(store, "model_traces").await, 40);
    assert_eq!(
        store.fetch(records[19].run_id).await.unwrap().as_ref(),
        Some(&records[19])
    );
}

/// The writer keeps two batches in flight on PostgreSQL, and a run's start row may be in one
/// and its record in the next, both sent before either commits. Here every run is: one batch
/// with the start rows (and records of other runs), the next with the records (and start rows
/// of other runs), in opposite orders, sent together, many times. Every run ends with one
/// row, its record's, whichever transaction the server ran first; and none fails, which it
/// would on a deadlock (each statement takes its rows in run-id order so that none happens).
#[tokio::test]
async fn batches_in_flight_together_keep_each_record_postgres() {
    let Some(db) = db::postgres("batches_in_flight_together").await else {
        return;
    };
    let store = &db.store;
    let rounds = 20;
    let mut all = Vec::new();
    for _ in 0..rounds {
        let shared: Vec<RunRecord> = (0..150).map(record).collect();
        let first_only: Vec<RunRecord> = (0..50).map(record).collect();
        let second_only: Vec<RunRecord> = (0..50).map(record).collect();
        let first_starts: Vec<StartedRun> = shared.iter().map(start_of).collect();
        let mut second_records = shared.clone();
        second_records.reverse();
        let second_starts: Vec<StartedRun> = second_only.iter().map(start_of).collect();
        let (first, second) = tokio::join!(
            store.write(Some("i-1"), &first_starts, &first_only),
            store.write(Some("i-1"), &second_starts, &second_records),
        );
        assert_eq!(first.unwrap(), 50);
        assert_eq!(
            second.unwrap(),
            150,
            "every record new or finalizing its row"
        );
        all.extend(shared);
        all.extend(first_only);
    }
    assert_eq!(count(store, "dual_runs").await, rounds * 250);
    assert_eq!(
        count_where(store, "dual_runs", "status = 'running'").await,
        rounds * 50,
        "only the start rows of runs without a record"
    );
    assert_eq!(count(store, "model_traces").await, rounds * 400);
    for r in all.iter().step_by(37) {
        assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
}

async fn migrations_revert_and_reapply(store: &Store) {
    let postgres = matches!(store, Store::Postgres(_));
    // The trigram index over ended runs only: 0014 on PostgreSQL. The client index made
    // partial: 0011 on SQLite, 0013 on PostgreSQL. Only indexes, so an insert still works
    // after them.
    if postgres {
        assert_eq!(
            store.applied().await.unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        );
        assert_eq!(store.revert_to(13).await.unwrap(), [14]);
        assert_eq!(store.revert_to(12).await.unwrap(), [13]);
    } else {
        assert_eq!(
            store.applied().await.unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        );
        assert_eq!(store.revert_to(10).await.unwrap(), [11]);
    }
    assert_eq!(store.insert(&[record(1)]).await.unwrap(), 1);
    // The preview's agreement: 0010 on SQLite, 0012 on PostgreSQL.
    if postgres {
        assert_eq!(store.revert_to(11).await.unwrap(), [12]);
    } else {
        assert_eq!(store.revert_to(9).await.unwrap(), [10]);
    }
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "dual_runs.agreement is gone"
    );
    // The `GET /runs` indexes: 0009 on SQLite, 0011 on PostgreSQL. Only indexes, so nothing
    // to see from an insert (which fails already for want of `agreement`).
    if postgres {
        assert_eq!(store.revert_to(10).await.unwrap(), [11]);
    } else {
        assert_eq!(store.revert_to(8).await.unwrap(), [9]);
    }
    // The clients' `client_id` (and on PostgreSQL `client_usage`): 0008 on SQLite, 0010 on
    // PostgreSQL.
    if postgres {
        assert_eq!(store.revert_to(9).await.unwrap(), [10]);
    } else {
        assert_eq!(store.revert_to(7).await.unwrap(), [8]);
    }
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "dual_runs.client_id is gone"
    );
    // The cost columns: 0007 on SQLite, 0009 on PostgreSQL.
    if postgres {
        assert_eq!(store.revert_to(8).await.unwrap(), [9]);
    } else {
        assert_eq!(store.revert_to(6).await.unwrap(), [7]);
    }
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "dual_runs.cost_usd is gone"
    );
    // The conversations' `messages` and `params` columns: 0006 on SQLite, 0008 on PostgreSQL
    // (whose 0006 is the rate-limit budget shared by replicas and 0007 the instances'
    // incarnations: on SQLite the limits stay in memory and one process owns the file).
    if postgres {
        assert_eq!(store.revert_to(6).await.unwrap(), [7, 8]);
    } else {
        assert_eq!(store.revert_to(5).await.unwrap(), [6]);
    }
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "dual_runs.messages is gone"
    );
    if matches!(store, Store::Postgres(_)) {
        assert_eq!(store.revert_to(5).await.unwrap(), [6]);
    }
    assert_eq!(store.applied().await.unwrap(), [1, 2, 3, 4, 5]);
    assert_eq!(store.revert_to(4).await.unwrap(), [5]);
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "dual_runs.instance_id is gone"
    );
    assert_eq!(store.revert_to(3).await.unwrap(), [4]);
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "model_traces.deadline is gone"
    );
    assert_eq!(store.revert_to(2).await.unwrap(), [3]);
    assert!(
        store.insert(&[record(1)]).await.is_err(),
        "owner_fingerprint is gone"
    );
    assert_eq!(store.revert_to(1).await.unwrap(), [2]);
    assert_eq!(store.applied().await.unwrap(), [1]);
    assert_eq!(store.revert_to(0).await.unwrap(), [1]);
    assert!(store.applied().await.unwrap().is_empty());
    assert!(store.insert(&[record(1)]).await.is_err(), "tables are gone");
    store.migrate().await.unwrap();
    assert_eq!(store.insert(&[record(1)]).await.unwrap(), 1);
}

#[tokio::test]
async fn migrations_revert_and_reapply_sqlite() {
    let db = db::sqlite().await;
    migrations_revert_and_reapply(&db.store).await;
}

#[tokio::test]
async fn migrations_revert_and_reapply_postgres() {
    let Some(db) = db::postgres("migrations_revert_and_reapply").await else {
        return;
    };
    migrations_revert_and_reapply(&db.store).await;
}

/// Migration 0014 rebuilds the trigram index over ended runs only, which holds off writes
/// while it runs; an operator with a large table builds it beforehand, concurrently, as
/// docs/operations.md says, and the migration then leaves that index alone.
#[tokio::test]
async fn a_trigram_index_built_beforehand_is_kept_postgres() {
    let Some(db) = db::postgres("a_trigram_index_built_beforehand_is_kept").await else {
        return;
    };
    let store = &db.store;
    let oid = "SELECT to_regclass('dual_runs_query_trgm')::oid::text";
    let definition =
        "SELECT indexdef::text FROM pg_indexes WHERE indexname = 'dual_runs_query_trgm'";
    if db::text(store, oid).await.is_none() {
        // No pg_trgm here: 0011 made no index, and 0014 makes none.
        return;
    }
    assert_eq!(store.revert_to(13).await.unwrap(), [14]);
    let full = db::text(store, definition).await.unwrap();
    assert!(
        !full.contains("WHERE"),
        "0011's index is over every run: {full}"
    );
    // The procedure of docs/operations.md, one statement at a time as CONCURRENTLY needs.
    for sql in [
        "CREATE INDEX CONCURRENTLY dual_runs_query_trgm_ended ON dual_runs \
         USING gin (query gin_trgm_ops) WHERE status <> 'running'",
        "DROP INDEX CONCURRENTLY dual_runs_query_trgm",
        "ALTER INDEX dual_runs_query_trgm_ended RENAME TO dual_runs_query_trgm",
    ] {
        db::execute(store, sql).await;
    }
    let built = db::text(store, oid).await;
    store.migrate().await.unwrap();
    assert_eq!(
        store.applied().await.unwrap().last(),
        Some(&14),
        "0014 is applied"
    );
    assert_eq!(db::text(store, oid).await, built, "not rebuilt");
    // Reverting rebuilds it over every run again, and reapplying over ended runs.
    assert_eq!(store.revert_to(13).await.unwrap(), [14]);
    assert_eq!(db::text(store, definition).await.unwrap(), full);
    store.migrate().await.unwrap();
    let partial = db::text(store, definition).await.unwrap();
    assert!(
        partial.ends_with("WHERE (status <> 'running'::text)"),
        "{partial}"
    );
}

/// A run written by a release before migration 0004 (and the events as values): its
/// deadline was the end of `error_message`, its events SSE text. Migrating moves the
/// deadline to its column; the events are read as they are; reverting puts the text back.
async fn rows_written_before_0004_read_as_records(store: &Store) {
    store.revert_to(3).await.unwrap();
    let id = "0192d5c4-0000-7000-8000-00000000000a";
    db::execute(
        store,
        &format!(
            "INSERT INTO dual_runs (run_id, created_at, query, status, total_ms, \
             service_version, events) VALUES ('{id}', '2025-01-31T12:34:56.123456Z', 'q', \
             'partial', 2040, '0.1.0', 'event: start\nid: {id}:0\ndata: {{\"run_id\":\"{id}\"}}\n\n\
             event: flash\nid: {id}:3\n\nevent: error\nid: {id}:4\ndata: {{\"model\":\"pro\"}}\n\n\
             event: done\nid: {id}:5\ndata: {{\"status\":\"partial\"}}\n\n')"
        ),
    )
    .await;
    for (model, outcome, message) in [
        ("flash", "ok", "NULL"),
        (
            "pro",
            "timeout",
            "'pro sent no first token within its deadline (3.0 s) [deadline: first_token]'",
        ),
    ] {
        db::execute(
            store,
            &format!(
                "INSERT INTO model_traces (run_id, model, provider, model_name, outcome, \
                 error_message, text, latency_ms) \
                 VALUES ('{id}', '{model}', 'simulated', 'm', '{outcome}', {message}, 't', 5)"
            ),
        )
        .await;
    }
    store.migrate().await.unwrap();

    let record = store.fetch(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(record.pro.deadline, Some(Deadline::FirstToken));
    assert_eq!(
        record.pro.error_message.as_deref(),
        Some("pro sent no first token within its deadline (3.0 s)")
    );
    assert_eq!(
        (record.flash.deadline, record.flash.error_message),
        (None, None)
    );
    let events: Vec<_> = record
        .events
        .iter()
        .map(|e| (e.seq, e.event.as_str(), e.data.as_ref().map(|d| d.get())))
        .collect();
    let start = format!("{{\"run_id\":\"{id}\"}}");
    assert_eq!(
        events,
        [
            (0, "start", Some(start.as_str())),
            (3, "flash", None),
            (4, "error", Some("{\"model\":\"pro\"}")),
            (5, "done", Some("{\"status\":\"partial\"}")),
        ]
    );

    store.revert_to(3).await.unwrap();
    let sql =
        format!("SELECT error_message FROM model_traces WHERE model = 'pro' AND run_id = '{id}'");
    assert_eq!(
        db::text(store, &sql).await.as_deref(),
        Some("pro sent no first token within its deadline (3.0 s) [deadline: first_token]")
    );
}

#[tokio::test]
async fn rows_written_before_0004_read_as_records_sqlite() {
    let db = db::sqlite().await;
    rows_written_before_0004_read_as_records(&db.store).await;
}

#[tokio::test]
async fn rows_written_before_0004_read_as_records_postgres() {
    let Some(db) = db::postgres("rows_written_before_0004_read_as_records").await else {
        return;
    };
    rows_written_before_0004_read_as_records(&db.store).await;
}

// ---- the writer ------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn writer_batches_what_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::failing(0);
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(store.clone(), options(&dir), metrics.clone()).unwrap();
    // Submitted before the writer task first runs (one thread): it finds 1200 waiting.
    for i in 0..1200 {
        writer.submit(record(i));
    }
    assert_eq!(metrics.audit_queue_depth.get(), 1200);
    writer.shutdown(Duration::from_secs(5)).await;
    let sizes: Vec<usize> = store.attempts().iter().map(|a| a.1).collect();
    assert_eq!(sizes, [500, 500, 200]);
    assert_eq!(store.stored().len(), 1200);
    assert_eq!(writes(&metrics, "ok"), 1200);
    assert_eq!(metrics.audit_queue_depth.get(), 0);
    assert!(dead_letters(&dir.path().join("deadletter.jsonl")).is_empty());
}

/// A record after a quiet spell is written at once; records that keep arriving are written
/// at most one transaction per DEFAULT_BATCH_INTERVAL, gathered into batches.
#[tokio::test(start_paused = true)]
async fn writer_paces_transactions_under_steady_load() {
    use duet::audit::writer::DEFAULT_BATCH_INTERVAL;
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::failing(0);
    let writer = AuditWriter::start(store.clone(), options(&dir), Metrics::new().unwrap()).unwrap();
    let t0 = tokio::time::Instant::now();
    // One record every millisecond for 50 ms.
    for i in 0..50 {
        writer.submit(record(i));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Then, after a quiet second, one more: written with no wait.
    let quiet = tokio::time::Instant::now();
    writer.submit(record(50));
    tokio::time::sleep(Duration::from_micros(100)).await;
    writer.shutdown(Duration::from_secs(5)).await;
    let attempts = store.attempts();
    assert_eq!(
        attempts.first().map(|a| a.0),
        Some(t0),
        "the first record at once"
    );
    for pair in attempts.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= DEFAULT_BATCH_INTERVAL,
            "{attempts:?}"
        );
    }
    let sizes: Vec<usize> = attempts.iter().map(|a| a.1).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 51);
    // 50 records over 50 ms in about 50 ms / DEFAULT_BATCH_INTERVAL transactions, not 50.
    let most = (50 / DEFAULT_BATCH_INTERVAL.as_millis() + 2) as usize;
    assert!(sizes.len() <= most && sizes.len() < 40, "{sizes:?}");
    assert_eq!(attempts.last().map(|a| (a.0, a.1)), Some((quiet, 1)));
    assert_eq!(store.stored().len(), 51);
}

/// A store that takes two batches at once, as PostgreSQL does: its first call waits for
/// `gate` (a slow commit), its second fails at once, and every later call succeeds.
struct TwoInFlight {
    gate: Semaphore,
    calls: std::sync::atomic::AtomicUsize,
    stored: std::sync::Mutex<Vec<RunRecord>>,
}

impl RecordStore for TwoInFlight {
    fn insert_batch<'a>(
        &'a self,
        records: &'a [RunRecord],
    ) -> futures::future::BoxFuture<'a, Result<u64, duet::audit::AuditError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if call == 0 {
                self.gate.acquire().await.unwrap().forget();
            }
            if call == 1 {
                return Err(duet::audit::AuditError::Timeout(Duration::from_secs(1)));
            }
            self.stored.lock().unwrap().extend_from_slice(records);
            Ok(records.len() as u64)
        })
    }

    fn batches_in_flight(&self) -> usize {
        2
    }
}

/// With two batches in flight, the second fails while the first is still committing:
/// nothing counts as written before its own write returned, the failed batch is retried as
/// any other (after the first is settled), and every record is stored once, none
/// dead-lettered.
#[tokio::test(start_paused = true)]
async fn a_batch_failing_while_the_one_before_commits_is_retried_and_nothing_is_acknowledged_early()
{
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(TwoInFlight {
        gate: Semaphore::new(0),
        calls: Default::default(),
        stored: Default::default(),
    });
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(store.clone(), options(&dir), metrics.clone()).unwrap();
    let records: Vec<RunRecord> = (0..600).map(record).collect();
    for r in &records {
        writer.submit(r.clone());
    }
    // The first batch (500) waits in its commit; the second (100) has been tried and failed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(store.stored.lock().unwrap().is_empty());
    assert_eq!(
        writes(&metrics, "ok"),
        0,
        "nothing acknowledged before it is stored"
    );
    assert_eq!(
        writes(&metrics, "retry"),
        0,
        "the failure is handled in turn"
    );
    // The first commits; then the second is retried, once.
    store.gate.add_permits(1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        *store.stored.lock().unwrap(),
        records,
        "each once, in order"
    );
    assert_eq!(writes(&metrics, "ok"), 600);
    assert_eq!(writes(&metrics, "retry"), 100);
    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(store.calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(writes(&metrics, "deadletter"), 0);
    assert!(dead_letters(&dir.path().join("deadletter.jsonl")).is_empty());
}

/// A store that takes two batches at once and never answers.
struct HangingTwoInFlight {
    calls: std::sync::atomic::AtomicUsize,
}

impl RecordStore for HangingTwoInFlight {
    fn insert_batch<'a>(
        &'a self,
        _records: &'a [RunRecord],
    ) -> futures::future::BoxFuture<'a, Result<u64, duet::audit::AuditError>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(std::future::pending())
    }

    fn batches_in_flight(&self) -> usize {
        2
    }
}

/// A drain that times out with two batches in flight dead-letters both, and the queue behind
/// them: every record once, none lost.
#[tokio::test(start_paused = true)]
async fn a_drain_cut_off_with_two_batches_in_flight_dead_letters_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HangingTwoInFlight {
        calls: Default::default(),
    });
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(store.clone(), options(&dir), metrics.clone()).unwrap();
    let records: Vec<RunRecord> = (0..1100).map(record).collect();
    for r in &records {
        writer.submit(r.clone());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two batches in flight, the third waits"
    );
    writer.shutdown(Duration::from_secs(1)).await;
    let mut dead = dead_letters(&dir.path().join("deadletter.jsonl"));
    dead.sort_by_key(|r| r.run_id);
    let mut expected = records.clone();
    expected.sort_by_key(|r| r.run_id);
    assert_eq!(dead, expected);
    assert_eq!(writes(&metrics, "ok"), 0);
}

/// A store whose write blocks the thread it runs on until released, as a SQLite batch blocks
/// the writer's own thread when the disk hangs its fsync.
struct BlockingStore {
    began: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl RecordStore for BlockingStore {
    fn insert_batch<'a>(
        &'a self,
        records: &'a [RunRecord],
    ) -> futures::future::BoxFuture<'a, Result<u64, duet::audit::AuditError>> {
        Box::pin(async move {
            let _ = self.began.lock().unwrap().send(());
            let _ = self
                .release
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60));
            Ok(records.len() as u64)
        })
    }
}

/// The drain's abort cannot cut off a write that blocks the writer's thread: shutdown waits
/// for it as long again as for the drain, then goes on without it (it used to wait forever).
#[tokio::test]
async fn shutdown_goes_on_when_a_write_blocks_the_writers_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (began, write_began) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel();
    let store = Arc::new(BlockingStore {
        began: std::sync::Mutex::new(began),
        release: std::sync::Mutex::new(released),
    });
    let writer = AuditWriter::start(
        store,
        options(&dir).with_own_thread(),
        Metrics::new().unwrap(),
    )
    .unwrap();
    writer.submit(record(1));
    write_began.recv_timeout(Duration::from_secs(30)).unwrap();
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        writer.shutdown(Duration::from_millis(200)),
    )
    .await;
    let took = started.elapsed();
    let _ = release.send(());
    assert!(
        stopped.is_ok(),
        "shutdown waited for a write that never ended"
    );
    assert!(
        took < Duration::from_secs(30),
        "bounded by twice the drain timeout, not the thread's stop timeout: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_batch_is_retried_on_the_backoff_schedule_then_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::failing(usize::MAX);
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(store.clone(), options(&dir), metrics.clone()).unwrap();
    let records = vec![record(1), record(2)];
    for r in &records {
        writer.submit(r.clone());
    }
    writer.shutdown(Duration::from_secs(60)).await;

    let attempts = store.attempts();
    assert_eq!(attempts.len(), 6, "one attempt and five retries");
    let nominal = [0.25, 0.5, 1.0, 2.0, 3.0];
    for (pair, nominal) in attempts.windows(2).zip(nominal) {
        let gap = (pair[1].0 - pair[0].0).as_secs_f64();
        assert!(
            gap >= nominal * 0.75 - 1e-3 && gap <= nominal + 1e-3,
            "gap {gap} for nominal {nominal}"
        );
    }
    assert_eq!(dead_letters(&dir.path().join("deadletter.jsonl")), records);
    assert_eq!(writes(&metrics, "retry"), 10);
    assert_eq!(writes(&metrics, "deadletter"), 2);
    assert_eq!(writes(&metrics, "ok"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_passing_outage_loses_nothing_and_dead_letters_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::failing(3);
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(store.clone(), options(&dir), metrics.clone()).unwrap();
    let r = record(1);
    writer.submit(r.clone());
    writer.shutdown(Duration::from_secs(60)).await;
    assert_eq!(store.attempts().len(), 4);
    assert_eq!(store.stored(), [r]);
    assert_eq!(writes(&metrics, "retry"), 3);
    assert!(dead_letters(&dir.path().join("deadletter.jsonl")).is_empty());
}

#[tokio::test(start_paused = true)]
async fn unreachable_postgres_dead_letters_then_replay_puts_records_back_once() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: every connection is refused.
    let down = Store::connect_lazy("postgres://postgres@127.0.0.1:1/duet").unwrap();
    assert!(down.ping().await.is_err());
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(Arc::new(down), options(&dir), metrics.clone()).unwrap();
    let records: Vec<RunRecord> = (0..3).map(record).collect();
    for r in &records {
        writer.submit(r.clone());
    }
    writer.shutdown(Duration::from_secs(60)).await;
    let path = dir.path().join("deadletter.jsonl");
    assert_eq!(dead_letters(&path), records);
    assert_eq!(writes(&metrics, "deadletter"), 3);
    assert_eq!(writes(&metrics, "retry"), 15);

    // The database is back (here: another one); replay puts each record back exactly once.
    // SQLite answers from a worker thread, which a paused clock would race: run for real.
    tokio::time::resume();
    let db = db::sqlite().await;
    let report = replay(&db.store, &path).await.unwrap();
    assert_eq!((report.written, report.skipped, report.kept), (3, 0, 0));
    assert!(dead_letters(&path).is_empty());
    let again = replay(&db.store, &path).await.unwrap();
    assert_eq!(again, ReplayReport::default());
    assert_eq!(count(&db.store, "dual_runs").await, 3);
    for r in &records {
        assert_eq!(db.store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
}

/// A record the database refuses (here a trigger stands for whatever it may refuse) keeps
/// only itself in the dead-letter file: the records replayed in the same batch go in.
#[tokio::test]
async fn replay_keeps_only_the_record_the_database_refuses() {
    let db = db::sqlite().await;
    refuse_rows(&db.store, "poison", "NEW.query = 'poison'").await;
    let mut records: Vec<RunRecord> = (0..5).map(record).collect();
    records[2].query = "poison".into();
    let path = db.dir.path().join("deadletter.jsonl");
    let lines: String = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    std::fs::write(&path, lines).unwrap();

    let report = replay(&db.store, &path).await.unwrap();
    assert_eq!((report.written, report.skipped, report.kept), (4, 0, 1));
    assert_eq!(dead_letters(&path), [records[2].clone()]);
    assert_eq!(count(&db.store, "dual_runs").await, 4);

    // Once the database takes it, the next replay puts it back.
    db::execute(&db.store, "DROP TRIGGER poison").await;
    let again = replay(&db.store, &path).await.unwrap();
    assert_eq!((again.written, again.skipped, again.kept), (1, 0, 0));
    assert_eq!(count(&db.store, "dual_runs").await, 5);
}

/// The live writer, likewise: a record the database refuses for what is in it (a trigger
/// stands for whatever that may be) goes to the dead-letter file alone; the other records
/// of its batch are written, and readiness is not held at 503 by it.
#[tokio::test]
async fn a_record_the_database_refuses_dead_letters_only_itself() {
    let (db, dir, writer, metrics) = writer_refusing("poison", "NEW.query = 'poison'").await;
    let mut records: Vec<RunRecord> = (0..5).map(record).collect();
    records[2].query = "poison".into();
    // Queued before the writer runs: one batch.
    for r in &records {
        writer.submit(r.clone());
    }
    writer.shutdown(Duration::from_secs(30)).await;
    assert_eq!(count(&db.store, "dual_runs").await, 4);
    let path = dir.path().join("deadletter.jsonl");
    assert_eq!(dead_letters(&path), [records[2].clone()]);
    assert_eq!(writes(&metrics, "ok"), 4);
    assert_eq!(writes(&metrics, "deadletter"), 1);
    assert_eq!(metrics.ready.get(), 1, "one refused record is no outage");
}

/// A batch that fails on every attempt sends its start rows to the dead-letter file too,
/// as start lines (their runs may still be going, and the journal holding them may go once
/// the records are settled); replay writes them as `running` rows.
#[tokio::test]
async fn a_batch_that_fails_every_attempt_dead_letters_its_start_rows() {
    use duet::audit::{AuditSink, OpenStatus, StartedRun, StoredRun};
    let (db, dir, writer, _) = writer_refusing("no_start_rows", "NEW.status = 'running'").await;
    let run = StartedRun::of(&record(1));
    // Writes are not known to fail yet: queued.
    drop(writer.started(run.clone()));
    writer.shutdown(Duration::from_secs(30)).await;
    let path = dir.path().join("deadletter.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"started\"") && text.contains(&run.run_id.to_string()));

    db::execute(&db.store, "DROP TRIGGER no_start_rows").await;
    let report = replay(&db.store, &path).await.unwrap();
    assert_eq!(report.running, 1, "{report}");
    match db.store.fetch_stored(run.run_id).await.unwrap() {
        Some(StoredRun::Open(open)) => assert_eq!(open.status, OpenStatus::Running),
        other => panic!("{other:?}"),
    }
}

/// A journal's start lines (runs that began while writes failed): one whose record is in
/// the file too is that record's; one without is a run cut off with its process when that
/// process is known dead (`duet serve` at start, for its own instance id), finalized
/// `interrupted`, and otherwise (`duet audit replay`, another instance's) written `running`,
/// since a live run is never marked interrupted; a start seen twice is one run; a run
/// already stored keeps its record.
#[tokio::test]
async fn replay_finalizes_journaled_starts_without_records_only_of_a_dead_process() {
    use duet::audit::{OpenStatus, StoredRun, replay::Starts, replay::replay_into};
    let db = db::sqlite().await;
    let stored = record(1);
    db.store
        .insert(std::slice::from_ref(&stored))
        .await
        .unwrap();
    let ended = record(2);
    let start = |r: &RunRecord, instance: &str| {
        serde_json::json!({"started": {
            "run_id": r.run_id, "client_request_id": null, "created_at": r.created_at,
            "query": r.query, "system": null, "messages": null, "params": null,
            "owner_fingerprint": null, "instance_id": instance, "client_id": null,
        }})
        .to_string()
    };
    let named = |i, query: &str| {
        let mut r = record(i);
        r.query = query.into();
        r
    };
    let lost = named(3, "cut off");
    let elsewhere = named(4, "another replica's");
    let path = db.dir.path().join("deadletter.jsonl.journal");
    let lines = [
        start(&stored, "gone:1"),
        start(&ended, "gone:1"),
        serde_json::to_string(&ended).unwrap(),
        start(&lost, "gone:1"),
        start(&lost, "gone:1"),
        start(&elsewhere, "live:2"),
    ];
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();

    let dead = Starts::OfDeadProcess {
        instance_id: "gone:1",
        any: false,
    };
    let report = replay_into(&db.store, &path, &path, dead).await.unwrap();
    assert_eq!(
        (
            report.written,
            report.kept,
            report.interrupted,
            report.running
        ),
        (1, 0, 1, 1),
        "{report}"
    );
    assert!(dead_letters(&path).is_empty());
    assert_eq!(count(&db.store, "dual_runs").await, 4);
    assert_eq!(db.store.fetch(stored.run_id).await.unwrap(), Some(stored));
    assert_eq!(db.store.fetch(ended.run_id).await.unwrap(), Some(ended));
    let status = |run: RunRecord| {
        let store = db.store.clone();
        async move {
            match store.fetch_stored(run.run_id).await.unwrap() {
                Some(StoredRun::Open(open)) => {
                    assert_eq!(open.query, run.query);
                    open.status
                }
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(status(lost).await, OpenStatus::Interrupted);
    assert_eq!(status(elsewhere.clone()).await, OpenStatus::Running);

    // `duet audit replay` never presumes a run dead.
    let cli = named(5, "replayed by hand");
    std::fs::write(&path, start(&cli, "gone:1") + "\n").unwrap();
    let report = replay(&db.store, &path).await.unwrap();
    assert_eq!((report.interrupted, report.running), (0, 1), "{report}");
    assert_eq!(status(cli).await, OpenStatus::Running);
}

#[tokio::test(start_paused = true)]
async fn full_queue_dead_letters_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let store = FakeStore::gated(gate.clone());
    let metrics = Metrics::new().unwrap();
    let mut opts = options(&dir);
    opts.queue_capacity = 2;
    opts.high_water = 2;
    let writer = AuditWriter::start(store.clone(), opts, metrics.clone()).unwrap();
    let records: Vec<RunRecord> = (0..5).map(record).collect();
    for r in &records {
        writer.submit(r.clone());
    }
    assert!(writer.backlogged());
    // The writer takes its batch of two and waits on the gate; the queue has room again.
    tokio::task::yield_now().await;
    assert!(!writer.backlogged());
    gate.add_permits(10);
    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(store.stored(), records[..2]);
    assert_eq!(
        dead_letters(&dir.path().join("deadletter.jsonl")),
        records[2..]
    );
    assert_eq!(writes(&metrics, "deadletter"), 3);
}

#[tokio::test]
async fn shutdown_drains_the_queue_into_sqlite() {
    let db = db::sqlite().await;
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(
        Arc::new(db.store.clone()),
        options(&db.dir),
        metrics.clone(),
    )
    .unwrap();
    let records: Vec<RunRecord> = (0..2000).map(record).collect();
    let started = std::time::Instant::now();
    for r in &records {
        writer.submit(r.clone());
    }
    writer.shutdown(Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    eprintln!(
        "sqlite writer: 2000 records in {elapsed:?} ({:.0} records/s, debug build)",
        2000.0 / elapsed.as_secs_f64()
    );
    assert_eq!(count(&db.store, "dual_runs").await, 2000);
    assert_eq!(count(&db.store, "model_traces").await, 4000);
    assert_eq!(writes(&metrics, "ok"), 2000);
    assert!(dead_letters(&db.dir.path().join("deadletter.jsonl")).is_empty());
    // After shutdown, nothing is lost either: a late record goes to the dead-letter file.
    let late = record(9);
    writer.submit(late.clone());
    assert_eq!(
        dead_letters(&db.dir.path().join("deadletter.jsonl")),
        [late]
    );
}

#[tokio::test(start_paused = true)]
async fn drain_past_its_timeout_dead_letters_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // A database that never answers.
    let store = FakeStore::gated(Arc::new(Semaphore::new(0)));
    let writer = AuditWriter::start(store, options(&dir), Metrics::new().unwrap()).unwrap();
    let records: Vec<RunRecord> = (0..700).map(record).collect();
    for r in &records {
        writer.submit(r.clone());
    }
    let started = tokio::time::Instant::now();
    writer.shutdown(Duration::from_secs(2)).await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(dead_letters(&dir.path().join("deadletter.jsonl")), records);
}

// ---- replay ----------------------------------------------------------------------------

async fn replay_twice(store: &Store, dir: &tempfile::TempDir) {
    let path = dir.path().join("deadletter.jsonl");
    let stored = record(0);
    store.insert(std::slice::from_ref(&stored)).await.unwrap();
    let fresh = [record(1), record(2)];
    let mut content = String::new();
    for r in [&stored, &fresh[0], &fresh[1], &fresh[0]] {
        content.push_str(&serde_json::to_string(r).unwrap());
        content.push('\n');
    }
    content.push_str("{not a record}\n");
    std::fs::write(&path, &content).unwrap();

    let first = replay(store, &path).await.unwrap();
    assert_eq!(
        first,
        ReplayReport {
            written: 2,
            skipped: 2,
            kept: 1,
            interrupted: 0,
            running: 0
        }
    );
    assert_eq!(count(store, "dual_runs").await, 3);
    assert_eq!(count(store, "model_traces").await, 6);
    for r in &fresh {
        assert_eq!(store.fetch(r.run_id).await.unwrap().as_ref(), Some(r));
    }
    // Only what was written (or was already there) is gone from the file.
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not a record}\n");

    let second = replay(store, &path).await.unwrap();
    assert_eq!(
        second,
        ReplayReport {
            written: 0,
            skipped: 0,
            kept: 1,
            interrupted: 0,
            running: 0
        }
    );
    assert_eq!(count(store, "dual_runs").await, 3);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "{not a record}\n");
}

#[tokio::test]
async fn replay_twice_sqlite() {
    let db = db::sqlite().await;
    replay_twice(&db.store, &db.dir).await;
}

#[tokio::test]
async fn replay_twice_postgres() {
    let Some(db) = db::postgres("replay_twice").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    replay_twice(&db.store, &dir).await;
}

#[tokio::test(start_paused = true)]
async fn replay_keeps_records_the_database_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deadletter.jsonl");
    let line = serde_json::to_string(&record(1)).unwrap() + "\n";
    std::fs::write(&path, &line).unwrap();
    let down = Store::connect_lazy("postgres://postgres@127.0.0.1:1/duet").unwrap();
    let report = replay(&down, &path).await.unwrap();
    assert_eq!(
        report,
        ReplayReport {
            written: 0,
            skipped: 0,
            kept: 1,
            interrupted: 0,
            running: 0
        }
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), line);
}

/// The `RecordStore` seam is what the writer sees; the real store satisfies it too.
#[test]
fn store_is_a_record_store() {
    fn assert_impl<T: RecordStore>() {}
    assert_impl::<Store>();
}

/// Throughput of the real store, printed (`--nocapture`), for the record; run with
/// `cargo test --release -- --ignored audit::throughput`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn throughput_sqlite() {
    let db = db::sqlite().await;
    let records: Vec<RunRecord> = (0..20_000).map(record).collect();
    let started = std::time::Instant::now();
    for chunk in records.chunks(500) {
        db.store.insert(chunk).await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "sqlite: 20000 records in {elapsed:?} ({:.0} records/s)",
        20_000.0 / elapsed.as_secs_f64()
    );
}

/// A service appending dead letters while `duet audit replay` runs: no line may fall between
/// the file replay reads and the one the service writes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_appending_loses_nothing() {
    let db = db::sqlite().await;
    let path = db.dir.path().join("dead.jsonl");
    const N: usize = 600;
    let appender = duet::audit::deadletter::Appender::new(&path, None);
    let writer = std::thread::spawn(move || {
        for i in 0..N {
            appender.append(&[record(i)]).unwrap();
        }
    });
    while !writer.is_finished() {
        duet::audit::replay::replay(&db.store, &path).await.unwrap();
    }
    writer.join().unwrap();
    duet::audit::replay::replay(&db.store, &path).await.unwrap();
    assert_eq!(db::count(&db.store, "dual_runs").await, N as i64);
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// With a thread of its own (as `duet serve` runs it on SQLite), the writer writes every
/// record from there, drains on shutdown, and its thread is gone afterwards.
#[tokio::test]
async fn a_writer_on_its_own_thread_writes_everything_and_stops_the_thread() {
    let db = db::sqlite().await;
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(
        Arc::new(db.store.clone()),
        options(&db.dir).with_own_thread(),
        metrics.clone(),
    )
    .unwrap();
    assert!(thread_names().iter().any(|n| n == "duet-audit-0"));
    for i in 0..300 {
        writer.submit(record(i));
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    writer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(&db.store, "dual_runs").await, 300);
    assert_eq!(writes(&metrics, "ok"), 300);
    assert!(dead_letters(&db.dir.path().join("deadletter.jsonl")).is_empty());
    assert!(
        !thread_names().iter().any(|n| n == "duet-audit-0"),
        "{:?}",
        thread_names()
    );
}

/// A run's response waits for its start row (`StartWritten`): answered once the batch holding
/// it has committed, never waited on past the bound when the store hangs, and not waited on
/// at all once a write has been running for `STALLED_AFTER`.
#[tokio::test(start_paused = true)]
async fn a_start_row_is_answered_once_committed_and_not_waited_on_past_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let store = FakeStore::gated(Arc::clone(&gate));
    let writer = AuditWriter::start(store.clone(), options(&dir), Metrics::new().unwrap()).unwrap();
    let bound = Duration::from_millis(100);
    let timed = |written: duet::audit::StartWritten| {
        tokio::spawn(async move {
            let began = tokio::time::Instant::now();
            let ok = written.wait(bound).await;
            (ok, began.elapsed())
        })
    };
    // A start row and a record in one batch, whose commit waits for the gate.
    let first = timed(writer.started(StartedRun::of(&record(1))));
    writer.submit(record(2));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!first.is_finished(), "answered before its batch committed");
    gate.add_permits(1);
    let (ok, waited) = first.await.unwrap();
    assert!(ok, "the commit is answered");
    assert_eq!(
        waited,
        Duration::from_millis(30),
        "answered when it committed"
    );
    // The next batch hangs: its start row is waited on for the bound, not longer.
    let third_record = record(3);
    let second = timed(writer.started(StartedRun::of(&third_record)));
    writer.submit(record(4));
    let (ok, waited) = second.await.unwrap();
    assert!(!ok);
    assert_eq!(waited, bound);
    // Its attempt has now run for 100 ms: the write counts as stalled (an unreachable
    // database fails the attempt only when the pool gives up connecting). A run starting
    // meanwhile is not held behind it: its start, and a record submitted meanwhile, go to the
    // journal as well as the queue, and the response waits for the journal's sync only.
    let fifth_record = record(5);
    let fifth = StartedRun::of(&fifth_record);
    let third = timed(writer.started(fifth.clone()));
    // (Whether the wait saw the sync depends on the journal thread's real time against this
    // test's paused clock: not asserted. What is: both lines are in the journal.)
    let (_, waited) = third.await.unwrap();
    assert!(waited <= bound);
    let sixth = record(6);
    writer.submit(sixth.clone());
    let journal = dir.path().join("deadletter.jsonl.journal");
    // The journal thread writes in real time, which this test's paused clock does not
    // measure: waited for on the wall clock (up to 10 s, a few ms when the box is idle),
    // letting the writer's task run in between (this runtime has one thread).
    let mut text = String::new();
    let ids = [&third_record.run_id, &fifth.run_id, &sixth.run_id].map(|id| id.to_string());
    for _ in 0..1000 {
        text = std::fs::read_to_string(&journal).unwrap_or_default();
        if ids.iter().all(|id| text.contains(id.as_str())) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(text.contains(&fifth.run_id.to_string()), "{text}");
    assert!(text.contains(&sixth.run_id.to_string()), "{text}");
    // And the stalled batch's own start row and record, journaled when it stalled.
    assert!(text.contains(&third_record.run_id.to_string()), "{text}");
    // Runs 3 and 5 end too (3's start row was journaled with its stalled batch): with every
    // record written, nothing is outstanding and the journal goes (a run that had not ended
    // would keep it: its start is its only trace).
    writer.submit(third_record);
    writer.submit(fifth_record);
    gate.add_permits(100);
    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(store.stored().len(), 5, "every record written in the end");
    assert!(
        !journal.exists(),
        "nothing outstanding: the journal goes: {}",
        std::fs::read_to_string(&journal).unwrap_or_default()
    );
}

/// A run whose start the writer journaled when its batch failed keeps the journal until its
/// record is settled, though everything else in it is: before, the journal went with the
/// last record, and a crash then left the run in flight no row.
#[tokio::test]
async fn a_start_journaled_by_a_failed_batch_keeps_the_journal_until_its_run_ends() {
    use duet::audit::{AuditSink, StartedRun};
    let (_db, dir, writer, _) = writer_refusing("down", "1").await;
    let journal = dir.path().join("deadletter.jsonl.journal");
    let deadletter = dir.path().join("deadletter.jsonl");
    let in_flight = record(1);
    // Queued (writes are not known to fail yet); journaled by the writer at the first failure.
    drop(writer.started(StartedRun::of(&in_flight)));
    // Another run ends meanwhile: its record is journaled, then dead-lettered.
    let other = record(2);
    writer.submit(other.clone());
    let settled = |path: &std::path::Path, run: &RunRecord| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .any(|l| !l.starts_with("{\"started\":") && l.contains(&run.run_id.to_string()))
    };
    for _ in 0..500 {
        if settled(&deadletter, &other) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        settled(&deadletter, &other),
        "the other record is dead-lettered"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = std::fs::read_to_string(&journal).expect("the journal is kept");
    assert!(text.contains(&in_flight.run_id.to_string()), "{text}");
    // The run ends: its record settles, and with it its start; nothing is left.
    writer.submit(in_flight.clone());
    for _ in 0..500 {
        if settled(&deadletter, &in_flight) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(settled(&deadletter, &in_flight));
    for _ in 0..100 {
        if !journal.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!journal.exists(), "nothing outstanding: the journal goes");
    writer.shutdown(Duration::from_secs(10)).await;
}

/// A batch whose first attempt fails lets its start rows' waiters go at once: their responses
/// do not wait through the retries for their bound.
#[tokio::test(start_paused = true)]
async fn a_failed_batch_lets_its_start_rows_waiters_go_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FakeStore::failing(usize::MAX);
    let writer = AuditWriter::start(store.clone(), options(&dir), Metrics::new().unwrap()).unwrap();
    let written = writer.started(StartedRun::of(&record(1)));
    writer.submit(record(2));
    let began = tokio::time::Instant::now();
    assert!(!written.wait(Duration::from_millis(100)).await);
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "let go at the first failure"
    );
    assert_eq!(store.attempts().len(), 1);
    // Writes failing: a new run's start goes to the journal, not behind the retries, and its
    // response waits for that line's fsync only.
    // (Whether the wait sees the sync depends on the journal thread's real time against this
    // test's paused clock: not asserted; the line is, on the wall clock.)
    let third = StartedRun::of(&record(3));
    let _ = writer
        .started(third.clone())
        .wait(Duration::from_millis(100))
        .await;
    let path = dir.path().join("deadletter.jsonl.journal");
    let journaled = |text: &str| {
        text.lines()
            .any(|l| l.starts_with("{\"started\":") && l.contains(&third.run_id.to_string()))
    };
    let mut journal = String::new();
    for _ in 0..1000 {
        journal = std::fs::read_to_string(&path).unwrap_or_default();
        if journaled(&journal) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(journaled(&journal), "{journal}");
    writer.shutdown(Duration::from_secs(60)).await;
}

/// A store that takes two batches at once, each call answering after `delay`: committed,
/// or failed when `fails` (a database that times out rather than refuses).
struct TimedTwoInFlight {
    delay: Duration,
    fails: bool,
}

impl RecordStore for TimedTwoInFlight {
    fn insert_batch<'a>(
        &'a self,
        records: &'a [RunRecord],
    ) -> futures::future::BoxFuture<'a, Result<u64, duet::audit::AuditError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if self.fails {
                return Err(duet::audit::AuditError::Timeout(self.delay));
            }
            Ok(records.len() as u64)
        })
    }

    fn batches_in_flight(&self) -> usize {
        2
    }
}

/// With batches in flight (PostgreSQL), a start row is answered when its batch commits,
/// not when the writer's batch interval ends: with 50 ms between batches, a batch started at
/// once (the writer idle) is answered after the commit's 5 ms, not after 50.
#[tokio::test(start_paused = true)]
async fn a_flight_committing_within_the_batch_interval_is_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(&dir).with_batch_interval(Duration::from_millis(50));
    let writer = AuditWriter::start(
        Arc::new(TimedTwoInFlight {
            delay: Duration::from_millis(5),
            fails: false,
        }),
        options,
        Metrics::new().unwrap(),
    )
    .unwrap();
    for round in 0..3 {
        let written = writer.started(StartedRun::of(&record(2 * round)));
        writer.submit(record(2 * round + 1));
        let began = tokio::time::Instant::now();
        assert!(written.wait(Duration::from_millis(100)).await);
        let waited = began.elapsed();
        assert!(
            waited <= Duration::from_millis(5),
            "round {round}: answered after {waited:?}"
        );
        // Past the interval: the next batch starts at once again.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    writer.shutdown(Duration::from_secs(5)).await;
}

/// When the first of two batches in flight fails, the second's records are journaled at
/// once, not after the first one's retries (which take tens of seconds here): until then
/// they were in memory only, and a `kill -9` lost them. Its start rows' waiters are let go
/// then too.
#[tokio::test(start_paused = true)]
async fn when_a_flight_fails_the_next_ones_records_are_journaled_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new().unwrap();
    let writer = AuditWriter::start(
        Arc::new(TimedTwoInFlight {
            delay: Duration::from_secs(5),
            fails: true,
        }),
        options(&dir),
        metrics.clone(),
    )
    .unwrap();
    let records = vec![record(1), record(2)];
    writer.submit(records[0].clone());
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The second flight also holds a start row, waited on here with a long bound.
    let second = writer.started(StartedRun::of(&record(3)));
    let waiting = tokio::spawn(second.wait(Duration::from_secs(60)));
    writer.submit(records[1].clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metrics.audit_journaled_total.get(),
        2,
        "both flights' records are in the journal a second after the first failure"
    );
    assert!(
        waiting.is_finished(),
        "the second flight's waiter is let go when the first fails, not after its retries"
    );
    assert!(!waiting.await.unwrap());
    writer.shutdown(Duration::from_secs(1)).await;
    let mut dead = dead_letters(&dir.path().join("deadletter.jsonl"));
    dead.sort_by_key(|r| r.run_id);
    let mut expected = records;
    expected.sort_by_key(|r| r.run_id);
    assert_eq!(
        dead, expected,
        "cut off by the drain: dead-lettered, none lost"
    );
}
