//! duet answers one query with two language models at once: a fast Flash model whose answer
//! is a preview and a slower Pro model whose answer is final. It streams both to the client
//! as Server-Sent Events and keeps an audit record of every run.
//!
//! Where things live:
//! - [`config`]: environment variables (contract §2), validated once at start; a leaf.
//! - [`domain`]: the shared vocabulary that is not configuration: [`domain::Role`] and
//!   [`domain::Secret`].
//! - [`api`]: HTTP routes, request validation, JSON errors, `/runs` and `/readyz` (contract §3).
//! - [`clients`]: API keys, named or not, their rate limits, daily budgets and usage, and
//!   reloading the key file (contract §11).
//! - [`run`]: one run: both models at once, deadlines, ordering, cancellation, and
//!   the drop guard that always sends `done` and always hands over the record. `run/mod.rs`
//!   is its API and the loop over both models; `drive.rs` one model call with its deadlines
//!   and retries; `emitter.rs` sending events; `report.rs` the drop guard and the record.
//! - [`events`]: the event contract: [`events::EventKind`] (the event names) and each
//!   event's `data` shape.
//! - [`providers`]: the streaming provider abstraction and its implementations.
//! - [`resume`]: each run's events, kept for `Last-Event-ID` reconnects.
//! - [`sse`]: event framing and the keep-alive response body (contract §4).
//! - [`audit`]: run records, the database store, the background writer, the dead-letter
//!   file and replay (contract §5).
//! - [`cost`]: what a model call and a run cost in USD, from the configured prices.
//! - [`agreement`]: how far the Flash preview used the same words as the Pro answer.
//! - [`metrics`]: Prometheus families (contract §6).
//! - [`backoff`]: the jittered exponential backoff that model calls and the audit writer
//!   retry with.
//! - [`server`]: binding, serving, signals and graceful shutdown.
//! - [`workers`]: the serving threads, one single-threaded runtime per core, that client
//!   connections and their runs are served on.
//! - [`telemetry`]: logging setup, and traces over OTLP when an endpoint is configured.
//! - [`cli`]: the command line.
//! - [`healthcheck`]: `duet healthcheck`, the probe of `/healthz` for container images.
//! - [`devtools`]: `duet mock-provider` and `duet bench`; the service never imports it.

pub mod agreement;
pub mod api;
pub mod audit;
pub mod backoff;
pub mod cli;
pub mod clients;
pub mod config;
pub mod conversation;
pub mod cost;
pub mod devtools;
pub mod domain;
pub mod events;
pub mod healthcheck;
pub mod metrics;
pub mod providers;
pub mod resume;
pub mod run;
pub mod server;
pub mod sse;
pub mod telemetry;
pub mod workers;

/// This build's version, recorded in every run record.
pub const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");
