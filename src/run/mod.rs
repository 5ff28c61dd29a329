//! One run: Flash and Pro at once, deadlines, ordering, cancellation, and the `done` guard.
//! This file is the public API ([`Orchestrator`] and what it takes and returns) and the run
//! task's `select!` loop over both models; the rest of a run lives beside it:
//! - `drive`: one model call, with its deadlines and its retries before the first token.
//! - `emitter`: numbering and sending a run's events under its channel and byte budget.
//! - `quiet`: `Quiet`, polling the futures a run waits on but nearly never gets
//!   (shutdown, deadlines) only once they are woken.
//! - `report`: the drop guard `RunGuard` that sends `done` and builds and submits the run
//!   record, and the status rule.
//!
//! The events themselves (names and `data` shapes) are the contract, in `crate::events`.
//!
//! Lifecycle (see DESIGN_DUAL_MODEL_AUDIT.md):
//! 1. [`Orchestrator::start`] makes the run id and a bounded channel, puts `start` in it and
//!    reserves one more slot for `done`, then spawns the run on the shared `TaskTracker`.
//! 2. The run task polls both model drivers in one `select!` loop. Each driver runs its
//!    provider stream under the model's total deadline (`timeout_at`), with the first-token
//!    and stall deadlines inside, and retries a retryable failure before the first token.
//! 3. Whatever way the task ends (both models done, Pro ok first, client gone, shutdown, a
//!    panic), its `RunGuard` is dropped: it sends `done` through the slot reserved in step 1,
//!    so `done` can neither be lost to a full channel nor block, and it submits the run record.
//!
//! Why a task and a channel rather than driving the models from the response body: the run
//! must finish and be audited even when the client is slow or gone, and the bounded channel is
//! the backpressure that keeps a slow reader from making us buffer without bound.

mod drive;
mod emitter;
mod quiet;
mod report;

use std::{
    sync::{Arc, atomic::AtomicU32},
    time::Duration,
};

use bytes::Bytes;
use chrono::Utc;
use futures::future::OptionFuture;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info_span;
use uuid::Uuid;

pub use self::drive::TimeoutKind;
pub(crate) use self::quiet::Quiet;
use self::{
    drive::{ModelResult, Progress, drive},
    emitter::Emitter,
    report::{OwnedModelRef, RunGuard},
};
use crate::{
    audit::{AuditSink, Outcome, RunRecord, StartWritten, StartedRun},
    config::{Config, Prices},
    conversation::{Conversation, RunParams},
    domain::{Role, Secret},
    events::{ErrorEvent, EventKind, ModelRef, StartEvent, StartModels},
    metrics::{Metrics, ModelMetrics},
    providers::{ErrorType, ModelRequest, Provider},
    resume::{Owner, Registry},
    sse::{self, OverheadProbe},
    telemetry::spans::{Incoming, ModelCall, ModelEnd, ModelSpan, RunSpan},
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

/// Deadlines of one role.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub total: Duration,
    pub first_token: Option<Duration>,
    pub stall: Duration,
}

/// One role's provider and deadlines.
#[derive(Clone)]
pub struct ModelSlot {
    pub provider: Arc<dyn Provider>,
    pub limits: Limits,
    /// The role's prices, for the cost of each call.
    pub prices: Prices,
    /// The role's series of the model metrics, resolved at start.
    pub metrics: ModelMetrics,
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub conversation: Arc<Conversation>,
    pub params: RunParams,
    pub deltas: bool,
    pub client_request_id: Option<String>,
    /// The name of the API key that started the run (`API_KEYS_FILE`), for the record's
    /// `client_id`; `None` without a key or for a key of `API_KEYS`.
    pub client_id: Option<Arc<str>>,
    /// The request's route and trace context, when traces are on.
    pub trace: Option<Incoming>,
}

