//! Serving: build the state, bind, serve until a signal, then shut down in order.
//!
//! Shutdown order: the token is cancelled (SIGINT/SIGTERM or a test), the listener stops
//! accepting, open runs get `SHUTDOWN_GRACE_S` to finish before they are cancelled (still
//! ending with `done`), the run tasks are awaited on the tracker, and only then does the
//! caller drain the audit queue and exit.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    api::{self, AppState},
    audit::AuditSink,
    config::{Config, Role},
    metrics::Metrics,
    orchestrator::{ModelSlot, Orchestrator},
    providers::{self, Provider},
};

/// Past the grace period, connections that still do not close (a client that stopped
/// reading) are dropped after this much more.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(5);

/// Errors that stop the service from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Provider(#[from] providers::BuildError),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Parts a server is built from; tests swap in their own providers and sink.
pub struct Parts {
    pub config: Config,
    pub flash: Arc<dyn Provider>,
    pub pro: Arc<dyn Provider>,
    pub sink: Arc<dyn AuditSink>,
    pub metrics: Metrics,
}

impl Parts {
    /// The providers the configuration names.
    pub fn from_config(config: Config, sink: Arc<dyn AuditSink>) -> Result<Parts, ServeError> {
        // One client for every upstream call: one connection pool, made once.
        let client = providers::http::client().map_err(providers::BuildError::from)?;
        Ok(Parts {
            flash: providers::build(&config.flash, &client)?,
            pro: providers::build(&config.pro, &client)?,
            metrics: Metrics::new()?,
            config,
            sink,
        })
    }
}

/// A server running on its own task.
pub struct Server {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub state: AppState,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds `config.bind_addr` (port 0 picks a free port) and starts serving.
    pub async fn start(parts: Parts) -> Result<Server, ServeError> {
        let addr = parts.config.bind_addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Server::start_on(listener, parts)
    }

    pub fn start_on(listener: TcpListener, parts: Parts) -> Result<Server, ServeError> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let config = Arc::new(parts.config);
        let slot = |role: Role, provider: Arc<dyn Provider>| ModelSlot {
            provider,
            limits: Orchestrator::limits_from(&config, role),
        };
        let orchestrator = Orchestrator::new(
            slot(Role::Flash, parts.flash),
            slot(Role::Pro, parts.pro),
            config.shutdown_grace,
            parts.sink,
            parts.metrics.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        let state = AppState {
            config: Arc::clone(&config),
            orchestrator,
            metrics: parts.metrics,
        };
        let app = api::router(state.clone());
        let grace = config.shutdown_grace + HARD_STOP_MARGIN;
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(token.clone().cancelled_owned())
                .into_future();
            tokio::pin!(serve);
            tokio::select! {
                result = &mut serve => result,
                () = async { token.cancelled().await; tokio::time::sleep(grace).await } => {
                    warn!("connections still open after the grace period; closing them");
                    Ok(())
                }
            }
        });
        info!(%addr, "listening");
        Ok(Server {
            addr,
            shutdown,
            tracker,
            state,
            task,
        })
    }

    /// Stops accepting, lets runs end (with `done`), and waits for every run task.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server has been told to stop and has drained.
    pub async fn wait(self) -> Result<(), ServeError> {
        let served = match self.task.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        };
        self.tracker.close();
        self.tracker.wait().await;
        served?;
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received; shutting down"),
        () = term => info!("SIGTERM received; shutting down"),
    }
}

/// `duet serve`: runs until a signal, then shuts down gracefully.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // The database writer replaces this sink in the audit issue; until then records are
    // kept in memory only.
    let sink = Arc::new(crate::audit::MemorySink::new());
    let server = Server::start(Parts::from_config(config, sink)?).await?;
    let token = server.shutdown.clone();
    tokio::spawn(async move {
        signal().await;
        token.cancel();
    });
    server.wait().await?;
    info!("stopped");
    Ok(())
}
