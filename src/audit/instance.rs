//! This process as one instance among the replicas sharing a database (contract §8): its id,
//! its heartbeat, and finalizing as `interrupted` the runs of processes that died.
//!
//! - Every process makes a fresh UUIDv7 at start ([`new_id`]), stamped on the `running` row
//!   and the record of each of its runs (`dual_runs.instance_id`). Fresh per process, not the
//!   host and port: a replica restarted after a crash is a new instance, so the old one's
//!   runs cannot pass for live.
//! - SQLite: one process owns the file, so at start every row still `running` was left by a
//!   process that died; [`Instance::start`] finalizes them all.
//! - PostgreSQL: the instance registers in `duet_instances` before it serves and refreshes
//!   `heartbeat_at` every third of `INSTANCE_LEASE_S` (at most every 5 s). Each refresh is
//!   followed by a sweep, in one statement: delete the instances whose heartbeat is older than
//!   the lease and finalize their `running` rows (plus `running` rows older than the lease
//!   whose instance is not registered at all). Times are the database's `now()`, so
//!   replicas' clocks do not matter. Two replicas sweeping at once finalize each row once:
//!   the second waits on the first's row locks, then finds the rows no longer `running`. A
//!   live replica's rows are never touched, because its heartbeat is younger than the lease;
//!   one that was paused past its lease finds its row gone at the next heartbeat, registers
//!   again and logs it (its runs were marked interrupted; their records, when they come,
//!   replace that, see `sqlite`/`postgres`).
//! - Stopping (graceful shutdown, after the audit queue drained) deletes the row: runs left
//!   `running` then (their records dead-lettered) are finalized by the next sweep at once.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::{AuditError, Result, Store};
use crate::metrics::Metrics;

/// A new instance id: a UUIDv7, so ids sort by start time.
pub fn new_id() -> String {
    Uuid::now_v7().hyphenated().to_string()
}

/// The longest wait between two heartbeats, whatever the lease.
const MAX_HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// How often an instance with this lease refreshes its heartbeat (and sweeps): a third of the
/// lease, so two heartbeats may fail before the lease runs out, and at most every 5 s.
pub fn heartbeat_every(lease: Duration) -> Duration {
    (lease / 3).min(MAX_HEARTBEAT_EVERY)
}

const REGISTER: &str = "\
INSERT INTO duet_instances (instance_id, started_at, heartbeat_at) VALUES ($1, now(), now())
ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()";

const HEARTBEAT: &str = "UPDATE duet_instances SET heartbeat_at = now() WHERE instance_id = $1";

/// Deletes the instances whose lease ran out and finalizes their runs, in one statement;
/// also the `running` rows older than the lease of an instance that is not registered (a row
/// whose instance was deleted while its start row waited in a queue). `$1`: the lease in
/// seconds. Returns one row per run finalized, and tells the replicas waiting for those runs
/// (see `notify`).
const SWEEP: &str = "\
WITH dead AS (
    DELETE FROM duet_instances
    WHERE heartbeat_at < now() - make_interval(secs => $1)
    RETURNING instance_id
), ended AS (
    UPDATE dual_runs SET status = 'interrupted', total_ms = 0
    WHERE status = 'running'
      AND (instance_id IN (SELECT instance_id FROM dead)
           OR (created_at < now() - make_interval(secs => $1)
               AND (instance_id IS NULL
                    OR instance_id NOT IN (SELECT instance_id FROM duet_instances))))
    RETURNING run_id
)
SELECT pg_notify('duet_run_ended', run_id::text) FROM ended";

const DEREGISTER: &str = "DELETE FROM duet_instances WHERE instance_id = $1";

/// This process's registration; [`Instance::stop`] ends the heartbeat.
pub struct Instance {
    id: String,
    store: Store,
    stop: CancellationToken,
    /// The heartbeat task, on a tracker of its own: it must outlive the server's, until the
    /// audit queue has drained.
    tracker: TaskTracker,
    /// On SQLite, the exclusive lock that makes this the file's one serving process; the
    /// kernel releases it when the process ends, however it ends.
    _file_lock: Option<std::fs::File>,
}

