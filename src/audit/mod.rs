//! The audit trail: one [`RunRecord`] per run that started (contract §5), handed to an
//! [`AuditSink`].
//!
//! The sink is synchronous and must never block: the orchestrator submits from a drop guard,
//! which may run during a panic or shutdown, so a sink queues the record (or dead-letters it)
//! and returns at once. Persisting happens elsewhere, on a background writer.
//!
//! - [`store`]: the database (SQLite or PostgreSQL, chosen from `DATABASE_URL`): migrations,
//!   batched idempotent inserts, reading a record back. Per-backend SQL lives in `sqlite` and
//!   `postgres`; what both do with rows (reading a record back) in `rows`.
//! - [`writer`]: the [`AuditWriter`] sink: bounded queue, batching, retries, shutdown drain.
//! - `events`: the events a run's client was sent, as the record keeps them ([`StoredEvent`]).
//! - [`deadletter`]: the JSON-lines file records go to when the database cannot take them,
//!   and the same kind of file for the journal (records in retry, kept on disk).
//! - [`replay`]: `duet audit replay`, putting dead-lettered records back.
//! - [`instance`]: this process's instance id, its heartbeat, and finalizing the runs of
//!   dead processes as `interrupted` (contract §8).
//! - [`privacy`]: `AUDIT_STORE_TEXT=none`, stripping a run's texts before it is queued.
//! - [`purge`]: deleting ended runs older than a cut-off, in small batches: the background
//!   job of `AUDIT_RETENTION_DAYS` and `duet audit purge` (contract §10).
//! - [`admin`]: the `duet migrate`, `duet audit replay` and `duet audit purge` commands.

pub mod admin;
pub mod deadletter;
mod events;
pub mod instance;
pub mod list;
pub mod notify;
mod postgres;
pub mod privacy;
pub mod purge;
pub mod replay;
mod rows;
mod sqlite;
mod sqlite_batch;
mod start_line;
pub mod store;
pub mod writer;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::conversation::{Conversation, Message, RunParams};

/// How one model ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Timeout,
    Error,
    Skipped,
    Cancelled,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ok" => Outcome::Ok,
            "timeout" => Outcome::Timeout,
            "error" => Outcome::Error,
            "skipped" => Outcome::Skipped,
            "cancelled" => Outcome::Cancelled,
            other => return Err(format!("unknown outcome {other:?}")),
        })
    }
}

/// How the whole run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    Partial,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for RunStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ok" => RunStatus::Ok,
            "partial" => RunStatus::Partial,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            other => return Err(format!("unknown status {other:?}")),
        })
    }
}

/// Which deadline ended a model call (contract §2: `*_TIMEOUT_S`, `*_TTFT_TIMEOUT_S`,
/// `STALL_TIMEOUT_S`). The record's `deadline`, and the `kind` label of
/// `duet_model_timeouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Deadline {
    /// The whole call's deadline.
    Total,
    /// No first token in time.
    FirstToken,
    /// Silence mid-answer.
    Stall,
}

impl Deadline {
    pub const fn as_str(self) -> &'static str {
        match self {
            Deadline::Total => "total",
            Deadline::FirstToken => "first_token",
            Deadline::Stall => "stall",
        }
    }
}

impl FromStr for Deadline {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "total" => Deadline::Total,
            "first_token" => Deadline::FirstToken,
            "stall" => Deadline::Stall,
            other => return Err(format!("unknown deadline {other:?}")),
        })
    }
}

/// One model's part of a run: a row of `model_traces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelTrace {
    pub provider: String,
    pub model: String,
    pub model_version: Option<String>,
    pub outcome: Outcome,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    /// Which deadline ended the call when `outcome` is `timeout`, else `None`. Records written
    /// before it had a field of its own carried it at the end of `error_message` instead
    /// (`... [deadline: stall]`); migration 0004 moves it here for stored rows.
    #[serde(default)]
    pub deadline: Option<Deadline>,
    pub text: String,
    pub finish_reason: Option<String>,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// What the call cost in USD at the prices configured when it ran; `None` when a price
    /// was not set or the provider reported no token counts (see [`crate::cost`]). Absent in
    /// records written before migration 0007 (SQLite) / 0009 (PostgreSQL).
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

impl ModelTrace {
    /// The trace's part in its run's cost ([`crate::cost::of_run`]).
    pub fn cost_part(&self) -> crate::cost::Part {
        crate::cost::Part {
            cost_usd: self.cost_usd,
            reported: self.input_tokens.is_some() || self.output_tokens.is_some(),
        }
    }

