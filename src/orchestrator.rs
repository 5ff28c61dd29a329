//! One run: Flash and Pro at once, deadlines, ordering, cancellation, and the `done` guard.
//!
//! Lifecycle (see DESIGN_DUAL_MODEL_AUDIT.md):
//! 1. [`Orchestrator::start`] makes the run id and a bounded channel, puts `start` in it and
//!    reserves one more slot for `done`, then spawns the run on the shared `TaskTracker`.
//! 2. The run task polls both model drivers in one `select!` loop. Each driver runs its
//!    provider stream under the model's total deadline (`timeout_at`), with the first-token
//!    and stall deadlines inside, and retries a retryable failure before the first token.
//! 3. Whatever way the task ends (both models done, Pro ok first, client gone, shutdown, a
//!    panic), its [`RunGuard`] is dropped: it sends `done` through the slot reserved in step 1,
//!    so `done` can neither be lost to a full channel nor block, and it submits the run record.
//!
//! Why a task and a channel rather than driving the models from the response body: the run
//! must finish and be audited even when the client is slow or gone, and the bounded channel is
//! the backpressure that keeps a slow reader from making us buffer without bound.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use chrono::Utc;
use futures::{FutureExt, StreamExt, future::OptionFuture};
use serde::Serialize;
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::{
    audit::{AuditSink, ModelTrace, Outcome, RunRecord, RunStatus},
    config::{Config, Role, Secret},
    metrics::Metrics,
    providers::{Completion, ErrorType, ModelRequest, Provider, ProviderError, ProviderEvent},
    resume::{Owner, Registry, RunLog},
    sse,
};

/// Events a run may queue ahead of a slow client. Past this the run waits (backpressure to
/// the upstream read), so memory per run stays bounded; `done` has its own reserved slot.
pub const CHANNEL_CAPACITY: usize = 16;

/// Bytes of events a run may have on their way to a slow client: queued in the channel, in
/// the response body, or in hyper's write buffers (HTTP/1.1's queue, HTTP/2's send buffer),
/// until they are written to the socket. Past it the run waits, as for a full channel. The
/// frame count alone let a stalled HTTP/2 stream buffer up to 400 KiB in hyper, and a run
/// without deltas queue two whole answers. A frame larger than this (a long answer event)
/// still goes, alone, once everything before it has been written. `done` is outside it.
pub const STREAM_BUFFER_BYTES: usize = 32 * 1024;

/// Retries before the first token, at most; each also has to fit in the model's deadline.
const MAX_RETRIES: u32 = 3;
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_CAP: Duration = Duration::from_secs(2);

/// Deadlines of one role.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub total: Duration,
    pub first_token: Option<Duration>,
    pub stall: Duration,
}

/// Which deadline ended a model call: the record's own type (`audit::Deadline`).
pub use crate::audit::Deadline as TimeoutKind;

/// One role's provider and deadlines.
#[derive(Clone)]
pub struct ModelSlot {
    pub provider: Arc<dyn Provider>,
    pub limits: Limits,
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub query: Arc<str>,
    pub system: Option<Arc<str>>,
    pub deltas: bool,
    pub client_request_id: Option<String>,
}

/// A started run: its id, its encoded events (ending with `done`), and its record once ended.
pub struct RunHandle {
    pub run_id: Uuid,
    pub events: mpsc::Receiver<Bytes>,
    pub record: oneshot::Receiver<RunRecord>,
}

