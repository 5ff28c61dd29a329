//! The background audit writer: the [`AuditWriter`] sink, its bounded queue, and the task
//! that writes batches to the store.
//!
//! Concurrency choices, where they are made:
//! - `submit` is a `try_send` on a bounded channel. A full queue (the database is slower
//!   than the request rate for long enough to fill it) sends the record to the dead-letter
//!   file instead: a stream is never slowed and a record never dropped.
//! - One task writes. It takes everything queued, up to `max_batch`, in one `recv_many`, and
//!   writes it in one transaction; records that arrive meanwhile form the next batch. It
//!   starts at most one transaction per [`MIN_BATCH_INTERVAL`] (unless a full batch waits):
//!   an idle service writes each record at once, and a busy one writes a few records per
//!   transaction instead of one, since each transaction has a fixed cost (measured at 1,450
//!   runs/s: SQLite took 12 % of duet's CPU with a transaction per record or two, 7 % with
//!   this pacing). It is short because records waiting here are what a `kill -9` loses.
//! - A failed batch is retried with jittered exponential backoff; after the last retry it
//!   goes to the dead-letter file, and the writer moves on.
//! - Shutdown closes the queue, writes what is left, and is bounded: past the timeout the
//!   batch in flight and the rest of the queue are dead-lettered. A write cut off mid-way may
//!   have committed; replay then skips it, since inserts are idempotent.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    AuditError, AuditSink, Result, RunRecord,
    deadletter::{Appender, DeadLetter},
    store::RecordStore,
};
use crate::metrics::Metrics;

/// Transactions start at least this far apart while fewer than a full batch wait: records
/// gather for at most this long (a few milliseconds more in memory, fewer commits).
pub const MIN_BATCH_INTERVAL: Duration = Duration::from_millis(2);

/// Longest one batch insert may take before it counts as failed.
const INSERT_TIMEOUT: Duration = Duration::from_secs(20);

/// Retries of a failed batch: contract §5 (5 attempts, 0.25 s rising to 3.0 s), read as the
/// first try plus five retries, whose waits run from 0.25 s to 3.0 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt. With the defaults the waits are about 0.25, 0.5,
    /// 1, 2 and 3 s: nearly 7 s of outage ridden out before a batch is dead-lettered.
    pub retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 5,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry `n` (0-based), before jitter: `base · 2^n`, capped.
    pub fn nominal(&self, n: u32) -> Duration {
        self.base.saturating_mul(1 << n.min(16)).min(self.cap)
    }

    /// The nominal wait scaled by a uniform factor in [0.75, 1]: enough spread that many
    /// duet processes hitting one recovering database do not retry in lock-step, while the
    /// schedule still reads as the contract's 0.25 s to 3.0 s.
    pub fn jittered(&self, n: u32) -> Duration {
        self.nominal(n).mul_f64(rand::random_range(0.75..=1.0))
    }
}

/// Sizes and paths of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Records that may wait for the writer. At the default, with records of a few KB, a
    /// full queue is tens of MB: enough to ride out a retry cycle at thousands of runs/s.
    pub queue_capacity: usize,
    /// `/readyz` answers 503 at or above this many queued records, so a load balancer can
    /// steer traffic away before the queue overflows into the dead-letter file.
    pub high_water: usize,
    /// Most records per transaction.
    pub max_batch: usize,
    pub retry: RetryPolicy,
    pub deadletter_path: PathBuf,
    /// Batches that may wait for the dead-letter thread before senders append themselves.
    pub deadletter_capacity: usize,
}

impl WriterOptions {
    pub fn new(deadletter_path: impl Into<PathBuf>) -> WriterOptions {
        let queue_capacity = 8192;
        WriterOptions {
            queue_capacity,
            high_water: queue_capacity * 3 / 4,
            max_batch: 500,
            retry: RetryPolicy::default(),
            deadletter_path: deadletter_path.into(),
            deadletter_capacity: 1024,
        }
    }
}

