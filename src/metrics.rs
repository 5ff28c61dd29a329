//! Prometheus metrics: the families of contract §6 and §9, registered once in a private
//! registry.
//!
//! Labels are small closed sets (routes, roles, outcomes, error types), never user text or ids,
//! so cardinality stays bounded whatever clients send. The model families also carry the
//! `provider` and `model_name` of each role, which come from the configuration only (one pair
//! per role, fixed at start), never from an upstream response: a provider answering with
//! another model version makes no new series. Their label children are resolved once per role
//! at start ([`ModelMetrics`]), so a model call counts without hashing a label.

use std::sync::Arc;

use prometheus::{
    Counter, CounterVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    audit::{Deadline, Outcome},
    domain::Role,
    events::EventKind,
    providers::ErrorType,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub streams_active: IntGauge,
    pub model_latency_seconds: HistogramVec,
    pub model_ttft_seconds: HistogramVec,
    pub model_timeouts_total: IntCounterVec,
    pub model_errors_total: IntCounterVec,
    pub tokens_total: IntCounterVec,
    /// `duet_cost_usd_total{model,provider,model_name}`: USD spent at the configured prices,
    /// counted only for calls whose cost is known (a float counter).
    pub cost_usd_total: CounterVec,
    /// `duet_build_info{version}`: always 1; the version is this build's.
    pub build_info: IntGaugeVec,
    /// `duet_overhead_seconds`: what duet adds between an upstream chunk reaching the run and
    /// the event it makes leaving the SSE body for hyper (see [`crate::sse::OverheadProbe`]).
    pub overhead_seconds: Histogram,
    /// `duet_preview_agreement`: each run's agreement between the Flash and Pro answers
    /// ([`crate::agreement`]), observed once per run whose models both answered `ok`. No
    /// model labels: the pair is fixed per process by its configuration, and the model
    /// families (`duet_model_latency_seconds` and the others) name it.
    pub preview_agreement: Histogram,
    pub sse_events_total: IntCounterVec,
    pub client_disconnects_total: IntCounter,
    pub flash_skipped_total: IntCounter,
    pub audit_queue_depth: IntGauge,
    pub audit_writes_total: IntCounterVec,
    pub audit_write_seconds: Histogram,
    /// Bytes of the records in the audit queue (the queue is bounded by count and bytes).
    pub audit_queue_bytes: IntGauge,
    /// Records appended to the audit journal: written down before a retry, so that a crash
    /// during a database outage loses none of them.
    pub audit_journaled_total: IntCounter,
    /// 1 while `/readyz` would answer 200, 0 while it would answer 503.
    pub ready: IntGauge,
    /// Runs this process finalized as `interrupted` because the process running them died.
    pub runs_interrupted_total: IntCounter,
    /// Runs whose response (and id) went out before their `running` row was known to be
    /// committed: the row was dropped (queue backlogged, writes failing), its write stalled
    /// or failed, or the wait's bound passed. A crash can leave such a run without a row.
    pub start_rows_unconfirmed_total: IntCounter,
    /// Runs deleted by the `AUDIT_RETENTION_DAYS` purge (contract §10).
    pub audit_purged_total: IntCounter,
    pub streams_rejected_total: IntCounterVec,
    /// `duet_auth_failures_total{endpoint}`: wrong keys or tokens presented (`query`, `admin`).
    pub auth_failures_total: IntCounterVec,
    /// `duet_auth_throttled_total{endpoint}`: requests refused because their address
    /// presented too many wrong keys or tokens lately.
    pub auth_throttled_total: IntCounterVec,
    /// `duet_rate_limit_fallbacks_total{reason}`: requests whose rate limit this replica
    /// decided alone because the shared budget (PostgreSQL) could not be reached (`error`,
    /// `timeout`, or `backoff` while it recently failed).
    pub rate_limit_fallbacks_total: IntCounterVec,
    /// `duet_budget_fallbacks_total{reason}`: runs admitted without the daily-budget check
    /// because the shared usage (PostgreSQL) could not be reached (`error`, `timeout`).
    pub budget_fallbacks_total: IntCounterVec,
    /// Client connections open now (both protocols).
    pub connections_open: IntGauge,
    /// Connections closed at accept by a cap, by cap (`per_client`, `total`).
    pub connections_refused_total: IntCounterVec,
    /// Connections closed for want of use, by reason (`first_request`, `idle`).
    pub connections_closed_total: IntCounterVec,
    /// `duet_sse_events_total` per event name, resolved once: a delta is counted without a
    /// label hash or the vector's lock.
    events: EventCounters,
}

