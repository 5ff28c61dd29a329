//! The background audit writer: the [`AuditWriter`] sink, its bounded queue, and the task
//! that writes batches to the store.
//!
//! Longer than the house's ~500 lines: the sink, the task, retries, the journal's bookkeeping
//! and readiness share one state, and reading them apart would hide how they interact.
//!
//! Concurrency choices, where they are made:
//! - `submit` is a `try_send` on a bounded channel. A full queue (the database is slower
//!   than the request rate for long enough to fill it) sends the record to the dead-letter
//!   file instead: a stream is never slowed and a record never dropped.
//! - One task writes. It takes everything queued, up to `max_batch`, in one `recv_many`, and
//!   writes it in one transaction; records that arrive meanwhile form the next batch. It
//!   starts at most one transaction per batch interval (`AUDIT_BATCH_INTERVAL_MS`, default
//!   [`DEFAULT_BATCH_INTERVAL`]) unless a full batch waits: an idle service writes each
//!   record at once, and a busy one writes several records per transaction instead of one,
//!   since each transaction has a fixed cost (an fsync, and on PostgreSQL a round trip to
//!   the server). It is short because records waiting here are what a `kill -9` loses.
//! - The queue is bounded by bytes as well as by count (`AUDIT_QUEUE_MAX_BYTES`): a record
//!   that does not fit is dead-lettered like one that finds the queue full.
//! - On PostgreSQL two batches are in flight while writes succeed: the next batch's first
//!   attempt starts (on a task of its own, on a second connection) before the one in flight
//!   is settled, so the server inserts one while the other's commit is flushed. Batches are
//!   still settled one by one in queue order, and a batch counts as written (metrics,
//!   readiness, the journal's book) only once its own attempt returned, that is once it
//!   committed. The next may commit first; the database keeps a run's record over its start
//!   row whatever the order (see `postgres::write_batch`). Once a write fails the writer goes
//!   back to one batch at a time, so everything below works as it does on SQLite.
//! - A failed batch is retried with jittered exponential backoff; after the last retry it
//!   goes to the dead-letter file, and the writer moves on. A batch the database refused for
//!   its content (`AuditError::refuses_content`) is first tried record by record (`Task::isolate`), so one
//!   bad record does not take the batch's other runs with it.
//! - Before the first retry, the batch is appended to the journal (`PATH.journal` beside the
//!   dead-letter file) and fsynced; while writes fail, each new record is journaled as it
//!   arrives. So a `kill -9` during an outage loses no record whose client had its answer
//!   (only records not yet tried while the database was healthy: milliseconds' worth). A
//!   journaled record may also reach the database later; replay skips it then. The journal
//!   is removed once nothing in it is outstanding (every record written, or fsynced in the
//!   dead-letter file), and at a clean shutdown; after a crash the next start replays it.
//! - Write results feed readiness: `/readyz` is 503 while a batch is in retry and for
//!   [`FAILURE_HOLD`] after the last failure, unless a write succeeds first.
//! - A run's start goes through the same queue as a small [`StartedRun`] (contract §8: its
//!   `running` row appears within milliseconds), and is written in the same transactions as
//!   the records, so start rows cost no commit of their own. Once the batch holding it has
//!   committed, the writer says so (`StartWritten`): the run's response, which carries its
//!   id, waits for that, so a client never holds the id of a run a crash left without a row.
//!   It is best effort: dropped (a debug line, nobody waits) while the queue is above its
//!   high-water mark, so start rows never take the room records need; the run's record
//!   inserts the row anyway. While writes are failing, a start is journaled instead of
//!   queued (`start_line`; never appended on the request's thread), and counts in the
//!   journal's book until the run's record is in the database or the dead-letter file, so
//!   a crash during the outage leaves the run in flight a row: the next start replays it as
//!   `interrupted`. While a write has stalled (running past `STALLED_AFTER`), starts and
//!   records are journaled as well as queued: an unreachable database fails the attempt
//!   only when the pool gives up connecting. The start rows of a
//!   batch whose first attempt failed are journaled with its records. A batch that fails on
//!   every attempt dead-letters its records, and its start rows as start lines.
//! - Shutdown closes the queue, writes what is left, and is bounded: past the timeout the
//!   batch in flight and the rest of the queue are dead-lettered. A write cut off mid-way may
//!   have committed; replay then skips it, since inserts are idempotent. A SQLite batch runs
//!   on the writer's own thread as one blocking call, which nothing cuts off: should one hang
//!   (a disk that never answers an fsync), shutdown waits the timeout once more and then
//!   leaves without it, keeping the journal; what was in memory only (that batch, unless it
//!   was a retry, and what queued behind it) is lost as a `kill -9` would lose it.
//! - An attempt running past `INSERT_TIMEOUT` counts as a failing write (`database_timeout`)
//!   even before it returns: records are journaled as they arrive and `/readyz` says 503.
//!   On PostgreSQL the timeout ends the attempt at that moment anyway; a SQLite batch on the
//!   writer's thread cannot be cut off.

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot,
    },
    task::JoinHandle,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use super::{
    AuditError, AuditSink, Result, RunRecord, StartWritten, StartedRun,
    deadletter::{Appender, DeadLetter, journal_path},
    privacy, start_line,
    store::RecordStore,
};
use crate::{config::StoreText, metrics::Metrics};

/// `AUDIT_BATCH_INTERVAL_MS`'s default: transactions start at least this far apart while
/// fewer than a full batch wait, so records gather for at most this long (a few milliseconds
/// more in memory, fewer commits).
///
/// Kept at 2 ms. A run's response waits for its start row, so a longer interval no longer
/// leaves runs a client saw without any row after a `kill -9` (it did before: 11 in one of
/// three kills at 10 ms), but it delays every response's headers by up to the interval, and
/// a run that ended within the interval before a crash, its client holding `done`, is
/// finalized `interrupted`. 10 ms saves the writer's threads about 0.14 ms of CPU per run when
/// clients come independently, and puts time to first byte at 7.5 ms (docs/benchmarks.md, "The writer's
/// connection outside the pool, the start row before the run's id"); operators who want
/// that raise `AUDIT_BATCH_INTERVAL_MS` knowing this.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_millis(2);

/// The longest batch interval allowed: a run's `running` row must appear within about 100 ms
/// of its start (contract §8), and the interval is also what a `kill -9` can lose.
pub const MAX_BATCH_INTERVAL: Duration = Duration::from_millis(100);

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
        self.backoff().nominal(n)
    }

    /// The nominal wait scaled by a uniform factor in [0.75, 1]: enough spread that many
    /// duet processes hitting one recovering database do not retry in lock-step, while the
    /// schedule still reads as the contract's 0.25 s to 3.0 s.
    pub fn jittered(&self, n: u32) -> Duration {
        self.backoff().jittered(n)
    }

    fn backoff(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(self.base, self.cap, 0.75)
    }
}

/// How long `/readyz` keeps reporting a failed write after the last failed attempt when no
/// write has been tried since. Past it readiness is "half open": a probe of the database
/// decides, and the next write confirms or fails again. Without it a service taken out of
/// rotation for failing writes would never see another write, and never become ready.
pub const FAILURE_HOLD: Duration = Duration::from_secs(10);

/// A write attempt running longer than this counts as stalled: start rows queued meanwhile
/// are still written, but no response waits for them. Without it, a database that hangs
/// rather than refuses (a connection that takes its 5 s timeout to fail) held every new
/// response for the whole bound of its wait (100 ms, `api::query`) until the first attempt
/// failed; measured with PostgreSQL stopped under load: time to first byte p99 103 ms.
pub const STALLED_AFTER: Duration = Duration::from_millis(100);