impl Instance {
    /// Finalizes the runs dead processes left `running` and, on PostgreSQL, registers this
    /// instance and starts its heartbeat. Call it after migrating and before serving.
    pub async fn start(
        store: &Store,
        id: String,
        lease: Duration,
        metrics: Metrics,
    ) -> Result<Instance> {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut file_lock = None;
        match store {
            Store::Sqlite(sqlite) => {
                // Every `running` row is a dead process's only while no other process serves
                // this file: a second `duet serve` started by mistake would otherwise mark
                // the first one's live runs interrupted before failing to bind.
                file_lock = sqlite.path().map(serve_lock).transpose()?;
                let n = store.interrupt_all_running().await?;
                interrupted(&metrics, n, "a previous process");
            }
            Store::Postgres(pool) => {
                sqlx::query(REGISTER).bind(&id).execute(pool).await?;
                sweep(pool, lease, &metrics).await?;
                let beat = Heartbeat {
                    pool: pool.clone(),
                    id: id.clone(),
                    lease,
                    metrics,
                    stop: stop.clone(),
                };
                tracker.spawn(beat.run());
            }
        }
        info!(instance_id = %id, lease_s = lease.as_secs_f64(), "instance registered");
        Ok(Instance {
            id,
            store: store.clone(),
            stop,
            tracker,
            _file_lock: file_lock,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Ends the heartbeat and deregisters. Call it once every run has ended and the audit
    /// queue has drained: a run still `running` afterwards lost its record (dead-lettered),
    /// and is finalized `interrupted` by the next sweep until a replay brings the record.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Store::Postgres(pool) = &self.store
            && let Err(e) = sqlx::query(DEREGISTER).bind(&self.id).execute(pool).await
        {
            warn!(error = %e, "cannot deregister this instance; its lease will run out instead");
        }
    }
}

/// Takes the exclusive lock of the SQLite file at `path`: `PATH.serve-lock`, created if
/// missing and left in place (its lock, not its presence, is what counts). A lock the kernel
/// holds for a process, so `kill -9` frees it; a separate file, so it never meets SQLite's own
/// locks on the database.
fn serve_lock(path: &Path) -> Result<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".serve-lock");
    let lock = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| AuditError::ServeLock {
            path: lock.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::InUse {
            path: path.to_owned(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(AuditError::ServeLock { path: lock, source })
        }
    }
}

/// The PostgreSQL heartbeat loop.
struct Heartbeat {
    pool: PgPool,
    id: String,
    lease: Duration,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Heartbeat {
    async fn run(self) {
        let mut tick = tokio::time::interval(heartbeat_every(self.lease));
        // A late tick (a slow database) is followed by the next one on schedule, not a burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            // Bounded by the beat interval: a connection that hangs (a half-open socket, a
            // lock wait) must not hold the loop past the lease, or the other replicas would
            // presume this live one dead and mark its runs interrupted, beat after beat.
            let every = heartbeat_every(self.lease);
            match tokio::time::timeout(every, self.beat()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, reason = e.reason(), "instance heartbeat failed; retrying");
                }
                Err(_) => warn!(
                    timeout_s = every.as_secs_f64(),
                    "instance heartbeat did not finish in time; retrying"
                ),
            }
        }
        debug!("instance heartbeat stopped");
    }

    async fn beat(&self) -> Result<()> {
        let refreshed = sqlx::query(HEARTBEAT)
            .bind(&self.id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if refreshed == 0 {
            error!(
                instance_id = %self.id,
                lease_s = self.lease.as_secs_f64(),
                "this instance's heartbeat was older than INSTANCE_LEASE_S and another replica \
                 presumed it dead: its runs in flight were marked interrupted (their records \
                 will replace that as they arrive); registering again"
            );
            sqlx::query(REGISTER)
                .bind(&self.id)
                .execute(&self.pool)
                .await?;
        }
        sweep(&self.pool, self.lease, &self.metrics).await
    }
}

async fn sweep(pool: &PgPool, lease: Duration, metrics: &Metrics) -> Result<()> {
    let n = sqlx::query(SWEEP)
        .bind(lease.as_secs_f64())
        .fetch_all(pool)
        .await?
        .len() as u64;
    interrupted(metrics, n, "a replica whose lease ran out");
    Ok(())
}

fn interrupted(metrics: &Metrics, n: u64, whose: &str) {
    if n > 0 {
        metrics.runs_interrupted_total.inc_by(n);
        warn!(
            runs = n,
            "finalized as interrupted the runs {whose} left running"
        );
    }
}
