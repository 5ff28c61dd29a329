//! SQLite for the audit store: the pool that reads records back and runs migrations, and the
//! writer's batches (their SQL and connection are in [`super::sqlite_batch`]).
//!
//! Timestamps are stored as fixed-width RFC 3339 text (`2025-01-31T12:34:56.123456Z`), so
//! text order is time order and SQLite's date functions accept them unchanged.
//!
//! A batch's transaction is plain `BEGIN IMMEDIATE` / `COMMIT` on the writer's own
//! connection, and a connection whose write failed is closed, never reused.
//! The reason is a trap found under a hostile test (sqlx 0.8.6, when batches still went
//! through sqlx's `Transaction`): when COMMIT fails (an I/O error on an immutable file, a
//! full disk), sqlx does not lower its transaction depth, so the connection goes back to the
//! pool counted as inside a transaction; its next `begin`/`commit` become
//! `SAVEPOINT`/`RELEASE`, and after a second failed commit SQLite is really left inside a
//! transaction that no later RELEASE commits. Observed with a pool of one connection: two
//! commits failing with `(778) disk I/O error`, then three "successful" commits that no other
//! connection ever saw, a raw `BEGIN` on the pooled connection refused with "cannot start a
//! transaction within a transaction", and `database is locked` for every other writer.
//! SQLite documents that a failed COMMIT may or may not leave the transaction open
//! ("Response To Errors Within A Transaction"), so the only safe response is to roll back and
//! discard the connection.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{
    Row, SqlitePool,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
};

use super::{
    AuditError, Result, RunRecord, StartedRun,
    rows::{Dialect, corrupt},
    sqlite_batch::BatchConnection,
    store::Batch,
};

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
    /// (docs/benchmarks.md, "One writer connection, one round trip"). Outside sqlx, so
    /// that a batch runs on the writer's own thread (`sqlite_batch`).
    batches: Arc<BatchConnection>,
    file: Arc<SqliteFile>,
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
        let batches = Arc::clone(&self.batches);
        // Off the runtime's workers: closing the last connection checkpoints the WAL.
        let _ = tokio::task::spawn_blocking(move || batches.close()).await;
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
        // One writer at a time is all SQLite allows, so the audit writer has one connection,
        // to the same database. It is opened at the first batch, and never pinged: a broken
        // connection fails the batch's BEGIN instead, and the batch is retried on a new one.
        let batches = Arc::new(BatchConnection::new(
            url,
            options.get_filename(),
            busy_timeout,
        ));
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(options);
        Ok(SqliteStore {
            pool,
            batches,
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

/// Writes a batch in one transaction on the writer's own connection (`sqlite_batch`): in
/// place on the audit writer's own thread, which may block, on tokio's blocking pool from
/// anywhere else.
pub(super) async fn write_batch(store: &SqliteStore, batch: &Batch<'_>) -> Result<u64> {
    // A write into a file that is no longer at the path would be lost: do not start one.
    store.check_file()?;
    let written = if crate::workers::may_block() {
        store.batches.write(batch)?
    } else {
        let owned = OwnedBatch::of(batch);
        let batches = Arc::clone(&store.batches);
        tokio::task::spawn_blocking(move || batches.write(&owned.batch()))
            .await
            .map_err(|_| AuditError::Database(sqlx::Error::WorkerCrashed))??
    };
    // Committed, but into the file at the path? If it was deleted or replaced meanwhile,
    // the rows are in an inode nobody will read: count them as failed so that they are
    // retried and dead-lettered, not reported `ok`.
    store.check_file()?;
    Ok(written)
}

/// A copy of a batch for a thread of tokio's blocking pool, which takes nothing borrowed.
/// Only batches written off the writer's own thread (tests, tools) pay for it.
struct OwnedBatch {
    instance_id: Option<String>,
    started: Vec<StartedRun>,
    records: Vec<RunRecord>,
}

impl OwnedBatch {
    fn of(batch: &Batch<'_>) -> OwnedBatch {
        OwnedBatch {
            instance_id: batch.instance_id.map(str::to_owned),
            started: batch.started.iter().map(|r| (*r).clone()).collect(),
            records: batch.records.iter().map(|r| (*r).clone()).collect(),
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            instance_id: self.instance_id.as_deref(),
            started: self.started.iter().collect(),
            records: self.records.iter().collect(),
        }
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
