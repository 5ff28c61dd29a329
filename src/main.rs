//! The `duet` binary: parse the command line, load config, start logging, hand over.

use std::process::ExitCode;

use clap::Parser;
use duet::{
    cli::{AuditCommand, Cli, Command},
    config::Config,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("duet: {e}");
            return ExitCode::from(2);
        }
    };
    duet::telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => duet::server::serve(config).await.map_err(|e| e.to_string()),
            Command::Migrate { revert, to } => duet::audit::admin::migrate(&config, revert, to)
                .await
                .map(|report| println!("{report}"))
                .map_err(|e| e.to_string()),
            Command::Audit {
                command: AuditCommand::Replay,
            } => duet::audit::admin::replay(&config)
                .await
                .map(|report| println!("{report}"))
                .map_err(|e| e.to_string()),
            Command::MockProvider { .. } => {
                Err("`duet mock-provider` arrives with the real provider adapters".into())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet: {e}");
            ExitCode::FAILURE
        }
    }
}