/// Starts runs. Cheap to clone; shared by all requests.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    flash: ModelSlot,
    pro: ModelSlot,
    shutdown_grace: Duration,
    /// One permit per run in progress: `MAX_CONCURRENT_STREAMS`.
    streams: Arc<Semaphore>,
    registry: Arc<Registry>,
    client_write_timeout: Duration,
    sink: Arc<dyn AuditSink>,
    metrics: Metrics,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Orchestrator {
    pub fn new(
        config: &Config,
        flash: ModelSlot,
        pro: ModelSlot,
        sink: Arc<dyn AuditSink>,
        metrics: Metrics,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Orchestrator {
            inner: Arc::new(Inner {
                flash,
                pro,
                shutdown_grace: config.shutdown_grace,
                streams: Arc::new(Semaphore::new(config.max_concurrent_streams)),
                registry: Arc::new(Registry::new(
                    config.resume_retention,
                    config.resume_store_max_bytes,
                )),
                client_write_timeout: config.client_write_timeout,
                sink,
                metrics,
                shutdown,
                tracker,
            }),
        }
    }

    /// Limits of a role as configured.
    pub fn limits_from(config: &Config, role: Role) -> Limits {
        let m = config.model(role);
        Limits {
            total: m.timeout,
            first_token: m.ttft_timeout,
            stall: config.stall_timeout,
        }
    }

    pub fn slot(&self, role: Role) -> &ModelSlot {
        match role {
            Role::Flash => &self.inner.flash,
            Role::Pro => &self.inner.pro,
        }
    }

    /// The tracker that shutdown waits on, for tasks serving runs.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Runs that can be resumed from memory.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// A place under `MAX_CONCURRENT_STREAMS` for a stream that is not a new run (a resumed
    /// one), counted in `duet_streams_active` until the returned value is dropped.
    pub fn stream_slot(&self) -> Result<StreamSlot, AtCapacity> {
        let permit = Arc::clone(&self.inner.streams)
            .try_acquire_owned()
            .map_err(|_| AtCapacity)?;
        self.inner.metrics.streams_active.inc();
        Ok(StreamSlot {
            _permit: permit,
            metrics: self.inner.metrics.clone(),
        })
    }

    /// Starts a run and returns at once; the run goes on in its own task. Refused when
    /// `MAX_CONCURRENT_STREAMS` streams are already open. `owner_key` is the API key the
    /// request authenticated with (none without API_KEYS): only it may resume the run.
    pub fn start(
        &self,
        request: RunRequest,
        owner_key: Option<&Secret>,
    ) -> Result<RunHandle, AtCapacity> {
        let inner = &self.inner;
        let permit = Arc::clone(&inner.streams)
            .try_acquire_owned()
            .map_err(|_| AtCapacity)?;
        let run_id = Uuid::now_v7();
        let log = inner
            .registry
            .open(run_id, owner_key.map(|key| Owner::of(run_id, key)));
        let run_id_text = run_id.hyphenated().to_string();
        // +2: the `start` frame queued below and the slot reserved for `done`, so a full
        // CHANNEL_CAPACITY stays available to the run in between.
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY + 2);
        let (record_tx, record_rx) = oneshot::channel();

        let start = StartEvent {
            run_id: &run_id_text,
            models: StartModels {
                flash: ModelRef::of(&*inner.flash.provider),
                pro: ModelRef::of(&*inner.pro.provider),
            },
        };
        // The channel is new and empty, so both of these succeed; a failure would mean the
        // receiver is gone, which cannot be before we return it.
        let data = sse::encode_data(&start);
        let start = sse::frame("start", &run_id_text, 0, &data);
        log.push(0, "start", start.clone(), data.len());
        let _ = tx.try_send(start);
        let done_permit = tx.clone().try_reserve_owned().ok();
        inner.metrics.sse_event("start");
        inner.metrics.streams_active.inc();

        let emitter = Arc::new(Emitter {
            tx,
            run_id: run_id_text,
            seq: AtomicU32::new(1),
            deltas: request.deltas,
            metrics: inner.metrics.clone(),
            log,
            write_timeout: inner.client_write_timeout,
            budget: Arc::new(Semaphore::new(STREAM_BUFFER_BYTES)),
        });
        // Boxed: an async fn keeps its arguments twice in its state (as captured and as
        // local), and the guard is the largest of them; a pointer keeps every open run's
        // task about 1.8 KB smaller.
        let guard = Box::new(RunGuard {
            emitter: Arc::clone(&emitter),
            done_permit,
            run_id,
            started: Instant::now(),
            created_at: Utc::now(),
            request: request.clone(),
            flash_ref: ModelRef::owned(&*inner.flash.provider),
            pro_ref: ModelRef::owned(&*inner.pro.provider),
            flash: None,
            pro: None,
            cancelled: None,
            sink: Arc::clone(&inner.sink),
            metrics: inner.metrics.clone(),
            record_tx: Some(record_tx),
            registry: Arc::clone(&inner.registry),
            _permit: permit,
        });
        let span = info_span!(
            "run",
            run_id = %run_id,
            client_request_id = request.client_request_id.as_deref().unwrap_or(""),
        );
        // The run's own future, not an `async` block around it: a wrapper would hold a second
        // copy of its state.
        inner
            .tracker
            .spawn(self.clone().run(guard, emitter, request).instrument(span));
        Ok(RunHandle {
            run_id,
            events: rx,
            record: record_rx,
        })
    }

    async fn run(self, mut guard: Box<RunGuard>, emitter: Arc<Emitter>, request: RunRequest) {
        let inner = &*self.inner;
        let model_request = |role| ModelRequest {
            role,
            query: Arc::clone(&request.query),
            system: request.system.clone(),
        };
        // Text and first-token time live out here, not in the driver futures, so that a
        // cancelled model's partial answer still reaches the record after its future is gone.
        let mut flash_progress = Progress::default();
        let mut pro_progress = Progress::default();
        {
            let flash = drive(
                Role::Flash,
                &inner.flash,
                model_request(Role::Flash),
                &emitter,
                &mut flash_progress,
            );
            let pro = drive(
                Role::Pro,
                &inner.pro,
                model_request(Role::Pro),
                &emitter,
                &mut pro_progress,
            );
            let mut flash = std::pin::pin!(OptionFuture::from(Some(flash)));
            let mut pro = std::pin::pin!(OptionFuture::from(Some(pro)));
            let grace = inner.shutdown_grace;
            let token = inner.shutdown.clone();
            let mut shutdown = std::pin::pin!(async move {
                token.cancelled().await;
                tokio::time::sleep(grace).await;
            });
            let closed_tx = emitter.tx.clone();
            let mut client_gone = std::pin::pin!(closed_tx.closed());

            while guard.flash.is_none() || guard.pro.is_none() {
                tokio::select! {
                    // Flash first: when both end at the same instant the preview still goes
                    // out before the final answer, which the ordering rule allows.
                    biased;
                    Some(result) = &mut flash, if guard.flash.is_none() => {
                        flash.set(None.into());
                        if result.outcome == Outcome::Cancelled {
                            // The driver found the client gone: nobody to tell.
                            guard.flash = Some(result);
                            guard.cancelled = Some(CancelReason::ClientGone);
                            break;
                        }
                        let sent = emitter.emit_result(Role::Flash, &guard.flash_ref, &result).await;
                        guard.flash = Some(result);
                        if sent.is_err() {
                            guard.cancelled = Some(CancelReason::ClientGone);
                            break;
                        }
                    }
                    Some(result) = &mut pro, if guard.pro.is_none() => {
                        pro.set(None.into());
                        if result.outcome == Outcome::Cancelled {
                            guard.pro = Some(result);
                            guard.cancelled = Some(CancelReason::ClientGone);
                            break;
                        }
                        if result.outcome == Outcome::Ok && guard.flash.is_none() {
                            // The preview has no use once the final answer is there: drop the
                            // Flash call now (closing its upstream request) and never send it.
                            flash.set(None.into());
                            guard.flash = Some(ModelResult::skipped(guard.started.elapsed()));
                            inner.metrics.flash_skipped_total.inc();
                        }
                        let sent = emitter.emit_result(Role::Pro, &guard.pro_ref, &result).await;
                        guard.pro = Some(result);
                        if sent.is_err() {
                            guard.cancelled = Some(CancelReason::ClientGone);
                            break;
                        }
                    }
                    () = &mut client_gone => {
                        guard.cancelled = Some(CancelReason::ClientGone);
                        break;
                    }
                    () = &mut shutdown => {
                        guard.cancelled = Some(CancelReason::Shutdown);
                        emitter.emit_now("error", &ErrorEvent {
                            run_id: &emitter.run_id,
                            model: None,
                            error_type: ErrorType::Cancelled,
                            retryable: true,
                            message: "the service is shutting down",
                        });
                        break;
                    }
                }
            }
            // Leaving this block drops both calls before the guard reports the run, so no
            // upstream request outlives it.
        }
        if guard.flash.is_none() {
            guard.flash = Some(guard.unfinished(Role::Flash).with_progress(flash_progress));
        }
        if guard.pro.is_none() {
            guard.pro = Some(guard.unfinished(Role::Pro).with_progress(pro_progress));
        }
    }
}