/// Sizes and paths of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Records that may wait for the writer. At the default, with records of a few KB, a
    /// full queue is tens of MB: enough to ride out a retry cycle at thousands of runs/s.
    pub queue_capacity: usize,
    /// `/readyz` answers 503 at or above this many queued records, so a load balancer can
    /// steer traffic away before the queue overflows into the dead-letter file.
    pub high_water: usize,
    /// Bytes of records ([`RunRecord::approx_bytes`]) that may wait for the writer: the
    /// count alone would let 8,192 runs with megabyte answers take gigabytes.
    pub queue_max_bytes: usize,
    /// `/readyz` answers 503 at or above this many queued bytes.
    pub high_water_bytes: usize,
    /// Most records per transaction. Start rows come on top, up to as many items again: so
    /// under load, when about half the queue is start rows, a transaction still carries as
    /// many records as before start rows existed (each transaction has a fixed cost, an
    /// fsync on SQLite).
    pub max_batch: usize,
    /// Transactions start at least this far apart unless a full batch waits (see the module
    /// doc); at most [`MAX_BATCH_INTERVAL`].
    pub batch_interval: Duration,
    /// Run the writer task on a thread of its own (a single-threaded runtime) rather than on
    /// the caller's runtime, so that a runtime saturated by streams cannot slow it (see
    /// [`WriterOptions::with_own_thread`]).
    pub own_thread: bool,
    pub retry: RetryPolicy,
    pub deadletter_path: PathBuf,
    /// Batches that may wait for the dead-letter thread before senders append themselves.
    pub deadletter_capacity: usize,
    /// Stamped on every start row and record (`dual_runs.instance_id`): this process's id,
    /// as [`super::instance::Instance`] heartbeats it. By default the host name and port 0.
    pub instance_id: String,
    /// `AUDIT_STORE_TEXT`: with `None`, texts are stripped from records and start rows as
    /// they are submitted, before anything durable can see them (see `audit::privacy`).
    pub store_text: StoreText,
}

/// `AUDIT_QUEUE_MAX_BYTES`'s default.
pub const DEFAULT_QUEUE_MAX_BYTES: usize = 64 << 20;

impl WriterOptions {
    pub fn new(deadletter_path: impl Into<PathBuf>) -> WriterOptions {
        let queue_capacity = 8192;
        WriterOptions {
            queue_capacity,
            high_water: queue_capacity * 3 / 4,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            high_water_bytes: DEFAULT_QUEUE_MAX_BYTES / 4 * 3,
            max_batch: 500,
            batch_interval: DEFAULT_BATCH_INTERVAL,
            own_thread: false,
            retry: RetryPolicy::default(),
            deadletter_path: deadletter_path.into(),
            deadletter_capacity: 1024,
            instance_id: super::instance::default_id(0),
            store_text: StoreText::Full,
        }
    }

    /// Sets what is kept of a run's texts (see [`WriterOptions::store_text`]).
    pub fn with_store_text(mut self, store_text: StoreText) -> WriterOptions {
        self.store_text = store_text;
        self
    }

    /// Sets the instance id stamped on rows (see [`WriterOptions::instance_id`]).
    pub fn with_instance_id(mut self, id: impl Into<String>) -> WriterOptions {
        self.instance_id = id.into();
        self
    }

    /// Sets the batch interval (see [`WriterOptions::batch_interval`]), at most
    /// [`MAX_BATCH_INTERVAL`].
    pub fn with_batch_interval(mut self, interval: Duration) -> WriterOptions {
        self.batch_interval = interval.min(MAX_BATCH_INTERVAL);
        self
    }

    /// Runs the writer task on a thread of its own, `duet-audit-0`. On a runtime that every
    /// stream also runs on, each of a batch's statements waits its turn among the streams'
    /// tasks: at saturation a batch took about 240 ms instead of 10, and in one benchmark run
    /// the queue filled and 1,143 records went to the dead-letter file. Only for a store
    /// whose connections need no runtime's reactor (SQLite's run on threads of their own),
    /// or that nothing else uses: a PostgreSQL connection belongs to the runtime it was
    /// opened on and stops working when this thread stops, so `duet serve` gives the writer
    /// a PostgreSQL pool of its own, whose connections open on this thread when it first
    /// writes. The thread may block ([`crate::workers::may_block`]): SQLite's batches run
    /// there in place, with no hop to another thread.
    pub fn with_own_thread(mut self) -> WriterOptions {
        self.own_thread = true;
        self
    }

    /// Sets the byte bound, with the high-water mark at three quarters of it.
    pub fn with_queue_max_bytes(mut self, bytes: usize) -> WriterOptions {
        self.queue_max_bytes = bytes;
        self.high_water_bytes = bytes / 4 * 3;
        self
    }
}

/// What the queue carries: a run's start (its `running` row) or its record.
#[expect(
    clippy::large_enum_variant,
    reason = "records are moved on into the batch as they are; boxing them would cost an \
              allocation per run to save a few hundred bytes per start row while it waits"
)]
enum Item {
    /// A start row, and who to tell once it is committed.
    Started(StartedRun, Ack),
    Ended(RunRecord),
}

/// Told once a start row is committed; dropped unanswered when it will not be.
type Ack = oneshot::Sender<()>;

/// What one batch takes from the queue: start rows (and who waits on each), and records
/// (and whether each is in the journal).
struct Gathered {
    started: Vec<StartedRun>,
    acks: Vec<Ack>,
    batch: Vec<RunRecord>,
    journaled: Vec<bool>,
}

/// An item in the queue, with its size and whether it is in the journal already (start
/// rows never are: they are not worth an fsync).
struct Queued {
    item: Item,
    bytes: usize,
    journaled: bool,
}

impl Queued {
    fn record(&self) -> Option<&RunRecord> {
        match &self.item {
            Item::Ended(r) => Some(r),
            Item::Started(..) => None,
        }
    }
}

/// What the journal holds that is not yet anywhere else. When nothing is (every journaled
/// record has been written, or dead-lettered and fsynced), the file is removed, so a service
/// that rides out many short outages does not grow it for ever.
#[derive(Default)]
struct JournalBook {
    /// Journaled records not yet written or durably dead-lettered, and journaled starts of
    /// runs that have not ended yet.
    outstanding: u64,
    /// Something was appended since the file was last removed.
    dirty: bool,
    /// The runs whose start `started` journaled and whose record has not come yet: each
    /// counts in `outstanding` until it does (see `AuditWriter::journal_start`).
    starts: HashSet<Uuid>,
}

/// Recent write results, for `/readyz`.
#[derive(Default)]
struct Health {
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// The reason and time of the last failed attempt, cleared by a successful write.
    failed: Option<(&'static str, Instant)>,
    /// A batch that has failed is still being retried.
    retrying: bool,
    /// Attempts running now (two on PostgreSQL while writes succeed).
    attempts: u32,
    /// About when the oldest of them began: set by the first, reset to now when one of two
    /// ends (the other began earlier, so its age is understated by at most one attempt).
    attempt_began: Option<Instant>,
}

impl HealthState {
    fn failure(&self) -> Option<&'static str> {
        if let Some((reason, at)) = self.failed
            && (self.retrying || at.elapsed() < FAILURE_HOLD)
        {
            return Some(reason);
        }
        // A write that has run past its timeout without returning (a SQLite batch on the
        // writer's thread, which no timeout cuts off) is failing: records are journaled as
        // they arrive, and readiness says so, while it hangs.
        self.attempt_began
            .is_some_and(|began| began.elapsed() >= INSERT_TIMEOUT)
            .then_some(AuditError::Timeout(INSERT_TIMEOUT).reason())
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // The state is two plain fields; a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, reason: &'static str, retrying: bool) {
        let mut s = self.lock();
        s.failed = Some((reason, Instant::now()));
        s.retrying = retrying;
    }

