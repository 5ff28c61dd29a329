//! The command line: `duet [serve]`, and the sub-commands of later milestones.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "duet",
    version,
    about = "Two models, one stream, every run audited."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The settings of `duet serve`, shown by `duet serve --help`: all of them are environment
/// variables (or lines of a `.env` file in the working directory), so the help has to say
/// which exist. README.md, "Configuration", has the full table.
const SERVE_ENV_HELP: &str = "\
Settings come from environment variables, or a .env file in the working directory
(defaults in brackets; README.md, \"Configuration\", says more):

Listening and database
  BIND_ADDR [127.0.0.1:8080]    DATABASE_URL [sqlite://duet.db] (sqlite://PATH or postgres://...)
Models (each for FLASH_ and PRO_)
  FLASH_PROVIDER, PRO_PROVIDER [simulated]   simulated, gemini, openai or anthropic
  FLASH_MODEL, PRO_MODEL                     model name sent upstream
  FLASH_BASE_URL, PRO_BASE_URL               the provider's endpoint
  FLASH_API_KEY, PRO_API_KEY                 else GEMINI_API_KEY, OPENAI_API_KEY, ANTHROPIC_API_KEY
  FLASH_TIMEOUT_S, PRO_TIMEOUT_S [5, 45]     whole-call deadline
  FLASH_TTFT_TIMEOUT_S, PRO_TTFT_TIMEOUT_S   first-token deadline [unset]
  STALL_TIMEOUT_S [15]                       longest silence after the first token
  FLASH_PRICE_INPUT_PER_MTOK, FLASH_PRICE_OUTPUT_PER_MTOK, PRO_PRICE_INPUT_PER_MTOK,
  PRO_PRICE_OUTPUT_PER_MTOK                  USD per million tokens [unset: cost unknown]
  SIMULATED_FLASH_TTFT_S, SIMULATED_PRO_TTFT_S, SIMULATED_FLASH_TOKEN_S, SIMULATED_PRO_TOKEN_S
  UPSTREAM_HTTP2, UPSTREAM_STREAMS_PER_CONNECTION
Limits and clients
  MAX_QUERY_BYTES, MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT,
  SSE_KEEPALIVE_S, SHUTDOWN_GRACE_S, HEADER_READ_TIMEOUT_S, FIRST_REQUEST_TIMEOUT_S,
  HTTP2_IDLE_TIMEOUT_S, CLIENT_WRITE_TIMEOUT_S, RESUME_RETENTION_S, RESUME_STORE_MAX_BYTES,
  CORS_ALLOWED_ORIGINS, TRUSTED_PROXIES, SERVE_THREADS [0: the main runtime]
Access
  API_KEYS (comma-separated; unset: open), ADMIN_TOKEN, METRICS_TOKEN [unset: open],
  RATE_LIMIT_PER_MINUTE [0: off], RATE_LIMIT_BURST, AUTH_FAILURE_LIMIT, AUTH_FAILURE_WINDOW_S
  API_KEYS_FILE (TOML: named keys, their rate limits and daily budgets; SIGHUP reloads it)
Audit and fleet
  AUDIT_DEADLETTER_PATH, AUDIT_QUEUE_MAX_BYTES, AUDIT_BATCH_INTERVAL_MS [0..100],
  AUDIT_STORE_TEXT [full|none],
  AUDIT_RETENTION_DAYS [unset: keep], INSTANCE_ID, INSTANCE_LEASE_S
Logging
  LOG_FORMAT [json unless on a terminal], RUST_LOG [info]
Traces over OTLP (off unless an endpoint is set; docs/operations.md, \"Traces\")
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   http(s)://host:port
  OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL   [http/protobuf] or grpc
  OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TRACES_HEADERS     key=value,... (never logged)
  OTEL_SERVICE_NAME [duet], OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED [false],
  OTEL_BSP_MAX_QUEUE_SIZE [2048], OTEL_BSP_SCHEDULE_DELAY [5000 ms],
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE [512], OTEL_BSP_EXPORT_TIMEOUT [30000 ms]";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    #[command(after_help = SERVE_ENV_HELP)]
    Serve,
    /// Apply database migrations and exit; with --revert, roll them back instead; with
    /// --status, only say where the database stands.
    ///
    /// Rolling back a release: stop it, then run *its* binary (the newer one, the only one
    /// that knows how to undo its migrations) with `--revert --to N`, N being the newest
    /// migration of the release you go back to; then start that release
    /// (RUNBOOK_DUAL_MODEL.md, "Rolling back a release").
    Migrate {
        /// Revert instead of applying: by default only the newest applied migration (what
        /// the latest release added); with --to VERSION, every migration newer than VERSION.
        #[arg(long, conflicts_with = "status")]
        revert: bool,
        /// With --revert: the version to go back to (0 reverts all).
        #[arg(
            long,
            requires = "revert",
            value_name = "VERSION",
            value_parser = clap::value_parser!(i64).range(0..)
        )]
        to: Option<i64>,
        /// With --revert: go ahead even though the revert drops tables that hold rows (all
        /// the audit data, for `--to 0`). Without it such a revert changes nothing and says
        /// what it would drop.
        #[arg(long, requires = "revert")]
        yes: bool,
        /// Print the database's schema version and the newest this build knows; change
        /// nothing.
        #[arg(long)]
        status: bool,
    },
    /// Work with the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Serve the provider wire formats locally, for demos, tests and benchmarks.
    ///
    /// Gemini, OpenAI and Anthropic formats, stream and non-stream, with faults chosen per
    /// request by `[[mock:...]]` directives in the prompt (see docs/providers.md).
    MockProvider {
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Delay before the first token, in milliseconds.
        #[arg(long, default_value_t = 200)]
        ttft_ms: u64,
        /// Delay between tokens, in milliseconds.
        #[arg(long, default_value_t = 20)]
        token_ms: u64,
        /// Tokens per answer.
        #[arg(long, default_value_t = 19)]
        tokens: usize,
        /// HTTP/2 streams one connection may carry at once (what the mock announces as
        /// SETTINGS_MAX_CONCURRENT_STREAMS; 100 is common among real providers).
        #[arg(long, default_value_t = 100)]
        h2_max_streams: u32,
    },
    /// Exit 0 if the local service's /healthz answers 200, else 1 (a container health check).
    ///
    /// For images without curl or a shell (deploy/Dockerfile's HEALTHCHECK): one
    /// `GET /healthz` to the port of BIND_ADDR, on the loopback address when BIND_ADDR is
    /// 0.0.0.0 or `[::]`. Needs none of the service's other settings.
    Healthcheck {
        /// The address `duet serve` listens on [default: BIND_ADDR from the environment or
        /// .env, else 127.0.0.1:8080].
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
        timeout_s: f64,
    },
    /// Benchmarks: a load generator for SSE streams, and the audit writer's throughput
    /// (docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

/// A number of seconds above 0 and at most a day (what `Duration::from_secs_f64` takes).
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Open C concurrent SSE streams against a URL and report latency percentiles.
    Streams(StreamArgs),
    /// Write synthetic run records through the audit writer and report records/s.
    Audit(AuditBenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// `http://HOST:PORT/query/stream` for duet, `http://HOST:PORT/v1/chat/completions`
    /// for an OpenAI-compatible upstream such as `duet mock-provider`.
    #[arg(long)]
    pub url: String,
    #[arg(long, value_enum, default_value = "duet")]
    pub target: crate::devtools::bench::streams::Target,
    /// Streams open at once (one worker, and one connection, each).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Streams to run in all, warm-up included (default 1000 unless --duration is given).
    #[arg(long, short = 'n')]
    pub requests: Option<u64>,
    /// Stop starting streams after this many seconds (open ones finish).
    #[arg(long)]
    pub duration: Option<f64>,
    #[arg(long, default_value = "Write a haiku about the sea.")]
    pub query: String,
    /// Send duet a conversation instead of a question: 19 earlier user and assistant
    /// messages sharing about this many bytes, then the query as the 20th (0: a `query`).
    #[arg(long, default_value_t = 0)]
    pub history_bytes: usize,
    /// Ask duet for `delta` events (needed for time to first token per model).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub deltas: bool,
    /// Deadline of one stream, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Streams per worker left out of the latency figures (connection set-up).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Spread the workers' starts over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Kinds of stream and their weights, e.g. `normal:70,hang:5,error:5,midstream:5,stall:5,disconnect:5,slow:5`.
    #[arg(long, default_value = "normal:1")]
    pub mix: crate::devtools::bench::streams::Mix,
    /// Wait before reading each event, for the `slow` kind, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub slow_read_ms: u64,
    /// Write `RUN_ID OUTCOME` per started duet stream to this file.
    #[arg(long)]
    pub run_ids: Option<std::path::PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AuditBenchArgs {
    /// `sqlite://PATH` or `postgres://...` (tables are created; records are added).
    #[arg(long)]
    pub database_url: String,
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub records: u64,
    /// Bytes of answer text per model in each record.
    #[arg(long, default_value_t = 400)]
    pub text_bytes: usize,
    /// Dead-letter file for records the database refuses.
    #[arg(long, default_value = "bench-deadletter.jsonl")]
    pub deadletter: std::path::PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-insert dead-lettered records into DATABASE_URL, idempotently: the journal
    /// (`FILE.journal`, when there is one), then the dead-letter file FILE
    /// (AUDIT_DEADLETTER_PATH, or --file). Prints, per file read, how many records were
    /// written and skipped; fails, changing nothing, when neither file exists.
    Replay {
        /// Replay this dead-letter file (and its journal, `PATH.journal`, if present)
        /// instead of AUDIT_DEADLETTER_PATH's: e.g. one copied from another replica.
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
    },
    /// Delete the ended runs (and their traces) created more than DAYS days ago, in small
    /// batches; `running` rows are kept. Prints how many runs were deleted.
    Purge {
        /// Age in whole days; 0 deletes every ended run.
        #[arg(long, value_name = "DAYS")]
        older_than: u32,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every variable the configuration reads is named in `duet serve --help`, so a new
    /// setting cannot be added without it; the other commands' help stays as it was.
    #[test]
    fn serve_help_lists_every_variable_the_configuration_reads() {
        let sources = [
            include_str!("config/mod.rs"),
            include_str!("config/parse.rs"),
            include_str!("config/otel.rs"),
        ];
        let mut names = Vec::new();
        for source in sources {
            for quoted in source.split('"').skip(1).step_by(2) {
                let is_name = quoted.contains('_')
                    && quoted
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if is_name {
                    names.push(quoted);
                }
            }
        }
        assert!(names.len() > 40, "the scan found the variables: {names:?}");
        let mut cli = Cli::command();
        let serve = cli.find_subcommand_mut("serve").unwrap().render_long_help();
        let serve = serve.to_string();
        for name in names {
            assert!(serve.contains(name), "{name} missing from serve --help");
        }
        let migrate = cli
            .find_subcommand_mut("migrate")
            .unwrap()
            .render_long_help();
        assert!(!migrate.to_string().contains("DATABASE_URL ["));
        assert!(!cli.render_long_help().to_string().contains("BIND_ADDR"));
    }
}
