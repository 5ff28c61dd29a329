//! The audit database: SQLite or PostgreSQL, chosen at run time from `DATABASE_URL`.
//!
//! Both backends share this front: connect, migrate (and revert), insert a batch of records
//! in one transaction, read one record back, answer a liveness probe. The SQL itself differs
//! (types, bulk-insert idiom, connection options) and lives in the sibling `sqlite` and
//! `postgres` modules; turning rows back into records is shared, in `rows`.
//! No `query!` macros: the build must not need a live database.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{
    PgPool,
    migrate::{MigrateError, Migrator},
};
use uuid::Uuid;

pub use super::sqlite::SqliteStore;
use super::{AuditError, Result, RunRecord, StartedRun, StoredRun, postgres, rows, sqlite};
use crate::config::DatabaseBackend;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long to wait for a pooled connection: past it a write counts as failed (and is
/// retried), so an unreachable database cannot stall the writer indefinitely.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A busy SQLite file (another process writing, e.g. `duet audit replay`) is waited on this
/// long before the write fails and is retried.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in a PostgreSQL store's pool: the API's reads, housekeeping, and (outside
/// `duet serve`) the audit writer.
const POOL_CONNECTIONS: u32 = 8;

/// `/readyz` must answer quickly even when the database hangs.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the batch writer puts records. [`Store`] is the real one; tests use fakes that
/// fail on purpose to check retries and dead-lettering on tokio's paused clock.
pub trait RecordStore: Send + Sync + 'static {
    /// Inserts every record (run and both traces) in one transaction, ignoring records
    /// whose `run_id` is already stored. Returns how many runs were new.
    fn insert_batch<'a>(&'a self, records: &'a [RunRecord]) -> BoxFuture<'a, Result<u64>>;

    /// Writes `running` rows for runs that started and final records, in one transaction:
    /// a start row never replaces anything; a record inserts its run or finalizes the
    /// run's `running` (or `interrupted`) row, and leaves an already final one alone.
    /// `instance_id` goes into the rows the records insert. Returns how many records were new
    /// or finalized a row. Stores without start rows (the tests' fakes) write the records
    /// alone, and nothing for a batch of start rows only.
    fn write_batch<'a>(
        &'a self,
        instance_id: Option<&'a str>,
        started: &'a [StartedRun],
        records: &'a [RunRecord],
    ) -> BoxFuture<'a, Result<u64>> {
        let _ = (instance_id, started);
        if records.is_empty() {
            return Box::pin(std::future::ready(Ok(0)));
        }
        self.insert_batch(records)
    }

    /// Batches the writer may have in flight at once: with 2, the next batch's first attempt
    /// starts while this one's commits (see `writer`). 1 unless the store says otherwise.
    fn batches_in_flight(&self) -> usize {
        1
    }
}