    fn succeeded(&self) {
        let mut s = self.lock();
        s.failed = None;
        s.retrying = false;
    }

    fn failure(&self) -> Option<&'static str> {
        self.lock().failure()
    }

    fn attempt_begins(&self) {
        let mut s = self.lock();
        s.attempts += 1;
        s.attempt_began.get_or_insert_with(Instant::now);
    }

    fn attempt_ends(&self) {
        let mut s = self.lock();
        s.attempts = s.attempts.saturating_sub(1);
        s.attempt_began = (s.attempts > 0).then(Instant::now);
    }

    /// Why writes are failing (as [`Health::failure`]), and whether a write has been
    /// running for [`STALLED_AFTER`]: what decides whether a start row queued now is worth
    /// waiting for. One lock for both, per run.
    fn failure_or_stall(&self) -> (Option<&'static str>, bool) {
        let s = self.lock();
        let stalled = s
            .attempt_began
            .is_some_and(|began| began.elapsed() >= STALLED_AFTER);
        (s.failure(), stalled)
    }
}

/// Marks an attempt as running in [`Health`] while it lives, whichever way it ends (a
/// dropped future too).
struct Attempting<'a>(&'a Health);

impl<'a> Attempting<'a> {
    fn new(health: &'a Health) -> Attempting<'a> {
        health.attempt_begins();
        Attempting(health)
    }
}

impl Drop for Attempting<'_> {
    fn drop(&mut self) {
        self.0.attempt_ends();
    }
}

/// The audit sink of a running service: queues records for the writer task.
#[derive(Clone)]
pub struct AuditWriter {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Queued>,
    deadletter: Arc<DeadLetter>,
    journal: Arc<DeadLetter>,
    /// Held while a record is counted (before it is handed to the journal thread), and while
    /// the file is removed: so a removal never takes a line whose record is still outstanding.
    book: Arc<Mutex<JournalBook>>,
    health: Arc<Health>,
    metrics: Metrics,
    high_water: usize,
    queued_bytes: Arc<AtomicUsize>,
    /// Records the task has taken out of the channel to journal them (see `Task::hold`).
    held: Arc<AtomicUsize>,
    /// How many runs are in `JournalBook::starts`: while none are (nearly always), a record
    /// skips the book's lock.
    journaled_starts: Arc<AtomicUsize>,
    max_bytes: usize,
    high_water_bytes: usize,
    /// Close the queue and write what is left.
    drain: CancellationToken,
    /// Stop writing; dead-letter what is left (the drain took too long).
    abort: CancellationToken,
    tracker: TaskTracker,
    instance_id: String,
    store_text: StoreText,
    /// The writer's own thread, if it has one; stopped at the end of `shutdown`.
    thread: Mutex<Option<crate::workers::Workers>>,
}

impl AuditWriter {
    /// Starts the dead-letter and journal threads and the writer task (on the current tokio
    /// runtime).
    pub fn start(
        store: Arc<dyn RecordStore>,
        options: WriterOptions,
        metrics: Metrics,
    ) -> Result<AuditWriter> {
        let deadletter_counter = metrics
            .audit_writes_total
            .with_label_values(&["deadletter"]);
        let journal = Arc::new(DeadLetter::start(
            Appender::new(
                journal_path(&options.deadletter_path),
                Some(metrics.audit_journaled_total.clone()),
            ),
            options.deadletter_capacity.max(1),
        )?);
        let deadletter = Arc::new(DeadLetter::start(
            Appender::new(options.deadletter_path, Some(deadletter_counter)),
            options.deadletter_capacity.max(1),
        )?);
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let health = Arc::new(Health::default());
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let book = Arc::new(Mutex::new(JournalBook::default()));
        let journaled_starts = Arc::new(AtomicUsize::new(0));
        let thread = if options.own_thread {
            Some(
                crate::workers::Workers::start_dedicated("duet-audit")
                    .map_err(AuditError::Thread)?,
            )
        } else {
            None
        };
        let inner = Arc::new(Inner {
            tx,
            deadletter: Arc::clone(&deadletter),
            journal: Arc::clone(&journal),
            book: Arc::clone(&book),
            health: Arc::clone(&health),
            metrics: metrics.clone(),
            high_water: options.high_water,
            queued_bytes: Arc::clone(&queued_bytes),
            held: Arc::clone(&held),
            journaled_starts: Arc::clone(&journaled_starts),
            max_bytes: options.queue_max_bytes,
            high_water_bytes: options.high_water_bytes,
            drain: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
            instance_id: options.instance_id.clone(),
            store_text: options.store_text,
            thread: Mutex::new(thread),
        });
        metrics.ready.set(1);
        let task = Task {
            rx,
            in_flight: store.batches_in_flight().clamp(1, 2),
            tracker: inner.tracker.clone(),
            store,
            deadletter,
            journal,
            book,
            health,
            queued_bytes,
            held,
            journaled_starts,
            backlog: VecDeque::new(),
            hold_capacity: options.queue_capacity.max(1),
            metrics,
            max_batch: options.max_batch.max(1),
            batch_interval: options.batch_interval.min(MAX_BATCH_INTERVAL),
            retry: options.retry,
            drain: inner.drain.clone(),
            abort: inner.abort.clone(),
            instance_id: options.instance_id,
        };
        let own = inner
            .thread
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|t| t.pick().0.clone()));
        match own {
            Some(handle) => inner.tracker.spawn_on(task.run(), &handle),
            None => inner.tracker.spawn(task.run()),
        };
        Ok(AuditWriter { inner })
    }

    /// Records waiting for the writer (not counting the batch being written).
    pub fn queue_depth(&self) -> usize {
        self.inner.tx.max_capacity() - self.inner.tx.capacity()
            + self.inner.held.load(Ordering::Relaxed)
    }

    /// Bytes of the records waiting for the writer.
    pub fn queue_bytes(&self) -> usize {
        self.inner.queued_bytes.load(Ordering::Relaxed)
    }

    /// Dead-letters a record `submit` could not queue. One it journaled stops being
    /// outstanding in the journal once the dead-letter append is on disk (not before: until
    /// then the journal is its only durable copy), so the journal can go when nothing else
    /// in it is outstanding.
    fn dead_letter(&self, record: RunRecord, journaled: bool) {
        let inner = &self.inner;
        let start = take_starts(
            &inner.book,
            &inner.journaled_starts,
            std::iter::once(&record.run_id),
        );
        let settled = u64::from(journaled) + start;
        if settled == 0 {
            inner.deadletter.send(vec![record]);
            return;
        }
        let book = Arc::clone(&inner.book);
        let path = inner.journal.path().to_owned();
        let then: super::deadletter::Then = Box::new(move |durable| {
            if durable {
                match settle(&book, &path, settled) {
                    Ok(true) => debug!("every journaled audit record is stored; journal removed"),
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "cannot remove the audit journal"),
                }
            }
        });
        inner.deadletter.send_then(vec![record], Some(then));
    }

    /// Journals a run's start while writes fail or stall (`start_line`). It counts as
    /// outstanding until the run's record is in the database or the dead-letter file (or
    /// its start row committed), so the journal is not removed while the run may still die
    /// with its process. Best effort, like every start row: never appended on the request's
    /// thread; a journal thread with no room leaves the start unjournaled.
    fn journal_start(&self, run: &StartedRun, synced: Ack) -> bool {
        let inner = &self.inner;
        // Counted before it is handed over, so no removal can run between the two.
        let counted = count_starts(
            &inner.book,
            &inner.journaled_starts,
            std::iter::once(run.run_id),
        );
        if inner
            .journal
            .try_send_line(start_line::to_line(run), Some(synced))
        {
            return true;
        }
        // Counted (`duet_start_rows_unconfirmed_total`): a line per run would flood the log
        // during the outage that causes it.
        debug!(run_id = %run.run_id, "audit journal busy; this run's start is not journaled");
        uncount_starts(&inner.book, &inner.journaled_starts, &counted);
        false
    }

    /// Writes everything queued and stops the writer, waiting at most `timeout` for the
    /// database; what is still unwritten then goes to the dead-letter file. Call it after
    /// every run has ended (records submitted later are dead-lettered directly). A write
    /// that blocks the writer's thread past that (a hung disk) is waited for `timeout` more,
    /// then left: its batch and what queued behind it are lost with the process.
    ///
    /// Once every record is either in the database or in the dead-letter file, the journal
    /// has nothing left that is not somewhere else, and is removed; it is kept when some
    /// dead-letter append failed.
    pub async fn shutdown(&self, timeout: Duration) {
        let inner = &self.inner;
        let mut stuck = false;
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
            // The abort is seen between awaits. A SQLite batch runs on the writer's thread
            // as one blocking call (`sqlite_batch`), so a disk that hangs its fsync would
            // hang this wait: bounded by the same timeout again, the shutdown then goes on
            // without that batch, and without waiting for the thread it blocks.
            if tokio::time::timeout(timeout, inner.tracker.wait())
                .await
                .is_err()
            {
                error!(
                    timeout_s = timeout.as_secs_f64(),
                    queued = self.queue_depth(),
                    "the audit writer is stuck in a write (a hung disk?); stopping without \
                     it: its batch and the records queued behind it are lost unless journaled"
                );
                stuck = true;
            }
        }
        let deadletter = Arc::clone(&inner.deadletter);
        let journal = Arc::clone(&inner.journal);
        // A run that outlived the server's wait for its task has not ended: its journaled
        // start is its only trace.
        let runs_open = lock(&inner.book).starts.len();
        let stopped = tokio::task::spawn_blocking(move || {
            journal.stop_blocking();
            deadletter.stop_blocking();
            if runs_open > 0 {
                warn!(journal = %journal.path().display(), runs = runs_open,
                    "runs journaled at their start have not ended; keeping the audit journal");
            } else if deadletter.ever_failed() {
                warn!(journal = %journal.path().display(),
                    "a dead-letter append failed; keeping the audit journal for replay");
            } else if stuck {
                warn!(journal = %journal.path().display(),
                    "the audit writer stopped in a write; keeping the audit journal for replay");
            } else if let Err(e) = std::fs::remove_file(journal.path())
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(error = %e, "cannot remove the audit journal");
            }
        })
        .await;
        if stopped.is_err() {
            error!("the dead-letter thread could not be stopped cleanly");
        }
        let thread = inner.thread.lock().ok().and_then(|mut t| t.take());
        match thread {
            // Told to stop when dropped; it ends if its write ever returns.
            Some(thread) if stuck => drop(thread),
            Some(thread) => thread.stop().await,
            None => {}
        }
        info!("audit writer stopped");
    }
}

