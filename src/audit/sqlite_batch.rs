//! The SQLite audit writer's batches: one transaction per batch on a connection of the
//! writer's own, driven by rusqlite on the thread that calls it.
//!
//! Why not sqlx here: sqlx runs each SQLite connection on a thread of its own and hands it
//! every statement through a channel, so a batch was a round trip between two threads
//! (the writer's and the connection's), each hop a wake-up of a sleeping thread. On this
//! workload a wake-up costs more CPU than SQLite's own work for a small batch
//! (docs/benchmarks.md, "The SQLite writer without sqlx's thread"). The audit writer already
//! has a thread of its own (`WriterOptions::with_own_thread`), which may block: called there,
//! a batch runs in place, with no hop at all. Called from anywhere else (tests, tools), it
//! runs on tokio's blocking pool, never on a runtime's worker.
//!
//! Reads, migrations and everything else stay on sqlx's pool ([`super::sqlite`]).
//!
//! A connection whose batch failed in any way is closed, never reused: SQLite documents that
//! a failed COMMIT may or may not leave the transaction open ("Response To Errors Within A
//! Transaction"), and closing a connection rolls back whatever it holds (see the module
//! header of [`super::sqlite`] for the trap that taught this).

use std::{
    borrow::Cow,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, params};

use super::{
    AuditError, Deadline, Result, RunRecord, StartedRun, events,
    rows::{as_is, messages_column, params_column, to_db},
    sqlite::format_time,
    store::Batch,
};

/// Prepared statements kept by the connection: the three below, with room to spare.
const STATEMENT_CACHE: usize = 8;

/// A run's `running` row (contract §8). A row already there (the run ended and its record
/// came first) is left alone.
const INSERT_STARTED: &str = "INSERT INTO dual_runs (run_id, client_request_id, created_at, \
    query, system, status, total_ms, service_version, owner_fingerprint, instance_id, \
    messages, params, client_id) \
    VALUES (?1, ?2, ?3, ?4, ?5, 'running', 0, ?6, ?7, ?8, ?9, ?10, ?11) \
    ON CONFLICT (run_id) DO NOTHING";

/// A record's run row: inserted, or finalizing the run's `running` row, or replacing an
/// `interrupted` one (the real record of a run presumed dead, back from the journal or the
/// dead-letter file, says more than the presumption). A row that already ended is left
/// alone, so a record is stored once however often it is replayed (contract §5). Only the
/// columns a start row does not know are set: the others (the run's id, time, request,
/// instance) are the same run's, and leaving them out of `SET` spares their indexes.
const UPSERT_RUN: &str = "INSERT INTO dual_runs (run_id, client_request_id, created_at, \
    query, system, status, total_ms, service_version, events, owner_fingerprint, instance_id, \
    messages, params, client_id, cost_usd, agreement) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
    ON CONFLICT (run_id) DO UPDATE SET \
    status = excluded.status, total_ms = excluded.total_ms, \
    service_version = excluded.service_version, events = excluded.events, \
    owner_fingerprint = excluded.owner_fingerprint, cost_usd = excluded.cost_usd, \
    agreement = excluded.agreement \
    WHERE dual_runs.status IN ('running', 'interrupted')";

/// A model's trace. A run whose row was already final has its traces: nothing to add. One
/// finalized just now (from `running` or `interrupted`) has none yet.
const INSERT_TRACE: &str = "INSERT INTO model_traces (run_id, model, provider, model_name, \
    model_version, outcome, error_type, error_message, deadline, text, finish_reason, \
    latency_ms, ttft_ms, input_tokens, output_tokens, cost_usd) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
    ON CONFLICT (run_id, model) DO NOTHING";

/// The writer's connection: opened at the first batch, kept between batches (so its page
/// cache stays valid: a connection that did not make the last commit reads again the pages
/// the WAL changed), closed after a failed one.
#[derive(Debug)]
pub(super) struct BatchConnection {
    /// What `sqlite3_open_v2` opens: the database's file as a SQLite URI, with the
    /// parameters of `DATABASE_URL`.
    uri: String,
    busy_timeout: Duration,
    /// The idle connection, or `None` before the first batch, after a failed one, or while
    /// a batch holds it. Locked only to take it out or put it back.
    idle: Mutex<Option<Connection>>,
    /// Set by `close`: no connection is opened or kept any more.
    closed: AtomicBool,
}

