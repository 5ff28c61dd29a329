//! One model call of a run: the provider's stream under the role's deadlines (total,
//! first token, stall), retries of a retryable failure before the first token, deltas relayed
//! as they come, and the call's metrics and log line. What it returns, [`ModelResult`], is
//! everything the answer event and the record need.

use std::{future::Future, panic::AssertUnwindSafe, pin::Pin, time::Duration};

use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Limits, ModelSlot, emitter::Emitter, millis, quiet::Quiet};
use crate::{
    audit::Outcome,
    backoff::Backoff,
    cost,
    domain::Role,
    providers::{Completion, ErrorType, ModelRequest, Provider, ProviderError, ProviderEvent},
};

/// Retries before the first token, at most; each also has to fit in the model's deadline.
const MAX_RETRIES: u32 = 3;
/// The wait before a retry the provider gave no `Retry-After` for: 100 ms doubling to 2 s,
/// each a uniform wait in [nominal / 2, nominal].
const RETRY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 0.5);

/// Which deadline ended a model call (the `kind` label of `duet_model_timeouts_total`): the
/// record's own type, so the record keeps it as a field of its own.
pub use crate::audit::Deadline as TimeoutKind;

/// What a model call has produced so far.
#[derive(Default)]
pub(super) struct Progress {
    text: String,
    ttft: Option<Duration>,
}

/// How one model call ended, with everything the event and the record need.
#[derive(Debug)]
pub(super) struct ModelResult {
    pub(super) outcome: Outcome,
    pub(super) text: String,
    pub(super) completion: Completion,
    pub(super) error: Option<ProviderError>,
    pub(super) timeout: Option<TimeoutKind>,
    pub(super) latency: Duration,
    pub(super) ttft: Option<Duration>,
    /// What the call cost (`crate::cost::of_model`); only a completed call has usage.
    pub(super) cost_usd: Option<f64>,
    /// When the provider's last chunk (the one that finished the call) reached the run: the
    /// start of the answer event's `duet_overhead_seconds`.
    pub(super) finished_at: Option<Instant>,
}

impl ModelResult {
    pub(super) fn skipped(latency: Duration) -> Self {
        ModelResult {
            outcome: Outcome::Skipped,
            text: String::new(),
            completion: Completion::default(),
            error: None,
            timeout: None,
            latency,
            ttft: None,
            cost_usd: None,
            finished_at: None,
        }
    }

    pub(super) fn with_progress(self, progress: Progress) -> Self {
        ModelResult {
            text: progress.text,
            ttft: progress.ttft,
            ..self
        }
    }

