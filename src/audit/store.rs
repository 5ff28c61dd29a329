//! The audit database: SQLite or PostgreSQL, chosen at run time from `DATABASE_URL`.
//!
//! Both backends share this front: connect, migrate (and revert), insert a batch of records
//! in one transaction, read one record back, answer a liveness probe. The SQL itself differs
//! (types, bulk-insert idiom) and lives in the sibling `sqlite` and `postgres` modules.
//! No `query!` macros: the build must not need a live database.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::future::BoxFuture;
use sqlx::{
    PgPool, SqlitePool,
    migrate::Migrator,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use super::{AuditError, ModelTrace, Result, RunRecord, postgres, sqlite};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long to wait for a pooled connection: past it a write counts as failed (and is
/// retried), so an unreachable database cannot stall the writer indefinitely.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A busy SQLite file (another process writing, e.g. `duet audit replay`) is waited on this
/// long before the write fails and is retried.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// `/readyz` must answer quickly even when the database hangs.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the batch writer puts records. [`Store`] is the real one; tests use fakes that
/// fail on purpose to check retries and dead-lettering on tokio's paused clock.
pub trait RecordStore: Send + Sync + 'static {
    /// Inserts every record (run and both traces) in one transaction, ignoring records
    /// whose `run_id` is already stored. Returns how many runs were new.
    fn insert_batch<'a>(&'a self, records: &'a [RunRecord]) -> BoxFuture<'a, Result<u64>>;
}

/// A pool on one of the two backends. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgPool),
}

/// A SQLite pool and the identity of the file it has open.
///
/// A file deleted or replaced under the running service stays open in every pooled
/// connection: writes to it succeed, into an inode nobody can read any more. So each write
/// checks that the file at the path is still the one the pool opened (device and inode),
/// and fails when it is not, which sends the records to retry and dead-letter instead.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
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

    /// Fails when the file at the path is no longer the file the pool opened (deleted,
    /// or replaced by another). The first call, made once a connection has opened the file,
    /// records which file that is.
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

/// Which backend a `DATABASE_URL` names.
enum Backend {
    Sqlite,
    Postgres,
}

fn backend(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(AuditError::UnsupportedUrl)
    }
}

impl Store {
    /// Opens the database (creating a missing SQLite file) and checks that it answers.
    pub async fn connect(url: &str) -> Result<Store> {
        let store = Store::connect_lazy(url)?;
        // At start a failed probe means "cannot open", not "a query failed".
        store.ping().await.map_err(|e| match e {
            AuditError::Database(e) => AuditError::Connect(e),
            other => other,
        })?;
        // The ping opened the file: remember which one it is.
        if let Store::Sqlite(s) = &store {
            s.check_file()?;
        }
        Ok(store)
    }

    /// A pool that connects on first use: the service can then start, and dead-letter, while
    /// the database is down. Fails only on a malformed URL.
    pub fn connect_lazy(url: &str) -> Result<Store> {
        match backend(url)? {
            Backend::Sqlite => {
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
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true);
                // One writer at a time is all SQLite allows; the other connections serve reads.
                let path = sqlite_path(&options);
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options);
                Ok(Store::Sqlite(SqliteStore {
                    pool,
                    file: Arc::new(SqliteFile {
                        path,
                        opened: OnceLock::new(),
                    }),
                }))
            }
            Backend::Postgres => {
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy(url)
                    .map_err(AuditError::Connect)?;
                Ok(Store::Postgres(pool))
            }
        }
    }

    fn migrator(&self) -> &'static Migrator {
        match self {
            Store::Sqlite(_) => &SQLITE_MIGRATIONS,
            Store::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => self.migrator().run(s.pool()).await?,
            Store::Postgres(pool) => self.migrator().run(pool).await?,
        }
        Ok(())
    }

    /// Reverts applied migrations newer than `target` (0 reverts them all), running their
    /// `.down.sql` files newest first. Returns the versions reverted.
    pub async fn revert_to(&self, target: i64) -> Result<Vec<i64>> {
        let before = self.applied().await?;
        match self {
            Store::Sqlite(s) => self.migrator().undo(s.pool(), target).await?,
            Store::Postgres(pool) => self.migrator().undo(pool, target).await?,
        }
        let after = self.applied().await?;
        Ok(before.into_iter().filter(|v| !after.contains(v)).collect())
    }

    /// Versions of the applied migrations, oldest first.
    pub async fn applied(&self) -> Result<Vec<i64>> {
        // The bookkeeping table only exists once a migration ran.
        let sql = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
        let result = match self {
            Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_all(s.pool()).await,
            Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        };
        match result {
            Ok(versions) => Ok(versions),
            Err(sqlx::Error::Database(e)) if is_missing_table(e.message()) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// The newest migration version this build knows.
    pub fn latest_known(&self) -> i64 {
        self.migrator()
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or_default()
    }

    /// Answers `SELECT 1` within [`PING_TIMEOUT`].
    pub async fn ping(&self) -> Result<()> {
        self.probe_sql("SELECT 1").await
    }

    /// What `/readyz` asks of the database: it answers, the audit tables are there (a
    /// database dropped and recreated without `duet migrate` answers pings but takes no
    /// record), and on SQLite the file at the path is still the one open. Within
    /// [`PING_TIMEOUT`]. Says nothing about free disk space: only a write can tell that.
    pub async fn probe(&self) -> Result<()> {
        // The file first: a new pooled connection to a deleted file's path creates an empty
        // one, whose missing tables would otherwise hide the real cause.
        if let Store::Sqlite(s) = self {
            s.check_file()?;
        }
        self.probe_sql("SELECT 1 FROM dual_runs, model_traces WHERE 1 = 0")
            .await
    }

    async fn probe_sql(&self, sql: &'static str) -> Result<()> {
        let probe = async {
            match self {
                Store::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(drop),
                Store::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(drop),
            }
        };
        match tokio::time::timeout(PING_TIMEOUT, probe).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(AuditError::Timeout(PING_TIMEOUT)),
        }
    }

    /// See [`RecordStore::insert_batch`].
    pub async fn insert(&self, records: &[RunRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Sqlite(s) => sqlite::insert_batch(s, records).await,
            Store::Postgres(pool) => postgres::insert_batch(pool, records).await,
        }
    }

    /// The whole record of one run, or `None` when it is not stored.
    pub async fn fetch(&self, run_id: Uuid) -> Result<Option<RunRecord>> {
        match self {
            Store::Sqlite(s) => sqlite::fetch(s.pool(), run_id).await,
            Store::Postgres(pool) => postgres::fetch(pool, run_id).await,
        }
    }

    /// Closes the pool, waiting for connections to return (SQLite then checkpoints its WAL).
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.pool().close().await,
            Store::Postgres(pool) => pool.close().await,
        }
    }
}