/// A pool on one of the two backends. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PgPool),
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
        match DatabaseBackend::of(url).ok_or(AuditError::UnsupportedUrl)? {
            DatabaseBackend::Sqlite => {
                SqliteStore::connect_lazy(url, ACQUIRE_TIMEOUT, SQLITE_BUSY_TIMEOUT)
                    .map(Store::Sqlite)
            }
            DatabaseBackend::Postgres => {
                postgres::connect_lazy(url, ACQUIRE_TIMEOUT, POOL_CONNECTIONS).map(Store::Postgres)
            }
        }
    }

    /// A store for the audit writer alone, connecting on first use: on PostgreSQL a pool of
    /// its own, as many connections as it has batches in flight, opened by the writer
    /// wherever it runs (`duet serve` runs it on a thread of its own, and a PostgreSQL
    /// connection belongs to the runtime it was opened on). On SQLite, where connections
    /// are threads of their own and the writer already has one, `self`.
    pub fn for_writer(&self, url: &str) -> Result<Store> {
        match self {
            Store::Sqlite(_) => Ok(self.clone()),
            Store::Postgres(_) => {
                let n = postgres::BATCHES_IN_FLIGHT as u32;
                postgres::connect_lazy(url, ACQUIRE_TIMEOUT, n).map(Store::Postgres)
            }
        }
    }

    /// The migrations this build embeds for the store's backend (`admin` reads their SQL to
    /// see what a revert would drop).
    pub(super) fn migrator(&self) -> &'static Migrator {
        match self {
            Store::Sqlite(_) => &SQLITE_MIGRATIONS,
            Store::Postgres(_) => &POSTGRES_MIGRATIONS,
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        let result = match self {
            Store::Sqlite(s) => self.migrator().run(s.pool()).await,
            Store::Postgres(pool) => self.migrator().run(pool).await,
        };
        result.map_err(|e| self.newer_schema(e))
    }

    /// Reverts applied migrations newer than `target` (0 reverts them all), running their
    /// `.down.sql` files newest first. Returns the versions reverted.
    pub async fn revert_to(&self, target: i64) -> Result<Vec<i64>> {
        let before = self.applied().await?;
        let result = match self {
            Store::Sqlite(s) => self.migrator().undo(s.pool(), target).await,
            Store::Postgres(pool) => self.migrator().undo(pool, target).await,
        };
        result.map_err(|e| self.newer_schema(e))?;
        let after = self.applied().await?;
        Ok(before.into_iter().filter(|v| !after.contains(v)).collect())
    }

    /// sqlx's "previously applied but missing" names a migration newer than this build as
    /// if it were lost: say what it means instead (an older build on a newer database).
    fn newer_schema(&self, e: MigrateError) -> AuditError {
        match e {
            MigrateError::VersionMissing(applied) if applied > self.latest_known() => {
                AuditError::SchemaNewer {
                    applied,
                    known: self.latest_known(),
                }
            }
            e => e.into(),
        }
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

    /// Answers `SELECT 1` within `PING_TIMEOUT`.
    pub async fn ping(&self) -> Result<()> {
        self.probe_sql("SELECT 1").await
    }

    /// What `/readyz` asks of the database: it answers, the audit tables are there (a
    /// database dropped and recreated without `duet migrate` answers pings but takes no
    /// record), and on SQLite the file at the path is still the one open. Within
    /// `PING_TIMEOUT`. Says nothing about free disk space: only a write can tell that.
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

    /// See [`RecordStore::insert_batch`]. Rows it inserts have no instance id (replay: the
    /// process that ran the run is not known).
    pub async fn insert(&self, records: &[RunRecord]) -> Result<u64> {
        self.write(None, &[], records).await
    }

    /// See [`RecordStore::write_batch`].
    pub async fn write(
        &self,
        instance_id: Option<&str>,
        started: &[StartedRun],
        records: &[RunRecord],
    ) -> Result<u64> {
        if records.is_empty() && started.is_empty() {
            return Ok(0);
        }
        let batch = Batch::new(instance_id, started, records);
        match self {
            Store::Sqlite(s) => sqlite::write_batch(s, &batch).await,
            Store::Postgres(pool) => postgres::write_batch(pool, &batch).await,
        }
    }

    /// The starts of runs that had no record yet when they were journaled (`start_line`):
    /// each becomes a `running` row, as if its start row had been written, and those whose
    /// process is known to be dead (`dead[i]`) are finalized `interrupted` at once, as a
    /// `running` row is at the next start. A run with a row already (its record stored, or
    /// a start row that made it) keeps it, unless it is still `running`. Returns how many
    /// rows it finalized and how many of the others are `running` now. On PostgreSQL the
    /// replicas waiting for the runs finalized are told.
    pub async fn write_journaled_starts(
        &self,
        started: &[StartedRun],
        dead: &[bool],
    ) -> Result<(u64, u64)> {
        if started.is_empty() {
            return Ok((0, 0));
        }
        // Start rows keep the instance id they carry: the sweep finds a dead one's.
        self.write(None, started, &[]).await?;
        let mut finalized = 0;
        for run in started
            .iter()
            .zip(dead)
            .filter_map(|(run, dead)| dead.then_some(run))
        {
            let id = run.run_id.to_string();
            finalized += match self {
                Store::Sqlite(s) => sqlx::query(
                    "UPDATE dual_runs SET status = 'interrupted', total_ms = 0 \
                         WHERE run_id = ? AND status = 'running'",
                )
                .bind(id)
                .execute(s.pool())
                .await?
                .rows_affected(),
                Store::Postgres(pool) => sqlx::query(
                    "WITH ended AS ( \
                         UPDATE dual_runs SET status = 'interrupted', total_ms = 0 \
                         WHERE run_id = $1::text::uuid AND status = 'running' RETURNING run_id) \
                     SELECT pg_notify('duet_run_ended', run_id::text) FROM ended",
                )
                .bind(id)
                .fetch_all(pool)
                .await?
                .len() as u64,
            };
        }
        // The others: how many are `running` now (a run that has its record kept it).
        let mut left_running = 0;
        for run in started
            .iter()
            .zip(dead)
            .filter_map(|(run, dead)| (!dead).then_some(run))
        {
            if let Some(StoredRun::Open(open)) = self.fetch_stored(run.run_id).await?
                && open.status == super::OpenStatus::Running
            {
                left_running += 1;
            }
        }
        Ok((finalized, left_running))
    }

    /// Finalizes as `interrupted` every run still `running` in this database: what a
    /// SQLite file's previous process left when it died (one process owns a SQLite file, so
    /// at start every running row is a dead one's). Returns how many.
    pub async fn interrupt_all_running(&self) -> Result<u64> {
        let sql = "UPDATE dual_runs SET status = 'interrupted', total_ms = 0 \
                   WHERE status = 'running'";
        Ok(match self {
            Store::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await?.rows_affected(),
            Store::Postgres(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
        })
    }

    /// The whole record of one run, or `None` when it is not stored or has no record (still
    /// `running`, or `interrupted`; [`Store::fetch_stored`] returns those too).
    pub async fn fetch(&self, run_id: Uuid) -> Result<Option<RunRecord>> {
        Ok(match self.fetch_stored(run_id).await? {
            Some(StoredRun::Ended(ended)) => Some(ended.record),
            Some(StoredRun::Open(_)) | None => None,
        })
    }

    /// Who owns a stored run (its owner fingerprint): `None` when no run has that id.
    pub async fn fetch_owner(&self, run_id: Uuid) -> Result<Option<Option<String>>> {
        match self {
            Store::Sqlite(s) => rows::fetch_owner(s.pool(), &sqlite::DIALECT, run_id).await,
            Store::Postgres(pool) => rows::fetch_owner(pool, &postgres::DIALECT, run_id).await,
        }
    }

    /// What is stored of one run: its record, or its `running`/`interrupted` row.
    pub async fn fetch_stored(&self, run_id: Uuid) -> Result<Option<StoredRun>> {
        match self {
            Store::Sqlite(s) => rows::fetch(s.pool(), &sqlite::DIALECT, run_id).await,
            Store::Postgres(pool) => rows::fetch(pool, &postgres::DIALECT, run_id).await,
        }
    }

    /// Closes the pool, waiting for connections to return (SQLite then checkpoints its WAL).
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(pool) => pool.close().await,
        }
    }
}

