//! Connection-level protection: caps on open connections (per client address and in all), the
//! deadline for a connection's first request, and the HTTP/2 idle timeout.
//!
//! Why here and not in hyper: hyper's HTTP/1.1 server cuts off a client that is slow to send
//! its headers (also between keep-alive requests), but its HTTP/2 server has no idle timeout
//! at all. A client that opens HTTP/2 connections and only answers PINGs would hold each one,
//! and its descriptor, for ever; enough of them and `accept` fails for everyone. So every
//! connection is served by [`drive`], which watches how many requests it has open (counted by
//! [`track`] from the moment hyper calls the app until the response body is dropped) and
//! closes it gracefully when it is not used.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use futures::future::OptionFuture;
use hyper_util::server::graceful::GracefulConnection;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// After a connection was told to close for want of use (GOAWAY on HTTP/2), how long it may
/// stay open with no request in flight before it is dropped: a client that ignores GOAWAY
/// (or never acknowledges its PING) must not keep the connection that way.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// At most one warning per this long about refused connections; the rest are counted in it.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Which cap refused a connection (the `reason` label of `duet_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    PerClient,
    Total,
}

impl Refused {
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Refused::PerClient => "per_client",
            Refused::Total => "total",
        }
    }
}

/// Why a connection was closed for want of use (`duet_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unused {
    /// No whole request within `FIRST_REQUEST_TIMEOUT_S` of the connection's start.
    FirstRequest,
    /// HTTP/2: no open stream for `HTTP2_IDLE_TIMEOUT_S`.
    Idle,
}

impl Unused {
    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Unused::FirstRequest => "first_request",
            Unused::Idle => "idle",
        }
    }
}

/// The open connections, per client address and in all.
pub(super) struct Caps {
    per_client: Option<usize>,
    total: Option<usize>,
    metrics: Metrics,
    state: Mutex<CapState>,
}

#[derive(Default)]
struct CapState {
    total: usize,
    /// Only addresses with a connection open: an entry goes with its last connection, so the
    /// map is never larger than the number of open connections.
    by_client: HashMap<IpAddr, usize>,
    /// Refusals since the last warning, and when that was.
    unlogged: u64,
    last_logged: Option<Instant>,
}

impl Caps {
    pub(super) fn new(
        per_client: Option<usize>,
        total: Option<usize>,
        metrics: Metrics,
    ) -> Arc<Caps> {
        // Zero, not absent, until the first refusal: alerts on `increase()` need the series.
        for reason in [Refused::PerClient, Refused::Total] {
            metrics
                .connections_refused_total
                .with_label_values(&[reason.as_str()]);
        }
        for reason in [Unused::FirstRequest, Unused::Idle] {
            metrics
                .connections_closed_total
                .with_label_values(&[reason.as_str()]);
        }
        Arc::new(Caps {
            per_client,
            total,
            metrics,
            state: Mutex::default(),
        })
    }

    /// Takes a place for a new connection from `peer`, or says which cap is full (counted and,
    /// at most every [`REFUSAL_LOG_EVERY`], logged). The place is given back when the returned
    /// [`Admitted`] is dropped, i.e. when the connection's task ends.
    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        // An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d; count it as a.b.c.d.
        let peer = peer.to_canonical();
        // A poisoned lock only means another thread panicked mid-update of plain counters;
        // keep counting rather than refuse everyone.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = state.by_client.get(&peer).copied().unwrap_or(0);
        let refused = if self.total.is_some_and(|cap| state.total >= cap) {
            Some(Refused::Total)
        } else if self.per_client.is_some_and(|cap| mine >= cap) {
            Some(Refused::PerClient)
        } else {
            None
        };
        if let Some(reason) = refused {
            self.metrics
                .connections_refused_total
                .with_label_values(&[reason.as_str()])
                .inc();
            state.unlogged += 1;
            let now = Instant::now();
            if state
                .last_logged
                .is_none_or(|at| now >= at + REFUSAL_LOG_EVERY)
            {
                warn!(
                    reason = reason.as_str(),
                    client = %peer,
                    refused = state.unlogged,
                    open = state.total,
                    "connections refused at a cap (count since the last such line)"
                );
                state.unlogged = 0;
                state.last_logged = Some(now);
            }
            return Err(reason);
        }
        state.total += 1;
        *state.by_client.entry(peer).or_insert(0) += 1;
        self.metrics.connections_open.inc();
        Ok(Admitted {
            caps: Arc::clone(self),
            peer,
        })
    }
}

/// One connection's place under the caps.
pub(super) struct Admitted {
    caps: Arc<Caps>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.caps.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.by_client.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                state.by_client.remove(&self.peer);
            }
        }
        drop(state);
        self.caps.metrics.connections_open.dec();
    }
}

/// What a connection is doing: requests open now, and whether it ever had one.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    open: usize,
    started: bool,
}

/// The requests in flight on one connection.
#[derive(Clone)]
pub(super) struct Activity {
    tx: Arc<watch::Sender<Load>>,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            tx: Arc::new(watch::Sender::new(Load::default())),
        }
    }

    fn enter(&self) -> InFlight {
        self.tx.send_modify(|load| {
            load.open += 1;
            load.started = true;
        });
        InFlight(Arc::clone(&self.tx))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// One request in flight; dropped with its response body (or with the handler's future when
/// the request is cancelled before it has a response).
struct InFlight(Arc<watch::Sender<Load>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .send_modify(|load| load.open = load.open.saturating_sub(1));
    }
}