impl BatchConnection {
    /// `filename` is the database as sqlx parsed it from `url` (the same file, or the same
    /// named in-memory database, which sqlx opens with a shared cache).
    pub(super) fn new(url: &str, filename: &Path, busy_timeout: Duration) -> BatchConnection {
        BatchConnection {
            uri: uri(url, filename),
            busy_timeout,
            idle: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// Writes a batch in one transaction; blocking. The run rows its records wrote (a
    /// record whose run had already ended writes none).
    pub(super) fn write(&self, batch: &Batch<'_>) -> Result<u64> {
        let conn = self.take()?;
        match write_on(&conn, batch) {
            Ok(written) => {
                self.give_back(conn);
                Ok(written)
            }
            Err(e) => {
                // Best effort: closing rolls back as well; this just does it now.
                let _ = conn.execute_batch("ROLLBACK");
                drop(conn);
                Err(AuditError::Sqlite(e))
            }
        }
    }

    /// Closes the idle connection; blocking (the last connection to a WAL database
    /// checkpoints it as it closes). One a batch holds now is closed when the batch ends.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        drop(self.take_idle());
    }

    /// The idle connection, or a new one. Two batches at once (the service's writer never
    /// does this, tests and tools may) get two connections; SQLite's lock orders them.
    fn take(&self) -> Result<Connection> {
        if self.closed.load(Ordering::Acquire) {
            return Err(AuditError::Database(sqlx::Error::PoolClosed));
        }
        match self.take_idle() {
            Some(conn) => Ok(conn),
            None => self.open().map_err(AuditError::SqliteOpen),
        }
    }

    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().map(|mut slot| slot.take()).unwrap_or(None)
    }

    /// Keeps a connection whose batch committed for the next batch; a second one (see
    /// `take`) is closed.
    fn give_back(&self, conn: Connection) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut slot) = self.idle.lock()
            && slot.is_none()
        {
            *slot = Some(conn);
        }
    }

    /// Opens the connection with the settings sqlx's pool gives its own (`sqlite::connect_lazy`):
    /// WAL, FULL sync (a commit is on disk before COMMIT returns), the busy timeout, foreign
    /// keys.
    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.uri,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // Answers with the mode now in force ("memory" for an in-memory database). A file
        // that will not take WAL still commits durably (FULL sync), but readers then block
        // the writer: worth a line in the log.
        let mode = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
            tracing::warn!(journal_mode = %mode, "the audit database did not take WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

/// The batch's transaction: its start rows, then each record's run row and traces. IMMEDIATE
/// takes the write lock at once, so a busy database fails here (and is retried) rather than
/// at COMMIT. The first statement that fails ends the batch, before COMMIT.
fn write_on(conn: &Connection, batch: &Batch<'_>) -> rusqlite::Result<u64> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    if !batch.started.is_empty() {
        let mut insert = conn.prepare_cached(INSERT_STARTED)?;
        for run in &batch.started {
            insert_started(&mut insert, run)?;
        }
    }
    let mut written = 0;
    if !batch.records.is_empty() {
        let mut run_row = conn.prepare_cached(UPSERT_RUN)?;
        let mut trace = conn.prepare_cached(INSERT_TRACE)?;
        for record in &batch.records {
            written += upsert_record(&mut run_row, &mut trace, batch.instance_id, record)?;
        }
    }
    conn.execute_batch("COMMIT")?;
    Ok(written)
}

fn insert_started(insert: &mut rusqlite::Statement<'_>, r: &StartedRun) -> rusqlite::Result<()> {
    let mut id = uuid::Uuid::encode_buffer();
    insert.execute(params![
        &*r.run_id.hyphenated().encode_lower(&mut id),
        r.client_request_id.as_deref(),
        format_time(&r.created_at),
        &*r.query,
        r.system.as_deref(),
        crate::SERVICE_VERSION,
        r.owner_fingerprint.as_deref(),
        r.instance_id.as_deref(),
        r.conversation
            .as_ref()
            .map(|c| messages_column(c.messages(), Cow::Borrowed)),
        r.params.as_ref().map(|p| params_column(p, as_is)),
        r.client_id.as_deref(),
    ])?;
    Ok(())
}