impl RecordStore for Store {
    fn insert_batch<'a>(&'a self, records: &'a [RunRecord]) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.insert(records))
    }
}

fn is_missing_table(message: &str) -> bool {
    // SQLite: "no such table: _sqlx_migrations"; PostgreSQL: "relation ... does not exist".
    message.contains("no such table") || message.contains("does not exist")
}

/// Numbers are `u64` in records and signed 64-bit in both databases; values past `i64::MAX`
/// (585 million years of milliseconds) are clamped rather than refused.
pub(super) fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The schema's `CHECK (... >= 0)` keeps stored numbers non-negative.
pub(super) fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// Builds the error for a stored row that does not make a record.
pub(super) fn corrupt(run_id: Uuid, problem: impl Into<String>) -> AuditError {
    AuditError::Corrupt {
        run_id: run_id.to_string(),
        problem: problem.into(),
    }
}

/// Builds a record from its `dual_runs` row and its `model_traces` rows: the same columns on
/// both backends, so one piece of code reads them. Only `created_at` differs in type (text on
/// SQLite, `timestamptz` on PostgreSQL), so the caller decodes it.
pub(super) fn assemble<R>(
    run_id: Uuid,
    run: &R,
    created_at: chrono::DateTime<chrono::Utc>,
    traces: &[R],
) -> Result<RunRecord>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut flash = None;
    let mut pro = None;
    for row in traces {
        let role: String = row.try_get("model")?;
        let trace = trace(run_id, row)?;
        match role.as_str() {
            "flash" => flash = Some(trace),
            "pro" => pro = Some(trace),
            other => return Err(corrupt(run_id, format!("unknown model role {other:?}"))),
        }
    }
    let status: String = run.try_get("status")?;
    Ok(RunRecord {
        run_id,
        client_request_id: run.try_get("client_request_id")?,
        created_at,
        query: run.try_get("query")?,
        system: run.try_get("system")?,
        status: status.parse().map_err(|e: String| corrupt(run_id, e))?,
        total_ms: from_db(run.try_get("total_ms")?),
        service_version: run.try_get("service_version")?,
        flash: flash.ok_or_else(|| corrupt(run_id, "no flash trace"))?,
        pro: pro.ok_or_else(|| corrupt(run_id, "no pro trace"))?,
        events: run
            .try_get::<Option<String>, _>("events")?
            .unwrap_or_default(),
        owner_fingerprint: run.try_get("owner_fingerprint")?,
    })
}

fn trace<R>(run_id: Uuid, row: &R) -> Result<ModelTrace>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let outcome: String = row.try_get("outcome")?;
    let opt =
        |col: &str| -> Result<Option<u64>> { Ok(row.try_get::<Option<i64>, _>(col)?.map(from_db)) };
    Ok(ModelTrace {
        provider: row.try_get("provider")?,
        model: row.try_get("model_name")?,
        model_version: row.try_get("model_version")?,
        outcome: outcome.parse().map_err(|e: String| corrupt(run_id, e))?,
        error_type: row.try_get("error_type")?,
        error_message: row.try_get("error_message")?,
        text: row.try_get("text")?,
        finish_reason: row.try_get("finish_reason")?,
        latency_ms: from_db(row.try_get("latency_ms")?),
        ttft_ms: opt("ttft_ms")?,
        input_tokens: opt("input_tokens")?,
        output_tokens: opt("output_tokens")?,
    })
}