/// What a model call has produced so far.
#[derive(Default)]
struct Progress {
    text: String,
    ttft: Option<Duration>,
}

/// A resumed stream's place under `MAX_CONCURRENT_STREAMS`; see [`Orchestrator::stream_slot`].
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.metrics.streams_active.dec();
    }
}

/// `MAX_CONCURRENT_STREAMS` streams are open.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the service is at its limit of concurrent streams")]
pub struct AtCapacity;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    ClientGone,
    Shutdown,
}

/// Sends a run's events in order with gapless `seq` numbers.
struct Emitter {
    tx: mpsc::Sender<Bytes>,
    run_id: String,
    seq: AtomicU32,
    deltas: bool,
    metrics: Metrics,
    /// Every event but the deltas, for resumes.
    log: Arc<RunLog>,
    write_timeout: Duration,
    /// [`STREAM_BUFFER_BYTES`] permits, one per byte of an event not yet written to the socket.
    budget: Arc<Semaphore>,
}

/// The receiver is gone: the client disconnected.
#[derive(Debug)]
struct ClientGone;

impl Emitter {
    /// Waits for room, then numbers and sends the event. The number is taken only once the
    /// slot is held, so concurrent emitters of one run can never leave a gap or swap order.
    ///
    /// A client that takes no event for `write_timeout` counts as gone: otherwise one reader
    /// that stopped reading (with its connection open) would hold the run, its upstream calls
    /// and a shutdown forever.
    async fn emit(&self, event: &'static str, data: &impl Serialize) -> Result<(), ClientGone> {
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
    fn emit_now(&self, event: &'static str, data: &impl Serialize) {
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
        event: &'static str,
        json: &[u8],
    ) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let frame = sse::frame(event, &self.run_id, seq, json);
        if event == "delta" {
            // Not kept, but a client that saw it may resume from it.
            self.log.mark_issued(seq);
        } else {
            self.log.push(seq, event, frame.clone(), json.len());
        }
        permit.send(budgeted(frame, bytes));
        self.metrics.sse_event(event);
    }