/// The record's run row and its two traces. Returns the run rows written: 0 or 1.
fn upsert_record(
    run_row: &mut rusqlite::Statement<'_>,
    trace: &mut rusqlite::Statement<'_>,
    instance_id: Option<&str>,
    r: &RunRecord,
) -> rusqlite::Result<u64> {
    let mut id = uuid::Uuid::encode_buffer();
    let run_id: &str = r.run_id.hyphenated().encode_lower(&mut id);
    let changed = run_row.execute(params![
        run_id,
        r.client_request_id.as_deref(),
        format_time(&r.created_at),
        r.query.as_str(),
        r.system.as_deref(),
        r.status.as_str(),
        to_db(r.total_ms),
        r.service_version.as_str(),
        events::to_column(&r.events),
        r.owner_fingerprint.as_deref(),
        instance_id,
        r.messages.as_ref().map(|m| {
            messages_column(
                m.iter().map(|m| (m.role, m.content.as_str())),
                Cow::Borrowed,
            )
        }),
        r.params.as_ref().map(|p| params_column(p, as_is)),
        r.client_id.as_deref(),
        r.cost_usd,
        r.agreement,
    ])?;
    // Traces are inserted whatever the run row did, as the multi-row statements did: one
    // already there is skipped by its key.
    for (role, t) in [("flash", &r.flash), ("pro", &r.pro)] {
        trace.execute(params![
            run_id,
            role,
            t.provider.as_str(),
            t.model.as_str(),
            t.model_version.as_deref(),
            t.outcome.as_str(),
            t.error_type.as_deref(),
            t.error_message.as_deref(),
            t.deadline.map(Deadline::as_str),
            t.text.as_str(),
            t.finish_reason.as_deref(),
            to_db(t.latency_ms),
            t.ttft_ms.map(to_db),
            t.input_tokens.map(to_db),
            t.output_tokens.map(to_db),
            t.cost_usd,
        ])?;
    }
    Ok(changed as u64)
}

/// The SQLite URI of the database sqlx parsed from `url`: `file:` and the path (its `%`, `?`
/// and `#` escaped), with the URL's parameters, which sqlx accepts only where SQLite's URIs
/// take the same (`mode`, `cache`, `immutable`, `vfs`). sqlx names an in-memory database
/// `file:sqlx-in-memory-N` and opens it with a shared cache: the same name, in memory and
/// shared, is the same database.
fn uri(url: &str, filename: &Path) -> String {
    let name = filename.to_string_lossy();
    if name.starts_with("file:sqlx-in-memory-") {
        return format!("{name}?mode=memory&cache=shared");
    }
    let mut uri = String::with_capacity(name.len() + 16);
    if name.starts_with("file:") {
        // Already a SQLite URI, as sqlx hands it to SQLite.
        uri.push_str(&name);
    } else {
        // An absolute path after an empty authority (`file:///srv/a.db`), so that a path
        // starting with `//` is not read as an authority; a relative one as it is.
        uri.push_str(if name.starts_with('/') {
            "file://"
        } else {
            "file:"
        });
        for c in name.chars() {
            match c {
                '%' => uri.push_str("%25"),
                '?' => uri.push_str("%3f"),
                '#' => uri.push_str("%23"),
                c => uri.push(c),
            }
        }
    }
    if let Some((_, params)) = url.split_once('?')
        && !params.is_empty()
    {
        uri.push('?');
        uri.push_str(params);
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process holding the write lock past the busy timeout fails the batch at its
    /// BEGIN, with the reason operators see on `/readyz`, and the connection is not kept.
    #[test]
    fn a_write_lock_held_elsewhere_fails_the_batch_as_database_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locked.db");
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let url = format!("sqlite://{}", path.display());
        let batches = BatchConnection::new(&url, &path, Duration::from_millis(50));
        let batch = Batch {
            instance_id: None,
            started: Vec::new(),
            records: Vec::new(),
        };
        let error = batches.write(&batch).unwrap_err();
        assert_eq!(error.reason(), "database_locked", "{error}");
        assert!(
            batches.take_idle().is_none(),
            "a failed connection is not kept"
        );
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(batches.write(&batch).unwrap(), 0);
        assert!(batches.take_idle().is_some(), "a clean one is");
    }

    #[test]
    fn the_uri_names_the_file_sqlx_opens_with_the_urls_parameters() {
        assert_eq!(
            uri("sqlite://duet.db", Path::new("duet.db")),
            "file:duet.db"
        );
        assert_eq!(
            uri(
                "sqlite:///var/lib/a b.db?mode=rwc",
                Path::new("/var/lib/a b.db")
            ),
            "file:///var/lib/a b.db?mode=rwc"
        );
        assert_eq!(
            uri("sqlite:////srv/x.db", Path::new("//srv/x.db")),
            "file:////srv/x.db"
        );
        assert_eq!(
            uri("sqlite://x%3F%23%25.db", Path::new("x?#%.db")),
            "file:x%3f%23%25.db"
        );
        assert_eq!(
            uri("sqlite::memory:", Path::new("file:sqlx-in-memory-7")),
            "file:sqlx-in-memory-7?mode=memory&cache=shared"
        );
    }
}
