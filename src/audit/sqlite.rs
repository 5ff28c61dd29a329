//! SQLite SQL for the audit store: multi-row `INSERT`s in one transaction, and reading back.
//!
//! Timestamps are stored as fixed-width RFC 3339 text (`2025-01-31T12:34:56.123456Z`), so
//! text order is time order and SQLite's date functions accept them unchanged.
//!
//! Transactions are plain `BEGIN IMMEDIATE` / `COMMIT` statements on the writer's own
//! connection, not sqlx's `Transaction`, and a connection whose write failed is closed,
//! never reused.
//! The reason is a trap found under a hostile test (sqlx 0.8.6): when COMMIT fails (an I/O
//! error on an immutable file, a full disk), sqlx does not lower its transaction depth, so
//! the connection goes back to the pool counted as inside a transaction; its next
//! `begin`/`commit` become `SAVEPOINT`/`RELEASE`, and after a second failed commit SQLite is
//! really left inside a transaction that no later RELEASE commits. Observed with a pool of
//! one connection: two commits failing with `(778) disk I/O error`, then three "successful"
//! commits that no other connection ever saw, a raw `BEGIN` on the pooled connection
//! refused with "cannot start a transaction within a transaction", and `database is
//! locked` for every other writer. SQLite documents that a failed COMMIT may or may not
//! leave the transaction open ("Response To Errors Within A Transaction"), so the only
//! safe response is to roll back and discard the connection.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{
    QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};

use super::{
    AuditError, Deadline, Result, RunRecord, events,
    rows::{Dialect, corrupt, messages_column, params_column, to_db},
    store::Batch,
};

/// Runs per statement. SQLite allows at most 32766 bound values per statement; a chunk of
/// runs binds 16 values per run and 16 per trace (two per run): 500 runs bind 24000. A chunk
/// of start rows binds 11 values each.
///
/// One statement per kind and chunk, its text built for the batch's size, rather than a few
/// fixed sizes that stay prepared: those cut the writer's instructions by 5 % (fewer
/// re-parsed statements) but made a batch several statements, each a round trip to sqlx's
/// SQLite thread, and on a saturated CPU each round trip waits for that thread to be
/// scheduled: at 1,300 runs/s the writer fell behind and dead-lettered 6,824 records that
/// this shape writes (docs/benchmarks.md, "Audit writer, second pass").
const CHUNK: usize = 500;

/// Batches of at most this many rows (start rows and records) keep their query prepared
/// in the connection's statement cache; larger ones are prepared for the one use. A batch is
/// one query whose text depends on how many start rows and records it holds, so small
/// shapes recur whenever the service is not saturated (and preparing one again costs a
/// visible share of a small commit), while large ones rarely repeat and a prepared query
/// holds the bytecode of every value it binds: 0.72 MB for one 500-row insert of 16
/// columns (`.stats on` in the `sqlite3` shell), about 2.7 MB for a full batch. sqlx bounds
/// its cache (100 per connection) in statements, not bytes: kept small, 100 of them stay
/// under about 5 MB.
const KEEP_PREPARED: usize = 8;

/// A record's run row: inserted, or finalizing the run's `running` row (contract §8), or
/// replacing an `interrupted` one (the real record of a run presumed dead, back from the
/// journal or the dead-letter file, says more than the presumption). A row that already
/// ended is left alone, so a record is stored once however often it is replayed. Only the
/// columns a start row does not know are set: the others (the run's id, time, request,
/// instance) are the same run's, and leaving them out of `SET` spares their indexes.
const UPSERT_RUN: &str = " ON CONFLICT (run_id) DO UPDATE SET \
    status = excluded.status, total_ms = excluded.total_ms, \
    service_version = excluded.service_version, events = excluded.events, \
    owner_fingerprint = excluded.owner_fingerprint, cost_usd = excluded.cost_usd, \
    agreement = excluded.agreement \
    WHERE dual_runs.status IN ('running', 'interrupted')";