#[derive(Clone)]
struct EventCounters {
    start: IntCounter,
    delta: IntCounter,
    flash: IntCounter,
    pro: IntCounter,
    error: IntCounter,
    done: IntCounter,
}

/// Model latencies run from tens of milliseconds (Flash first tokens) to a minute (Pro).
const MODEL_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0,
];
/// duet's own part of a token's way: microseconds when the client keeps up, up to a tenth of a
/// second when a run waits for a slow reader.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];
/// Agreement is a number in [0, 1]: tenths; `le="1"` holds every run (identical answers too).
const AGREEMENT_BUCKETS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
/// The labels every model family starts with: the role, then its configured provider and model.
const MODEL_LABELS: [&str; 3] = ["model", "provider", "model_name"];
/// Audit batch writes take well under a millisecond on SQLite up to seconds during outages.
const AUDIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let sse_events_total = reg!(IntCounterVec::new(
            Opts::new(
                "duet_sse_events_total",
                "Server-sent events emitted, by event name."
            ),
            &["event"]
        )?);
        let by_name = |kind: EventKind| sse_events_total.with_label_values(&[kind.as_str()]);
        let events = EventCounters {
            start: by_name(EventKind::Start),
            delta: by_name(EventKind::Delta),
            flash: by_name(EventKind::Flash),
            pro: by_name(EventKind::Pro),
            error: by_name(EventKind::Error),
            done: by_name(EventKind::Done),
        };
        let metrics = Metrics {
            events,
            requests_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_requests_total",
                    "HTTP requests answered, by route, status and client (the name of the \
                     API key from API_KEYS_FILE; empty for no key or a key of API_KEYS)."
                ),
                &["route", "status", "client"]
            )?),
            streams_active: reg!(IntGauge::new(
                "duet_streams_active",
                "Runs in progress (event streams and /query calls)."
            )?),
            model_latency_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "duet_model_latency_seconds",
                    "Time from the start of a model call to its end, by outcome."
                )
                .buckets(MODEL_BUCKETS.to_vec()),
                &["model", "provider", "model_name", "outcome"]
            )?),
            model_ttft_seconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "duet_model_ttft_seconds",
                    "Time from the start of a model call to its first token."
                )
                .buckets(MODEL_BUCKETS.to_vec()),
                &MODEL_LABELS
            )?),
            model_timeouts_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_model_timeouts_total",
                    "Model calls ended by a deadline, by which deadline fired."
                ),
                &["model", "provider", "model_name", "kind"]
            )?),
            model_errors_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_model_errors_total",
                    "Failed model calls, by error type."
                ),
                &["model", "provider", "model_name", "error_type"]
            )?),
            tokens_total: reg!(IntCounterVec::new(
                Opts::new("duet_tokens_total", "Tokens reported by providers."),
                &["model", "provider", "model_name", "direction"]
            )?),
            cost_usd_total: reg!(CounterVec::new(
                Opts::new(
                    "duet_cost_usd_total",
                    "USD spent on model calls at the configured prices, counted only when known."
                ),
                &MODEL_LABELS
            )?),
            build_info: reg!(IntGaugeVec::new(
                Opts::new(
                    "duet_build_info",
                    "Always 1; the version label names this build of duet."
                ),
                &["version"]
            )?),
            overhead_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "duet_overhead_seconds",
                    "Time from an upstream chunk reaching duet to its event leaving for the client."
                )
                .buckets(OVERHEAD_BUCKETS.to_vec())
            )?),
            preview_agreement: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "duet_preview_agreement",
                    "Agreement of the Flash and Pro answers per run (0 = no word in common, \
                     1 = the same words), for runs where both answered ok."
                )
                .buckets(AGREEMENT_BUCKETS.to_vec())
            )?),
            sse_events_total,
            client_disconnects_total: reg!(IntCounter::new(
                "duet_client_disconnects_total",
                "Runs cancelled because the client went away."
            )?),
            flash_skipped_total: reg!(IntCounter::new(
                "duet_flash_skipped_total",
                "Flash calls cancelled because Pro answered first."
            )?),
            audit_queue_depth: reg!(IntGauge::new(
                "duet_audit_queue_depth",
                "Run records waiting for the audit writer."
            )?),
            audit_writes_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_audit_writes_total",
                    "Audit record writes, by outcome (ok, retry, deadletter)."
                ),
                &["outcome"]
            )?),
            audit_write_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "duet_audit_write_seconds",
                    "Time to write one batch of audit records."
                )
                .buckets(AUDIT_BUCKETS.to_vec())
            )?),
            audit_queue_bytes: reg!(IntGauge::new(
                "duet_audit_queue_bytes",
                "Approximate bytes of the run records waiting for the audit writer."
            )?),
            audit_journaled_total: reg!(IntCounter::new(
                "duet_audit_journaled_total",
                "Audit records written to the local journal because a database write failed."
            )?),
            runs_interrupted_total: reg!(IntCounter::new(
                "duet_runs_interrupted_total",
                "Runs finalized as interrupted by this process because the process running them died."
            )?),
            start_rows_unconfirmed_total: reg!(IntCounter::new(
                "duet_start_rows_unconfirmed_total",
                "Runs whose response went out before their running row was known to be committed."
            )?),
            audit_purged_total: reg!(IntCounter::new(
                "duet_audit_purged_total",
                "Runs deleted by this process because they were older than AUDIT_RETENTION_DAYS."
            )?),
            ready: reg!(IntGauge::new(
                "duet_ready",
                "1 while GET /readyz answers 200 (ready), 0 while it answers 503."
            )?),
            streams_rejected_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_streams_rejected_total",
                    "Requests refused before a run started, by reason."
                ),
                &["reason"]
            )?),
            auth_failures_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_auth_failures_total",
                    "Wrong API keys or admin tokens presented, by endpoint (query, admin)."
                ),
                &["endpoint"]
            )?),
            auth_throttled_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_auth_throttled_total",
                    "Requests refused because their address presented too many wrong keys or \
                     tokens lately, by endpoint (query, admin)."
                ),
                &["endpoint"]
            )?),
            rate_limit_fallbacks_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_rate_limit_fallbacks_total",
                    "Requests whose rate limit this replica decided alone because the shared \
                     budget could not be reached, by reason (error, timeout, backoff)."
                ),
                &["reason"]
            )?),
            budget_fallbacks_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_budget_fallbacks_total",
                    "Runs admitted without the daily-budget check because the shared usage \
                     could not be reached, by reason (error, timeout)."
                ),
                &["reason"]
            )?),
            connections_open: reg!(IntGauge::new(
                "duet_connections_open",
                "Client connections open now."
            )?),
            connections_refused_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_connections_refused_total",
                    "Client connections closed at accept by a cap (per_client, total)."
                ),
                &["reason"]
            )?),
            connections_closed_total: reg!(IntCounterVec::new(
                Opts::new(
                    "duet_connections_closed_total",
                    "Client connections closed for want of use (first_request, idle)."
                ),
                &["reason"]
            )?),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[crate::SERVICE_VERSION])
            .set(1);
        // Both endpoints show from the start (at 0), so alerts on a rate see the first failure.
        for endpoint in ["query", "admin"] {
            metrics.auth_failures_total.with_label_values(&[endpoint]);
            metrics.auth_throttled_total.with_label_values(&[endpoint]);
        }
        for reason in ["error", "timeout", "backoff"] {
            metrics
                .rate_limit_fallbacks_total
                .with_label_values(&[reason]);
        }
        for reason in ["error", "timeout"] {
            metrics.budget_fallbacks_total.with_label_values(&[reason]);
        }
        #[cfg(target_os = "linux")]
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// The model families' children for one role, resolved now: the role's configured
    /// `provider` and `model_name` (never an upstream's answer) label every series. `priced`:
    /// both of the role's prices are set, so its `duet_cost_usd_total` series exists (at 0);
    /// without them it never appears, rather than claiming that calls cost nothing.
    pub fn model(
        &self,
        role: Role,
        provider: &str,
        model_name: &str,
        priced: bool,
    ) -> ModelMetrics {
        let base = [role.as_str(), provider, model_name];
        let with = |last: &'static str| [base[0], base[1], base[2], last];
        let latency = |o: Outcome| {
            self.model_latency_seconds
                .with_label_values(&with(o.as_str()))
        };
        let timeouts = |d: Deadline| {
            self.model_timeouts_total
                .with_label_values(&with(d.as_str()))
        };
        let errors = |e: ErrorType| self.model_errors_total.with_label_values(&with(e.as_str()));
        let tokens =
            |direction: &'static str| self.tokens_total.with_label_values(&with(direction));
        ModelMetrics(Arc::new(ModelSeries {
            latency: [
                latency(Outcome::Ok),
                latency(Outcome::Timeout),
                latency(Outcome::Error),
                latency(Outcome::Cancelled),
            ],
            ttft: self.model_ttft_seconds.with_label_values(&base),
            timeouts: [
                timeouts(Deadline::Total),
                timeouts(Deadline::FirstToken),
                timeouts(Deadline::Stall),
            ],
            errors: ERROR_TYPES.map(errors),
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
            cost_usd: priced.then(|| self.cost_usd_total.with_label_values(&base)),
        }))
    }

    /// Counts one emitted event.
    pub fn sse_event(&self, event: EventKind) {
        let e = &self.events;
        match event {
            EventKind::Delta => e.delta.inc(),
            EventKind::Start => e.start.inc(),
            EventKind::Flash => e.flash.inc(),
            EventKind::Pro => e.pro.inc(),
            EventKind::Error => e.error.inc(),
            EventKind::Done => e.done.inc(),
        }
    }

    /// The text exposition of every family. Registration rules out most invalid metric data,
    /// but not all of it (a collector can still hand the encoder a family it refuses); then
    /// the scrape must fail loudly, not look like a service with no metrics.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