    async fn emit_result(
        &self,
        role: Role,
        model: &OwnedModelRef,
        result: &ModelResult,
    ) -> Result<(), ClientGone> {
        match &result.error {
            None if result.outcome == Outcome::Ok => {
                self.emit(
                    role.as_str(),
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
                    },
                )
                .await
            }
            Some(error) => {
                self.emit(
                    "error",
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

/// How one model call ended, with everything the event and the record need.
#[derive(Debug)]
struct ModelResult {
    outcome: Outcome,
    text: String,
    completion: Completion,
    error: Option<ProviderError>,
    timeout: Option<TimeoutKind>,
    latency: Duration,
    ttft: Option<Duration>,
}

impl ModelResult {
    fn skipped(latency: Duration) -> Self {
        ModelResult {
            outcome: Outcome::Skipped,
            text: String::new(),
            completion: Completion::default(),
            error: None,
            timeout: None,
            latency,
            ttft: None,
        }
    }

    fn with_progress(self, progress: Progress) -> Self {
        ModelResult {
            text: progress.text,
            ttft: progress.ttft,
            ..self
        }
    }

    fn cancelled(latency: Duration, reason: &str) -> Self {
        ModelResult {
            outcome: Outcome::Cancelled,
            error: Some(ProviderError::new(ErrorType::Cancelled, false, reason)),
            ..ModelResult::skipped(latency)
        }
    }
}

/// Why the attempt loop stopped without a completion.
enum Failure {
    Provider(ProviderError),
    Timeout(TimeoutKind),
    ClientGone,
}

/// Runs one model call to its end under its deadlines, relaying deltas if asked.
async fn drive(
    role: Role,
    slot: &ModelSlot,
    request: ModelRequest,
    emitter: &Emitter,
    progress: &mut Progress,
) -> ModelResult {
    let started = Instant::now();
    let limits = slot.limits;
    let deadline = started + limits.total;
    let attempt = attempts(
        &*slot.provider,
        &request,
        limits,
        started,
        deadline,
        emitter,
        progress,
    );
    let outcome = match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(completion)) => Ok(completion),
        Ok(Err(failure)) => Err(failure),
        Err(_elapsed) => Err(Failure::Timeout(TimeoutKind::Total)),
    };
    let latency = started.elapsed();
    let text = std::mem::take(&mut progress.text);
    let ttft = progress.ttft;
    let metrics = &emitter.metrics;
    let model = role.as_str();
    let result = match outcome {
        Ok(completion) => {
            if let Some(n) = completion.usage.input_tokens {
                metrics
                    .tokens_total
                    .with_label_values(&[model, "input"])
                    .inc_by(n);
            }
            if let Some(n) = completion.usage.output_tokens {
                metrics
                    .tokens_total
                    .with_label_values(&[model, "output"])
                    .inc_by(n);
            }
            ModelResult {
                outcome: Outcome::Ok,
                text,
                completion,
                error: None,
                timeout: None,
                latency,
                ttft,
            }
        }
        Err(Failure::Timeout(kind)) => {
            metrics
                .model_timeouts_total
                .with_label_values(&[model, kind.as_str()])
                .inc();
            let what = match kind {
                TimeoutKind::Total => "did not finish within its deadline",
                TimeoutKind::FirstToken => "sent no first token within its deadline",
                TimeoutKind::Stall => "stalled mid-answer",
            };
            let after = match kind {
                TimeoutKind::Total => limits.total,
                TimeoutKind::FirstToken => limits.first_token.unwrap_or(limits.total),
                TimeoutKind::Stall => limits.stall,
            };
            let message = format!("{role} {what} ({:.1} s)", after.as_secs_f64());
            ModelResult {
                outcome: Outcome::Timeout,
                text,
                completion: Completion::default(),
                error: Some(ProviderError::new(ErrorType::Timeout, true, message)),
                timeout: Some(kind),
                latency,
                ttft,
            }
        }
        Err(Failure::Provider(error)) => {
            metrics
                .model_errors_total
                .with_label_values(&[model, error.error_type.as_str()])
                .inc();
            ModelResult {
                outcome: Outcome::Error,
                text,
                completion: Completion::default(),
                error: Some(error),
                timeout: None,
                latency,
                ttft,
            }
        }
        Err(Failure::ClientGone) => ModelResult {
            text,
            ttft,
            ..ModelResult::cancelled(latency, "the client went away")
        },
    };
    metrics
        .model_latency_seconds
        .with_label_values(&[model, result.outcome.as_str()])
        .observe(latency.as_secs_f64());
    if let Some(t) = ttft {
        metrics
            .model_ttft_seconds
            .with_label_values(&[model])
            .observe(t.as_secs_f64());
    }
    match &result.error {
        // A model that did its job is in the `run ended` line (and the record); a line of its
        // own would be two more log lines per run at full rate. Failures keep theirs.
        None => debug!(
            model,
            outcome = result.outcome.as_str(),
            latency_ms = millis(latency),
            ttft_ms = ttft.map(millis),
            "model ended"
        ),
        Some(e) => {
            warn!(model, outcome = result.outcome.as_str(), error_type = e.error_type.as_str(), detail = %e.detail, latency_ms = millis(latency), "model failed")
        }
    }
    result
}

/// The attempts of one call. Retries only before the first token: after it the client has
/// seen text, and a second answer would not continue the first.
async fn attempts(
    provider: &dyn Provider,
    request: &ModelRequest,
    limits: Limits,
    started: Instant,
    deadline: Instant,
    emitter: &Emitter,
    progress: &mut Progress,
) -> Result<Completion, Failure> {
    let Progress { text, ttft } = progress;
    let role = request.role;
    let first_token_deadline = limits.first_token.map(|d| started + d);
    let mut retries = 0;
    loop {
        let error = match std::panic::catch_unwind(AssertUnwindSafe(|| provider.stream(request))) {
            Err(_) => panicked(),
            Ok(mut stream) => {
                // One timer per attempt, armed at the first-token deadline (if any) and, after
                // the first token, at the stall deadline. It is not re-armed per token: a token
                // only records its time, and when the timer fires it checks the real deadline
                // and sleeps on if tokens came since. A timer-wheel update per token per model
                // would cost more than the clock read. Without a first-token deadline it is
                // not polled (so not in the wheel at all) before the first token.
                let mut timer = std::pin::pin!(tokio::time::sleep_until(
                    first_token_deadline.unwrap_or(deadline)
                ));
                let mut last_token = Instant::now();
                loop {
                    let armed = ttft.is_some() || first_token_deadline.is_some();
                    let polled = tokio::select! {
                        biased;
                        polled = AssertUnwindSafe(stream.next()).catch_unwind() => polled,
                        () = &mut timer, if armed => {
                            if ttft.is_none() {
                                return Err(Failure::Timeout(TimeoutKind::FirstToken));
                            }
                            let due = last_token + limits.stall;
                            if Instant::now() < due {
                                timer.as_mut().reset(due);
                                continue;
                            }
                            return Err(Failure::Timeout(TimeoutKind::Stall));
                        }
                    };
                    match polled {
                        Err(_panic) => break panicked(),
                        Ok(None) => {
                            break ProviderError::new(
                                ErrorType::InvalidResponse,
                                false,
                                format!("{role} answer ended before the model finished"),
                            );
                        }
                        Ok(Some(Err(error))) => break error,
                        Ok(Some(Ok(ProviderEvent::Finished(completion)))) => return Ok(completion),
                        Ok(Some(Ok(ProviderEvent::Delta(delta)))) => {
                            let first = ttft.is_none() && !delta.is_empty();
                            if !delta.is_empty() {
                                if first {
                                    *ttft = Some(started.elapsed());
                                }
                                text.push_str(&delta);
                                if emitter.deltas {
                                    let event = DeltaEvent {
                                        run_id: &emitter.run_id,
                                        model: role,
                                        text: &delta,
                                    };
                                    emitter
                                        .emit("delta", &event)
                                        .await
                                        .map_err(|_| Failure::ClientGone)?;
                                }
                            }
                            // Silence counts from here, so time spent waiting on a slow client is
                            // not held against the model.
                            last_token = Instant::now();
                            if first {
                                timer.as_mut().reset(last_token + limits.stall);
                            }
                        }
                    }
                }
            }
        };
        if ttft.is_some() || !error.retryable || retries >= MAX_RETRIES {
            return Err(Failure::Provider(error));
        }
        let backoff = error
            .retry_after
            .unwrap_or_else(|| jittered_backoff(retries));
        let resume_at = Instant::now() + backoff;
        if resume_at >= deadline || first_token_deadline.is_some_and(|at| resume_at >= at) {
            // Waiting would run past a deadline: report the real failure, not a timeout.
            return Err(Failure::Provider(error));
        }
        retries += 1;
        warn!(model = role.as_str(), retry = retries, backoff_ms = millis(backoff), detail = %error.detail, "retrying before first token");
        tokio::time::sleep(backoff).await;
    }
}

fn panicked() -> ProviderError {
    ProviderError::new(
        ErrorType::Internal,
        false,
        "the model call failed inside duet",
    )
    .with_detail("provider panicked")
}

/// Full jitter: a uniform wait in [base·2^n / 2, base·2^n], capped.
fn jittered_backoff(retry: u32) -> Duration {
    let ceiling = RETRY_BASE.saturating_mul(1 << retry.min(16)).min(RETRY_CAP);
    ceiling.mul_f64(rand::random_range(0.5..=1.0))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reports the run when dropped, on every path: normal end, client gone, shutdown, panic.
struct RunGuard {
    emitter: Arc<Emitter>,
    /// The slot reserved for `done` when the run started: sending through it cannot block
    /// or fail for lack of room. `None` only if the receiver was gone before the run started.
    done_permit: Option<mpsc::OwnedPermit<Bytes>>,
    run_id: Uuid,
    started: Instant,
    created_at: chrono::DateTime<Utc>,
    request: RunRequest,
    flash_ref: OwnedModelRef,
    pro_ref: OwnedModelRef,
    flash: Option<ModelResult>,
    pro: Option<ModelResult>,
    cancelled: Option<CancelReason>,
    sink: Arc<dyn AuditSink>,
    metrics: Metrics,
    record_tx: Option<oneshot::Sender<RunRecord>>,
    registry: Arc<Registry>,
    /// Released when the run is reported, freeing its place under `MAX_CONCURRENT_STREAMS`.
    _permit: OwnedSemaphorePermit,
}

impl RunGuard {
    /// A model with no result when the run ends was cut off: by the client, by shutdown, or
    /// by a panic in the run itself (the only way to get here with no cancel reason).
    fn unfinished(&self, role: Role) -> ModelResult {
        let elapsed = self.started.elapsed();
        match self.cancelled {
            Some(CancelReason::ClientGone) => {
                ModelResult::cancelled(elapsed, "the client went away")
            }
            Some(CancelReason::Shutdown) => {
                ModelResult::cancelled(elapsed, "the service shut down")
            }
            None => {
                let error =
                    ProviderError::new(ErrorType::Internal, false, "the run failed inside duet")
                        .with_detail("run task ended without a result (panic)");
                // Best effort: the channel may be full; `done` still goes out below.
                self.emitter.emit_now(
                    "error",
                    &ErrorEvent {
                        run_id: &self.emitter.run_id,
                        model: Some(role),
                        error_type: error.error_type,
                        retryable: false,
                        message: &error.message,
                    },
                );
                ModelResult {
                    outcome: Outcome::Error,
                    error: Some(error),
                    ..ModelResult::skipped(elapsed)
                }
            }
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let flash = match self.flash.take() {
            Some(r) => r,
            None => self.unfinished(Role::Flash),
        };
        let pro = match self.pro.take() {
            Some(r) => r,
            None => self.unfinished(Role::Pro),
        };
        let cut_short = flash.outcome == Outcome::Cancelled || pro.outcome == Outcome::Cancelled;
        let status = run_status(flash.outcome, pro.outcome, self.cancelled.is_some());
        let total = self.started.elapsed();
        let run_id = &self.emitter.run_id;
        let seq = self.emitter.seq.fetch_add(1, Ordering::Relaxed);
        let data = sse::encode_data(&DoneEvent {
            run_id,
            status,
            flash: flash.outcome,
            pro: pro.outcome,
            total_ms: millis(total),
        });
        let done = sse::frame("done", run_id, seq, &data);
        self.emitter.log.push(seq, "done", done.clone(), data.len());
        self.registry.close(self.run_id, &self.emitter.log);
        if let Some(permit) = self.done_permit.take() {
            permit.send(done);
        }
        self.metrics.sse_event("done");
        if self.cancelled == Some(CancelReason::ClientGone) && cut_short {
            self.metrics.client_disconnects_total.inc();
        }
        self.metrics.streams_active.dec();
        info!(
            status = status.as_str(),
            flash = flash.outcome.as_str(),
            pro = pro.outcome.as_str(),
            total_ms = millis(total),
            "run ended"
        );
        let record = RunRecord {
            run_id: self.run_id,
            client_request_id: self.request.client_request_id.clone(),
            created_at: self.created_at,
            query: self.request.query.to_string(),
            system: self.request.system.as_deref().map(str::to_owned),
            status,
            total_ms: millis(total),
            service_version: crate::SERVICE_VERSION.to_owned(),
            flash: trace(&self.flash_ref, flash),
            pro: trace(&self.pro_ref, pro),
            events: self.emitter.log.to_events(),
            owner_fingerprint: self.emitter.log.owner().map(Owner::to_hex),
        };
        // Only `POST /query` waits for the record; streams dropped their receiver at once,
        // and copying both answers for nobody is waste.
        if let Some(tx) = self.record_tx.take().filter(|tx| !tx.is_closed()) {
            let _ = tx.send(record.clone());
        }
        self.sink.submit(record);
    }
}

fn trace(model: &OwnedModelRef, result: ModelResult) -> ModelTrace {
    ModelTrace {
        provider: model.provider.clone(),
        model: model.model.clone(),
        model_version: result.completion.model_version,
        outcome: result.outcome,
        error_type: result
            .error
            .as_ref()
            .map(|e| e.error_type.as_str().to_owned()),
        error_message: result.error.map(|e| e.detail),
        deadline: result.timeout,
        text: result.text,
        finish_reason: result.completion.finish_reason,
        latency_ms: millis(result.latency),
        ttft_ms: result.ttft.map(millis),
        input_tokens: result.completion.usage.input_tokens,
        output_tokens: result.completion.usage.output_tokens,
    }
}

/// Provider and model names, for events.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ModelRef<'a> {
    provider: &'a str,
    model: &'a str,
}

impl<'a> ModelRef<'a> {
    fn of(p: &'a dyn Provider) -> Self {
        ModelRef {
            provider: p.provider_name(),
            model: p.model_name(),
        }
    }

    fn owned(p: &dyn Provider) -> OwnedModelRef {
        OwnedModelRef {
            provider: p.provider_name().to_owned(),
            model: p.model_name().to_owned(),
        }
    }
}

struct OwnedModelRef {
    provider: String,
    model: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct StartModels<'a> {
    flash: ModelRef<'a>,
    pro: ModelRef<'a>,
}

/// The `data` of `start`: always the first event of a run.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct StartEvent<'a> {
    run_id: &'a str,
    models: StartModels<'a>,
}

/// The `data` of `delta`: a piece of one model's text, sent only when deltas were asked for.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct DeltaEvent<'a> {
    run_id: &'a str,
    model: Role,
    text: &'a str,
}

/// The `data` of `flash` and `pro`: one model's whole answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AnswerEvent<'a> {
    run_id: &'a str,
    model: Role,
    provider: &'a str,
    model_name: &'a str,
    model_version: Option<&'a str>,
    text: &'a str,
    finish_reason: Option<&'a str>,
    latency_ms: u64,
    ttft_ms: Option<u64>,
    usage: crate::providers::Usage,
}

