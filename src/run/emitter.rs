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
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc},
    time::Instant,
};

use super::{STREAM_BUFFER_BYTES, drive::ModelResult, millis, report::OwnedModelRef};
use crate::{
    audit::Outcome,
    domain::Role,
    events::{AnswerEvent, ErrorEvent, EventKind},
    metrics::Metrics,
    resume::RunLog,
    sse::{self, OverheadProbe},
};

/// What the data of an event other than a delta usually needs, to size its buffer once.
const DATA_HINT: usize = 160;

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
    /// `duet_overhead_seconds` for this run's stream.
    pub(super) overhead: Arc<OverheadProbe>,
    /// The run's span (`run_id` and `client_request_id` on its log lines), entered around the
    /// run's work that may log: starting a model call and polling it up to its first token
    /// (the connection pool logs there), retries, each model's end and the run's end. Not
    /// around relaying tokens, which logs nothing.
    pub(super) span: tracing::Span,
    /// What each model's deltas begin with: Flash's, then Pro's.
    pub(super) delta_prefixes: [sse::DeltaPrefix; 2],
    /// A channel slot kept for one notice on the way out (see [`Emitter::emit_now`]), as
    /// `done` has its own: a client that stopped reading still gets the `error` that says
    /// why its stream ends, before `done`.
    pub(super) notice: std::sync::Mutex<Option<mpsc::OwnedPermit<Bytes>>>,
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
        self.emit_arrived(event, data, None).await
    }

    /// [`Emitter::emit`] for an event made from an upstream chunk that reached the run at
    /// `arrived`: its way out is measured (`duet_overhead_seconds`).
    pub(super) async fn emit_arrived(
        &self,
        event: EventKind,
        data: &impl Serialize,
        arrived: Option<Instant>,
    ) -> Result<(), ClientGone> {
        // The data is encoded before waiting, to know how much of the budget the event needs;
        // its number is taken only once it may be sent (see `send`).
        let draft = sse::Draft::new(event, &self.run_id, data, DATA_HINT);
        self.emit_draft(event, draft, arrived).await
    }

    /// A delta of `text` from `role` (a `DeltaEvent`): [`Emitter::emit_arrived`], encoded by
    /// [`sse::Draft::delta`].
    pub(super) async fn emit_delta(
        &self,
        role: Role,
        text: &str,
        arrived: Instant,
    ) -> Result<(), ClientGone> {
        let prefix = match role {
            Role::Flash => &self.delta_prefixes[0],
            Role::Pro => &self.delta_prefixes[1],
        };
        let draft = sse::Draft::delta(prefix, text);
        self.emit_draft(EventKind::Delta, draft, Some(arrived))
            .await
    }

    async fn emit_draft(
        &self,
        event: EventKind,
        draft: sse::Draft,
        arrived: Option<Instant>,
    ) -> Result<(), ClientGone> {
        let len = draft.max_len();
        // Nearly always there is room at once: then no timer is armed at all. Only a full
        // channel or budget waits, under the write timeout.
        let (permit, bytes) = match self.room_now(len)? {
            Some(room) => room,
            None => {
                let room = async {
                    let permit = self.tx.reserve().await.map_err(|_| ClientGone)?;
                    let bytes = budget_for(&self.budget, len)
                        .await
                        .map_err(|_| ClientGone)?;
                    Ok::<_, ClientGone>((permit, bytes))
                };
                // Boxed: in place, the wait (a timer and two queue entries) is part of every
                // future that sends an event for the whole run, 264 bytes of each model
                // call's, although only a full channel or budget ever waits.
                match Box::pin(tokio::time::timeout(self.write_timeout, room)).await {
                    Ok(Ok(room)) => room,
                    Ok(Err(ClientGone)) | Err(_) => return Err(ClientGone),
                }
            }
        };
        self.send(permit, bytes, event, draft, arrived);
        Ok(())
    }

    /// A channel slot and `len` bytes of the budget if both are free right now; `None` if
    /// either is not (nothing is held then), an error if the client is gone.
    fn room_now(
        &self,
        len: usize,
    ) -> Result<Option<(mpsc::Permit<'_, Bytes>, OwnedSemaphorePermit)>, ClientGone> {
        let permit = match self.tx.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => return Ok(None),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(ClientGone),
        };
        let n = u32::try_from(len.clamp(1, STREAM_BUFFER_BYTES)).unwrap_or(u32::MAX);
        match Arc::clone(&self.budget).try_acquire_many_owned(n) {
            Ok(bytes) => Ok(Some((permit, bytes))),
            Err(TryAcquireError::NoPermits) => Ok(None),
            Err(TryAcquireError::Closed) => Err(ClientGone),
        }
    }

    /// Sends at once, never waiting on the client: for notices on the way out (shutdown, a
    /// panicking run). With no room (a client that stopped reading has filled the channel or
    /// the byte budget), the first such notice goes through the slot kept for it, outside
    /// the budget (a notice is small); a later one, if any, is dropped.
    pub(super) fn emit_now(&self, event: EventKind, data: &impl Serialize) {
        let draft = sse::Draft::new(event, &self.run_id, data, DATA_HINT);
        let len = draft.max_len().min(STREAM_BUFFER_BYTES);
        if let Ok(bytes) =
            Arc::clone(&self.budget).try_acquire_many_owned(u32::try_from(len).unwrap_or(u32::MAX))
            && let Ok(permit) = self.tx.try_reserve()
        {
            self.send(permit, bytes, event, draft, None);
            return;
        }
        let kept = self.notice.lock().ok().and_then(|mut slot| slot.take());
        let Some(permit) = kept else {
            return;
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let data_len = draft.data_len();
        let frame = draft.finish(event, &self.run_id, seq).freeze();
        self.log.push(seq, event, frame.clone(), data_len);
        permit.send(frame);
        self.metrics.sse_event(event);
    }

    /// Numbers and sends an event. Taking the number and sending happen with no `.await`
    /// between, while the channel slot is held, so numbers go out in order and without gaps.
    fn send(
        &self,
        permit: mpsc::Permit<'_, Bytes>,
        bytes: OwnedSemaphorePermit,
        event: EventKind,
        draft: sse::Draft,
        arrived: Option<Instant>,
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = arrived {
            self.overhead.sent(seq, at);
        }
        let data_len = draft.data_len();
        let frame = draft.finish(event, &self.run_id, seq);
        if event == EventKind::Delta {
            // Not kept, but a client that saw it may resume from it. The frame's buffer
            // itself travels, with the budget it holds: no second handle on it.
            self.log.mark_issued(seq);
            permit.send(budgeted(frame, bytes));
        } else {
            let frame = frame.freeze();
            self.log.push(seq, event, frame.clone(), data_len);
            permit.send(budgeted(frame, bytes));
        }
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
                self.emit_arrived(
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
                    result.finished_at,
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
fn budgeted<B>(frame: B, bytes: OwnedSemaphorePermit) -> Bytes
where
    B: AsRef<[u8]> + Send + 'static,
{
    Bytes::from_owner(BudgetedFrame {
        frame,
        _bytes: bytes,
    })
}

struct BudgetedFrame<B> {
    frame: B,
    _bytes: OwnedSemaphorePermit,
}

impl<B: AsRef<[u8]>> AsRef<[u8]> for BudgetedFrame<B> {
    fn as_ref(&self) -> &[u8] {
        self.frame.as_ref()
    }
}
