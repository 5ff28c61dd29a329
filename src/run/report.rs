//! The end of a run: [`RunGuard`], the drop guard that on every path (normal end, client
//! gone, shutdown, a panic) sends `done` through its reserved slot, closes the run's resume
//! log and builds and submits the run record; and the status rule of contract §4.

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use chrono::Utc;
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, oneshot},
    time::Instant,
};
use tracing::info;
use uuid::Uuid;

use super::{CancelReason, RunRequest, drive::ModelResult, emitter::Emitter, millis};
use crate::{
    agreement,
    audit::{AuditSink, ModelTrace, Outcome, RunRecord, RunStatus},
    cost,
    domain::Role,
    events::{DoneEvent, ErrorEvent, EventKind},
    metrics::Metrics,
    providers::{ErrorType, Provider, ProviderError},
    resume::{Owner, Registry},
    sse,
    telemetry::spans::RunSpan,
};

/// Reports the run when dropped, on every path: normal end, client gone, shutdown, panic.
pub(super) struct RunGuard {
    pub(super) emitter: Arc<Emitter>,
    /// The slot reserved for `done` when the run started: sending through it cannot block
    /// or fail for lack of room. `None` only if the receiver was gone before the run started.
    pub(super) done_permit: Option<mpsc::OwnedPermit<Bytes>>,
    pub(super) run_id: Uuid,
    pub(super) started: Instant,
    pub(super) created_at: chrono::DateTime<Utc>,
    pub(super) request: RunRequest,
    pub(super) flash_ref: OwnedModelRef,
    pub(super) pro_ref: OwnedModelRef,
    pub(super) flash: Option<ModelResult>,
    pub(super) pro: Option<ModelResult>,
    pub(super) cancelled: Option<CancelReason>,
    pub(super) sink: Arc<dyn AuditSink>,
    pub(super) metrics: Metrics,
    pub(super) record_tx: Option<oneshot::Sender<RunRecord>>,
    pub(super) registry: Arc<Registry>,
    /// The run's trace span (disabled while traces are off): ends with the guard.
    pub(super) trace: RunSpan,
    /// Released when the run is reported, freeing its place under `MAX_CONCURRENT_STREAMS`.
    pub(super) _permit: OwnedSemaphorePermit,
}

impl RunGuard {
    /// A model with no result when the run ends was cut off: by the client, by shutdown, or
    /// by a panic in the run itself (the only way to get here with no cancel reason).
    pub(super) fn unfinished(&self, role: Role) -> ModelResult {
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
                    EventKind::Error,
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
        // The run's log lines carry its span: the guard may be dropped outside any poll of
        // the run (a task cancelled at shutdown), so it enters the span itself.
        let emitter = Arc::clone(&self.emitter);
        let _in_run = emitter.span.enter();
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
        let flash = trace(&self.flash_ref, flash);
        let pro = trace(&self.pro_ref, pro);
        let cost_usd = cost::of_run(&[flash.cost_part(), pro.cost_part()]);
        // Once per run, both final texts known and every answer event sent; never per delta.
        let agreement = (flash.outcome == Outcome::Ok && pro.outcome == Outcome::Ok)
            .then(|| agreement::of(&flash.text, &pro.text));
        self.trace.end(status.as_str());
        let run_id = &self.emitter.run_id;
        let seq = self.emitter.seq.fetch_add(1, Ordering::Relaxed);
        let data = sse::encode_data(&DoneEvent {
            run_id,
            status,
            flash: flash.outcome,
            pro: pro.outcome,
            total_ms: millis(total),
            cost_usd,
            agreement,
        });
        let done = sse::frame(EventKind::Done, run_id, seq, &data);
        self.emitter
            .log
            .push(seq, EventKind::Done, done.clone(), data.len());
        self.registry.close(self.run_id, &self.emitter.log);
        if let Some(permit) = self.done_permit.take() {
            permit.send(done);
        }
        self.metrics.sse_event(EventKind::Done);
        if let Some(a) = agreement {
            self.metrics.preview_agreement.observe(a);
        }
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
            query: self.request.conversation.last_user().to_owned(),
            system: self.request.conversation.system().map(str::to_owned),
            messages: self
                .request
                .conversation
                .sent_as_messages()
                .then(|| self.request.conversation.to_messages()),
            params: (!self.request.params.is_empty()).then(|| self.request.params.clone()),
            status,
            total_ms: millis(total),
            service_version: crate::SERVICE_VERSION.to_owned(),
            flash,
            pro,
            cost_usd,
            agreement,
            events: self.emitter.log.to_events(),
            owner_fingerprint: self.emitter.log.owner().map(Owner::to_hex),
            client_id: self.request.client_id.as_deref().map(str::to_owned),
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
        cost_usd: result.cost_usd,
    }
}

/// Provider and model names of a role, kept by the run for its answer events and record.
pub(super) struct OwnedModelRef {
    pub(super) provider: String,
    pub(super) model: String,
}

impl OwnedModelRef {
    pub(super) fn of(p: &dyn Provider) -> Self {
        OwnedModelRef {
            provider: p.provider_name().to_owned(),
            model: p.model_name().to_owned(),
        }
    }
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