/// The audit sink of a running service: queues records for the writer task.
#[derive(Clone)]
pub struct AuditWriter {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<RunRecord>,
    deadletter: Arc<DeadLetter>,
    metrics: Metrics,
    high_water: usize,
    /// Close the queue and write what is left.
    drain: CancellationToken,
    /// Stop writing; dead-letter what is left (the drain took too long).
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl AuditWriter {
    /// Starts the dead-letter thread and the writer task (on the current tokio runtime).
    pub fn start(
        store: Arc<dyn RecordStore>,
        options: WriterOptions,
        metrics: Metrics,
    ) -> Result<AuditWriter> {
        let deadletter_counter = metrics
            .audit_writes_total
            .with_label_values(&["deadletter"]);
        let deadletter = Arc::new(DeadLetter::start(
            Appender::new(options.deadletter_path, Some(deadletter_counter)),
            options.deadletter_capacity.max(1),
        )?);
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let inner = Arc::new(Inner {
            tx,
            deadletter: Arc::clone(&deadletter),
            metrics: metrics.clone(),
            high_water: options.high_water,
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let task = Task {
            rx,
            store,
            deadletter,
            metrics,
            max_batch: options.max_batch.max(1),
            retry: options.retry,
            drain: inner.drain.clone(),
            abort: inner.abort.clone(),
        };
        inner.tracker.spawn(task.run());
        Ok(AuditWriter { inner })
    }

    /// Records waiting for the writer (not counting the batch being written).
    pub fn queue_depth(&self) -> usize {
        self.inner.tx.max_capacity() - self.inner.tx.capacity()
    }

    /// Writes everything queued and stops the writer, waiting at most `timeout` for the
    /// database; what is still unwritten then goes to the dead-letter file. Call it after
    /// every run has ended (records submitted later are dead-lettered directly).
    pub async fn shutdown(&self, timeout: Duration) {
        let inner = &self.inner;
        inner.drain.cancel();
        inner.tracker.close();
        if tokio::time::timeout(timeout, inner.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                timeout_s = timeout.as_secs_f64(),
                "audit queue not drained in time; dead-lettering the rest"
            );
            inner.abort.cancel();
            inner.tracker.wait().await;
        }
        let deadletter = Arc::clone(&inner.deadletter);
        if tokio::task::spawn_blocking(move || deadletter.stop_blocking())
            .await
            .is_err()
        {
            error!("the dead-letter thread could not be stopped cleanly");
        }
        info!("audit writer stopped");
    }
}

impl AuditSink for AuditWriter {
    fn submit(&self, record: RunRecord) {
        let inner = &self.inner;
        match inner.tx.try_send(record) {
            Ok(()) => {
                let depth = self.queue_depth();
                inner
                    .metrics
                    .audit_queue_depth
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
            Err(TrySendError::Full(record)) => {
                warn!(run_id = %record.run_id, "audit queue full; dead-lettering the record");
                inner.deadletter.send(vec![record]);
            }
            Err(TrySendError::Closed(record)) => {
                warn!(run_id = %record.run_id, "audit writer stopped; dead-lettering the record");
                inner.deadletter.send(vec![record]);
            }
        }
    }

    fn backlogged(&self) -> bool {
        self.queue_depth() >= self.inner.high_water
    }
}

/// The writer task's state.
struct Task {
    rx: mpsc::Receiver<RunRecord>,
    store: Arc<dyn RecordStore>,
    deadletter: Arc<DeadLetter>,
    metrics: Metrics,
    max_batch: usize,
    retry: RetryPolicy,
    drain: CancellationToken,
    abort: CancellationToken,
}

impl Task {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut draining = false;
        let mut next_write = tokio::time::Instant::now();
        loop {
            if !draining
                && self.rx.len() < self.max_batch
                && next_write > tokio::time::Instant::now()
            {
                tokio::select! {
                    biased;
                    () = self.drain.cancelled() => {}
                    () = tokio::time::sleep_until(next_write) => {}
                }
            }
            let received = tokio::select! {
                biased;
                () = self.drain.cancelled(), if !draining => {
                    // Closing refuses new records (their senders dead-letter them) but keeps
                    // those already queued, so `recv_many` hands them out and then returns 0.
                    draining = true;
                    self.rx.close();
                    continue;
                }
                n = self.rx.recv_many(&mut batch, self.max_batch) => n,
            };
            if received == 0 {
                break;
            }
            self.set_depth();
            next_write = tokio::time::Instant::now() + MIN_BATCH_INTERVAL;
            let written = tokio::select! {
                biased;
                () = self.abort.cancelled() => None,
                result = self.write_with_retry(&batch) => Some(result),
            };
            match written {
                Some(Ok(_)) => batch.clear(),
                Some(Err(e)) => {
                    error!(error = %e, records = batch.len(),
                        "audit batch failed on every attempt; dead-lettering it");
                    self.deadletter.send(std::mem::take(&mut batch));
                }
                None => {
                    self.rx.close();
                    while let Ok(record) = self.rx.try_recv() {
                        batch.push(record);
                    }
                    warn!(
                        records = batch.len(),
                        "audit drain timed out; dead-lettering"
                    );
                    self.deadletter.send(std::mem::take(&mut batch));
                    break;
                }
            }
        }
        self.metrics.audit_queue_depth.set(0);
        debug!("audit writer task ended");
    }

    fn set_depth(&self) {
        let depth = i64::try_from(self.rx.len()).unwrap_or(i64::MAX);
        self.metrics.audit_queue_depth.set(depth);
    }

    /// Writes one batch, retrying on the policy's schedule. Counts records, not batches, in
    /// `duet_audit_writes_total` (a retried batch of 100 is 100 retries).
    async fn write_with_retry(&self, batch: &[RunRecord]) -> Result<u64> {
        let n = batch.len() as u64;
        let mut retry = 0;
        loop {
            let started = std::time::Instant::now();
            // A database that takes the connection and then hangs (a lock wait, a half-open
            // socket) must count as a failed attempt, or the writer would stall for good.
            let attempt =
                tokio::time::timeout(INSERT_TIMEOUT, self.store.insert_batch(batch)).await;
            match attempt.unwrap_or(Err(AuditError::Timeout(INSERT_TIMEOUT))) {
                Ok(new) => {
                    self.metrics
                        .audit_write_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .audit_writes_total
                        .with_label_values(&["ok"])
                        .inc_by(n);
                    if new < n {
                        debug!(
                            already_stored = n - new,
                            "records already in the audit store were skipped"
                        );
                    }
                    return Ok(new);
                }
                Err(e) if retry < self.retry.retries => {
                    let wait = self.retry.jittered(retry);
                    warn!(error = %e, records = n, retry = retry + 1,
                        wait_ms = wait.as_millis() as u64, "audit batch failed; retrying");
                    self.metrics
                        .audit_writes_total
                        .with_label_values(&["retry"])
                        .inc_by(n);
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_rises_from_a_quarter_second_to_three() {
        let p = RetryPolicy::default();
        let nominal: Vec<f64> = (0..p.retries).map(|n| p.nominal(n).as_secs_f64()).collect();
        assert_eq!(nominal, [0.25, 0.5, 1.0, 2.0, 3.0]);
        for n in 0..p.retries {
            for _ in 0..100 {
                let j = p.jittered(n);
                assert!(
                    j <= p.nominal(n) && j >= p.nominal(n).mul_f64(0.75),
                    "{j:?}"
                );
            }
        }
    }
}
