//! Sending a run's events: each is numbered (gapless `seq`) only once it has room in the
//! run's channel and its bytes in the run's [`STREAM_BUFFER_BYTES`] budget, so a slow client
//! slows the run (and through it the upstream reads) instead of making it buffer, and a client
//! that stops reading for `CLIENT_WRITE_TIMEOUT_S` counts as gone. Every event but the deltas
//! is also kept in the run's resume log.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc};

use super::{STREAM_BUFFER_BYTES, drive::ModelResult, millis, report::OwnedModelRef};
use crate::{
    audit::Outcome,
    domain::Role,
    events::{AnswerEvent, ErrorEvent, EventKind},
    metrics::Metrics,
    resume::RunLog,
    sse,
};

/// Sends a run's events in order with gapless `seq` numbers.
pub(super) struct Emitter {
    pub(super) tx: mpsc::Sender<Bytes>,
    pub(super) run_id: String,
    pub(super) seq: AtomicU32,
    pub(super) deltas: bool,
    pub(super) metrics: Metrics,
    /// Every event but the deltas, for resumes.
    pub(super) log: Arc<RunLog>,
    pub(super) write_timeout: Duration,
    /// [`STREAM_BUFFER_BYTES`] permits, one per byte of an event not yet written to the socket.
    pub(super) budget: Arc<Semaphore>,
}

/// The receiver is gone: the client disconnected.
#[derive(Debug)]
pub(super) struct ClientGone;

impl Emitter {
    /// Waits for room, then numbers and sends the event. The number is taken only once the
    /// slot is held, so concurrent emitters of one run can never leave a gap or swap order.
    ///
    /// A client that takes no event for `write_timeout` counts as gone: otherwise one reader
    /// that stopped reading (with its connection open) would hold the run, its upstream calls
    /// and a shutdown forever.
    pub(super) async fn emit(
        &self,
        event: EventKind,
        data: &impl Serialize,
    ) -> Result<(), ClientGone> {
        // The data is encoded before waiting, to know how much of the budget the event needs;
        // its number is taken only once it may be sent (see `send`).
        let json = sse::encode_data(data);
        let len = sse::frame_len(event, &self.run_id, json.len());
        let room = async {
            let permit = self.tx.reserve().await.map_err(|_| ClientGone)?;
            let bytes = budget_for(&self.budget, len)
                .await
                .map_err(|_| ClientGone)?;
            Ok::<_, ClientGone>((permit, bytes))
        };
        let (permit, bytes) = match tokio::time::timeout(self.write_timeout, room).await {
            Ok(Ok(room)) => room,
            Ok(Err(ClientGone)) | Err(_) => return Err(ClientGone),
        };
        self.send(permit, bytes, event, &json);
        Ok(())
    }

    /// Sends at once if there is room, else drops the event: for notices on the way out
    /// (shutdown, a panicking run) that must not wait on a client.
    pub(super) fn emit_now(&self, event: EventKind, data: &impl Serialize) {
        let json = sse::encode_data(data);
        let len = sse::frame_len(event, &self.run_id, json.len()).min(STREAM_BUFFER_BYTES);
        let Ok(bytes) =
            Arc::clone(&self.budget).try_acquire_many_owned(u32::try_from(len).unwrap_or(u32::MAX))
        else {
            return;
        };
        if let Ok(permit) = self.tx.try_reserve() {
            self.send(permit, bytes, event, &json);
        }
    }

    /// Numbers and sends an event. Taking the number and sending happen with no `.await`
    /// between, while the channel slot is held, so numbers go out in order and without gaps.
    fn send(
        &self,
        permit: mpsc::Permit<'_, Bytes>,
        bytes: OwnedSemaphorePermit,
        event: EventKind,
        json: &[u8],
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let frame = sse::frame(event, &self.run_id, seq, json);
        if event == EventKind::Delta {
            // Not kept, but a client that saw it may resume from it.
            self.log.mark_issued(seq);
        } else {
            self.log.push(seq, event, frame.clone(), json.len());
        }
        permit.send(budgeted(frame, bytes));
        self.metrics.sse_event(event);
    }

    pub(super) async fn emit_result(
        &self,
        role: Role,
        model: &OwnedModelRef,
        result: &ModelResult,
    ) -> Result<(), ClientGone> {
        match &result.error {
            None if result.outcome == Outcome::Ok => {
                self.emit(
                    EventKind::answer(role),
                    &AnswerEvent {
                        run_id: &self.run_id,
                        model: role,
                        provider: &model.provider,
                        model_name: &model.model,
                        model_version: result.completion.model_version.as_deref(),
                        text: &result.text,
                        finish_reason: result.completion.finish_reason.as_deref(),
                        latency_ms: millis(result.latency),
                        ttft_ms: result.ttft.map(millis),
                        usage: result.completion.usage,
                        cost_usd: result.cost_usd,
                    },
                )
                .await
            }
            Some(error) => {
                self.emit(
                    EventKind::Error,
                    &ErrorEvent {
                        run_id: &self.run_id,
                        model: Some(role),
                        error_type: error.error_type,
                        retryable: error.retryable,
                        message: &error.message,
                    },
                )
                .await
            }
            // Skipped results are never emitted; nothing else lacks an error.
            None => Ok(()),
        }
    }
}

/// The budget's permits for a frame of `len` bytes: all of it for a frame larger than the
/// whole budget, so that such a frame waits until it is alone rather than for ever.
async fn budget_for(
    budget: &Arc<Semaphore>,
    len: usize,
) -> Result<OwnedSemaphorePermit, AcquireError> {
    let n = len.clamp(1, STREAM_BUFFER_BYTES);
    // STREAM_BUFFER_BYTES fits in u32 by far.
    Arc::clone(budget)
        .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        .await
}

/// The frame as sent: the same bytes (not a copy), holding `bytes` of the run's budget until
/// the last handle on it is dropped, which is when hyper has written it to the socket (or the
/// stream is gone). The resume log keeps its own handle on the frame, outside the budget.
fn budgeted(frame: Bytes, bytes: OwnedSemaphorePermit) -> Bytes {
    Bytes::from_owner(BudgetedFrame {
        frame,
        _bytes: bytes,
    })
}

struct BudgetedFrame {
    frame: Bytes,
    _bytes: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for BudgetedFrame {
    fn as_ref(&self) -> &[u8] {
        &self.frame
    }
}
