//! Serving threads: one single-threaded tokio runtime per core, each running the client
//! connections it is handed, and the runs they start, from start to end.
//!
//! Why not tokio's multi-thread runtime for this: a run is woken once per upstream chunk,
//! each wake-up is a little work, and on a work-stealing runtime a worker that finds two
//! tasks ready after an I/O event wakes a sleeping sibling to steal one. On the relay
//! workload (two upstream streams of 20 tokens per run, C = 100) that is a `futex` wake, a
//! context switch and a steal attempt on the other core for a few microseconds of work, and
//! a run's sockets, timers and task state move between cores. On a serving thread a
//! connection's socket, its run's upstream sockets (see `providers::h1`'s idle lists, kept
//! per serving thread) and its timers are all registered with the one thread's reactor, so
//! an event wakes that thread and no other.
//!
//! The cost is that nothing is stolen: a thread with more work than its neighbour keeps it.
//! New connections go to the thread with the fewest open ones, which keeps them even for
//! the long-lived streams duet serves.
//!
//! Off unless `SERVE_THREADS` is set: on the relay benchmark it costs less CPU per run at
//! moderate load, but a little more at saturation (docs/benchmarks.md, "Serving threads and
//! the audit batch interval").
//!
//! The audit writer runs on a [`Workers`] thread of its own as well, on either backend
//! (`audit::writer::WriterOptions::with_own_thread`).
//!
//! Everything else (the accept loop, housekeeping, LISTEN/NOTIFY, the key file's reloads)
//! stays on the main runtime.

use std::{
    cell::Cell,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use tokio::{runtime, sync::oneshot};
use tracing::warn;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// True on a thread started by [`Workers::start_dedicated`]: its one task may block it (the
/// SQLite audit writer runs its batches in place there). False everywhere else, where a
/// blocking call belongs on tokio's blocking pool.
pub fn may_block() -> bool {
    MAY_BLOCK.with(Cell::get)
}

/// The serving thread this code runs on (0, 1, …; or the index of the thread of any other
/// [`Workers`], such as the audit writer's), `None` on any other thread: the main runtime, the
/// blocking pool, tests.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// How long [`Workers::stop`] waits for a serving thread to end. Each ends at once when
/// told, unless a task it runs blocks it; shutdown must not hang on that.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The serving threads, started together and stopped together.
pub struct Workers {
    threads: Vec<Worker>,
}

struct Worker {
    handle: runtime::Handle,
    open: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A connection counted on its serving thread until dropped.
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Starts `count` serving threads (at least one), named `duet-serve-N`.
    pub fn start(count: usize) -> io::Result<Workers> {
        Workers::start_named(count, "duet-serve")
    }

    /// Starts one thread named `NAME-0` for a task of its own, which may block it (see
    /// [`may_block`]): nothing else is run there, so a blocking call delays that task only.
    pub fn start_dedicated(name: &str) -> io::Result<Workers> {
        Workers::start_threads(1, name, true)
    }

    /// Starts `count` threads (at least one) named `NAME-N`, each a single-threaded runtime,
    /// and returns once every one of them runs.
    pub fn start_named(count: usize, name: &str) -> io::Result<Workers> {
        Workers::start_threads(count, name, false)
    }

    fn start_threads(count: usize, name: &str, may_block: bool) -> io::Result<Workers> {
        let mut workers = Workers {
            threads: Vec::with_capacity(count.max(1)),
        };
        // Each thread says when it runs, so that the caller never sees a thread that is not
        // there yet (its name, its index): a wait of microseconds, once, at start.
        let (running, started) = std::sync::mpsc::channel::<()>();
        for index in 0..count.max(1) {
            let runtime = runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let running = running.clone();
            let thread = thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    MAY_BLOCK.with(|c| c.set(may_block));
                    let _ = running.send(());
                    drop(running);
                    // The runtime runs its tasks while this waits. A dropped sender (the
                    // `Workers` gone without `stop`) ends it as well.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime drops the tasks still on it, if any: a run's drop
                    // guard still hands its record to the audit writer then.
                })?;
            workers.threads.push(Worker {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        drop(running);
        // Every thread sends once, or drops its sender if it died before: never a hang.
        while started.recv().is_ok() {}
        Ok(workers)
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The thread with the fewest open connections (the first of equals), and the count
    /// of the connection about to be handed to it.
    pub fn pick(&self) -> (&runtime::Handle, Open) {
        // `start` makes at least one thread; the fallback is never taken.
        let worker = self
            .threads
            .iter()
            .min_by_key(|w| w.open.load(Ordering::Relaxed))
            .unwrap_or_else(|| unreachable!("Workers::start makes at least one thread"));
        worker.open.fetch_add(1, Ordering::Relaxed);
        (&worker.handle, Open(Arc::clone(&worker.open)))
    }

    /// Open connections per thread, in thread order.
    pub fn open(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Tells every thread to stop and waits (off the runtime's threads, bounded) until they
    /// have. Whatever task is still on one is dropped with its runtime.
    pub async fn stop(mut self) {
        let threads: Vec<_> = self
            .threads
            .iter_mut()
            .filter_map(|w| {
                if let Some(stop) = w.stop.take() {
                    let _ = stop.send(());
                }
                w.thread.take()
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        if tokio::time::timeout(STOP_TIMEOUT, joined).await.is_err() {
            warn!("a serving thread did not stop in time; going on with the shutdown");
        }
    }
}

impl Drop for Workers {
    /// Without `stop` (an error path): the threads are told to stop and left to end on
    /// their own.
    fn drop(&mut self) {
        for worker in &mut self.threads {
            if let Some(stop) = worker.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_thread_knows_its_index_and_connections_go_to_the_least_busy() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(current(), None);
        let (first, a) = workers.pick();
        let first = first.spawn(async { current() }).await.unwrap();
        let (second, b) = workers.pick();
        let second = second.spawn(async { current() }).await.unwrap();
        assert_eq!((first, second), (Some(0), Some(1)));
        assert_eq!(workers.open(), [1, 1]);
        drop(a);
        assert_eq!(workers.open(), [0, 1]);
        let (third, c) = workers.pick();
        assert_eq!(third.spawn(async { current() }).await.unwrap(), Some(0));
        drop((b, c));
        assert_eq!(workers.open(), [0, 0]);
        workers.stop().await;
    }

    #[tokio::test]
    async fn stop_ends_the_threads_and_drops_what_is_left_on_them() {
        let workers = Workers::start(1).unwrap();
        let (handle, _open) = workers.pick();
        let (tx, rx) = oneshot::channel::<()>();
        // A task that never ends: its drop (the sender's) must come with the stop.
        handle.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        workers.stop().await;
        assert!(rx.await.is_err(), "the task was dropped");
    }
}