    /// The token counts the provider reported, as the answer events carry them.
    pub fn usage(&self) -> crate::providers::Usage {
        crate::providers::Usage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
        }
    }
}

/// One run: a row of `dual_runs` and its two traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub run_id: Uuid,
    pub client_request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub query: String,
    pub system: Option<String>,
    /// The whole conversation when the client sent `messages` (contract §7), the system
    /// prompt first; `None` for a `query` request, whose `query` and `system` say it all.
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    /// The generation parameters as the client sent them; `None` when it sent none.
    #[serde(default)]
    pub params: Option<RunParams>,
    pub status: RunStatus,
    pub total_ms: u64,
    pub service_version: String,
    pub flash: ModelTrace,
    pub pro: ModelTrace,
    /// The run's cost in USD, or `None` when it is not known: the sum of both traces'
    /// `cost_usd` by the rule of [`crate::cost::of_run`] (`null` when a model reported tokens
    /// but has no price; skipped or cancelled calls, which reported nothing, add nothing).
    /// A plain field, set when the run ends, for whatever reads the record then (the
    /// `done` event, the audit row, per-client budgets); see also [`RunRecord::tokens`].
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// How far the Flash preview agreed with the Pro answer, in [0, 1] ([`crate::agreement`]);
    /// `None` unless both models answered `ok`. Absent in records written before migration
    /// 0010 (SQLite) / 0012 (PostgreSQL).
    #[schema(minimum = 0, maximum = 1)]
    #[serde(default)]
    pub agreement: Option<f64>,
    /// The events the client was sent, without the deltas (`start`, the answers, errors,
    /// `done`), each with its `seq`: what a reconnect replays once the run has left memory.
    /// Empty in records written before this was kept. See [`StoredEvent`].
    #[serde(default, deserialize_with = "events::deserialize")]
    pub events: Vec<StoredEvent>,
    /// Who may resume the run: hex SHA-256 over (run id ‖ the API key that started it), so
    /// the key itself is never stored; `None` when the run was started without API_KEYS
    /// (anyone may resume it). See `resume::Owner`.
    #[serde(default)]
    pub owner_fingerprint: Option<String>,
    /// The name of the API key that started the run (`API_KEYS_FILE`, contract §11), never
    /// the key; `None` without a key, for a key of `API_KEYS`, and in older records.
    #[serde(default)]
    pub client_id: Option<String>,
}

impl RunRecord {
    /// The run's token counts: each the sum over both models of what the providers
    /// reported, `None` when neither model reported that count (a skipped or cancelled call
    /// reports none).
    pub fn tokens(&self) -> crate::providers::Usage {
        fn sum(a: Option<u64>, b: Option<u64>) -> Option<u64> {
            match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            }
        }
        crate::providers::Usage {
            input_tokens: sum(self.flash.input_tokens, self.pro.input_tokens),
            output_tokens: sum(self.flash.output_tokens, self.pro.output_tokens),
        }
    }

    /// About how many bytes the record holds in memory: its texts plus a fixed allowance for
    /// the rest. What the audit queue's byte bound counts.
    pub fn approx_bytes(&self) -> usize {
        fn opt(s: &Option<String>) -> usize {
            s.as_ref().map_or(0, String::len)
        }
        fn trace(t: &ModelTrace) -> usize {
            t.provider.len()
                + t.model.len()
                + opt(&t.model_version)
                + opt(&t.error_type)
                + opt(&t.error_message)
                + t.text.len()
                + opt(&t.finish_reason)
                + 128
        }
        self.query.len()
            + opt(&self.system)
            + self.messages.as_deref().map_or(0, messages_bytes)
            + self.params.as_ref().map_or(0, params_bytes)
            + opt(&self.client_request_id)
            + opt(&self.client_id)
            + self.service_version.len()
            + self
                .events
                .iter()
                .map(StoredEvent::approx_bytes)
                .sum::<usize>()
            + trace(&self.flash)
            + trace(&self.pro)
            + 128
    }
}

/// About how many bytes stored messages hold: their texts and an allowance for each.
fn messages_bytes(messages: &[Message]) -> usize {
    messages.iter().map(|m| m.content.len() + 32).sum()
}

/// About how many bytes a run's parameters hold: a few numbers and words, as JSON, and the
/// `stop` strings, which a client chooses.
fn params_bytes(params: &RunParams) -> usize {
    256 + params.sampling.text_bytes()
}

/// A stored run that has no record (yet, or ever): still running, or finalized
/// `interrupted` because the process running it died (contract §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpenStatus {
    Running,
    Interrupted,
}