/// How reading a record back differs on SQLite: `?` parameters, `created_at` as text.
pub(super) const DIALECT: Dialect<SqliteRow> = Dialect {
    by_run_id: "run_id = ?",
    json_columns: "messages, params",
    created_at: |run_id, row| {
        let text: String = row.try_get("created_at")?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt(run_id, format!("created_at {text:?}: {e}")))
    },
};

/// `2025-01-31T12:34:56.123456Z`: RFC 3339 in UTC, always six fractional digits.
///
/// Through `to_rfc3339_opts` rather than `format("%Y-%m-%dT%H:%M:%S%.6fZ")`, which produces
/// the same text (a test checks it) but parses its format string on every call: that was 4 %
/// of the audit writer's instructions, two timestamps per run.
pub(super) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A SQLite pool and the identity of the file it has open.
///
/// A file deleted or replaced under the running service stays open in every pooled
/// connection: writes to it succeed, into an inode nobody can read any more. So each write
/// checks that the file at the path is still the one the pool opened (device and inode),
/// and fails when it is not, which sends the records to retry and dead-letter instead.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    /// Reads, migrations and the service's other statements.
    pool: SqlitePool,
    /// The audit writer's batches: one connection, always the same, so its page cache stays
    /// valid between commits. Taking whichever connection the shared pool handed out next
    /// meant a different connection for each batch (the pool's idle queue is first in,
    /// first out), and a connection that did not make the last commit finds the WAL changed
    /// and reads the pages it needs again: 24 `pread`s per commit, measured
    /// (docs/benchmarks.md, "One writer connection, one round trip").
    writer: Arc<WriterSlot>,
    file: Arc<SqliteFile>,
}

/// The writer's connection, outside any pool. sqlx pings a pooled connection each time it
/// goes back to its pool, whatever `test_before_acquire` says: a second round trip to the
/// connection's thread per batch, each waking that thread and then the writer's. Kept here,
/// a batch is one round trip (docs/benchmarks.md, "The writer's connection outside the
/// pool").
#[derive(Debug)]
struct WriterSlot {
    options: SqliteConnectOptions,
    /// How long opening the connection may take before the batch counts as failed.
    connect_timeout: Duration,
    /// The idle connection, or `None` before the first batch, after a failed one (whose
    /// connection was closed), or while a batch holds it. Never locked across an await: a
    /// batch takes the connection out and puts it back once its write ended cleanly.
    idle: std::sync::Mutex<Option<SqliteConnection>>,
    /// Set by `close`: no connection is opened or kept any more.
    closed: std::sync::atomic::AtomicBool,
}

impl WriterSlot {
    /// The idle connection, or a new one. Two batches at once (the service's writer never
    /// does this, tests and tools may) get two connections; SQLite's lock orders them.
    async fn take(&self) -> Result<SqliteConnection> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(AuditError::Database(sqlx::Error::PoolClosed));
        }
        let idle = self.take_idle();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        use sqlx::ConnectOptions as _;
        let timed_out = || {
            AuditError::Connect(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("opening the database took over {:?}", self.connect_timeout),
            )))
        };
        tokio::time::timeout(self.connect_timeout, self.options.connect())
            .await
            .map_err(|_| timed_out())?
            .map_err(AuditError::from)
    }

    fn take_idle(&self) -> Option<SqliteConnection> {
        self.idle.lock().map(|mut slot| slot.take()).unwrap_or(None)
    }

    /// Keeps a connection whose write ended cleanly for the next batch; a second one (see
    /// `take`) is closed.
    fn give_back(&self, conn: SqliteConnection) {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Ok(mut slot) = self.idle.lock()
            && slot.is_none()
        {
            *slot = Some(conn);
        }
    }

    /// Closes the idle connection; one a batch holds now is closed when the batch ends.
    async fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let idle = self.take_idle();
        if let Some(conn) = idle {
            use sqlx::Connection as _;
            let _ = conn.close().await;
        }
    }
}

#[derive(Debug)]
struct SqliteFile {
    /// `None` for an in-memory database, which has no file to lose.
    path: Option<PathBuf>,
    /// (device, inode) of the file when the pool first wrote to or probed it.
    opened: OnceLock<(u64, u64)>,
}

