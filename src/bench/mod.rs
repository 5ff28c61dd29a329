//! Benchmarks of the project's own, behind `duet bench` (results in docs/benchmarks.md).
//!
//! - [`streams`]: the load generator: C concurrent SSE streams against duet or an
//!   OpenAI-compatible upstream (the mock), with latency percentiles, errors and a fault mix.
//! - [`audit`]: how many records per second the audit writer sustains on a database.
//! - [`stats`]: exact percentiles.
//!
//! None of this runs in `cargo test` as a timed assertion: the numbers depend on the machine,
//! so they are measured by commands and scripts (`scripts/bench.sh`, `scripts/soak.sh`).

pub mod audit;
pub mod stats;
pub mod streams;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot create the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot write the results: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