impl OpenStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            OpenStatus::Running => "running",
            OpenStatus::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> Option<OpenStatus> {
        match s {
            "running" => Some(OpenStatus::Running),
            "interrupted" => Some(OpenStatus::Interrupted),
            _ => None,
        }
    }
}

/// The `dual_runs` row of a run that is `running` or `interrupted`: what is known of it
/// without its record. It has no traces (`flash` and `pro` are `null`) and no events; its
/// `total_ms` is 0, since nobody saw it end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenRun {
    pub run_id: Uuid,
    pub client_request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub query: String,
    pub system: Option<String>,
    /// As in [`RunRecord::messages`].
    pub messages: Option<Vec<Message>>,
    /// As in [`RunRecord::params`].
    pub params: Option<RunParams>,
    pub status: OpenStatus,
    pub total_ms: u64,
    pub service_version: String,
    /// The process that runs (or ran) it.
    pub instance_id: Option<String>,
    /// Who may resume it (see [`RunRecord::owner_fingerprint`]): checked by a resume on
    /// another replica. Not shown by `GET /runs/{run_id}`, which never showed it for open runs.
    #[serde(skip)]
    pub owner_fingerprint: Option<String>,
    /// As in [`RunRecord::client_id`].
    #[serde(default)]
    pub client_id: Option<String>,
    /// Always `null`: a run without a record has no traces.
    #[schema(value_type = Option<ModelTrace>)]
    pub flash: Option<ModelTrace>,
    /// Always `null`, like `flash`.
    #[schema(value_type = Option<ModelTrace>)]
    pub pro: Option<ModelTrace>,
}

/// What `dual_runs` holds for one run: its whole record once it ended, or an [`OpenRun`]
/// while it runs or after its process died. Serialized as the one or the other.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StoredRun {
    Ended(EndedRun),
    Open(OpenRun),
}

/// A run's record as stored, with the process that ran it. The instance id is not part of
/// [`RunRecord`]: the writer adds it to the row, so records in the queue, the journal and the
/// dead-letter file stay as the run made them.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EndedRun {
    #[serde(flatten)]
    pub record: RunRecord,
    /// The process that ran it (see [`instance`]); `None` in rows written before migration
    /// 0005, and for a record replayed from another process's journal or dead-letter file
    /// whose start row was never written.
    pub instance_id: Option<String>,
}

/// A run that has just started: what its `running` row holds (contract §8). Cheap to make
/// (the texts are shared with the run), since every run makes one on its way to the client.
#[derive(Debug, Clone)]
pub struct StartedRun {
    pub run_id: Uuid,
    pub client_request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub query: Arc<str>,
    pub system: Option<Arc<str>>,
    /// The conversation when the client sent `messages` (shared with the run, not copied);
    /// stored as the record's `messages`.
    pub conversation: Option<Arc<Conversation>>,
    /// As in [`RunRecord::params`].
    pub params: Option<RunParams>,
    pub owner_fingerprint: Option<String>,
    /// Stamped by the writer: this process's instance id.
    pub instance_id: Option<String>,
    /// As in [`RunRecord::client_id`].
    pub client_id: Option<Arc<str>>,
}

impl StartedRun {
    /// The start row of the run `record` describes, for tools and tests that make records
    /// first (`duet bench audit`): its id, request, time, query, system prompt, parameters,
    /// owner and client. Without a conversation: a record holds its messages as stored, and
    /// a run's start row carries them only when the run sends it (`run::Run`).
    pub fn of(record: &RunRecord) -> StartedRun {
        StartedRun {
            run_id: record.run_id,
            client_request_id: record.client_request_id.clone(),
            created_at: record.created_at,
            query: record.query.as_str().into(),
            system: record.system.as_deref().map(Into::into),
            conversation: None,
            params: record.params.clone(),
            owner_fingerprint: record.owner_fingerprint.clone(),
            instance_id: None,
            client_id: record.client_id.as_deref().map(Into::into),
        }
    }

    /// About how many bytes it holds: what the audit queue's byte bound counts.
    pub fn approx_bytes(&self) -> usize {
        self.query.len()
            + self.system.as_ref().map_or(0, |s| s.len())
            + self
                .conversation
                .as_ref()
                .map_or(0, |c| c.content_bytes() + 32 * (c.turns().len() + 1))
            + self.params.as_ref().map_or(0, params_bytes)
            + self.client_request_id.as_ref().map_or(0, String::len)
            + self.client_id.as_ref().map_or(0, |c| c.len())
            + 192
    }
}