impl AuditWriter {
    /// This process's instance id, as stamped on rows.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Reserves `bytes` under the queue's byte bound; false when they do not fit.
    fn reserve(&self, bytes: usize) -> bool {
        let inner = &self.inner;
        inner
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                queued
                    .checked_add(bytes)
                    .filter(|total| *total <= inner.max_bytes)
            })
            .is_ok()
    }

    fn queued(&self) {
        let inner = &self.inner;
        inner
            .metrics
            .audit_queue_depth
            .set(i64::try_from(self.queue_depth()).unwrap_or(i64::MAX));
        inner
            .metrics
            .audit_queue_bytes
            .set(i64::try_from(self.queue_bytes()).unwrap_or(i64::MAX));
    }
}

impl AuditSink for AuditWriter {
    fn started(&self, mut run: StartedRun) -> StartWritten {
        let inner = &self.inner;
        let (failure, stalled) = inner.health.failure_or_stall();
        // Start rows only use the queue below its high-water marks, so the top quarter stays
        // free for records. While writes fail or stall they go to the journal, which that
        // does not concern (an outage under load is what fills the queue).
        let backlogged = self.backlogged();
        if failure.is_none() && !stalled && backlogged {
            debug!(run_id = %run.run_id, "audit queue busy; no running row for this run");
            return StartWritten::never();
        }
        // After the early return: a row that will not be written is not worth hashing.
        if inner.store_text == StoreText::None {
            privacy::strip_started(&mut run);
        }
        run.instance_id
            .get_or_insert_with(|| inner.instance_id.clone());
        if failure.is_some() {
            // A start row queued now would only wait in retry, in memory: journaled instead,
            // so that a crash during the outage still leaves the run a row. The response
            // waits for the journal's sync as it would for the row's commit.
            let (ack, written) = StartWritten::pending();
            if self.journal_start(&run, ack) {
                return written;
            }
            return StartWritten::never();
        }
        // A write has stalled (the first attempt against an unreachable database waits for
        // the pool's connect timeout): journaled as well as queued, so that a crash during
        // the stall leaves the run a row, and the row still appears once the write goes
        // through. The response waits for the journal's sync only.
        let journaled = if stalled {
            let (ack, written) = StartWritten::pending();
            self.journal_start(&run, ack).then_some(written)
        } else {
            None
        };
        let bytes = run.approx_bytes();
        if backlogged || !self.reserve(bytes) {
            return journaled.unwrap_or_else(StartWritten::never);
        }
        let (ack, written) = StartWritten::pending();
        let run_id = run.run_id;
        let queued = Queued {
            item: Item::Started(run, ack),
            bytes,
            journaled: false,
        };
        match inner.tx.try_send(queued) {
            Ok(()) => {
                self.queued();
                if stalled {
                    // The row is queued, but nobody waits on its commit.
                    debug!(run_id = %run_id, "audit write stalled; the run's response does not wait for its running row");
                    journaled.unwrap_or_else(StartWritten::never)
                } else {
                    written
                }
            }
            // Full or closed: the record will insert the row; nothing is lost.
            Err(TrySendError::Full(q) | TrySendError::Closed(q)) => {
                inner.queued_bytes.fetch_sub(q.bytes, Ordering::AcqRel);
                journaled.unwrap_or_else(StartWritten::never)
            }
        }
    }

    fn submit(&self, mut record: RunRecord) {
        let inner = &self.inner;
        // Before the journal, the queue and the dead-letter file: none may see a text.
        if inner.store_text == StoreText::None {
            privacy::strip_record(&mut record);
        }
        // While writes fail, a record goes to the journal at once: the queue behind a batch
        // in retry is memory only, and a crash then would lose it. So while a write has
        // stalled: an unreachable database fails the attempt only when the pool gives up
        // connecting (seconds), and a crash meanwhile lost what had queued.
        let (failure, stalled) = inner.health.failure_or_stall();
        let journaled = failure.is_some() || stalled;
        if journaled {
            // Counted before it is handed over, so no removal can run between the two; the
            // lock is not held over the hand-over, which appends on this thread when the
            // journal thread's queue is full.
            {
                let mut book = lock(&inner.book);
                book.outstanding += 1;
                book.dirty = true;
            }
            inner.journal.send(vec![record.clone()]);
        }
        let bytes = record.approx_bytes();
        if !self.reserve(bytes) {
            warn!(run_id = %record.run_id, bytes,
                "audit queue full (bytes); dead-lettering the record");
            self.dead_letter(record, journaled);
            return;
        }
        let run_id = record.run_id;
        let queued = Queued {
            item: Item::Ended(record),
            bytes,
            journaled,
        };
        let (q, why) = match inner.tx.try_send(queued) {
            Ok(()) => return self.queued(),
            Err(TrySendError::Full(q)) => (q, "audit queue full; dead-lettering the record"),
            Err(TrySendError::Closed(q)) => (q, "audit writer stopped; dead-lettering the record"),
        };
        inner.queued_bytes.fetch_sub(q.bytes, Ordering::AcqRel);
        warn!(%run_id, "{why}");
        if let Item::Ended(record) = q.item {
            self.dead_letter(record, q.journaled);
        }
    }