    pub(super) fn cancelled(latency: Duration, reason: &str) -> Self {
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
pub(super) async fn drive(
    role: Role,
    slot: &ModelSlot,
    request: ModelRequest,
    emitter: &Emitter,
    progress: &mut Progress,
) -> ModelResult {
    let started = Instant::now();
    let limits = slot.limits;
    let deadline = started + limits.total;
    let outcome = {
        // Pinned here and selected by reference: moved into `select!` it took a second
        // place in this future's state.
        let attempt = std::pin::pin!(attempts(
            &*slot.provider,
            &request,
            limits,
            started,
            deadline,
            emitter,
            progress,
        ));
        // `timeout_at`, with its timer polled only when it fires (see `Quiet`): the attempt
        // is polled first, so an answer that ends as the deadline passes still counts.
        let total = std::pin::pin!(tokio::time::sleep_until(deadline));
        let mut total = Quiet::new(total);
        tokio::select! {
            biased;
            outcome = attempt => outcome,
            () = &mut total => Err(Failure::Timeout(TimeoutKind::Total)),
        }
    };
    let latency = started.elapsed();
    let text = std::mem::take(&mut progress.text);
    let ttft = progress.ttft;
    let metrics = &slot.metrics;
    let model = role.as_str();
    let result = match outcome {
        Ok((completion, finished_at)) => {
            metrics.tokens(
                completion.usage.input_tokens,
                completion.usage.output_tokens,
            );
            let cost_usd = cost::of_model(slot.prices, completion.usage);
            if let Some(usd) = cost_usd {
                metrics.cost(usd);
            }
            ModelResult {
                outcome: Outcome::Ok,
                text,
                completion,
                error: None,
                timeout: None,
                latency,
                ttft,
                cost_usd,
                finished_at: Some(finished_at),
            }
        }
        Err(Failure::Timeout(kind)) => {
            metrics.timeout(kind);
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
                cost_usd: None,
                finished_at: None,
            }
        }
        Err(Failure::Provider(error)) => {
            metrics.error(error.error_type);
            ModelResult {
                outcome: Outcome::Error,
                text,
                completion: Completion::default(),
                error: Some(error),
                timeout: None,
                latency,
                ttft,
                cost_usd: None,
                finished_at: None,
            }
        }
        Err(Failure::ClientGone) => ModelResult {
            text,
            ttft,
            ..ModelResult::cancelled(latency, "the client went away")
        },
    };
    metrics.latency(result.outcome, latency.as_secs_f64());
    if let Some(t) = ttft {
        metrics.ttft(t.as_secs_f64());
    }
    let _in_run = emitter.span.enter();
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

/// The attempts of one call, ending with the completion and when its last chunk reached the
/// run. Retries only before the first token: after it the client has seen text, and a second
/// answer would not continue the first.
async fn attempts(
    provider: &dyn Provider,
    request: &ModelRequest,
    limits: Limits,
    started: Instant,
    deadline: Instant,
    emitter: &Emitter,
    progress: &mut Progress,
) -> Result<(Completion, Instant), Failure> {
    let Progress { text, ttft } = progress;
    let role = request.role;
    let first_token_deadline = limits.first_token.map(|d| started + d);
    let mut retries = 0;
    loop {
        let started_call = {
            let _in_run = emitter.span.enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| provider.stream(request)))
        };
        let error = match started_call {
            Err(_) => panicked(),
            Ok(mut stream) => {
                // One timer per attempt, armed at the first-token deadline (if any) and, after
                // the first token, at the stall deadline. It is not re-armed per token: a token
                // only records its time, and when the timer fires it checks the real deadline
                // and sleeps on if tokens came since. A timer-wheel update per token per model
                // would cost more than the clock read. Without a first-token deadline it is
                // not polled (so not in the wheel at all) before the first token.
                let timer = std::pin::pin!(tokio::time::sleep_until(
                    first_token_deadline.unwrap_or(deadline)
                ));
                let mut timer = Quiet::new(timer);
                let mut last_token = Instant::now();
                loop {
                    let armed = ttft.is_some() || first_token_deadline.is_some();
                    // In the run's span up to the first token: taking a connection and
                    // sending the request may log. After it, a poll only relays tokens.
                    let cold = ttft.is_none();
                    let mut next = AssertUnwindSafe(stream.next()).catch_unwind();
                    let next = std::future::poll_fn(|cx| {
                        let _in_run = cold.then(|| emitter.span.enter());
                        Pin::new(&mut next).poll(cx)
                    });
                    let polled = tokio::select! {
                        biased;
                        polled = next => polled,
                        () = &mut timer, if armed => {
                            if ttft.is_none() {
                                return Err(Failure::Timeout(TimeoutKind::FirstToken));
                            }
                            let due = last_token + limits.stall;
                            if Instant::now() < due {
                                timer.get_mut().as_mut().reset(due);
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
                        Ok(Some(Ok(ProviderEvent::Finished(completion)))) => {
                            return Ok((completion, Instant::now()));
                        }
                        Ok(Some(Ok(ProviderEvent::Delta(delta)))) => {
                            let first = ttft.is_none() && !delta.is_empty();
                            if !delta.is_empty() {
                                // The one clock read per chunk: when it reached the run, for
                                // the first-token time and `duet_overhead_seconds`.
                                let arrived = Instant::now();
                                if first {
                                    *ttft = Some(arrived - started);
                                }
                                text.push_str(&delta);
                                if emitter.deltas {
                                    emitter
                                        .emit_delta(role, &delta, arrived)
                                        .await
                                        .map_err(|_| Failure::ClientGone)?;
                                }
                            }
                            // Silence counts from here, so time spent waiting on a slow client is
                            // not held against the model.
                            last_token = Instant::now();
                            if first {
                                timer.get_mut().as_mut().reset(last_token + limits.stall);
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
            .unwrap_or_else(|| RETRY_BACKOFF.jittered(retries));
        let resume_at = Instant::now() + backoff;
        if resume_at >= deadline || first_token_deadline.is_some_and(|at| resume_at >= at) {
            // Waiting would run past a deadline: report the real failure, not a timeout.
            return Err(Failure::Provider(error));
        }
        retries += 1;
        emitter.span.in_scope(|| {
            warn!(model = role.as_str(), retry = retries, backoff_ms = millis(backoff), detail = %error.detail, "retrying before first token");
        });
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