impl std::ops::Deref for SqliteStore {
    type Target = SqlitePool;

    fn deref(&self) -> &SqlitePool {
        &self.pool
    }
}

impl SqliteStore {
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the writer's connection and the pool, waiting for the pool's connections to
    /// return.
    pub(super) async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }

    /// The database file, or `None` for an in-memory database.
    pub fn path(&self) -> Option<&Path> {
        self.file.path.as_deref()
    }

    /// Fails when the file at the path is no longer the file the pool opened (deleted,
    /// or replaced by another). The first call, made once a connection has opened the file,
    /// records which file that is.
    /// A pool that connects on first use, to the file the URL names (created if missing).
    pub(super) fn connect_lazy(
        url: &str,
        acquire_timeout: Duration,
        busy_timeout: Duration,
    ) -> Result<SqliteStore> {
        use sqlx::ConnectOptions as _;
        let options = SqliteConnectOptions::from_str(url)
            .map_err(AuditError::Connect)?
            .create_if_missing(true)
            // WAL lets `/runs` and operators' sqlite3 read while the writer writes.
            // FULL sync: a commit is on disk before COMMIT returns, so a record counted
            // `ok` survives a power cut too, as a dead-letter line (fsynced) does.
            // NORMAL would only survive a process crash. The cost is one fsync per
            // transaction, and the writer batches, so a busy service pays it per batch.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(busy_timeout)
            .foreign_keys(true)
            // sqlx logs every statement at `debug`, and asking the subscriber whether that
            // level is on cost about 3,000 instructions per statement, a tenth of a
            // small insert's; slow statements are still logged (`warn`, over 1 s).
            .log_statements(log::LevelFilter::Off);
        let path = sqlite_path(&options);
        // One writer at a time is all SQLite allows, so the audit writer has one connection.
        // Built from the same options, an in-memory database's connections share it (sqlx
        // names it once, at parse time, and opens it with a shared cache). It is opened at
        // the first batch, and never pinged: a broken connection fails the batch's BEGIN
        // instead, and the batch is retried on a new one.
        let writer = Arc::new(WriterSlot {
            options: options.clone(),
            connect_timeout: acquire_timeout,
            idle: std::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options);
        Ok(SqliteStore {
            pool,
            writer,
            file: Arc::new(SqliteFile {
                path,
                opened: OnceLock::new(),
            }),
        })
    }

    pub(super) fn check_file(&self) -> Result<()> {
        let Some(path) = &self.file.path else {
            return Ok(());
        };
        let replaced = || AuditError::FileReplaced { path: path.clone() };
        let now = match std::fs::metadata(path) {
            Ok(meta) => file_id(&meta),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(replaced()),
            Err(e) => {
                return Err(AuditError::DeadLetter {
                    path: path.clone(),
                    source: e,
                });
            }
        };
        if *self.file.opened.get_or_init(|| now) == now {
            Ok(())
        } else {
            Err(replaced())
        }
    }
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// The file a `sqlite:` URL names, or `None` for an in-memory database.
fn sqlite_path(options: &SqliteConnectOptions) -> Option<PathBuf> {
    let path = options.get_filename();
    let text = path.to_string_lossy();
    if text.is_empty() || text == ":memory:" || text.starts_with("file:") {
        None
    } else {
        Some(Path::new(&*text).to_owned())
    }
}

/// The writer's connection during a batch: kept for the next batch only if the write on it
/// ended cleanly. An error, or the future being dropped half-way (the writer's timeout), may
/// have left it inside a transaction: it is then dropped, which closes it, and closing a
/// SQLite connection rolls back whatever transaction it holds.
struct WriteConn<'a> {
    conn: Option<SqliteConnection>,
    slot: &'a WriterSlot,
    clean: bool,
}

impl Drop for WriteConn<'_> {
    fn drop(&mut self) {
        if self.clean
            && let Some(conn) = self.conn.take()
        {
            self.slot.give_back(conn);
        }
    }
}