    fn backlogged(&self) -> bool {
        self.queue_depth() >= self.inner.high_water
            || self.queue_bytes() >= self.inner.high_water_bytes
    }

    fn write_failure(&self) -> Option<&'static str> {
        self.inner.health.failure()
    }
}

/// A plain counter behind a lock: a panic elsewhere cannot leave it half-written.
fn lock(book: &Mutex<JournalBook>) -> std::sync::MutexGuard<'_, JournalBook> {
    book.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts the starts of `runs` in the journal's book (each once, however often journaled):
/// each is outstanding until its run's record, or its own start row, is settled. Returns the
/// runs counted now, for [`uncount_starts`] should their lines not reach the file.
fn count_starts(
    book: &Mutex<JournalBook>,
    journaled_starts: &AtomicUsize,
    runs: impl IntoIterator<Item = Uuid>,
) -> Vec<Uuid> {
    let mut book = lock(book);
    book.dirty = true;
    let new: Vec<Uuid> = runs
        .into_iter()
        .filter(|id| book.starts.insert(*id))
        .collect();
    book.outstanding += new.len() as u64;
    journaled_starts.fetch_add(new.len(), Ordering::AcqRel);
    new
}

/// Undoes [`count_starts`] for starts whose lines did not reach the journal.
fn uncount_starts(book: &Mutex<JournalBook>, journaled_starts: &AtomicUsize, runs: &[Uuid]) {
    let n = take_starts(book, journaled_starts, runs);
    let mut book = lock(book);
    book.outstanding = book.outstanding.saturating_sub(n);
}

/// The runs of `ended` whose start is in the journal leave `JournalBook::starts`: their
/// records are now in the database or durably dead-lettered, or about to be, so the caller
/// settles them (with `settle`, after that is so). Returns how many; without a lock while
/// no start is journaled (nearly always).
fn take_starts<'a>(
    book: &Mutex<JournalBook>,
    journaled_starts: &AtomicUsize,
    ended: impl IntoIterator<Item = &'a Uuid>,
) -> u64 {
    if journaled_starts.load(Ordering::Acquire) == 0 {
        return 0;
    }
    let mut book = lock(book);
    let mut taken = 0;
    for run_id in ended {
        if book.starts.remove(run_id) {
            taken += 1;
        }
    }
    journaled_starts.fetch_sub(taken, Ordering::AcqRel);
    taken as u64
}