/// Whether a run's `running` row has been committed: what the API waits on before it tells
/// the client the run's id (see [`StartWritten::wait`]).
#[must_use = "a run's id goes out once its start row is written: wait on this first"]
#[derive(Debug, Default)]
pub struct StartWritten(Option<tokio::sync::oneshot::Receiver<()>>);

impl StartWritten {
    /// No row is coming: the sink writes none, or dropped this one.
    pub fn never() -> StartWritten {
        StartWritten(None)
    }

    /// Answered once the row is committed; the sender dropped means it will not be (its
    /// batch failed, or the writer stopped).
    pub fn pending() -> (tokio::sync::oneshot::Sender<()>, StartWritten) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (tx, StartWritten(Some(rx)))
    }

    /// Waits until the row is committed, at most `bound`. Returns at once when no row is
    /// coming. True when the row is in the database.
    pub async fn wait(self, bound: std::time::Duration) -> bool {
        match self.0 {
            None => false,
            Some(rx) => matches!(tokio::time::timeout(bound, rx).await, Ok(Ok(()))),
        }
    }
}

/// Where finished runs go. `submit` must return at once, whatever the backend is doing.
pub trait AuditSink: Send + Sync + 'static {
    fn submit(&self, record: RunRecord);

    /// A run has started: write its `running` row soon. Must return at once, like `submit`.
    /// Unlike a record this is best effort: dropped when the queue is full or writes are
    /// failing, since the run's record, which it only announces, still inserts the row.
    /// The answer says when the row is committed (never, when it was dropped).
    fn started(&self, _run: StartedRun) -> StartWritten {
        StartWritten::never()
    }

    /// True while records wait above the sink's high-water mark (`/readyz` answers 503).
    fn backlogged(&self) -> bool {
        false
    }

    /// Why audit writes are failing now (a short fixed word such as `disk_full`), or `None`
    /// while they succeed (`/readyz` answers 503 while this is `Some`).
    fn write_failure(&self) -> Option<&'static str> {
        None
    }
}

pub use self::{
    events::StoredEvent,
    store::{RecordStore, Store},
    writer::{AuditWriter, WriterOptions},
};

/// The audit boundary's errors: database, migrations, dead-letter file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("DATABASE_URL must start with sqlite:// or postgres://")]
    UnsupportedUrl,
    #[error("cannot open the audit database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("audit database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// What sqlx calls "migration N was previously applied but is missing in the resolved
    /// migrations" when N is newer than this build: the case of an older release started on
    /// a database a newer one migrated, where the operator needs the way out, not sqlx's words.
    #[error(
        "the audit database has migration {applied}, newer than this build of duet knows \
         (up to {known}): a newer duet migrated it. To run this build, revert with the newer \
         binary first: `duet migrate --revert --to {known}` (RUNBOOK_DUAL_MODEL.md, \
         \"Rolling back a release\")"
    )]
    SchemaNewer { applied: i64, known: i64 },
    #[error("audit database query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The SQLite audit writer's own connection (`sqlite_batch`) could not be opened.
    #[error("cannot open the audit database: {0}")]
    SqliteOpen(#[source] rusqlite::Error),
    /// A statement of the SQLite audit writer's batch failed.
    #[error("audit database query failed: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("the audit database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("stored run {run_id} cannot be read back: {problem}")]
    Corrupt { run_id: String, problem: String },
    #[error("dead-letter file {}: {source}", path.display())]
    DeadLetter {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the dead-letter thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(
        "the SQLite file {} is no longer the file the service opened (deleted or replaced); \
         restart duet to open the file at the path, then run `duet audit replay`",
        path.display()
    )]
    FileReplaced { path: PathBuf },
    #[error(
        "another duet serve already uses {} (it holds {}): SQLite takes one serving process \
         per file; stop the other one, or use PostgreSQL for several replicas",
        path.display(),
        lock.display()
    )]
    InUse { path: PathBuf, lock: PathBuf },
    #[error(
        "INSTANCE_ID {id:?} is in use by a live replica (its heartbeat went on while this one \
         waited {waited_s:.1} s): give each replica its own INSTANCE_ID, or leave it unset \
         for host name and port"
    )]
    InstanceInUse { id: String, waited_s: f64 },
    #[error("SQLite serve lock {}: {source}", path.display())]
    ServeLock {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuditError {
    /// The database refused what a write holds, not the write itself: a value it cannot
    /// store or a constraint it breaks (PostgreSQL's classes 22 and 23; SQLite's constraint,
    /// mismatch and too-big errors). Another batch without that record would go in; an
    /// outage, a lock, a full disk, a deadlock or a server shutting down would refuse it too,
    /// and are not this.
    pub fn refuses_content(&self) -> bool {
        match self {
            AuditError::Database(sqlx::Error::Database(e)) => {
                let code = e.code().unwrap_or_default();
                // PostgreSQL's SQLSTATE; SQLite's extended codes through sqlx (19 and its
                // extensions: constraint; 20 mismatch; 18 too big).
                code.starts_with("22")
                    || code.starts_with("23")
                    || matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(18..=20))
            }
            AuditError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => matches!(
                failure.code,
                rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TypeMismatch
                    | rusqlite::ErrorCode::TooBig
            ),
            _ => false,
        }
    }

    /// Why a write failed, as the short fixed word `/readyz` reports and logs carry.
    pub fn reason(&self) -> &'static str {
        match self {
            AuditError::FileReplaced { .. } => "database_file_replaced",
            AuditError::Timeout(_) => "database_timeout",
            AuditError::Connect(_) => "database_unavailable",
            AuditError::Database(sqlx::Error::Database(e)) => {
                let code = e.code().unwrap_or_default();
                let message = e.message();
                let named = reason_in_message(message);
                // SQLite's extended codes: 13 SQLITE_FULL; PostgreSQL: 53100 disk_full.
                if code == "13" || code == "53100" || named == Some("disk_full") {
                    "disk_full"
                } else if code == "42P01" {
                    "schema_missing"
                } else {
                    named.unwrap_or("database_error")
                }
            }
            AuditError::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
            ) => "database_unavailable",
            AuditError::Database(_) => "database_error",
            // Opening may fail for the reasons a write does (a full disk creating the WAL
            // file); anything else is an unusable database.
            AuditError::SqliteOpen(e) => match sqlite_reason(e) {
                "database_error" => "database_unavailable",
                reason => reason,
            },
            AuditError::Sqlite(e) => sqlite_reason(e),
            _ => "audit_error",
        }
    }
}