impl RecordStore for Store {
    fn insert_batch<'a>(&'a self, records: &'a [RunRecord]) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.insert(records))
    }

    fn write_batch<'a>(
        &'a self,
        instance_id: Option<&'a str>,
        started: &'a [StartedRun],
        records: &'a [RunRecord],
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(self.write(instance_id, started, records))
    }

    fn batches_in_flight(&self) -> usize {
        match self {
            // One process writes a SQLite file, one transaction at a time.
            Store::Sqlite(_) => 1,
            Store::Postgres(_) => postgres::BATCHES_IN_FLIGHT,
        }
    }
}

/// One transaction's rows, made ready for both backends' SQL: each run at most once among
/// the records (PostgreSQL refuses an upsert that meets the same row twice in one
/// statement), and no start row for a run whose record is in the same batch (it would be
/// replaced in the same transaction: writing it is waste).
pub(super) struct Batch<'a> {
    /// Goes into the rows the records insert.
    pub instance_id: Option<&'a str>,
    pub started: Vec<&'a StartedRun>,
    pub records: Vec<&'a RunRecord>,
}

impl<'a> Batch<'a> {
    fn new(
        instance_id: Option<&'a str>,
        started: &'a [StartedRun],
        records: &'a [RunRecord],
    ) -> Batch<'a> {
        let mut seen = std::collections::HashSet::with_capacity(records.len());
        let records: Vec<&RunRecord> = records.iter().filter(|r| seen.insert(r.run_id)).collect();
        let started = started
            .iter()
            .filter(|s| !seen.contains(&s.run_id))
            .collect();
        Batch {
            instance_id,
            started,
            records,
        }
    }
}

pub(super) fn is_missing_table(message: &str) -> bool {
    // SQLite: "no such table: _sqlx_migrations"; PostgreSQL: "relation ... does not exist".
    message.contains("no such table") || message.contains("does not exist")
}
