//! Resuming a run that is not in this process's memory but `running` in the database: another
//! replica runs it (contract §8). The reconnect is held open (the response body sends
//! keep-alives) until the run's row is final, then gets the stored events after its `seq`;
//! a run whose replica died (`interrupted`) gets an `error` and a `done` saying so.
//!
//! What belongs here: the wait and the frames it ends with. Waking comes from
//! `audit::notify`; choosing between memory, the store and this is `api::query`'s.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tracing::warn;
use uuid::Uuid;

use super::stored_frames_after;
use crate::{
    audit::{OpenStatus, Store, StoredRun, notify::Waiter},
    events::EventKind,
    sse,
};

/// How often a waiter reads the run's row even without a notification: what bounds the wait
/// for a notification that was lost (the listening connection dropped). Slow enough that
/// hundreds of waiters cost the database little.
pub const RECHECK_EVERY: Duration = Duration::from_secs(3);

/// How the wait ends when the run's row is not final by then: see [`wait_then_send`].
pub struct Bounds {
    /// When to give up: the run's deadlines and the dead-replica detection are past.
    pub until: Instant,
    /// The longest the reader may leave a frame unread before the stream is dropped.
    pub write_timeout: Duration,
}

/// Waits for the end of run `run_id` (`waiter` registered for it; the row is read once more
/// at once, then on each wake-up) and then streams its frames after `after` into the returned channel; `hold` (the reader's
/// place under `MAX_CONCURRENT_STREAMS`) is kept until then. While it waits, the channel
/// sends nothing and the response body sends keep-alives.
///
/// - Ended: the stored events after `after` (the answers and `done`).
/// - `interrupted`: `error` (`interrupted`) and `done` (`interrupted`).
/// - Not final by `bounds.until` (the owner is alive but its audit writes do not reach the
///   database), or its row vanished: `error` (`timeout`) and `done` (`interrupted`): this
///   stream cannot tell the end; `GET /runs/{run_id}` will once the record is written.
/// - Shutdown of this replica: the stream ends without `done`, so the client reconnects with
///   the same `Last-Event-ID` and lands on a replica that can still wait.
#[allow(
    clippy::too_many_arguments,
    reason = "each is one independent input of the wait"
)]
pub fn wait_then_send<H: Send + 'static>(
    store: Store,
    mut waiter: Waiter,
    ends: Arc<crate::audit::notify::RunEnds>,
    run_id: Uuid,
    after: u32,
    bounds: Bounds,
    tracker: &tokio_util::task::TaskTracker,
    hold: H,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(1);
    tracker.spawn(async move {
        let _hold = hold;
        // The first read is at once: the run may have ended between the caller's read and
        // the waiter's registration, and no notification would then come.
        let mut first = true;
        let frames = loop {
            if !first {
                tokio::select! {
                    () = waiter.changed() => {}
                    () = tokio::time::sleep(RECHECK_EVERY) => {}
                    () = tokio::time::sleep_until(bounds.until) => break gave_up(run_id, after),
                    () = tx.closed() => return,
                    () = ends.shutdown() => return,
                }
            }
            first = false;
            // The read is watched like the wait: a hung connection must not keep this
            // follower's place, or shutdown, waiting past the bound.
            let read = tokio::select! {
                read = store.fetch_stored(run_id) => read,
                () = tokio::time::sleep_until(bounds.until) => break gave_up(run_id, after),
                () = tx.closed() => return,
                () = ends.shutdown() => return,
            };
            match read {
                Ok(Some(StoredRun::Ended(ended))) => {
                    break stored_frames_after(&ended.record, after);
                }
                Ok(Some(StoredRun::Open(open))) if open.status == OpenStatus::Interrupted => {
                    break interrupted(run_id, after);
                }
                Ok(Some(StoredRun::Open(_))) => {}
                // Deleted under us (a purge, a revert): nothing will ever end it.
                Ok(None) => break gave_up(run_id, after),
                Err(e) => {
                    warn!(%run_id, error = %e, "cannot read a run waited for; reading again later")
                }
            }
        };
        for frame in frames {
            match tokio::time::timeout(bounds.write_timeout, tx.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    });
    rx
}

/// The `data` of the `error` a resume sends for a run it cannot see end. Its own type, not
/// `events::ErrorEvent`: `interrupted` is no model's error type, only a run's.
#[derive(Serialize)]
struct RunError<'a> {
    run_id: &'a str,
    model: Option<()>,
    error_type: &'static str,
    retryable: bool,
    message: &'static str,
}

/// The `data` of the `done` that ends such a resume: status `interrupted`. Nothing is known
/// of the models' calls, which were cut off with their process: `cancelled`; so neither the
/// cost nor the agreement is (`null`, as `done` always carries them).
#[derive(Serialize)]
struct InterruptedDone<'a> {
    run_id: &'a str,
    status: &'static str,
    flash: &'static str,
    pro: &'static str,
    total_ms: u64,
    cost_usd: Option<f64>,
    agreement: Option<f64>,
}

/// `error` (`interrupted`) and `done` (`interrupted`), numbered after `after`.
pub fn interrupted(run_id: Uuid, after: u32) -> Vec<Bytes> {
    end_frames(
        run_id,
        after,
        "interrupted",
        "the replica running this run stopped before it ended; start the query again",
    )
}

/// `error` (`timeout`) and `done` (`interrupted`): the run's end was not seen in time.
fn gave_up(run_id: Uuid, after: u32) -> Vec<Bytes> {
    end_frames(
        run_id,
        after,
        "timeout",
        "the run did not end within its deadlines on the replica running it; its audit record may still arrive",
    )
}

fn end_frames(
    run_id: Uuid,
    after: u32,
    error_type: &'static str,
    message: &'static str,
) -> Vec<Bytes> {
    let id = run_id.hyphenated().to_string();
    let error = RunError {
        run_id: &id,
        model: None,
        error_type,
        retryable: true,
        message,
    };
    let done = InterruptedDone {
        run_id: &id,
        status: "interrupted",
        flash: "cancelled",
        pro: "cancelled",
        total_ms: 0,
        cost_usd: None,
        agreement: None,
    };
    vec![
        sse::encode(EventKind::Error, &id, after.saturating_add(1), &error),
        sse::encode(EventKind::Done, &id, after.saturating_add(2), &done),
    ]
}