/// The reason a database's error message names, in SQLite's wording (or PostgreSQL's, for
/// a full disk): what both drivers' errors fall back on when their codes say nothing more.
fn reason_in_message(message: &str) -> Option<&'static str> {
    if message.contains("disk is full") {
        Some("disk_full")
    } else if message.contains("no such table") {
        Some("schema_missing")
    } else if message.contains("disk I/O error") || message.contains("readonly") {
        Some("database_io_error")
    } else if message.contains("database is locked") || message.contains("database table is locked")
    {
        Some("database_locked")
    } else {
        None
    }
}

/// The same words as for sqlx's SQLite errors above, from SQLite's primary result codes.
fn sqlite_reason(e: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as Code;
    let rusqlite::Error::SqliteFailure(failure, message) = e else {
        return "database_error";
    };
    let message = message.as_deref().unwrap_or_default();
    match failure.code {
        Code::DiskFull => "disk_full",
        Code::SystemIoFailure | Code::ReadOnly => "database_io_error",
        Code::CannotOpen => "database_unavailable",
        // Another process held SQLite's write lock past the busy timeout (an operator's
        // `sqlite3` in a write transaction, a second writer on the file).
        Code::DatabaseBusy | Code::DatabaseLocked => "database_locked",
        _ => reason_in_message(message).unwrap_or("database_error"),
    }
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// Keeps records in memory: for tests and for running without a database.
#[derive(Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<RunRecord>>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn records(&self) -> Vec<RunRecord> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl AuditSink for MemorySink {
    fn submit(&self, record: RunRecord) {
        // A poisoned lock still holds valid records (pushes cannot half-happen), so keep going.
        let mut records = match self.records.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        records.push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::AuditError;

    fn sqlite(code: i32) -> AuditError {
        AuditError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    /// Only what a record holds counts as refused content: the writer and replay then try
    /// each record alone, which an outage would only make 500 times slower.
    #[test]
    fn a_refused_value_is_content_an_outage_is_not() {
        // SQLITE_CONSTRAINT (a trigger's RAISE, a CHECK), its extended form, SQLITE_TOOBIG.
        for code in [19, 19 | (3 << 8), 18] {
            assert!(sqlite(code).refuses_content(), "{code}");
        }
        // SQLITE_BUSY, SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN.
        for code in [5, 13, 10, 8, 14] {
            assert!(!sqlite(code).refuses_content(), "{code}");
        }
        assert!(!AuditError::Timeout(std::time::Duration::from_secs(1)).refuses_content());
        assert!(!AuditError::Database(sqlx::Error::PoolTimedOut).refuses_content());
    }
}