/// `n` journaled records are now in the database or durably dead-lettered; when nothing
/// journaled is outstanding any more, removes the journal at `path`. Blocking (a file
/// removal under the lock): call it off the runtime's workers. True when it removed the file.
fn settle(book: &Mutex<JournalBook>, path: &std::path::Path, n: u64) -> std::io::Result<bool> {
    let mut book = lock(book);
    book.outstanding = book.outstanding.saturating_sub(n);
    if book.outstanding > 0 || !book.dirty {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            book.dirty = false;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            book.dirty = false;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The writer task's state.
struct Task {
    rx: mpsc::Receiver<Queued>,
    store: Arc<dyn RecordStore>,
    deadletter: Arc<DeadLetter>,
    journal: Arc<DeadLetter>,
    book: Arc<Mutex<JournalBook>>,
    health: Arc<Health>,
    queued_bytes: Arc<AtomicUsize>,
    /// Records taken out of the channel during an outage, journaled, waiting their turn:
    /// the channel alone is memory that a crash loses. At most `hold_capacity` of them, so
    /// an outage holds at most twice the queue's count (the byte bound covers both).
    backlog: VecDeque<Queued>,
    hold_capacity: usize,
    held: Arc<AtomicUsize>,
    /// Shared with `Inner` (see there).
    journaled_starts: Arc<AtomicUsize>,
    metrics: Metrics,
    max_batch: usize,
    batch_interval: Duration,
    retry: RetryPolicy,
    drain: CancellationToken,
    abort: CancellationToken,
    /// Goes into the rows the records insert (start rows carry their own).
    instance_id: String,
    /// Batches in flight at once: 1, or 2 on a store that takes two (PostgreSQL).
    in_flight: usize,
    /// Where a batch in flight runs its first attempt, so that shutdown waits for it.
    tracker: TaskTracker,
}

/// A batch whose first attempt runs on a task of its own while the writer gathers (and
/// starts) the next one: the second batch in flight (see `Task::run`).
struct Flight {
    started: Arc<Vec<StartedRun>>,
    acks: Vec<Ack>,
    batch: Arc<Vec<RunRecord>>,
    journaled: Vec<bool>,
    /// The first attempt's result and how long it took.
    attempt: JoinHandle<(Result<u64>, Duration)>,
}

impl Flight {
    /// The first attempt's result, once it has ended. A task that panicked counts as a failed
    /// attempt (the retries then write the batch or dead-letter it).
    async fn first(attempt: &mut JoinHandle<(Result<u64>, Duration)>) -> (Result<u64>, Duration) {
        attempt.await.unwrap_or_else(|e| {
            error!(error = %e, "an audit write task ended without an answer");
            (
                Err(AuditError::Database(sqlx::Error::WorkerCrashed)),
                Duration::ZERO,
            )
        })
    }
}

/// Waits for the flight's first attempt; never ends when there is no flight.
async fn landing(flight: &mut Option<Flight>) -> (Result<u64>, Duration) {
    match flight {
        Some(f) => Flight::first(&mut f.attempt).await,
        None => std::future::pending().await,
    }
}

/// Hands back what a flight's task shared, cloning only if the task still holds it (it has
/// ended by then, so it does not).
fn unshare<T: Clone>(v: Arc<Vec<T>>) -> Vec<T> {
    Arc::try_unwrap(v).unwrap_or_else(|v| v.as_ref().clone())
}

/// One attempt at a batch, bounded by [`INSERT_TIMEOUT`]: a database that takes the
/// connection and then hangs (a lock wait, a half-open socket) must count as a failed
/// attempt, or the writer would stall for good. A SQLite batch on the writer's own thread
/// is one blocking call the timeout cannot cut off (its lock waits are bounded by SQLite's
/// busy timeout); `HealthState::failure` counts it as failing once it has run that long.
async fn attempt(
    store: &dyn RecordStore,
    health: &Health,
    instance_id: &str,
    started: &[StartedRun],
    batch: &[RunRecord],
) -> (Result<u64>, Duration) {
    let _running = Attempting::new(health);
    let began = std::time::Instant::now();
    let result = tokio::time::timeout(
        INSERT_TIMEOUT,
        store.write_batch(Some(instance_id), started, batch),
    )
    .await
    .unwrap_or(Err(AuditError::Timeout(INSERT_TIMEOUT)));
    (result, began.elapsed())
}

impl Task {
    async fn run(mut self) {
        let mut incoming = Vec::with_capacity(self.max_batch);
        let mut draining = false;
        let mut next_write = tokio::time::Instant::now();
        // The batch in flight while the next is gathered, when the store takes two at once.
        let mut flying: Option<Flight> = None;
        // The records to dead-letter when the drain's abort cuts the writer off.
        let mut abandoned: Option<Vec<RunRecord>> = None;
        loop {
            if !draining
                && self.rx.len() + self.backlog.len() < self.max_batch
                && next_write > tokio::time::Instant::now()
            {
                tokio::select! {
                    biased;
                    () = self.drain.cancelled() => {}
                    // A flight that commits during the interval is settled now, not when the
                    // interval ends: the runs waiting on its start rows are answered at once.
                    first = landing(&mut flying) => {
                        if let Some(cut) = self.land_ended(&mut flying, first).await {
                            abandoned = Some(cut);
                            break;
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(next_write) => {}
                }
            }
            let received = if self.backlog.is_empty() {
                tokio::select! {
                biased;
                () = self.drain.cancelled(), if !draining => {
                    // Closing refuses new records (their senders dead-letter them) but keeps
                    // those already queued, so `recv_many` hands them out and then returns 0.
                    draining = true;
                    self.rx.close();
                    continue;
                }
                // A flight that ends while nothing new comes is settled now: its records count
                // as written (and leave the journal) when they are, not at the next record.
                first = landing(&mut flying) => {
                    if let Some(cut) = self.land_ended(&mut flying, first).await {
                        abandoned = Some(cut);
                        break;
                    }
                    continue;
                }
                n = self.rx.recv_many(&mut incoming, self.max_batch) => n,
                }
            } else {
                let n = self.backlog.len().min(self.max_batch);
                incoming.extend(self.backlog.drain(..n));
                self.held.store(self.backlog.len(), Ordering::Relaxed);
                n
            };
            if received == 0 {
                break;
            }
            self.top_up(&mut incoming);
            let Gathered {
                started,
                mut acks,
                batch,
                journaled,
            } = self.take(&mut incoming);
            self.set_depth();
            next_write = tokio::time::Instant::now() + self.batch_interval;
            // Two batches in flight only while writes succeed: once one fails, the writer
            // goes back to one at a time, so retries, the journal and the backlog work as
            // they always have. The new batch starts before the one in flight is settled, so
            // the server inserts it while the other's commit is flushed.
            if self.in_flight > 1 && self.health.failure().is_none() {
                let next = self.launch(started, acks, batch, journaled);
                if let Some(f) = flying.replace(next)
                    && let Some(cut) = self.land(f, None, flying.as_mut()).await
                {
                    abandoned = Some(cut);
                    break;
                }
                continue;
            }
            if let Some(f) = flying.take()
                && let Some(mut cut) = self.land(f, None, None).await
            {
                // The batch just gathered was not tried: it goes with the rest.
                cut.extend(batch);
                abandoned = Some(cut);
                break;
            }
            let abort = self.abort.clone();
            let mut journaled = journaled;
            let written = tokio::select! {
                biased;
                () = abort.cancelled() => None,
                result = self.write_with_retry(&started, &mut acks, &batch, &mut journaled, None) => Some(result),
            };
            match written {
                Some(written) => self.settle(written, &started, batch, journaled).await,
                None => {
                    abandoned = Some(batch);
                    break;
                }
            }
        }
        if let Some(f) = flying.take() {
            match &mut abandoned {
                Some(records) => {
                    // Cut off: its first attempt may still commit; replay then skips those
                    // records.
                    f.attempt.abort();
                    records.extend(unshare(f.batch));
                }
                None => abandoned = self.land(f, None, None).await,
            }
        }
        if let Some(records) = abandoned {
            self.abandon(records);
        }
        self.metrics.audit_queue_depth.set(0);
        self.metrics.audit_queue_bytes.set(0);
        debug!("audit writer task ended");
    }

    /// Start rows do not count against the batch's bound on records: a batch that holds some
    /// takes more of what is waiting, up to `max_batch` records and `2 · max_batch` items.
    fn top_up(&mut self, incoming: &mut Vec<Queued>) {
        let mut records = incoming.iter().filter(|q| q.record().is_some()).count();
        while records < self.max_batch && incoming.len() < 2 * self.max_batch {
            // The backlog first: it holds what came before anything still in the channel,
            // and a run's record must not overtake its start (`hold` fills the backlog while
            // a write stalls, not only once it failed).
            let next = match self.backlog.pop_front() {
                Some(q) => Some(q),
                None => self.rx.try_recv().ok(),
            };
            let Some(q) = next else { break };
            records += usize::from(q.record().is_some());
            incoming.push(q);
        }
        self.held.store(self.backlog.len(), Ordering::Relaxed);
    }

    /// Moves received items into a batch, releasing their bytes from the queue's bound.
    fn take(&self, incoming: &mut Vec<Queued>) -> Gathered {
        let mut g = Gathered {
            started: Vec::with_capacity(incoming.len()),
            acks: Vec::with_capacity(incoming.len()),
            batch: Vec::with_capacity(incoming.len()),
            journaled: Vec::with_capacity(incoming.len()),
        };
        let mut bytes = 0;
        for q in incoming.drain(..) {
            bytes += q.bytes;
            match q.item {
                Item::Started(run, ack) => {
                    g.started.push(run);
                    g.acks.push(ack);
                }
                Item::Ended(record) => {
                    g.journaled.push(q.journaled);
                    g.batch.push(record);
                }
            }
        }
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        g
    }

    /// Starts a batch's first attempt on a task of its own.
    fn launch(
        &self,
        started: Vec<StartedRun>,
        acks: Vec<Ack>,
        batch: Vec<RunRecord>,
        journaled: Vec<bool>,
    ) -> Flight {
        let started = Arc::new(started);
        let batch = Arc::new(batch);
        let store = Arc::clone(&self.store);
        let instance_id = self.instance_id.clone();
        let health = Arc::clone(&self.health);
        let (s, b) = (Arc::clone(&started), Arc::clone(&batch));
        let attempt = self
            .tracker
            .spawn(async move { attempt(store.as_ref(), &health, &instance_id, &s, &b).await });
        Flight {
            started,
            acks,
            batch,
            journaled,
            attempt,
        }
    }

    /// Lands the flight whose first attempt `landing` saw end, with that result; `Some` as
    /// from [`Task::land`].
    async fn land_ended(
        &mut self,
        flying: &mut Option<Flight>,
        first: (Result<u64>, Duration),
    ) -> Option<Vec<RunRecord>> {
        let f = flying.take()?;
        self.land(f, Some(first), None).await
    }

    /// Waits for a flight's first attempt (unless its result is known already) and carries
    /// on as a batch written here does: retries, then written or dead-lettered. The batch
    /// counts as written only once its attempt has returned, that is once its transactions
    /// committed. Returns the batch's records when the drain's abort came first.
    ///
    /// `next` is the flight launched after this one, if any. Should this one's first attempt
    /// fail, that one's records are journaled before the retries begin: it lands only after
    /// them (tens of seconds against a database that times out), and meanwhile its records
    /// would be in memory only, which a `kill -9` loses (test
    /// `audit_faults::kill_9_during_a_postgres_outage_loses_no_answered_run`, found failing
    /// once the runs' timing changed).
    async fn land(
        &mut self,
        mut flight: Flight,
        first: Option<(Result<u64>, Duration)>,
        mut next: Option<&mut Flight>,
    ) -> Option<Vec<RunRecord>> {
        let abort = self.abort.clone();
        let first = match first {
            Some(first) => first,
            None => tokio::select! {
                biased;
                () = abort.cancelled() => {
                    flight.attempt.abort();
                    return Some(unshare(flight.batch));
                }
                first = Flight::first(&mut flight.attempt) => first,
                // Stalled: journaled now, as in `write_with_retry`, with the flight launched
                // after it, which would wait behind it in memory.
                () = tokio::time::sleep(STALLED_AFTER) => {
                    self.journal(&flight.batch, &mut flight.journaled).await;
                    self.journal_starts(&flight.started).await;
                    if let Some(next) = next.as_deref_mut() {
                        self.journal(&next.batch, &mut next.journaled).await;
                        self.journal_starts(&next.started).await;
                    }
                    self.hold().await;
                    tokio::select! {
                        biased;
                        () = abort.cancelled() => {
                            flight.attempt.abort();
                            return Some(unshare(flight.batch));
                        }
                        first = Flight::first(&mut flight.attempt) => first,
                    }
                }
            },
        };
        if first.0.is_err()
            && let Some(next) = next
        {
            self.journal(&next.batch, &mut next.journaled).await;
            self.journal_starts(&next.started).await;
            // Its answer comes only after this one's retries: nobody waits for that.
            next.acks.clear();
        }
        let Flight {
            started,
            mut acks,
            batch,
            mut journaled,
            ..
        } = flight;
        let written = tokio::select! {
            biased;
            () = abort.cancelled() => None,
            result = self.write_with_retry(&started, &mut acks, &batch, &mut journaled, Some(first)) => Some(result),
        };
        let batch = unshare(batch);
        match written {
            Some(written) => {
                self.settle(written, &started, batch, journaled).await;
                None
            }
            None => Some(batch),
        }
    }

    /// After a batch's last attempt: its journaled records leave the journal's count, and a
    /// batch that failed on every attempt goes to the dead-letter file, its start rows too
    /// (as start lines: their runs may still be going, and the journal that holds them may
    /// go once the records are settled).
    async fn settle(
        &mut self,
        written: Result<u64>,
        started: &[StartedRun],
        batch: Vec<RunRecord>,
        journaled: Vec<bool>,
    ) {
        if written.is_err() && !started.is_empty() {
            let lines: Vec<u8> = started.iter().flat_map(start_line::to_line).collect();
            if let Err(e) = self.deadletter.append_line_now(lines).await {
                error!(error = %e, runs = started.len(),
                    "cannot dead-letter the start rows of a failed audit batch");
            }
        }
        let (written, batch, journaled) = match written {
            Err(e) if batch.len() > 1 && e.refuses_content() => {
                self.isolate(e, batch, journaled).await
            }
            written => (written, batch, journaled),
        };
        // Journaled records, and the journaled starts of the batch's runs, which have ended;
        // on a commit also those of its start rows: a committed `running` row does what the
        // journal's line would (the next start finalizes it), so a run whose record went
        // elsewhere (the dead-letter file, at `submit`) leaves nothing counted for good.
        let mut starts = self.take_starts(batch.iter().map(|r| &r.run_id));
        if written.is_ok() {
            starts += self.take_starts(started.iter().map(|s| &s.run_id));
        }
        let resolved = journaled.iter().filter(|j| **j).count() + starts;
        match written {
            Ok(_) => self.resolve(resolved).await,
            Err(e) => {
                error!(error = %e, reason = e.reason(), records = batch.len(),
                    "audit batch failed on every attempt; dead-lettering it");
                if batch.is_empty() {
                    // Start rows only: dead-lettered above.
                } else if resolved == 0 {
                    self.deadletter.send(batch);
                } else {
                    // Journaled records (and starts) leave the journal's count only once
                    // the records are fsynced in the dead-letter file: wait for that append.
                    match self.deadletter.append_now(batch.clone()).await {
                        Ok(()) => self.resolve(resolved).await,
                        // The thread retries the append and logs what still fails; the
                        // journal keeps these records meanwhile.
                        Err(_) => self.deadletter.send(batch),
                    }
                }
            }
        }
    }

    /// A batch the database refused on every attempt for something in it
    /// ([`AuditError::refuses_content`]: not an outage, a lock, a full disk or a deadlock,
    /// which would refuse each record alike): each record is tried alone, so that one record
    /// the database cannot take sends only itself to the dead-letter file, not its batch's
    /// other runs, and does not hold `/readyz` at 503. Returns what is left to dead-letter
    /// (none: `Ok`).
    async fn isolate(
        &mut self,
        e: AuditError,
        batch: Vec<RunRecord>,
        journaled: Vec<bool>,
    ) -> (Result<u64>, Vec<RunRecord>, Vec<bool>) {
        warn!(error = %e, records = batch.len(),
            "the database refused an audit batch; writing its records one by one");
        let mut refused = Vec::new();
        let mut refused_journaled = Vec::new();
        let mut resolved = 0;
        let mut written = 0;
        for (record, j) in batch.into_iter().zip(journaled) {
            let one = std::slice::from_ref(&record);
            match attempt(
                self.store.as_ref(),
                &self.health,
                &self.instance_id,
                &[],
                one,
            )
            .await
            {
                (Ok(_), _) => {
                    written += 1;
                    resolved += usize::from(j) + self.take_starts([&record.run_id]);
                }
                (Err(e), _) => {
                    warn!(error = %e, run_id = %record.run_id,
                        "the database refused an audit record; dead-lettering it");
                    refused.push(record);
                    refused_journaled.push(j);
                }
            }
        }
        if written > 0 {
            self.metrics
                .audit_writes_total
                .with_label_values(&["ok"])
                .inc_by(written);
            // The database takes writes: one record it refuses is no outage.
            self.health.succeeded();
            self.metrics.ready.set(1);
        }
        self.resolve(resolved).await;
        if refused.is_empty() {
            return (Ok(written), refused, refused_journaled);
        }
        (Err(e), refused, refused_journaled)
    }

    /// The runs of `ended` whose start is in the journal: taken out of the book, to be
    /// settled with their records or start rows (see `take_starts`).
    fn take_starts<'a>(&self, ended: impl IntoIterator<Item = &'a Uuid>) -> usize {
        let taken = take_starts(&self.book, &self.journaled_starts, ended);
        usize::try_from(taken).unwrap_or(usize::MAX)
    }

    /// The drain's abort cut the writer off: `batch` (what was being written) and everything
    /// still queued go to the dead-letter file.
    fn abandon(&mut self, mut batch: Vec<RunRecord>) {
        self.rx.close();
        for q in self.backlog.drain(..) {
            self.queued_bytes.fetch_sub(q.bytes, Ordering::AcqRel);
            if let Item::Ended(record) = q.item {
                batch.push(record);
            }
        }
        while let Ok(q) = self.rx.try_recv() {
            self.queued_bytes.fetch_sub(q.bytes, Ordering::AcqRel);
            if let Item::Ended(record) = q.item {
                batch.push(record);
            }
        }
        warn!(
            records = batch.len(),
            "audit drain timed out; dead-lettering"
        );
        // Their runs have ended: shutdown need not keep the journal for their starts.
        self.take_starts(batch.iter().map(|r| &r.run_id));
        self.deadletter.send(batch);
    }

    fn set_depth(&self) {
        let depth = i64::try_from(self.rx.len() + self.backlog.len()).unwrap_or(i64::MAX);
        self.metrics.audit_queue_depth.set(depth);
        let bytes = self.queued_bytes.load(Ordering::Acquire);
        self.metrics
            .audit_queue_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// `n` journaled records are now in the database or durably dead-lettered. When nothing
    /// journaled is outstanding any more, the journal file goes.
    async fn resolve(&self, n: usize) {
        if n == 0 {
            return;
        }
        let book = Arc::clone(&self.book);
        let path = self.journal.path().to_owned();
        let removed = tokio::task::spawn_blocking(move || settle(&book, &path, n as u64)).await;
        match removed {
            Ok(Ok(true)) => debug!("every journaled audit record is stored; journal removed"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot remove the audit journal"),
            Err(e) => warn!(error = %e, "the journal clean-up task failed"),
        }
    }

    /// Counts records the task itself journaled.
    fn journaled(&self, n: usize) {
        let mut book = lock(&self.book);
        book.outstanding += n as u64;
        book.dirty = true;
    }

    /// Takes the records waiting in the channel into the backlog and journals them: they
    /// arrived before the failure was known, so `submit` did not journal them, and the
    /// batch in retry may keep them waiting for seconds.
    async fn hold(&mut self) {
        // Into the backlog first, then journal: if the drain's abort drops this future
        // during the journal write, the records are in the backlog, which it dead-letters.
        let start = self.backlog.len();
        while self.backlog.len() < self.hold_capacity {
            match self.rx.try_recv() {
                Ok(q) => self.backlog.push_back(q),
                Err(_) => break,
            }
        }
        self.held.store(self.backlog.len(), Ordering::Relaxed);
        self.set_depth();
        let missing: Vec<RunRecord> = self
            .backlog
            .iter()
            .skip(start)
            .filter(|q| !q.journaled)
            .filter_map(Queued::record)
            .cloned()
            .collect();
        if self.journal_now(missing).await {
            self.backlog
                .iter_mut()
                .skip(start)
                .for_each(|q| q.journaled = true);
        }
        let starts: Vec<StartedRun> = self
            .backlog
            .iter()
            .skip(start)
            .filter_map(|q| match &q.item {
                Item::Started(run, _) => Some(run.clone()),
                Item::Ended(_) => None,
            })
            .collect();
        self.journal_starts(&starts).await;
    }

    /// Journals the start rows of a batch that failed or stalled (or of the backlog, or of
    /// the batch in flight behind it) and waits for the fsync: their runs may still be in
    /// flight, and a crash before the rows are written would otherwise leave those runs no
    /// row at all. Each counts as outstanding until its run's record or its start row is
    /// settled. A start journaled again is harmless (replay takes each run once).
    async fn journal_starts(&self, started: &[StartedRun]) {
        if started.is_empty() {
            return;
        }
        let lines: Vec<u8> = started.iter().flat_map(start_line::to_line).collect();
        // Counted before the append, as `AuditWriter::journal_start` does, so that no
        // removal of the file can come between. A run's record always comes after its
        // start, through this task (or the dead-letter file at `submit`), which settles the
        // start then, as a commit of the start row does.
        let counted = count_starts(
            &self.book,
            &self.journaled_starts,
            started.iter().map(|s| s.run_id),
        );
        if let Err(e) = self.journal.append_line_now(lines).await {
            error!(error = %e, runs = started.len(),
                "cannot write the audit journal; these runs' starts live in memory until written");
            uncount_starts(&self.book, &self.journaled_starts, &counted);
        }
    }

    /// Writes the records of a failed attempt that are not in the journal yet to it, and
    /// waits for the fsync: from then on a crash loses none of them. A journal that cannot
    /// be written (the disk is full too) is logged; the retries go on regardless.
    async fn journal(&self, batch: &[RunRecord], journaled: &mut [bool]) {
        let missing: Vec<RunRecord> = batch
            .iter()
            .zip(journaled.iter())
            .filter(|(_, j)| !**j)
            .map(|(r, _)| r.clone())
            .collect();
        if self.journal_now(missing).await {
            journaled.iter_mut().for_each(|j| *j = true);
        }
    }

    /// Appends records to the journal and waits for the fsync; counts them as outstanding.
    /// False when there was nothing to write or the write failed (logged: those records
    /// live in memory only until written).
    async fn journal_now(&self, missing: Vec<RunRecord>) -> bool {
        if missing.is_empty() {
            return false;
        }
        let n = missing.len();
        match self.journal.append_now(missing).await {
            Ok(()) => {
                self.journaled(n);
                true
            }
            Err(e) => {
                error!(error = %e, records = n,
                    "cannot write the audit journal; these records live in memory until written");
                false
            }
        }
    }

    /// Writes one batch, retrying on the policy's schedule. `first` is the first attempt's
    /// result when it was made already (a batch in flight). Counts records, not batches, in
    /// `duet_audit_writes_total` (a retried batch of 100 is 100 retries). `acks` (the runs
    /// waiting on the batch's start rows) are answered once it commits, and let go at its
    /// first failure: their responses then go out at once instead of waiting through the
    /// retries for their bound.
    async fn write_with_retry(
        &mut self,
        started: &[StartedRun],
        acks: &mut Vec<Ack>,
        batch: &[RunRecord],
        journaled: &mut [bool],
        mut first: Option<(Result<u64>, Duration)>,
    ) -> Result<u64> {
        let n = batch.len() as u64;
        let mut retry = 0;
        // Journaled when the first attempt stalled: not again at its failure.
        let mut starts_journaled = false;
        loop {
            let (result, took) = match first.take() {
                Some(first) => first,
                None => {
                    // Owning what it needs of the task, so that the task can journal while it
                    // runs.
                    let (store, health) = (Arc::clone(&self.store), Arc::clone(&self.health));
                    let instance_id = self.instance_id.clone();
                    let attempt = async move {
                        attempt(store.as_ref(), &health, &instance_id, started, batch).await
                    };
                    let mut attempt = std::pin::pin!(attempt);
                    tokio::select! {
                        biased;
                        done = &mut attempt => done,
                        // A first attempt that stalls (an unreachable database answers only
                        // when the pool gives up connecting, seconds later): its records and
                        // start rows, and what queued behind it meanwhile, go to the journal
                        // now, not at its failure, so a crash meanwhile loses none. (A SQLite
                        // batch blocks the writer's thread instead, and fails fast when its
                        // file does.)
                        () = tokio::time::sleep(STALLED_AFTER), if retry == 0 => {
                            self.journal(batch, journaled).await;
                            self.journal_starts(started).await;
                            self.hold().await;
                            starts_journaled = true;
                            attempt.await
                        }
                    }
                }
            };
            if result.is_err() {
                acks.clear();
            }
            match result {
                Ok(new) => {
                    for ack in acks.drain(..) {
                        // The run may have ended its wait, or its client gone: nobody to tell.
                        let _ = ack.send(());
                    }
                    self.metrics.audit_write_seconds.observe(took.as_secs_f64());
                    self.metrics
                        .audit_writes_total
                        .with_label_values(&["ok"])
                        .inc_by(n);
                    self.health.succeeded();
                    self.metrics.ready.set(1);
                    if new < n {
                        debug!(
                            already_stored = n - new,
                            "records already in the audit store were skipped"
                        );
                    }
                    return Ok(new);
                }
                Err(e) if retry < self.retry.retries => {
                    self.health.failed(e.reason(), true);
                    self.metrics.ready.set(0);
                    if retry == 0 && !starts_journaled {
                        self.journal(batch, journaled).await;
                        self.journal_starts(started).await;
                    }
                    self.hold().await;
                    let wait = self.retry.jittered(retry);
                    warn!(error = %e, reason = e.reason(), records = n, retry = retry + 1,
                        wait_ms = wait.as_millis() as u64, "audit batch failed; retrying");
                    self.metrics
                        .audit_writes_total
                        .with_label_values(&["retry"])
                        .inc_by(n);
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                Err(e) => {
                    self.health.failed(e.reason(), false);
                    self.metrics.ready.set(0);
                    if retry == 0 && !starts_journaled {
                        self.journal(batch, journaled).await;
                        self.journal_starts(started).await;
                    }
                    self.hold().await;
                    return Err(e);
                }
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

    /// A write that has not returned within the insert timeout (a SQLite batch blocking the
    /// writer's thread) counts as failing while it runs, and stops counting once it ends.
    #[test]
    fn an_attempt_running_past_the_insert_timeout_is_a_failure() {
        let health = Health::default();
        health.attempt_begins();
        assert_eq!(health.failure(), None, "just begun");
        health.lock().attempt_began = Instant::now().checked_sub(STALLED_AFTER);
        assert_eq!(
            health.failure_or_stall(),
            (None, true),
            "stalled, not failing"
        );
        health.lock().attempt_began = Instant::now().checked_sub(INSERT_TIMEOUT);
        assert_eq!(health.failure(), Some("database_timeout"));
        health.attempt_ends();
        assert_eq!(health.failure(), None);
    }
}
