//! Serving: build the state, bind, serve until a signal, then shut down in order.
//!
//! Shutdown order: the token is cancelled (SIGINT/SIGTERM or a test), the listener stops
//! accepting, open runs get `SHUTDOWN_GRACE_S` to finish before they are cancelled (still
//! ending with `done`), the run tasks are awaited on the tracker, and only then does the
//! caller drain the audit queue and exit.

mod connections;
mod startup;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ConnectInfo;
use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{error, info, warn};

use self::connections::{Activity, Caps, Unused, Watch};
use crate::workers::{Open, Workers};
use crate::{
    api::{self, AppState, Guard},
    audit::{self, AuditError, AuditSink, AuditWriter, Store, WriterOptions},
    clients::usage::{Metering, Usage},
    config::Config,
    domain::Role,
    metrics::Metrics,
    providers::{self, Provider},
    resume::Registry,
    run::{ModelSlot, Orchestrator},
};

/// Past the grace period, connections that still do not close (a client that stopped
/// reading) are dropped after this much more.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(5);

/// How long shutdown waits for the last spans to reach the collector.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for the audit queue to reach the database before dead-lettering
/// what is left: one full retry cycle (about 7 s) plus room for a large backlog.
const AUDIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

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
    #[error(transparent)]
    Audit(#[from] AuditError),
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
    /// The audit database behind `sink`, read by `/runs` and probed by `/readyz`.
    pub store: Option<Store>,
    /// Whether this process still holds its instance id (`/readyz`); `None` outside `serve`.
    pub instance: Option<Arc<audit::instance::IdClaim>>,
}