/// The app, counting each request on `activity` until its response body is dropped: over
/// HTTP/2 that is when the stream ends or is reset, so a long event stream keeps its
/// connection in use however quiet it is.
pub(super) fn track<S, R>(
    service: S,
    activity: Activity,
) -> impl tower::Service<
    R,
    Response = axum::response::Response,
    Error = Infallible,
    Future = impl Future<Output = Result<axum::response::Response, Infallible>> + Send,
> + Clone
+ Send
where
    S: tower::Service<R, Response = axum::response::Response, Error = Infallible> + Clone + Send,
    S::Future: Send + 'static,
{
    tower::ServiceExt::map_future(service, move |future: S::Future| {
        // Counted from the call, not from the response: a handler still working (a run
        // starting, a database read) is use too.
        let in_flight = activity.enter();
        async move {
            let response = future.await?;
            Ok(response.map(|body| {
                Body::new(TrackedBody {
                    body,
                    _in_flight: in_flight,
                })
            }))
        }
    })
}

/// A response body that holds its request's place in [`Activity`].
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How [`drive`] treats a connection.
pub(super) struct Watch {
    pub activity: Activity,
    /// The first whole request must have come by then.
    pub first_request_by: Instant,
    /// Close after this long with no request open (HTTP/2); `None` leaves it to hyper
    /// (HTTP/1.1, whose header read timeout also runs between requests).
    pub idle: Option<Duration>,
    /// Server shutdown: close gracefully (open streams still end with `done`).
    pub stopping: CancellationToken,
    /// End of the grace period: drop the connection whatever it is doing.
    pub abort: CancellationToken,
    pub metrics: Metrics,
}

/// Serves `conn` to its end, closing it gracefully on shutdown or when it is not used (see
/// [`Watch`]), and dropping it if it stays open unused after that.
pub(super) async fn drive<C: GracefulConnection>(mut conn: Pin<&mut C>, watch: Watch) {
    let Watch {
        activity,
        first_request_by,
        idle,
        stopping,
        abort,
        metrics,
    } = watch;
    let mut unused = std::pin::pin!(unused(activity.tx.subscribe(), first_request_by, idle));
    // Made once the connection was told to close for want of use, which few are: in
    // place it would be part of every connection's task for the connection's life.
    let mut lingering = OptionFuture::from(None::<Pin<Box<_>>>);
    let mut closing = false;
    let mut closing_unused = false;
    loop {
        tokio::select! {
            // Connection errors (resets, timeouts) are the client's business, not ours.
            _ = conn.as_mut() => return,
            () = abort.cancelled() => return,
            () = stopping.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            reason = &mut unused, if !closing => {
                metrics
                    .connections_closed_total
                    .with_label_values(&[reason.as_str()])
                    .inc();
                debug!(reason = reason.as_str(), "closing an unused connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
                closing_unused = true;
                lingering = Some(Box::pin(idle_for(activity.tx.subscribe(), CLOSE_GRACE))).into();
            }
            Some(()) = &mut lingering, if closing_unused => return,
        }
    }
}

/// Resolves when the connection should close for want of use: no first request by
/// `first_request_by`, or then (when `idle` is set) no open request for `idle`.
async fn unused(
    mut rx: watch::Receiver<Load>,
    first_request_by: Instant,
    idle: Option<Duration>,
) -> Unused {
    let late = tokio::time::timeout_at(first_request_by, rx.wait_for(|l| l.started))
        .await
        .is_err();
    if late {
        return Unused::FirstRequest;
    }
    match idle {
        Some(idle) => {
            idle_for(rx, idle).await;
            Unused::Idle
        }
        None => std::future::pending().await,
    }
}

/// Resolves once no request has been open for `period` without a break.
async fn idle_for(mut rx: watch::Receiver<Load>, period: Duration) {
    loop {
        if rx.wait_for(|l| l.open == 0).await.is_err() {
            // The service is gone, so is the connection: nothing to watch.
            return std::future::pending().await;
        }
        if tokio::time::timeout(period, rx.wait_for(|l| l.open > 0))
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[tokio::test]
    async fn caps_count_per_address_and_in_all_and_give_places_back() {
        let metrics = Metrics::new().unwrap();
        let caps = Caps::new(Some(2), Some(3), metrics.clone());
        let a1 = caps.admit(ip(1)).unwrap();
        let _a2 = caps.admit(ip(1)).unwrap();
        assert_eq!(caps.admit(ip(1)).err(), Some(Refused::PerClient));
        let b1 = caps.admit(ip(2)).unwrap();
        assert_eq!(caps.admit(ip(3)).err(), Some(Refused::Total));
        drop(a1);
        let _a3 = caps.admit(ip(1)).unwrap();
        // The IPv4-mapped form of an address is the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        drop(b1);
        assert_eq!(caps.admit(mapped).err(), Some(Refused::PerClient));
        assert_eq!(metrics.connections_open.get(), 2);
        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"duet_connections_refused_total{reason="per_client"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"duet_connections_refused_total{reason="total"} 1"#));
        assert!(text.contains(r#"duet_connections_closed_total{reason="idle"} 0"#));
    }

    #[tokio::test]
    async fn no_caps_admit_everyone() {
        let caps = Caps::new(None, None, Metrics::new().unwrap());
        let held: Vec<_> = (0..1000).map(|_| caps.admit(ip(1)).unwrap()).collect();
        assert_eq!(held.len(), 1000);
    }
}
