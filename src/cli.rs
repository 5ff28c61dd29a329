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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply database migrations and exit; with --revert, roll them back instead.
    Migrate {
        /// Revert instead of applying: by default only the newest applied migration (what
        /// the latest release added); with --to VERSION, every migration newer than VERSION
        /// (0 reverts all, dropping the audit tables and their data).
        #[arg(long)]
        revert: bool,
        /// With --revert: the version to go back to.
        #[arg(long, requires = "revert", value_name = "VERSION")]
        to: Option<i64>,
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
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-insert dead-lettered records (AUDIT_DEADLETTER_PATH) into DATABASE_URL,
    /// idempotently; prints how many were written and skipped.
    Replay,
}
