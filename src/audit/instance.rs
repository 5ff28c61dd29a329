//! This process as one instance among the replicas sharing a database (contract §8): its id,
//! its heartbeat, and finalizing as `interrupted` the runs of processes that died.
//!
//! - The instance id is `INSTANCE_ID`, or by default the host name and the port the service
//!   listens on ([`default_id`]), stamped on the `running` row and the record of each run
//!   (`dual_runs.instance_id`). A replica restarted under the same id (the same host and
//!   port, a StatefulSet's pod name) is a new *incarnation* of it: a fresh UUIDv7 kept in
//!   `duet_instances`, never on runs.
//! - SQLite: one process owns the file, so at start every row still `running` was left by a
//!   process that died; [`Instance::start`] finalizes them all.
//! - PostgreSQL: the instance claims its id in `duet_instances` before it serves and
//!   refreshes `heartbeat_at` every third of `INSTANCE_LEASE_S` (at most every 5 s). Each
//!   refresh is followed by a sweep, in one statement: delete the instances whose heartbeat is
//!   older than the lease and finalize their `running` rows (plus `running` rows older than
//!   the lease whose instance is not registered at all). Times are the database's `now()`, so
//!   replicas' clocks do not matter. Two replicas sweeping at once finalize each row once:
//!   the second waits on the first's row locks, then finds the rows no longer `running`. A
//!   live replica's rows are never touched, because its heartbeat is younger than the lease;
//!   one that was paused past its lease finds its row gone at the next heartbeat, registers
//!   again and logs it (its runs were marked interrupted; their records, when they come,
//!   replace that, see `sqlite`/`postgres`).
//! - Claiming an id whose row another incarnation holds with a fresh heartbeat: either that
//!   process just died (a restart after `kill -9`, within the lease) or a live replica was
//!   given the same id by mistake. The start watches the row for one and a half heartbeat
//!   intervals (at most the lease): a heartbeat that moves is a live replica, and the start
//!   is refused ([`AuditError::InstanceInUse`]); one that stays is a dead predecessor, whose
//!   row is taken over (compare-and-set on the heartbeat seen) and whose runs are finalized
//!   `interrupted` at once, before this process starts any run of its own under that id.
//! - Stopping (graceful shutdown, after the audit queue drained) deletes the row: runs left
//!   `running` then (their records dead-lettered) are finalized by a sweep once they are
//!   older than the lease, or at once by the next process that registers the same id.

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

/// The default instance id: this machine's host name and `port`, e.g. `web-3:8080`. The
/// host name is kept to the characters `INSTANCE_ID` allows.
pub fn default_id(port: u16) -> String {
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(100)
        .collect();
    let host = if host.is_empty() { "localhost" } else { &host };
    format!("{host}:{port}")
}

/// The longest wait between two heartbeats, whatever the lease.
const MAX_HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// How often an instance with this lease refreshes its heartbeat (and sweeps): a third of the
/// lease, so two heartbeats may fail before the lease runs out, and at most every 5 s.
pub fn heartbeat_every(lease: Duration) -> Duration {
    (lease / 3).min(MAX_HEARTBEAT_EVERY)
}

/// Registers `$1` for incarnation `$2` unless another incarnation holds it.
const REGISTER: &str = "\
INSERT INTO duet_instances (instance_id, incarnation, started_at, heartbeat_at)
VALUES ($1, $2, now(), now())
ON CONFLICT (instance_id) DO NOTHING";

/// The row another incarnation holds: its incarnation, heartbeat and age in seconds.
const HOLDER: &str = "\
SELECT incarnation, heartbeat_at, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8
FROM duet_instances WHERE instance_id = $1";

/// Takes over the row of a dead incarnation, if it is still as it was seen: `$1` id, `$2`
/// this incarnation, `$3` the dead one, `$4` the heartbeat seen.
const TAKE_OVER: &str = "\
UPDATE duet_instances SET incarnation = $2, started_at = now(), heartbeat_at = now()
WHERE instance_id = $1 AND incarnation = $3 AND heartbeat_at = $4";