impl Parts {
    /// The providers the configuration names.
    pub fn from_config(config: Config, sink: Arc<dyn AuditSink>) -> Result<Parts, ServeError> {
        let pool = providers::pool::PoolConfig::from(&config);
        Ok(Parts {
            flash: providers::build(&config.flash, pool)?,
            pro: providers::build(&config.pro, pool)?,
            metrics: Metrics::new()?,
            config,
            sink,
            store: None,
            instance: None,
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
    /// The serving threads, when connections are served on them (`duet serve`).
    workers: Option<Arc<Workers>>,
}

impl Server {
    /// Binds `config.bind_addr` (port 0 picks a free port) and starts serving.
    pub async fn start(parts: Parts) -> Result<Server, ServeError> {
        let listener = bind(parts.config.bind_addr).await?;
        Server::start_on(listener, parts)
    }

    /// Serves on `listener`, connections on the caller's runtime.
    pub fn start_on(listener: TcpListener, parts: Parts) -> Result<Server, ServeError> {
        Server::start_serving(listener, parts, None)
    }

    /// Serves on `listener`, each connection (and the runs it starts) on one of `workers`'
    /// threads (see [`crate::workers`]); the rest stays on the caller's runtime. The threads
    /// are stopped once the server has drained.
    pub fn start_on_threads(
        listener: TcpListener,
        parts: Parts,
        workers: Workers,
    ) -> Result<Server, ServeError> {
        Server::start_serving(listener, parts, Some(Arc::new(workers)))
    }

    fn start_serving(
        listener: TcpListener,
        parts: Parts,
        workers: Option<Arc<Workers>>,
    ) -> Result<Server, ServeError> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let config = Arc::new(parts.config);
        let slot = |role: Role, provider: Arc<dyn Provider>| {
            let prices = config.model(role).prices;
            let priced = prices.input_per_mtok.is_some() && prices.output_per_mtok.is_some();
            // The configured names, as the provider was built from them: never what an
            // upstream answers with, so the series are fixed at start.
            let metrics = parts.metrics.model(
                role,
                provider.provider_name(),
                provider.model_name(),
                priced,
            );
            ModelSlot {
                provider,
                limits: Orchestrator::limits_from(&config, role),
                prices,
                metrics,
            }
        };
        let guard = Arc::new(Guard::new(&config, parts.store.as_ref()));
        let usage = Arc::new(Usage::new(
            parts.store.as_ref(),
            tracker.clone(),
            parts.metrics.clone(),
        ));
        // Every run's record passes the usage count on its way to the audit trail.
        let sink: Arc<dyn AuditSink> = Arc::new(Metering::new(
            parts.sink,
            Arc::clone(&usage),
            Arc::clone(guard.keys()),
        ));
        let orchestrator = Orchestrator::new(
            &config,
            slot(Role::Flash, parts.flash),
            slot(Role::Pro, parts.pro),
            Arc::clone(&sink),
            parts.metrics.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        spawn_housekeeping(&tracker, &shutdown, &guard, orchestrator.registry());
        let state = AppState {
            config: Arc::clone(&config),
            orchestrator,
            metrics: parts.metrics,
            guard,
            sink,
            usage,
            run_ends: match &parts.store {
                Some(audit::Store::Postgres(pool)) => Some(audit::notify::RunEnds::new(
                    pool.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                )),
                _ => None,
            },
            store: parts.store,
            instance: parts.instance,
        };
        let app = api::router(state.clone());
        let caps = Caps::new(
            config.max_connections_per_client,
            config.max_connections,
            state.metrics.clone(),
        );
        // On the tracker like every other task; `wait` also awaits it by its handle, first,
        // since the connections must drain before the runs are waited for.
        let task = tracker.spawn(accept_loop(
            listener,
            app,
            tracker.clone(),
            shutdown.clone(),
            caps,
            state.metrics.clone(),
            ConnectionSettings::of(&config, workers.clone()),
        ));
        info!(
            %addr,
            serving_threads = workers.as_ref().map_or(0, |w| w.len()),
            "listening"
        );
        Ok(Server {
            addr,
            shutdown,
            tracker,
            state,
            task,
            workers,
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
        // Already cancelled when the accept loop ended normally; if it died instead, the runs
        // and housekeeping must still be told to stop.
        self.shutdown.cancel();
        self.tracker.close();
        // Every run has ended by now unless one is stuck on something we do not control;
        // never let that keep the caller from draining the audit queue.
        if tokio::time::timeout(HARD_STOP_MARGIN, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some run tasks did not end in time; going on with the shutdown");
        }
        // The accept loop, the only other holder, has ended.
        if let Some(workers) = self.workers.and_then(Arc::into_inner) {
            workers.stop().await;
        }
        served?;
        Ok(())
    }
}

/// Periodic clean-up of per-client and per-run memory, stopped by the shutdown token.
fn spawn_housekeeping(
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    guard: &Arc<Guard>,
    registry: &Arc<Registry>,
) {
    let (guard, registry, token) = (Arc::clone(guard), Arc::clone(registry), shutdown.clone());
    tracker.spawn(async move {
        let mut sweep = tokio::time::interval(Registry::SWEEP_EVERY);
        let mut forget = tokio::time::interval(Guard::CLEANUP_EVERY);
        loop {
            tokio::select! {
                _ = sweep.tick() => registry.sweep(),
                _ = forget.tick() => guard.forget_idle_clients().await,
                () = token.cancelled() => break,
            }
        }
    });
}

/// The first bytes of an HTTP/2 connection with prior knowledge (h2c), RFC 9113 §3.4.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How the accept loop treats connections, from the configuration, and where it serves them.
struct ConnectionSettings {
    header_read_timeout: Duration,
    write_timeout: Duration,
    first_request_timeout: Duration,
    http2_idle_timeout: Duration,
    hard_stop: Duration,
    /// The serving threads; `None`: connections are served on the accept loop's runtime.
    workers: Option<Arc<Workers>>,
}

impl ConnectionSettings {
    fn of(config: &Config, workers: Option<Arc<Workers>>) -> Self {
        ConnectionSettings {
            header_read_timeout: config.header_read_timeout,
            write_timeout: config.client_write_timeout,
            first_request_timeout: config.first_request_timeout,
            http2_idle_timeout: config.http2_idle_timeout,
            hard_stop: config.shutdown_grace + HARD_STOP_MARGIN,
            workers,
        }
    }
}

/// Accepts connections until the token is cancelled, then lets open ones finish (each open
/// response ends when its run sends `done`), dropping stragglers after `hard_stop`.
///
/// A hand-written loop over hyper rather than `axum::serve`, for what `axum::serve` does
/// not expose: a header read timeout (slowloris), HTTP/2 settings, a write timeout on the
/// socket, surviving `EMFILE` without spinning, and the connection caps and idle deadlines
/// of `connections`.
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    tracker: TaskTracker,
    token: CancellationToken,
    caps: Arc<Caps>,
    metrics: Metrics,
    settings: ConnectionSettings,
) -> std::io::Result<()> {
    // Cancelled when the grace period is over: connections still open then (a client that
    // stopped reading) are dropped, which also ends any run still writing to them.
    let abort = CancellationToken::new();
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // Queue, never copy, the body's frames: a queued frame keeps its run's buffer budget
        // (run::STREAM_BUFFER_BYTES) until it is written, where a copy in hyper's
        // flat buffer would free it at once and let up to 400 KiB pile up per stalled stream.
        .writev(true)
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        // Pings find dead HTTP/2 peers whose streams would otherwise idle until a deadline.
        .keep_alive_interval(Some(Duration::from_secs(30)));
    // Shared, not cloned into each connection's task: a task lives as long as its stream.
    let (http1, http2) = (Arc::new(http1), Arc::new(http2));
    // The connection tasks alone (they also run on `tracker`), so that shutdown can wait for
    // the connections to drain without waiting for the audit or housekeeping tasks.
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning on accept.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = token.cancelled() => break,
        };
        // Over a cap: closed at once (dropping the socket), before it costs a task or a byte
        // of buffer. Counted and logged (rate-limited) by `admit`.
        let Ok(admitted) = caps.admit(peer.ip()) else {
            continue;
        };
        let first_request_by = tokio::time::Instant::now() + settings.first_request_timeout;
        // Small SSE frames must go out at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let service = TowerToHyperService::new(connections::track(service, activity.clone()));
        let (http1, http2) = (Arc::clone(&http1), Arc::clone(&http2));
        let watch = Watch {
            activity,
            first_request_by,
            idle: None,
            stopping: token.clone(),
            abort: abort.clone(),
            metrics: metrics.clone(),
        };
        let (write_timeout, http2_idle_timeout) =
            (settings.write_timeout, settings.http2_idle_timeout);
        // With serving threads, the socket is handed over as a plain one and registered
        // again on the thread that serves it: a tokio socket stays with the reactor it was
        // made on, and every event on it would wake the accept loop's runtime first.
        let (incoming, thread) = match &settings.workers {
            None => (Incoming::Here(stream), None),
            Some(workers) => match stream.into_std() {
                Ok(socket) => {
                    let (handle, open) = workers.pick();
                    (Incoming::Handed(socket, open), Some(handle.clone()))
                }
                Err(e) => {
                    warn!(error = %e, "cannot hand a connection to a serving thread");
                    continue;
                }
            },
        };
        let connection = connections.track_future(async move {
            let _admitted = admitted;
            let (stream, _open) = match incoming {
                Incoming::Here(stream) => (stream, None),
                Incoming::Handed(socket, open) => match tokio::net::TcpStream::from_std(socket) {
                    Ok(stream) => (stream, Some(open)),
                    Err(e) => {
                        warn!(error = %e, "cannot serve a connection on its serving thread");
                        return;
                    }
                },
            };
            // A client that sends nothing at all is cut off at its first-request deadline,
            // and does not hold up a shutdown (bytes already waiting still count).
            let sniff = tokio::time::timeout_at(first_request_by, opens_with_h2(&stream));
            let h2c = tokio::select! {
                biased;
                sniffed = sniff => match sniffed {
                    Ok(Ok(h2c)) => h2c,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        watch
                            .metrics
                            .connections_closed_total
                            .with_label_values(&[Unused::FirstRequest.as_str()])
                            .inc();
                        return;
                    }
                },
                () = watch.stopping.cancelled() => return,
            };
            // A client whose socket takes no byte for `write_timeout` is cut off. Its run
            // gives up on it after the same time (the event channel stays full), but without
            // this the connection would stay: hyper waits for the socket to drain, with no
            // timeout of its own, holding a descriptor and the buffered events until the peer
            // goes away. The client can reconnect with Last-Event-ID for what it missed.
            let mut io = tokio_io_timeout::TimeoutStream::new(stream);
            io.set_write_timeout(Some(write_timeout));
            let io = TokioIo::new(Box::pin(io));
            if h2c {
                let watch = Watch {
                    idle: Some(http2_idle_timeout),
                    ..watch
                };
                // Boxed: an HTTP/2 connection keeps h2's codec and handshake state inline,
                // more than an HTTP/1.1 connection's 656 bytes, and in place it would set
                // the size of every connection's task, the HTTP/1.1 ones (one per open
                // stream) included.
                let mut conn = Box::pin(http2.serve_connection(io, service));
                connections::drive(conn.as_mut(), watch).await;
            } else {
                // Pinned here and lent: given by value, `drive` (an async fn) would hold it
                // twice, as its argument and as its pinned local.
                let conn = std::pin::pin!(http1.serve_connection(io, service));
                connections::drive(conn, watch).await;
            }
        });
        match thread {
            Some(handle) => tracker.spawn_on(connection, &handle),
            None => tracker.spawn(connection),
        };
    }
    drop(listener);
    connections.close();
    let drained = tokio::time::timeout(settings.hard_stop, connections.wait()).await;
    abort.cancel();
    if drained.is_err() {
        warn!("connections still open after the grace period; closing them");
    }
    Ok(())
}

/// An accepted connection on its way to the task that serves it.
enum Incoming {
    /// Served on the accept loop's runtime.
    Here(tokio::net::TcpStream),
    /// Handed to a serving thread, counted there while it is open.
    Handed(std::net::TcpStream, Open),
}

/// Whether a new connection opens with the HTTP/2 preface. It looks with `MSG_PEEK`, so the
/// bytes stay in the socket for hyper. (hyper-util's automatic version detection reads them
/// and hands them back as a prefix instead; hyper's HTTP/1.1 read buffer then doubles from 8
/// to 16 KiB on its second read and keeps that size for the connection's life, 8 KiB more
/// for every open stream.) An HTTP/1.1 request differs from the preface within its first few
/// bytes, so one peek decides; only a client sending its first bytes in pieces makes it look
/// again.
async fn opens_with_h2(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut wait = Duration::from_millis(5);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            // Closed, or not the preface: HTTP/1.1, which answers or closes as fits.
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far. `peek` returns at once while any byte is waiting, so
        // give the rest a moment to arrive rather than spin, backing off so that a client
        // that sends one byte and stops costs a few dozen wakeups, not thousands.
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// SIGINT and SIGTERM (and SIGHUP), listened for from the moment this is made. Made before
/// the `listening` line is logged: a supervisor (or a test) that sends SIGTERM as soon as it
/// reads that line must get a graceful stop, not the default action, which kills the
/// process with runs and the audit queue still in it. SIGHUP's default action kills the
/// process too, so it is caught from the start as well, even when there is nothing to
/// reload.
pub struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM: shut down gracefully.
    Stop,
    /// SIGHUP: read the API key file again.
    Reload,
}

impl Signals {
    /// Installs the handlers now. One that cannot be installed is logged and never fires.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(error = %e, signal = name, "cannot listen for the signal");
                    None
                }
            };
            Self {
                int: listen(SignalKind::interrupt(), "SIGINT"),
                term: listen(SignalKind::terminate(), "SIGTERM"),
                hup: listen(SignalKind::hangup(), "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next signal.
    pub async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            async fn next(s: Option<&mut tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(self.int.as_mut()) => {
                    info!("SIGINT received; shutting down");
                    Signal::Stop
                }
                () = next(self.term.as_mut()) => {
                    info!("SIGTERM received; shutting down");
                    Signal::Stop
                }
                () = next(self.hup.as_mut()) => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            if let Err(e) = tokio::signal::ctrl_c().await {
                warn!(error = %e, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
            info!("SIGINT received; shutting down");
            Signal::Stop
        }
    }

    /// Resolves on the first SIGINT or SIGTERM; a SIGHUP meanwhile is logged and ignored
    /// (for processes with nothing to reload).
    pub async fn recv(mut self) {
        while self.next().await == Signal::Reload {
            info!("SIGHUP received; nothing to reload");
        }
    }
}

/// Binds `addr` (port 0 picks a free port).
async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// `duet serve`: opens and migrates the audit database, runs until a signal, shuts down
/// gracefully, then drains the audit queue before returning.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let signals = Signals::install();
    let store = Store::connect(&config.database_url).await?;
    store.migrate().await?;
    info!(
        backend = backend_name(&store),
        deadletter = %config.audit_deadletter_path.display(),
        "audit store ready"
    );
    let metrics = Metrics::new()?;
    // Bound before the instance claims its id: the default id carries the port, which is
    // only known once bound when BIND_ADDR asks for port 0. Connections that arrive
    // meanwhile wait in the listen queue until serving starts.
    let listener = bind(config.bind_addr).await?;
    let instance_id = match &config.instance_id {
        Some(id) => id.clone(),
        None => audit::instance::default_id(listener.local_addr()?.port()),
    };
    startup::log(&config, &instance_id);
    // Before the journal's replay: a record it puts back replaces the `interrupted` row.
    let instance = audit::instance::Instance::start(
        &store,
        instance_id.clone(),
        config.instance_lease,
        metrics.clone(),
    )
    .await?;
    // Records a crash left in the journal (see `audit::writer`): put back before new ones
    // arrive; what the database refuses moves to the dead-letter file.
    let journal = audit::deadletter::journal_path(&config.audit_deadletter_path);
    // Runs journaled at their start by a process now dead: on SQLite any (this process owns
    // the file, see `Instance::start`), on PostgreSQL this instance's earlier incarnation.
    let starts = audit::replay::Starts::OfDeadProcess {
        instance_id: &instance_id,
        any: matches!(store, Store::Sqlite(_)),
    };
    match audit::replay::replay_into(&store, &journal, &config.audit_deadletter_path, starts).await
    {
        Ok(r) if r == audit::replay::ReplayReport::default() => {}
        Ok(r) => {
            metrics.runs_interrupted_total.inc_by(r.interrupted);
            warn!(
                written = r.written,
                skipped = r.skipped,
                dead_lettered = r.kept,
                interrupted = r.interrupted,
                left_running = r.running,
                "replayed the audit journal a previous run left behind"
            );
        }
        Err(e) => error!(error = %e, "cannot replay the audit journal; run `duet audit replay`"),
    }
    let options = WriterOptions::new(&config.audit_deadletter_path)
        .with_queue_max_bytes(config.audit_queue_max_bytes)
        .with_batch_interval(config.audit_batch_interval)
        .with_instance_id(instance_id)
        .with_store_text(config.audit_store_text);
    // The writer gets a thread of its own, out of the streams' way (see
    // `WriterOptions::with_own_thread`). On PostgreSQL it writes through a pool of its own:
    // a connection's socket belongs to the runtime it was opened on, and this pool opens
    // its connections when the writer first asks, on the writer's thread, while the shared
    // pool's stay on this runtime for the API. Without it, at twice the load that saturates
    // this machine the writer's queue reached 6,435 of its 8,192 records
    // (docs/benchmarks.md, "One writer connection, one round trip").
    let writer = AuditWriter::start(
        Arc::new(store.for_writer(&config.database_url)?),
        options.with_own_thread(),
        metrics.clone(),
    )?;
    let purger = config
        .audit_retention_days
        .map(|days| audit::purge::Purger::start(store.clone(), days, metrics.clone()));
    // The writer counts into this registry, so the server must expose the same one.
    let config_threads = config.serve_threads;
    let started = Parts::from_config(config, Arc::new(writer.clone())).map(|parts| Parts {
        store: Some(store.clone()),
        instance: Some(instance.claim()),
        metrics,
        ..parts
    });
    let server = match started {
        Ok(parts) => match config_threads {
            0 => Server::start_on(listener, parts),
            n => Workers::start(n)
                .map_err(ServeError::from)
                .and_then(|workers| Server::start_on_threads(listener, parts, workers)),
        },
        Err(e) => Err(e),
    };
    let served = match server {
        Ok(server) => until_signal(server, signals).await,
        Err(e) => Err(e),
    };
    if let Some(purger) = purger {
        purger.stop().await;
    }
    // Every run has ended (the server waited on its tracker), so every record is queued.
    writer.shutdown(AUDIT_DRAIN_TIMEOUT).await;
    // Then the last spans (the runs' spans ended with the runs): a blocking wait on the
    // exporter's thread, bounded, off the runtime's workers.
    let _ = tokio::task::spawn_blocking(|| crate::telemetry::traces::shutdown(TRACE_FLUSH_TIMEOUT))
        .await;
    instance.stop().await;
    store.close().await;
    served?;
    info!("stopped");
    Ok(())
}

/// Serves until SIGINT or SIGTERM (or until something else stops the server), then drains;
/// reloads the API key file on each SIGHUP meanwhile. The signals are awaited here, beside
/// the server, rather than on a task of their own: nothing is left waiting for a signal once
/// the server has stopped.
async fn until_signal(server: Server, mut signals: Signals) -> Result<(), ServeError> {
    let token = server.shutdown.clone();
    let state = server.state.clone();
    let stopped = server.wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            served = &mut stopped => return served,
            signal = signals.next() => match signal {
                Signal::Stop => {
                    token.cancel();
                    return stopped.await;
                }
                Signal::Reload => reload_keys(&state).await,
            }
        }
    }
}

/// SIGHUP: puts the key file's keys in force, or keeps the keys in force and says why. Open
/// streams are not touched: each holds the client it started with. Logs names and counts,
/// never a key.
async fn reload_keys(state: &AppState) {
    let config = &state.config;
    match state.guard.keys().reload(config).await {
        Ok(None) => info!("SIGHUP received; nothing to reload (API_KEYS_FILE is not set)"),
        Ok(Some(names)) => info!(
            file = %config.api_keys_file.as_deref().unwrap_or(std::path::Path::new("")).display(),
            named_keys = names.len(),
            names = %names.join(","),
            "SIGHUP received; API_KEYS_FILE reloaded"
        ),
        Err(e) => error!(
            file = %e.path.display(),
            line = e.line,
            problem = %e.problem,
            "SIGHUP received; API_KEYS_FILE cannot be used, the keys in force are kept"
        ),
    }
}

/// The backend's name for logs: the URL itself may carry a password.
fn backend_name(store: &Store) -> &'static str {
    match store {
        Store::Sqlite(_) => "sqlite",
        Store::Postgres(_) => "postgres",
    }
}