pub(super) async fn write_batch(store: &SqliteStore, batch: &Batch<'_>) -> Result<u64> {
    // A write into a file that is no longer at the path would be lost: do not start one.
    store.check_file()?;
    let mut conn = WriteConn {
        conn: Some(store.writer.take().await?),
        slot: &store.writer,
        clean: false,
    };
    // Just put there; only `Drop` takes it out.
    let Some(db) = conn.conn.as_mut() else {
        return Err(AuditError::Database(sqlx::Error::PoolClosed));
    };
    // IMMEDIATE takes the write lock now, so a busy database fails here (and is retried)
    // rather than at COMMIT. A BEGIN that fails because a transaction is already open
    // would also catch a poisoned connection, should one ever be kept.
    let mut sql = QueryBuilder::<Sqlite>::new("BEGIN IMMEDIATE; ");
    push_started(&mut sql, batch);
    push_rows(&mut sql, batch.instance_id, &batch.records);
    sql.push("COMMIT");
    // The whole transaction is one query of several statements: one round trip to sqlx's
    // SQLite thread, where it was five (BEGIN, three inserts, COMMIT), each of which woke
    // that thread and then the writer's (docs/benchmarks.md, "One writer connection, one
    // round trip"). SQLite runs the statements in order and sqlx stops at the first that
    // fails, so a failed insert never reaches COMMIT. sqlx 0.8 supports several statements
    // in one query on SQLite only, and calls that behaviour deprecated: the audit tests
    // (every row once, the faults) fail loudly should a later version drop it. Its rows are
    // the `SELECT changes()` after each chunk of records: the run rows each chunk wrote.
    let small = batch.started.len() + batch.records.len() <= KEEP_PREPARED;
    let result = sql
        .build_query_scalar::<i64>()
        .persistent(small)
        .fetch_all(&mut *db)
        .await
        .map(|counts| counts.into_iter().map(super::rows::from_db).sum::<u64>())
        .map_err(AuditError::from);
    match result {
        Ok(written) => {
            conn.clean = true;
            drop(conn);
            // Committed, but into the file at the path? If it was deleted or replaced
            // meanwhile, the rows are in an inode nobody will read: count them as failed so
            // that they are retried and dead-lettered, not reported `ok`.
            store.check_file()?;
            Ok(written)
        }
        Err(e) => {
            // Best effort: closing (on drop) rolls back as well; this just does it now.
            let _ = sqlx::query("ROLLBACK").execute(&mut *db).await;
            Err(e)
        }
    }
}

/// The `running` rows of runs that started, one statement per chunk. A row already there
/// (the run ended and its record came first) is left alone.
fn push_started<'a>(sql: &mut QueryBuilder<'a, Sqlite>, batch: &'a Batch<'_>) {
    for chunk in batch.started.chunks(CHUNK) {
        sql.push(
            "INSERT INTO dual_runs (run_id, client_request_id, created_at, query, system, \
             status, total_ms, service_version, owner_fingerprint, instance_id, messages, \
             params, client_id) ",
        );
        sql.push_values(chunk, |mut row, r| {
            row.push_bind(r.run_id.to_string())
                .push_bind(r.client_request_id.as_deref())
                .push_bind(format_time(&r.created_at))
                .push_bind(&*r.query)
                .push_bind(r.system.as_deref())
                .push("'running'")
                .push("0")
                .push_bind(crate::SERVICE_VERSION)
                .push_bind(r.owner_fingerprint.as_deref())
                .push_bind(r.instance_id.as_deref())
                .push_bind(
                    r.conversation
                        .as_ref()
                        .map(|c| messages_column(c.messages(), Cow::Borrowed)),
                )
                .push_bind(r.params.as_ref().map(params_column))
                .push_bind(r.client_id.as_deref());
        });
        sql.push(" ON CONFLICT (run_id) DO NOTHING; ");
    }
}

