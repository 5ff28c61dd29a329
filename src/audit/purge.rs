//! Deleting ended runs older than a cut-off (contract §10): the background job that
//! `AUDIT_RETENTION_DAYS` turns on ([`Purger`]) and `duet audit purge --older-than DAYS`
//! ([`purge_older_than`]).
//!
//! Deletes go in small batches, one statement (and so one short transaction) each, with a
//! pause between them: a purge of millions of rows never holds SQLite's single writer (or
//! PostgreSQL's row locks) for long, so the audit writer's batches keep going in between.
//! Traces go with their run by `ON DELETE CASCADE` (both schemas declare it; SQLite
//! connections turn foreign keys on). `running` rows are never deleted, however old: their
//! run may still be going (an `interrupted` one has ended, and goes).
//!
//! Several replicas may each run the job on one PostgreSQL database: a delete is idempotent
//! (a row is gone or it is not), and `FOR UPDATE SKIP LOCKED` lets two purges take different
//! rows instead of waiting on each other.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{Result, sqlite, store::Store};
use crate::metrics::Metrics;

/// Runs deleted per statement.
pub const BATCH: i64 = 1_000;
/// Pause between two batches: room for the audit writer's transactions.
pub const PAUSE: Duration = Duration::from_millis(100);
/// How often the background job looks for runs past the retention period.
pub const EVERY: Duration = Duration::from_secs(3600);

const SQLITE_DELETE: &str = "DELETE FROM dual_runs WHERE run_id IN (\
     SELECT run_id FROM dual_runs WHERE created_at < ?1 AND status <> 'running' \
     ORDER BY created_at LIMIT ?2)";
const POSTGRES_DELETE: &str = "DELETE FROM dual_runs WHERE run_id IN (\
     SELECT run_id FROM dual_runs WHERE created_at < $1 AND status <> 'running' \
     ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// The cut-off for "older than `days` days", from now.
pub fn cutoff(days: u32) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(i64::from(days))
}

/// Deletes one batch of ended runs created before `cutoff`; returns how many.
async fn purge_batch(store: &Store, cutoff: DateTime<Utc>) -> Result<u64> {
    Ok(match store {
        Store::Sqlite(s) => sqlx::query(SQLITE_DELETE)
            .bind(sqlite::format_time(&cutoff))
            .bind(BATCH)
            .execute(s.pool())
            .await?
            .rows_affected(),
        Store::Postgres(pool) => sqlx::query(POSTGRES_DELETE)
            .bind(cutoff)
            .bind(BATCH)
            .execute(pool)
            .await?
            .rows_affected(),
    })
}

/// Deletes every ended run created before `cutoff`, batch by batch, until none is left or
/// `stop` is cancelled (between batches). `on_batch` hears each batch's count as it commits,
/// so a counter stays right when a later batch fails. Returns how many runs were deleted.
pub async fn purge_older_than(
    store: &Store,
    cutoff: DateTime<Utc>,
    stop: &CancellationToken,
    mut on_batch: impl FnMut(u64),
) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = purge_batch(store, cutoff).await?;
        total += n;
        on_batch(n);
        if n < BATCH.unsigned_abs() {
            return Ok(total);
        }
        tokio::select! {
            () = tokio::time::sleep(PAUSE) => {}
            () = stop.cancelled() => return Ok(total),
        }
    }
}

/// The `AUDIT_RETENTION_DAYS` job: a purge at start, then every [`EVERY`], until stopped.
/// On a tracker of its own, like the instance heartbeat: it uses the store, which the
/// service closes only after the audit queue has drained.
pub struct Purger {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Purger {
    pub fn start(store: Store, days: u32, metrics: Metrics) -> Purger {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let token = stop.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = token.cancelled() => break,
                }
                let counter = &metrics.audit_purged_total;
                match purge_older_than(&store, cutoff(days), &token, |n| counter.inc_by(n)).await {
                    Ok(0) => {}
                    Ok(n) => info!(runs = n, days, "purged runs past the retention period"),
                    Err(e) => warn!(error = %e, "audit purge failed; trying again later"),
                }
            }
        });
        tracker.close();
        Purger { stop, tracker }
    }

    /// Stops the job; a batch in flight finishes first (it is small).
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.wait().await;
    }
}
