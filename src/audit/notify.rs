//! Run ends across replicas (contract §8), on PostgreSQL: whoever finalizes a `dual_runs`
//! row (the audit writer's record, a replay, the sweep that marks a dead replica's runs
//! `interrupted`) sends `NOTIFY duet_run_ended, '<run id>'` in the same transaction, and
//! [`RunEnds`] listens on one connection per process and wakes the resumes waiting for
//! that run (a reconnect that landed on another replica than the one running the run).
//!
//! What belongs here: the channel's name, the listener and the waiters' registry. What a
//! woken waiter does (read the row, send the events) is `api::query`'s.
//!
//! A notification is only a hint: one sent while the listening connection was down is lost
//! (PostgreSQL keeps none for a connection that is not there), so every waiter also reads the
//! row again every few seconds, and all of them are woken when the connection comes back.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};
use uuid::Uuid;

/// The channel a finalized run's id is sent on.
pub const CHANNEL: &str = "duet_run_ended";

/// How long to wait before trying again when the listening connection cannot be opened.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The waiters of this process, by run id, and the listener that wakes them.
pub struct RunEnds {
    /// A pool of one connection of its own, for the listener: `PgListener` keeps the
    /// connection it takes for good, and taken from the audit pool it would leave the writer,
    /// the heartbeat, resumes and the shared rate budget one connection fewer.
    pool: PgPool,
    waiters: Mutex<HashMap<Uuid, Waiters>>,
    /// Whether the listener task runs: started by the first waiter, so a replica that never
    /// waits for another's run holds no extra connection.
    listening: AtomicBool,
    /// The service's shutdown: ends the listener, and the waits (their replica is going
    /// away; the run goes on elsewhere).
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// One run's waiters: a channel whose every send wakes all of them, and how many there are.
struct Waiters {
    wake: watch::Sender<()>,
    count: usize,
}

impl RunEnds {
    /// `pool` names the database; the listener connects on its own (see `RunEnds::pool`),
    /// lazily, when the first waiter starts it.
    pub fn new(pool: PgPool, shutdown: CancellationToken, tracker: TaskTracker) -> Arc<RunEnds> {
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*pool.connect_options()).clone());
        Arc::new(RunEnds {
            pool: own,
            waiters: Mutex::new(HashMap::new()),
            listening: AtomicBool::new(false),
            shutdown,
            tracker,
        })
    }

    /// Resolves when the service shuts down.
    pub async fn shutdown(&self) {
        self.shutdown.cancelled().await;
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Waiters>> {
        // Every change to the map is a single insert, update or remove: never half done.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for `run_id`. Take it *before* reading the run's row: a
    /// notification sent after that read then still wakes [`Waiter::changed`].
    pub fn wait_for(self: &Arc<Self>, run_id: Uuid) -> Waiter {
        if !self.listening.swap(true, Ordering::AcqRel) {
            // It ends with the shutdown token, so shutdown does not wait for it.
            let ends = Arc::clone(self);
            self.tracker.spawn(async move {
                tokio::select! {
                    () = ends.shutdown.cancelled() => {}
                    () = Arc::clone(&ends).listen() => {}
                }
            });
        }
        let rx = {
            let mut waiters = self.lock();
            let entry = waiters.entry(run_id).or_insert_with(|| Waiters {
                wake: watch::Sender::new(()),
                count: 0,
            });
            entry.count += 1;
            entry.wake.subscribe()
        };
        Waiter {
            ends: Arc::clone(self),
            run_id,
            rx,
        }
    }

    fn wake(&self, run_id: &Uuid) {
        if let Some(w) = self.lock().get(run_id) {
            w.wake.send_replace(());
        }
    }

    fn wake_all(&self) {
        for w in self.lock().values() {
            w.wake.send_replace(());
        }
    }

    /// The listener: one connection, `LISTEN duet_run_ended`, forever.
    async fn listen(self: Arc<Self>) {
        loop {
            let mut listener = match PgListener::connect_with(&self.pool).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "cannot open the connection that listens for run ends; trying again");
                    tokio::time::sleep(RECONNECT_AFTER).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                warn!(error = %e, "cannot LISTEN for run ends; trying again");
                tokio::time::sleep(RECONNECT_AFTER).await;
                continue;
            }
            // Anything that ended before the LISTEN took effect was not heard: look again.
            self.wake_all();
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => match Uuid::parse_str(n.payload()) {
                        Ok(run_id) => self.wake(&run_id),
                        Err(_) => debug!(payload = n.payload(), "ignoring a foreign notification"),
                    },
                    // The connection was lost and is open again (with its LISTEN): what was
                    // sent meanwhile is lost, so every waiter looks for itself.
                    Ok(None) => self.wake_all(),
                    Err(e) => {
                        warn!(error = %e, "lost the connection that listens for run ends");
                        tokio::time::sleep(RECONNECT_AFTER).await;
                        break;
                    }
                }
            }
        }
    }
}

/// A registered wait for one run's end; leaves the registry when dropped.
pub struct Waiter {
    ends: Arc<RunEnds>,
    run_id: Uuid,
    rx: watch::Receiver<()>,
}

impl Waiter {
    /// Resolves when the run may have ended since the last call (or since the waiter was
    /// made): a notification for it, or the listening connection coming back.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The sender lives in the registry as long as this waiter does; should that ever
            // not hold, never resolve rather than spin (the caller's re-check still runs).
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiters = self.ends.lock();
        if let Some(w) = waiters.get_mut(&self.run_id) {
            w.count -= 1;
            if w.count == 0 {
                waiters.remove(&self.run_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> Arc<RunEnds> {
        // Never connects: `listening` is set so no listener task starts.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let ends = RunEnds::new(pool, CancellationToken::new(), TaskTracker::new());
        ends.listening.store(true, Ordering::Relaxed);
        ends
    }

    #[tokio::test]
    async fn a_notification_wakes_the_runs_waiters_only_and_the_registry_empties() {
        let ends = ends();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut wa = ends.wait_for(a);
        let mut wa2 = ends.wait_for(a);
        let mut wb = ends.wait_for(b);
        // Sent before anyone awaits: still seen (taken before the row was read).
        ends.wake(&a);
        tokio::time::timeout(Duration::from_secs(1), wa.changed())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), wa2.changed())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), wb.changed())
                .await
                .is_err()
        );
        ends.wake_all();
        tokio::time::timeout(Duration::from_secs(1), wb.changed())
            .await
            .unwrap();
        drop((wa, wa2));
        assert_eq!(ends.lock().len(), 1);
        drop(wb);
        assert!(ends.lock().is_empty());
    }
}
