//! Logging with `tracing`: pretty on a terminal, one JSON object per line otherwise.
//!
//! Lines are written by a thread of their own, never by the runtime's workers: a log pipe
//! that stops draining (a stuck collector, a full disk) must not stall the streams. The
//! thread takes what is queued, writes it in one go and flushes, so a busy service makes one
//! write per batch of lines, not one per line. If it falls more than [`LOG_QUEUE_LINES`]
//! behind, new lines are dropped rather than waited for.

use std::io::{BufWriter, Stdout};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Lines that may wait for the writer thread before new ones are dropped (about 30 MB of
/// JSON lines at worst; normally the queue is empty).
pub const LOG_QUEUE_LINES: usize = 65_536;

/// The writer thread's handle: dropping it writes out what is queued and stops the thread.
/// Keep it until the process is done logging.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Installs the global subscriber. `RUST_LOG` filters as usual (default `info`).
pub fn init(format: LogFormat) -> LogGuard {
    let stdout: BufWriter<Stdout> = BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("duet-log")
        .finish(stdout);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_target(false).with_writer(writer))
            .try_init(),
    };
    LogGuard { _writer: guard }
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