/// Each chunk of records: its run rows, `SELECT changes()` (how many of them were written),
/// then its traces.
fn push_rows<'a>(
    sql: &mut QueryBuilder<'a, Sqlite>,
    instance_id: Option<&'a str>,
    records: &'a [&RunRecord],
) {
    for chunk in records.chunks(CHUNK) {
        sql.push(
            "INSERT INTO dual_runs (run_id, client_request_id, created_at, query, system, \
             status, total_ms, service_version, events, owner_fingerprint, instance_id, \
             messages, params, client_id, cost_usd, agreement) ",
        );
        sql.push_values(chunk, |mut row, r| {
            row.push_bind(r.run_id.to_string())
                .push_bind(r.client_request_id.as_deref())
                .push_bind(format_time(&r.created_at))
                .push_bind(r.query.as_str())
                .push_bind(r.system.as_deref())
                .push_bind(r.status.as_str())
                .push_bind(to_db(r.total_ms))
                .push_bind(r.service_version.as_str())
                .push_bind(events::to_column(&r.events))
                .push_bind(r.owner_fingerprint.as_deref())
                .push_bind(instance_id)
                .push_bind(r.messages.as_ref().map(|m| {
                    messages_column(
                        m.iter().map(|m| (m.role, m.content.as_str())),
                        Cow::Borrowed,
                    )
                }))
                .push_bind(r.params.as_ref().map(params_column))
                .push_bind(r.client_id.as_deref())
                .push_bind(r.cost_usd)
                .push_bind(r.agreement);
        });
        // A replayed or resubmitted record is ignored, never duplicated (contract §5).
        sql.push(UPSERT_RUN);
        sql.push("; SELECT changes(); ");

        sql.push(
            "INSERT INTO model_traces (run_id, model, provider, model_name, model_version, \
             outcome, error_type, error_message, deadline, text, finish_reason, latency_ms, \
             ttft_ms, input_tokens, output_tokens, cost_usd) ",
        );
        let rows = chunk
            .iter()
            .flat_map(|r| [(r.run_id, "flash", &r.flash), (r.run_id, "pro", &r.pro)]);
        sql.push_values(rows, |mut row, (run_id, role, t)| {
            row.push_bind(run_id.to_string())
                .push_bind(role)
                .push_bind(t.provider.as_str())
                .push_bind(t.model.as_str())
                .push_bind(t.model_version.as_deref())
                .push_bind(t.outcome.as_str())
                .push_bind(t.error_type.as_deref())
                .push_bind(t.error_message.as_deref())
                .push_bind(t.deadline.map(Deadline::as_str))
                .push_bind(t.text.as_str())
                .push_bind(t.finish_reason.as_deref())
                .push_bind(to_db(t.latency_ms))
                .push_bind(t.ttft_ms.map(to_db))
                .push_bind(t.input_tokens.map(to_db))
                .push_bind(t.output_tokens.map(to_db))
                .push_bind(t.cost_usd);
        });
        // A run whose row was already final has its traces: nothing to add. One finalized
        // just now (from `running` or `interrupted`) has none yet.
        sql.push(" ON CONFLICT (run_id, model) DO NOTHING; ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_fixed_width_rfc3339_with_microseconds() {
        use chrono::{Datelike, TimeZone};
        let formatted = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        let mut t = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap();
        // Whole seconds, a nanosecond that rounds down, leap days, the end of a year.
        let steps = [
            chrono::Duration::nanoseconds(999),
            chrono::Duration::microseconds(1),
            chrono::Duration::milliseconds(123_456_789),
            chrono::Duration::days(59),
            chrono::Duration::seconds(86_399) + chrono::Duration::nanoseconds(999_999_999),
        ];
        for i in 0..20_000 {
            t += steps[i % steps.len()] * (i as i32 % 7 + 1);
            assert_eq!(format_time(&t), formatted(t), "{t:?}");
            assert_eq!(format_time(&t).len(), 27);
        }
        assert!(
            t.year() > 2100,
            "the walk crossed the years that matter: {t}"
        );
        assert_eq!(
            format_time(&Utc.with_ymd_and_hms(2025, 1, 31, 12, 34, 56).unwrap()),
            "2025-01-31T12:34:56.000000Z"
        );
    }
}