/// Every error type, in the order of `ModelSeries::errors`.
const ERROR_TYPES: [ErrorType; 6] = [
    ErrorType::Timeout,
    ErrorType::RateLimited,
    ErrorType::ProviderError,
    ErrorType::InvalidResponse,
    ErrorType::Cancelled,
    ErrorType::Internal,
];

/// One role's series of the model families (`duet_model_*`, `duet_tokens_total`,
/// `duet_cost_usd_total`), labelled with the role's configured provider and model name and
/// resolved once at start: counting a call is an atomic add, with no label hashing or lock.
/// Cheap to clone.
#[derive(Clone)]
pub struct ModelMetrics(Arc<ModelSeries>);

struct ModelSeries {
    /// By outcome: ok, timeout, error, cancelled (a skipped call is not timed: it never
    /// reaches its end).
    latency: [Histogram; 4],
    ttft: Histogram,
    /// By deadline: total, first_token, stall.
    timeouts: [IntCounter; 3],
    /// By [`ERROR_TYPES`].
    errors: [IntCounter; 6],
    input_tokens: IntCounter,
    output_tokens: IntCounter,
    /// `None` unless both of the role's prices are set.
    cost_usd: Option<Counter>,
}

impl ModelMetrics {
    /// A call ended after `seconds`.
    pub fn latency(&self, outcome: Outcome, seconds: f64) {
        let i = match outcome {
            Outcome::Ok => 0,
            Outcome::Timeout => 1,
            Outcome::Error => 2,
            Outcome::Cancelled => 3,
            Outcome::Skipped => return,
        };
        self.0.latency[i].observe(seconds);
    }