impl<'a> AnswerEvent<'a> {
    /// The answer event as it was sent, from the model's trace in the audit record: the
    /// trace holds every field of it (see `trace`).
    pub(crate) fn from_trace(run_id: &'a str, model: Role, t: &'a ModelTrace) -> Self {
        AnswerEvent {
            run_id,
            model,
            provider: &t.provider,
            model_name: &t.model,
            model_version: t.model_version.as_deref(),
            text: &t.text,
            finish_reason: t.finish_reason.as_deref(),
            latency_ms: t.latency_ms,
            ttft_ms: t.ttft_ms,
            usage: t.usage(),
        }
    }
}

/// The `data` of `error`: one model failed (`model` set) or the run did (`model` null).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorEvent<'a> {
    run_id: &'a str,
    model: Option<Role>,
    error_type: ErrorType,
    retryable: bool,
    message: &'a str,
}

/// The `data` of `done`: always the last event of a stream that started.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct DoneEvent<'a> {
    run_id: &'a str,
    status: RunStatus,
    flash: Outcome,
    pro: Outcome,
    total_ms: u64,
}

/// The status rule of contract §4: `ok` when Pro is ok, `partial` when only Flash is,
/// `failed` when neither is, `cancelled` when the client left or the service shut down
/// first. "First" matters: a run is cancelled only when that cut a model short; a client
/// leaving after both models ended (its last event unsent) changes nothing.
fn run_status(flash: Outcome, pro: Outcome, cancelled: bool) -> RunStatus {
    let cut_short = flash == Outcome::Cancelled || pro == Outcome::Cancelled;
    if cut_short && cancelled {
        RunStatus::Cancelled
    } else if pro == Outcome::Ok {
        RunStatus::Ok
    } else if flash == Outcome::Ok {
        RunStatus::Partial
    } else {
        RunStatus::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_leaving_after_both_answers_does_not_cancel_the_run() {
        use Outcome::{Cancelled, Error, Ok, Skipped, Timeout};
        // Both answers exist: the client leaving changes nothing.
        assert_eq!(run_status(Ok, Ok, true), RunStatus::Ok);
        assert_eq!(run_status(Skipped, Ok, true), RunStatus::Ok);
        assert_eq!(run_status(Ok, Timeout, true), RunStatus::Partial);
        assert_eq!(run_status(Error, Error, true), RunStatus::Failed);
        // A model cut short by the client or shutdown.
        assert_eq!(run_status(Ok, Cancelled, true), RunStatus::Cancelled);
        assert_eq!(run_status(Cancelled, Cancelled, true), RunStatus::Cancelled);
        // Without a cancellation the outcomes alone decide.
        assert_eq!(run_status(Ok, Ok, false), RunStatus::Ok);
        assert_eq!(run_status(Ok, Error, false), RunStatus::Partial);
        assert_eq!(run_status(Timeout, Error, false), RunStatus::Failed);
    }
}
