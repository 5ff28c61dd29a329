//! The `duet` binary: parse the command line, load config, start logging, hand over.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use duet::{
    audit::admin::{self, MigrateAction},
    cli::{AuditCommand, Cli, Command},
    config::{Config, LogFormat},
    devtools::{
        bench,
        mock::{self, MockConfig},
    },
};

// jemalloc instead of the system allocator: on the relay workload it spent about 10 % less CPU
// per run and held less memory per open stream than glibc's malloc (docs/benchmarks.md,
// "Issue 18"); mimalloc, tried earlier, held more.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::MockProvider {
        port,
        host,
        ttft_ms,
        token_ms,
        tokens,
        h2_max_streams,
    }) = cli.command
    {
        // The mock needs none of the service's configuration, so a half-written .env for
        // `serve` does not stop it.
        let log_format = Config::from_env().map_or(LogFormat::Pretty, |c| c.log_format);
        let _log = duet::telemetry::init(log_format);
        let config = MockConfig {
            ttft: Duration::from_millis(ttft_ms),
            token_interval: Duration::from_millis(token_ms),
            tokens,
            h2_max_streams,
        };
        return run(async move {
            mock::run((host, port).into(), config)
                .await
                .map_err(|e| format!("mock provider: {e}"))
        });
    }
    if let Some(Command::Healthcheck { addr, timeout_s }) = &cli.command {
        // Run by the container every few seconds: no configuration, no logging set-up,
        // one line on failure.
        let timeout = Duration::from_secs_f64(*timeout_s);
        // BIND_ADDR as `serve` reads it: the environment, then `.env`.
        if let Err(e) = duet::config::load_dotenv() {
            eprintln!("duet: {e}");
            return ExitCode::FAILURE;
        }
        let addr = addr.clone().unwrap_or_else(|| {
            std::env::var("BIND_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned())
        });
        return run(async move {
            let addr = duet::healthcheck::probe_addr(&addr).map_err(|e| e.to_string())?;
            duet::healthcheck::check(addr, timeout)
                .await
                .map_err(|e| e.to_string())
        });
    }
    if let Some(Command::Bench { command }) = cli.command {
        // Like the mock, a benchmark needs none of the service's configuration.
        duet::telemetry::init_stderr();
        return run(bench::run(command));
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("duet: {e}");
            return ExitCode::from(2);
        }
    };
    // Traces are the service's alone: `migrate` and `audit` make no runs.
    let serving = matches!(cli.command, None | Some(Command::Serve));
    let traces = config.traces.as_ref().filter(|_| serving);
    let _log = match duet::telemetry::init_with_traces(config.log_format, traces) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("duet: {e}");
            return ExitCode::from(2);
        }
    };
    run(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => duet::server::serve(config).await.map_err(|e| e.to_string()),
            Command::Migrate {
                revert,
                to,
                yes,
                status,
            } => {
                let action = match (status, revert) {
                    (true, _) => MigrateAction::Status,
                    (false, true) => MigrateAction::Revert { to, yes },
                    (false, false) => MigrateAction::Apply,
                };
                admin::migrate(&config, action)
                    .await
                    .map(|report| println!("{report}"))
                    .map_err(|e| e.to_string())
            }
            Command::Audit {
                command: AuditCommand::Replay { file },
            } => admin::replay(&config, file.as_deref())
                .await
                .map(|report| println!("{report}"))
                .map_err(|e| e.to_string()),
            Command::Audit {
                command: AuditCommand::Purge { older_than },
            } => duet::audit::admin::purge(&config, older_than)
                .await
                .map(|report| println!("{report}"))
                .map_err(|e| e.to_string()),
            // Handled above, before the service configuration is loaded.
            Command::MockProvider { .. } | Command::Bench { .. } | Command::Healthcheck { .. } => {
                Ok(())
            }
        }
    })
}

/// Runs the command on a new runtime and turns its result into the exit code.
fn run(command: impl Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("duet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet: {e}");
            ExitCode::FAILURE
        }
    }
}
