//! Logging with `tracing`: pretty on a terminal, one JSON object per line otherwise; and,
//! when an OTLP endpoint is configured, traces (contract §9).
//!
//! - this file: the global subscriber, its log layer and its writer thread.
//! - [`traces`]: the OpenTelemetry pipeline (exporter, batch processor, its own runtime),
//!   installed only when traces are on, and its flush at shutdown.
//! - [`spans`]: the span tree of a run and the W3C `traceparent` in and out.
//!
//! Lines are written by a thread of their own, never by the runtime's workers: a log pipe
//! that stops draining (a stuck collector, a full disk) must not stall the streams. The
//! thread takes what is queued, writes it in one go and flushes, so a busy service makes one
//! write per batch of lines, not one per line. If it falls more than [`LOG_QUEUE_LINES`]
//! behind, new lines are dropped rather than waited for.

pub mod spans;
pub mod traces;

use std::io::{BufWriter, Stdout};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, filter::FilterExt, fmt, prelude::*};

use crate::config::{LogFormat, TracesConfig};

/// Lines that may wait for the writer thread before new ones are dropped (about 30 MB of
/// JSON lines at worst; normally the queue is empty).
pub const LOG_QUEUE_LINES: usize = 65_536;

/// The writer thread's handle: dropping it writes out what is queued and stops the thread.
/// Keep it until the process is done logging.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Installs the global subscriber, without traces. `RUST_LOG` filters as usual (default
/// `info`).
pub fn init(format: LogFormat) -> LogGuard {
    // Without a traces configuration nothing can fail.
    match init_with_traces(format, None) {
        Ok(guard) => guard,
        Err(e) => unreachable!("logging alone cannot fail: {e}"),
    }
}

/// Installs the global subscriber, and the OpenTelemetry layer when `traces` is given (see
/// [`traces`]). `RUST_LOG` filters the log lines only: it never turns spans off.
pub fn init_with_traces(
    format: LogFormat,
    traces: Option<&TracesConfig>,
) -> Result<LogGuard, traces::TracesError> {
    let pipeline = traces.map(traces::Pipeline::start).transpose()?;
    let stdout: BufWriter<Stdout> = BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("duet-log")
        .finish(stdout);
    // The filter is the log layer's own, not the subscriber's: `RUST_LOG=warn` must not
    // switch traces off. The trace spans are never log lines.
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if let Some(directive) = spans::no_logs() {
        filter = filter.add_directive(directive);
    }
    for directive in quiet_sdk(std::env::var("RUST_LOG").ok().as_deref()) {
        filter = filter.add_directive(directive);
    }
    let registry = tracing_subscriber::registry();
    let tracer = pipeline.as_ref().map(traces::Pipeline::tracer);
    // A second init (tests) is harmless: the first subscriber stays.
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer)
                    .with_filter(filter.and(quiet_http_clients())),
            )
            .with(tracer.map(traces::layer))
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_writer(writer)
                    .with_filter(filter.and(quiet_http_clients())),
            )
            .with(tracer.map(traces::layer))
            .try_init(),
    };
    if let (Some(pipeline), Ok(())) = (pipeline, installed) {
        // Only now, with the layer in place, do runs start making spans.
        pipeline.install();
    }
    Ok(LogGuard { _writer: guard })
}

/// The HTTP client libraries' debug and trace lines print the URLs they connect to, user
/// part and query included, where an OTLP endpoint or a provider's base URL may carry
/// credentials: those lines never reach the log, whatever `RUST_LOG` says (their info and
/// above still do).
fn quiet_http_clients<S>() -> impl tracing_subscriber::layer::Filter<S> {
    const LEAKY: [&str; 5] = ["reqwest", "hyper_util", "h2", "tonic", "opentelemetry"];
    tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::INFO
            || !LEAKY.iter().any(|t| {
                meta.target()
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '-', '_']))
            })
    })
}

/// Logging for tools whose standard output is their report (`duet bench`): warnings and
/// errors only by default, on standard error, so `--json` output stays parseable.
pub fn init_stderr() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
        .try_init();
}

/// The OpenTelemetry crates log each failed export themselves (a warning per batch, every
/// few seconds while a collector is down); duet logs that once a minute instead
/// (`traces::Exporter`). Their own lines are kept to errors, unless `RUST_LOG` names them.
fn quiet_sdk(rust_log: Option<&str>) -> Vec<tracing_subscriber::filter::Directive> {
    if rust_log.is_some_and(|v| v.contains("opentelemetry")) {
        return Vec::new();
    }
    [
        "opentelemetry=error",
        "opentelemetry_sdk=error",
        "opentelemetry-otlp=error",
    ]
    .iter()
    .filter_map(|d| d.parse().ok())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::quiet_sdk;

    #[test]
    fn the_sdks_own_lines_are_errors_only_unless_asked_for() {
        let directives: Vec<String> = quiet_sdk(Some("info"))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            directives,
            [
                "opentelemetry=error",
                "opentelemetry_sdk=error",
                "opentelemetry-otlp=error"
            ]
        );
        assert_eq!(quiet_sdk(None).len(), 3);
        assert!(quiet_sdk(Some("info,opentelemetry_sdk=debug")).is_empty());
    }
}
