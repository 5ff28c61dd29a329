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
    /// Apply database migrations and exit.
    Migrate,
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
    /// Re-insert dead-lettered records, idempotently.
    Replay,
}
