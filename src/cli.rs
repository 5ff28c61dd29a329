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
    MockProvider {
        #[arg(long, default_value_t = 9090)]
        port: u16,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-insert dead-lettered records (AUDIT_DEADLETTER_PATH) into DATABASE_URL,
    /// idempotently; prints how many were written and skipped.
    Replay,
}
