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

use std::time::Duration;

use crate::cli::BenchCommand;

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

/// `duet bench …`: runs one benchmark and prints its report (a table, or JSON).
pub async fn run(command: BenchCommand) -> Result<(), String> {
    fn print(json: bool, table: &dyn std::fmt::Display, value: &impl serde::Serialize) {
        if json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("duet: cannot encode the report: {e}"),
            }
        } else {
            println!("{table}");
        }
    }
    // `from_secs_f64` panics on a negative or NaN value; a typo must be an error instead.
    fn secs(value: f64, flag: &str) -> Result<Duration, String> {
        Duration::try_from_secs_f64(value)
            .map_err(|_| format!("bench: {flag} {value} is not a duration in seconds"))
    }
    match command {
        BenchCommand::Streams(a) => {
            let options = streams::Options {
                requests: a.requests.or(if a.duration.is_none() {
                    Some(1000)
                } else {
                    None
                }),
                duration: a.duration.map(|d| secs(d, "--duration")).transpose()?,
                url: a.url,
                target: a.target,
                concurrency: a.concurrency,
                query: a.query,
                history_bytes: a.history_bytes,
                deltas: a.deltas,
                timeout: secs(a.timeout, "--timeout")?,
                warmup: a.warmup,
                ramp: secs(a.ramp, "--ramp")?,
                mix: a.mix,
                slow_read: Duration::from_millis(a.slow_read_ms),
                run_ids: a.run_ids,
            };
            let report = streams::run(options)
                .await
                .map_err(|e| format!("bench: {e}"))?;
            print(a.json, &report, &report);
        }
        BenchCommand::Audit(a) => {
            let report = audit::run(audit::Options {
                database_url: a.database_url,
                records: a.records,
                text_bytes: a.text_bytes,
                deadletter: a.deadletter,
            })
            .await
            .map_err(|e| format!("bench: {e}"))?;
            print(a.json, &report, &report);
        }
    }
    Ok(())
}