    /// A call's first token came after `seconds`.
    pub fn ttft(&self, seconds: f64) {
        self.0.ttft.observe(seconds);
    }

    /// A deadline ended a call.
    pub fn timeout(&self, deadline: Deadline) {
        let i = match deadline {
            Deadline::Total => 0,
            Deadline::FirstToken => 1,
            Deadline::Stall => 2,
        };
        self.0.timeouts[i].inc();
    }

    /// A call failed.
    pub fn error(&self, error_type: ErrorType) {
        let i = match error_type {
            ErrorType::Timeout => 0,
            ErrorType::RateLimited => 1,
            ErrorType::ProviderError => 2,
            ErrorType::InvalidResponse => 3,
            ErrorType::Cancelled => 4,
            ErrorType::Internal => 5,
        };
        self.0.errors[i].inc();
    }

    /// The token counts a provider reported.
    pub fn tokens(&self, input: Option<u64>, output: Option<u64>) {
        if let Some(n) = input {
            self.0.input_tokens.inc_by(n);
        }
        if let Some(n) = output {
            self.0.output_tokens.inc_by(n);
        }
    }

    /// A call's known cost in USD (never negative: prices are not).
    pub fn cost(&self, usd: f64) {
        if let Some(c) = &self.0.cost_usd {
            c.inc_by(usd);
        }
    }
}

/// A collector whose family the text encoder refuses (it has no name), registered into a
/// [`Metrics`] so that tests can see a scrape fail.
#[cfg(test)]
pub(crate) fn break_encoding(metrics: &Metrics) {
    use prometheus::{
        core::{Collector, Desc},
        proto::{Metric, MetricFamily},
    };
    struct Nameless(Desc);
    impl Collector for Nameless {
        fn desc(&self) -> Vec<&Desc> {
            vec![&self.0]
        }
        fn collect(&self) -> Vec<MetricFamily> {
            let mut family = MetricFamily::default();
            family.mut_metric().push(Metric::default());
            vec![family]
        }
    }
    let desc = Desc::new(
        "duet_broken".into(),
        "broken".into(),
        vec![],
        Default::default(),
    );
    metrics
        .registry
        .register(Box::new(Nameless(desc.unwrap())))
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_the_encoder_refuses_fails_the_render() {
        let metrics = Metrics::new().unwrap();
        assert!(metrics.render().unwrap().contains("duet_streams_active 0"));
        break_encoding(&metrics);
        let err = metrics.render().unwrap_err();
        assert!(err.to_string().contains("no name"), "{err}");
    }
}