/// Finalizes the runs a dead incarnation of this id left `running`, and tells the replicas
/// waiting for them.
const INTERRUPT_OWN: &str = "\
WITH ended AS (
    UPDATE dual_runs SET status = 'interrupted', total_ms = 0
    WHERE status = 'running' AND instance_id = $1
    RETURNING run_id
)
SELECT pg_notify('duet_run_ended', run_id::text) FROM ended";

const HEARTBEAT: &str =
    "UPDATE duet_instances SET heartbeat_at = now() WHERE instance_id = $1 AND incarnation = $2";

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

const DEREGISTER: &str = "DELETE FROM duet_instances WHERE instance_id = $1 AND incarnation = $2";

/// Whether this process still holds its instance id. Lost when another process took the id
/// over while this one's heartbeat was late (a paused or starved replica whose twin
/// restarted under the same id): `/readyz` then says `instance_id_taken`, so a load balancer
/// stops sending it runs that the other process could mark `interrupted`.
#[derive(Debug, Default)]
pub struct IdClaim {
    lost: std::sync::atomic::AtomicBool,
}

impl IdClaim {
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_lost(&self, lost: bool) {
        self.lost.store(lost, std::sync::atomic::Ordering::Relaxed);
    }
}

/// This process's registration; [`Instance::stop`] ends the heartbeat.
pub struct Instance {
    id: String,
    /// This process's incarnation of `id` (see the module's doc).
    incarnation: String,
    claim: std::sync::Arc<IdClaim>,
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
        let incarnation = Uuid::now_v7().hyphenated().to_string();
        let claim = std::sync::Arc::new(IdClaim::default());
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
                claim_id(pool, &id, &incarnation, lease, &metrics).await?;
                sweep(pool, lease, &metrics).await?;
                let beat = Heartbeat {
                    pool: pool.clone(),
                    id: id.clone(),
                    incarnation: incarnation.clone(),
                    claim: std::sync::Arc::clone(&claim),
                    lease,
                    metrics,
                    stop: stop.clone(),
                };
                tracker.spawn(beat.run());
            }
        }
        info!(
            instance_id = %id,
            %incarnation,
            lease_s = lease.as_secs_f64(),
            "instance registered"
        );
        Ok(Instance {
            id,
            incarnation,
            claim,
            store: store.clone(),
            stop,
            tracker,
            _file_lock: file_lock,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this process still holds its id, for `/readyz`.
    pub fn claim(&self) -> std::sync::Arc<IdClaim> {
        std::sync::Arc::clone(&self.claim)
    }

    /// Ends the heartbeat and deregisters. Call it once every run has ended and the audit
    /// queue has drained: a run still `running` afterwards lost its record (dead-lettered),
    /// and is finalized `interrupted` by the next sweep until a replay brings the record.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if let Store::Postgres(pool) = &self.store
            && let Err(e) = sqlx::query(DEREGISTER)
                .bind(&self.id)
                .bind(&self.incarnation)
                .execute(pool)
                .await
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

/// Claims `id` for `incarnation` in `duet_instances` (see the module's doc): registers it,
/// or takes over the row of a dead incarnation, or refuses when a live one holds it.
async fn claim_id(
    pool: &PgPool,
    id: &str,
    incarnation: &str,
    lease: Duration,
    metrics: &Metrics,
) -> Result<()> {
    // Twice at most: a holder's row that disappears between the insert and the read (its
    // clean stop, or a sweep) is followed by a second insert.
    for _ in 0..2 {
        let inserted = sqlx::query(REGISTER)
            .bind(id)
            .bind(incarnation)
            .execute(pool)
            .await?
            .rows_affected();
        if inserted == 1 {
            // No incarnation held the id, so a run still `running` under it was left by a
            // process that is gone (one that deregistered while the run's record went to the
            // dead-letter file); with the id live again, no sweep would ever finalize it.
            let n = sqlx::query(INTERRUPT_OWN)
                .bind(id)
                .fetch_all(pool)
                .await?
                .len() as u64;
            interrupted(metrics, n, "an earlier process of this INSTANCE_ID");
            return Ok(());
        }
        let Some(seen) = holder(pool, id).await? else {
            continue;
        };
        if seen.age < lease {
            // Fresh: watch it for one and a half beats. A live holder beats in that time.
            let watch = (heartbeat_every(lease) * 3 / 2).min(lease);
            warn!(
                instance_id = %id,
                heartbeat_age_s = seen.age.as_secs_f64(),
                watch_s = watch.as_secs_f64(),
                "another incarnation of this INSTANCE_ID has a fresh heartbeat; \
                 waiting to see whether it is alive"
            );
            tokio::time::sleep(watch).await;
            match holder(pool, id).await? {
                None => continue,
                Some(now) if now.incarnation != seen.incarnation || now.beat != seen.beat => {
                    return Err(AuditError::InstanceInUse {
                        id: id.to_owned(),
                        waited_s: watch.as_secs_f64(),
                    });
                }
                Some(_) => {}
            }
        }
        let mut tx = pool.begin().await?;
        let taken = sqlx::query(TAKE_OVER)
            .bind(id)
            .bind(incarnation)
            .bind(&seen.incarnation)
            .bind(seen.beat)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if taken == 0 {
            // Another process took it (or its heartbeat moved) since it was read.
            return Err(AuditError::InstanceInUse {
                id: id.to_owned(),
                waited_s: 0.0,
            });
        }
        let n = sqlx::query(INTERRUPT_OWN)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?
            .len() as u64;
        tx.commit().await?;
        info!(instance_id = %id, "took over the INSTANCE_ID of a process that stopped");
        interrupted(metrics, n, "the previous process of this INSTANCE_ID");
        return Ok(());
    }
    Err(AuditError::InstanceInUse {
        id: id.to_owned(),
        waited_s: 0.0,
    })
}

/// The incarnation holding an id's row, as read at one instant.
struct Holder {
    incarnation: String,
    beat: chrono::DateTime<chrono::Utc>,
    age: Duration,
}

async fn holder(pool: &PgPool, id: &str) -> Result<Option<Holder>> {
    let row: Option<(String, chrono::DateTime<chrono::Utc>, f64)> =
        sqlx::query_as(HOLDER).bind(id).fetch_optional(pool).await?;
    Ok(row.map(|(incarnation, beat, age)| Holder {
        incarnation,
        beat,
        // A clock step can make the age negative; it is fresh then.
        age: Duration::try_from_secs_f64(age).unwrap_or(Duration::ZERO),
    }))
}

/// The PostgreSQL heartbeat loop.
struct Heartbeat {
    pool: PgPool,
    id: String,
    incarnation: String,
    claim: std::sync::Arc<IdClaim>,
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
            .bind(&self.incarnation)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if refreshed > 0 {
            self.claim.set_lost(false);
        } else {
            let registered = sqlx::query(REGISTER)
                .bind(&self.id)
                .bind(&self.incarnation)
                .execute(&self.pool)
                .await?
                .rows_affected();
            if registered == 1 {
                self.claim.set_lost(false);
                error!(
                    instance_id = %self.id,
                    lease_s = self.lease.as_secs_f64(),
                    "this instance's heartbeat was older than INSTANCE_LEASE_S and another \
                     replica presumed it dead: its runs in flight were marked interrupted \
                     (their records will replace that as they arrive); registered again"
                );
            } else {
                // Not fought over: taking the row back would let each process mark the
                // other's runs interrupted in turn. Not ready instead, so no new runs come.
                self.claim.set_lost(true);
                error!(
                    instance_id = %self.id,
                    "another process holds this INSTANCE_ID (it took it over while this \
                     one's heartbeat was late): two replicas share one id; /readyz says \
                     instance_id_taken; stop one of them"
                );
            }
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
