//! duet answers one query with two language models at once: a fast Flash model whose answer
//! is a preview and a slower Pro model whose answer is final. It streams both to the client
//! as Server-Sent Events and keeps an audit record of every run.
//!
//! Where things live:
//! - [`config`]: environment variables (contract §2), validated once at start.
//! - [`api`]: HTTP routes, request validation, JSON errors, `/runs` and `/readyz` (contract §3).
//! - [`orchestrator`]: one run: both models at once, deadlines, ordering, cancellation, and
//!   the drop guard that always sends `done` and always hands over the record.
//! - [`providers`]: the streaming provider abstraction and its implementations.
//! - [`resume`]: each run's events, kept for `Last-Event-ID` reconnects.
//! - [`sse`]: event encoding and the keep-alive response body (contract §4).
//! - [`audit`]: run records, the database store, the background writer, the dead-letter
//!   file and replay (contract §5).
//! - [`metrics`]: Prometheus families (contract §6).
//! - [`server`]: binding, serving, signals and graceful shutdown.
//! - [`telemetry`]: logging setup.
//! - [`cli`]: the command line.
//! - [`devtools`]: `duet mock-provider` and `duet bench`; the service never imports it.

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod devtools;
pub mod metrics;
pub mod orchestrator;
pub mod providers;
pub mod resume;
pub mod server;
pub mod sse;
pub mod telemetry;

/// This build's version, recorded in every run record.
pub const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");