/// A started run: its id, its encoded events (ending with `done`), and its record once ended.
pub struct RunHandle {
    pub run_id: Uuid,
    pub events: mpsc::Receiver<Bytes>,
    pub record: oneshot::Receiver<RunRecord>,
    /// Measures `duet_overhead_seconds` where the events leave: give it to the response body
    /// that reads `events` (`sse::EventBody::with_overhead`).
    pub overhead: Arc<OverheadProbe>,
    /// When the run's `running` row is committed: the API waits on it before the response
    /// (and with it the run's id) goes out.
    pub start_written: StartWritten,
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
    ) -> Result<RunHandle, NotStarted> {
        let inner = &self.inner;
        // A request whose body was still arriving when shutdown began would otherwise start
        // a run that the hard stop (grace + a margin) may cut before its `done`; refused,
        // its client retries elsewhere.
        if inner.shutdown.is_cancelled() {
            return Err(NotStarted::ShuttingDown);
        }
        let permit = Arc::clone(&inner.streams)
            .try_acquire_owned()
            .map_err(|_| NotStarted::AtCapacity)?;
        let run_id = Uuid::now_v7();
        let log = inner
            .registry
            .open(run_id, owner_key.map(|key| Owner::of(run_id, key)));
        let run_id_text = run_id.hyphenated().to_string();
        // +3: the `start` frame queued below and the slots reserved for `done` and for one
        // notice on the way out (`Emitter::notice`), so a full CHANNEL_CAPACITY stays
        // available to the run in between.
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY + 3);
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
        let start = sse::frame(EventKind::Start, &run_id_text, 0, &data);
        log.push(0, EventKind::Start, start.clone(), data.len());
        let _ = tx.try_send(start);
        let done_permit = tx.clone().try_reserve_owned().ok();
        let notice = std::sync::Mutex::new(tx.clone().try_reserve_owned().ok());
        inner.metrics.sse_event(EventKind::Start);
        inner.metrics.streams_active.inc();

        let overhead = OverheadProbe::new(inner.metrics.overhead_seconds.clone());
        let delta_prefixes = [
            sse::DeltaPrefix::new(&run_id_text, Role::Flash),
            sse::DeltaPrefix::new(&run_id_text, Role::Pro),
        ];
        // The run's span puts `run_id` on every log line of the run. It is entered where the
        // run may log (see `Emitter::span`), not around every poll of the run's task: that
        // was an enter and an exit per upstream chunk, for lines that are written a few times
        // per run.
        let span = info_span!(
            "run",
            run_id = %run_id,
            client_request_id = request.client_request_id.as_deref().unwrap_or(""),
        );
        let emitter = Arc::new(Emitter {
            tx,
            span,
            delta_prefixes,
            run_id: run_id_text,
            seq: AtomicU32::new(1),
            deltas: request.deltas,
            metrics: inner.metrics.clone(),
            log,
            write_timeout: inner.client_write_timeout,
            budget: Arc::new(Semaphore::new(STREAM_BUFFER_BYTES)),
            overhead: Arc::clone(&overhead),
            notice,
        });
        let created_at = Utc::now();
        // The run's `running` row (contract §8): a message to the audit writer's queue,
        // which returns at once; the writer writes it with its next batch, and says so.
        let start_written = inner.sink.started(StartedRun {
            run_id,
            client_request_id: request.client_request_id.clone(),
            created_at,
            query: request.conversation.last_user().into(),
            system: request.conversation.system().map(Into::into),
            conversation: request
                .conversation
                .sent_as_messages()
                .then(|| Arc::clone(&request.conversation)),
            params: (!request.params.is_empty()).then(|| request.params.clone()),
            owner_fingerprint: emitter.log.owner().map(Owner::to_hex),
            instance_id: None,
            client_id: request.client_id.clone(),
        });
        let trace = RunSpan::start(run_id, request.trace.as_ref());
        // Boxed: an async fn keeps its arguments twice in its state (as captured and as
        // local), and the guard is the largest of them; a pointer keeps every open run's
        // task about 1.8 KB smaller. The run reads its request from the guard, for the same
        // reason (280 bytes twice).
        let guard = Box::new(RunGuard {
            emitter: Arc::clone(&emitter),
            done_permit,
            run_id,
            started: Instant::now(),
            created_at,
            request,
            flash_ref: OwnedModelRef::of(&*inner.flash.provider),
            pro_ref: OwnedModelRef::of(&*inner.pro.provider),
            flash: None,
            pro: None,
            cancelled: None,
            sink: Arc::clone(&inner.sink),
            metrics: inner.metrics.clone(),
            record_tx: Some(record_tx),
            registry: Arc::clone(&inner.registry),
            trace,
            _permit: permit,
        });
        // The run's own future, not an `async` block around it: a wrapper would hold a second
        // copy of its state.
        inner.tracker.spawn(self.clone().run(guard, emitter));
        Ok(RunHandle {
            run_id,
            events: rx,
            record: record_rx,
            overhead,
            start_written,
        })
    }

    async fn run(self, mut guard: Box<RunGuard>, emitter: Arc<Emitter>) {
        let inner = &*self.inner;
        let request = &guard.request;
        // One span per model call, under the run's; ended as each call ends (see `end_span`).
        let model_span = |role| {
            let provider = &*self.slot(role).provider;
            let params = request.params.for_role(role);
            let call = ModelCall {
                provider: provider.provider_name(),
                model: provider.model_name(),
                max_tokens: params.max_tokens,
                temperature: params.temperature,
            };
            Some(guard.trace.model(role, guard.run_id, call))
        };
        let mut flash_span = model_span(Role::Flash);
        let mut pro_span = model_span(Role::Pro);
        let model_request = |role, span: &Option<ModelSpan>| ModelRequest {
            role,
            conversation: Arc::clone(&request.conversation),
            params: request.params.for_role(role),
            sampling: request.params.sampling.clone(),
            trace: span.as_ref().and_then(ModelSpan::headers),
        };
        // Text and first-token time live out here, not in the driver futures, so that a
        // cancelled model's partial answer still reaches the record after its future is gone.
        let mut flash_progress = Progress::default();
        let mut pro_progress = Progress::default();
        {
            // Each call on the heap, not in the run's task: a finished call's state (1.6 KB)
            // is freed when it ends instead of staying in the task for the whole run (Flash
            // ends long before Pro in most runs). In place, the run's state was 11.4 KB,
            // each call held twice (as built and as pinned); now it is 1.7 KB.
            let flash = Box::pin(drive(
                Role::Flash,
                &inner.flash,
                model_request(Role::Flash, &flash_span),
                &emitter,
                &mut flash_progress,
            ));
            let pro = Box::pin(drive(
                Role::Pro,
                &inner.pro,
                model_request(Role::Pro, &pro_span),
                &emitter,
                &mut pro_progress,
            ));
            let mut flash = OptionFuture::from(Some(flash));
            let mut pro = OptionFuture::from(Some(pro));
            let grace = inner.shutdown_grace;
            let token = inner.shutdown.clone();
            // Both are polled by every wake-up of the run (one per upstream chunk), and are
            // ready at most once: `Quiet` polls them only when they were woken.
            let shutdown = std::pin::pin!(async move {
                token.cancelled().await;
                tokio::time::sleep(grace).await;
            });
            let mut shutdown = Quiet::new(shutdown);
            let closed_tx = emitter.tx.clone();
            let client_gone = std::pin::pin!(closed_tx.closed());
            let mut client_gone = Quiet::new(client_gone);

            while guard.flash.is_none() || guard.pro.is_none() {
                tokio::select! {
                    // Flash first: when both end at the same instant the preview still goes
                    // out before the final answer, which the ordering rule allows.
                    biased;
                    Some(result) = &mut flash, if guard.flash.is_none() => {
                        flash = None.into();
                        end_span(&mut flash_span, &result);
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
                        pro = None.into();
                        end_span(&mut pro_span, &result);
                        if result.outcome == Outcome::Cancelled {
                            guard.pro = Some(result);
                            guard.cancelled = Some(CancelReason::ClientGone);
                            break;
                        }
                        if result.outcome == Outcome::Ok && guard.flash.is_none() {
                            // The preview has no use once the final answer is there: drop the
                            // Flash call now (closing its upstream request) and never send it.
                            flash = None.into();
                            let skipped = ModelResult::skipped(guard.started.elapsed());
                            end_span(&mut flash_span, &skipped);
                            guard.flash = Some(skipped);
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
                        emitter.emit_now(EventKind::Error, &ErrorEvent {
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
            let result = guard.unfinished(Role::Flash).with_progress(flash_progress);
            end_span(&mut flash_span, &result);
            guard.flash = Some(result);
        }
        if guard.pro.is_none() {
            let result = guard.unfinished(Role::Pro).with_progress(pro_progress);
            end_span(&mut pro_span, &result);
            guard.pro = Some(result);
        }
    }
}

/// Ends a model call's span with its result, when the call ends: before its answer is sent,
/// so the span times the model, not the client.
fn end_span(span: &mut Option<ModelSpan>, result: &ModelResult) {
    let Some(span) = span.take() else { return };
    let error = result.error.as_ref();
    span.finish(ModelEnd {
        outcome: result.outcome.as_str(),
        error_type: error.map(|e| e.error_type.as_str()),
        message: error.map(|e| e.message.as_str()),
        model_version: result.completion.model_version.as_deref(),
        finish_reason: result.completion.finish_reason.as_deref(),
        input_tokens: result.completion.usage.input_tokens,
        output_tokens: result.completion.usage.output_tokens,
    });
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

/// Why [`Orchestrator::start`] started no run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotStarted {
    #[error("the service is at its limit of concurrent streams")]
    AtCapacity,
    /// Shutdown has begun: no new run, whatever its request's timing.
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Why a run was cut off: its client went away, or the service shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelReason {
    ClientGone,
    Shutdown,
}

/// A duration in whole milliseconds, as events, logs and the record give them.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
