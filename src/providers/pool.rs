//! Upstream connections for one provider: its calls spread over as many HTTP/2 connections as
//! they need, none carrying more than `streams_per_connection` calls at once.
//!
//! Why: hyper's client puts every call to a host on one HTTP/2 connection and never
//! opens a second one; calls beyond the server's `SETTINGS_MAX_CONCURRENT_STREAMS` wait for a
//! free stream (hyperium/hyper#2197, #3623). Real providers negotiate HTTP/2 and typically
//! allow about 100 streams per connection, and a model answer holds its stream for seconds:
//! the 101st concurrent call would wait for the first to finish, and time out on its
//! first-token deadline instead. So each provider holds a list of clients (one client = one
//! connection to the host), counts the calls in flight on each, and gives a new call to the
//! first client with room, opening a new one when all are full.
//!
//! A client is built only when needed, so a quiet service holds one, and on tokio's blocking
//! pool, so no runtime worker waits on its set-up. Clients are never
//! dropped (an idle one keeps no connection past the pool's idle timeout), so their number
//! only grows to the peak need: `ceil(peak calls / streams_per_connection)`, capped.
//!
//! The clients are hyper-util's (the client reqwest wraps), used directly because reqwest
//! cannot set what an HTTP/1.1 connection holds: see [`build_client`]. Calls to plain
//! `http://` upstreams without prior knowledge (HTTP/1.1) go to duet's own client instead
//! ([`super::h1`], one per provider, shared by its slots), which the relaying task reads
//! itself. Requests are still made with reqwest's `RequestBuilder` ([`Upstream::requests`]),
//! which never sends anything; [`Lease::send`] does.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::{
    client::legacy::{
        self,
        connect::{Connected, Connection, HttpConnector},
    },
    rt::{TokioExecutor, TokioTimer},
};
use tracing::{info, warn};

use super::{h1, proxy::ProxyConnector};
use crate::config::Config;

/// How a provider's upstream is reached.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Speak HTTP/2 to `http://` upstreams without negotiation (`UPSTREAM_HTTP2`).
    pub http2_prior_knowledge: bool,
    /// Calls one connection carries at once before the next call goes to another one.
    /// `usize::MAX` for a single client (HTTP/1.1 upstreams: the client opens a connection
    /// per call in flight by itself).
    pub streams_per_connection: usize,
    /// Clients (connections per host) at most; past it calls share the least busy one.
    pub max_connections: usize,
}

impl PoolConfig {
    /// One client for every call, negotiating the protocol (HTTP/1.1 to `http://`
    /// upstreams): what tests and tools use.
    pub fn single() -> Self {
        PoolConfig {
            http2_prior_knowledge: false,
            streams_per_connection: usize::MAX,
            max_connections: 1,
        }
    }
}

impl From<&Config> for PoolConfig {
    /// Enough connections for every stream the service may hold, at
    /// `UPSTREAM_STREAMS_PER_CONNECTION` calls each.
    fn from(config: &Config) -> Self {
        let per = config.upstream_streams_per_connection;
        PoolConfig {
            http2_prior_knowledge: config.upstream_http2,
            streams_per_connection: per,
            max_connections: config.max_concurrent_streams.div_ceil(per),
        }
    }
}

/// Why the upstream clients could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("request builder: {0}")]
    Requests(#[from] reqwest::Error),
}

/// The HTTP client of one upstream connection (HTTP/2) or of all of them (HTTP/1.1).
pub type HttpClient = legacy::Client<Connector, reqwest::Body>;

/// TCP (through a proxy tunnel where the environment names one), then TLS for `https://`
/// upstreams, the whole of it within the connect timeout.
pub type Connector = ConnectTimeout<hyper_rustls::HttpsConnector<ProxyConnector>>;

/// The clients of one provider. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    /// The TLS configuration every client starts from (root store, crypto provider), built
    /// once: building it parses the ~150 web roots.
    tls: rustls::ClientConfig,
    /// Builds requests only (a reqwest client that never sends), for every connection.
    requests: reqwest::Client,
    /// The HTTP/1.1 client every slot shares, without prior knowledge.
    h1: Option<h1::Client>,
    /// Read on every call, written only to add a client. Never held across an await.
    slots: RwLock<Vec<Arc<Slot>>>,
}

struct Slot {
    client: HttpClient,
    /// Calls to `http://` upstreams without prior knowledge (HTTP/1.1): the same for every
    /// slot of the provider.
    h1: Option<h1::Client>,
    in_flight: AtomicUsize,
}

/// One call's place on a connection, given back when dropped (when the call's stream is).
pub struct Lease {
    slot: Arc<Slot>,
}

impl Lease {
    /// Sends a request on this lease's client: HTTP/1.1 to a plain `http://` upstream on
    /// duet's own client ([`h1`]), anything else on hyper's.
    pub async fn send(
        &self,
        request: http::Request<reqwest::Body>,
    ) -> Result<http::Response<UpstreamBody>, BoxError> {
        if let Some(h1) = &self.slot.h1
            && request.uri().scheme() == Some(&http::uri::Scheme::HTTP)
        {
            let response = h1.send(request).await?;
            return Ok(response.map(UpstreamBody::Own));
        }
        let response = self.slot.client.request(request).await?;
        Ok(response.map(UpstreamBody::Hyper))
    }
}

/// A response body from either client.
pub enum UpstreamBody {
    Hyper(hyper::body::Incoming),
    Own(h1::Body),
}

impl hyper::body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::Own(_) => hyper::body::SizeHint::default(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstream {
    /// Builds the TLS configuration and the first client now, so that a broken TLS setup
    /// fails at start.
    pub fn new(config: PoolConfig) -> Result<Self, ClientError> {
        let tls = tls_config()?;
        let requests = reqwest::Client::builder()
            // It never connects; its own TLS set-up would only parse the roots again.
            .use_preconfigured_tls(tls.clone())
            .build()?;
        let h1 = (!config.http2_prior_knowledge)
            .then(|| h1::Client::new(tcp_connector(), CONNECT_TIMEOUT));
        let first = Slot {
            client: build_client(config.http2_prior_knowledge, &tls),
            h1: h1.clone(),
            in_flight: AtomicUsize::new(0),
        };
        Ok(Upstream {
            inner: Arc::new(Inner {
                config: PoolConfig {
                    streams_per_connection: config.streams_per_connection.max(1),
                    max_connections: config.max_connections.max(1),
                    ..config
                },
                tls,
                requests,
                h1,
                slots: RwLock::new(vec![Arc::new(first)]),
            }),
        })
    }

    /// What requests are built with (`client.post(url)…`); it sends nothing itself: a
    /// [`Lease`] sends them.
    pub fn requests(&self) -> &reqwest::Client {
        &self.inner.requests
    }

    /// A place for one call: on the first connection with room, else on a new one.
    ///
    /// Building a client (its connector and TLS connector) is blocking work, so it runs on
    /// tokio's blocking pool, never on a runtime worker that is driving streams. It is built
    /// before taking the write lock, which every call's `lease` would otherwise wait on
    /// meanwhile.
    pub async fn lease(&self) -> Lease {
        let inner = &*self.inner;
        if let Some(lease) = inner.try_existing() {
            return lease;
        }
        // All full: add a client, unless another call just did or the cap is reached.
        let built = if inner.has_room() {
            let http2 = inner.config.http2_prior_knowledge;
            let tls = inner.tls.clone();
            match tokio::task::spawn_blocking(move || build_client(http2, &tls)).await {
                Ok(client) => Some(client),
                Err(e) => {
                    warn!(error = %e, "building another upstream client failed");
                    None
                }
            }
        } else {
            None
        };
        inner.place(built)
    }

    /// Calls in flight on each connection, in the order they were opened.
    pub fn in_flight(&self) -> Vec<usize> {
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .map(|s| s.in_flight.load(Ordering::Acquire))
            .collect()
    }
}

impl Inner {
    fn try_existing(&self) -> Option<Lease> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        first_with_room(&slots, self.config.streams_per_connection)
    }

    fn has_room(&self) -> bool {
        self.slots
            .read()
            .map_or(true, |s| s.len() < self.config.max_connections)
    }

    /// Places a call once every connection was full: on one that freed up meanwhile, else on
    /// `built` (a new client) if the cap allows, else on the least busy one.
    fn place(&self, built: Option<HttpClient>) -> Lease {
        let per = self.config.streams_per_connection;
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = first_with_room(&slots, per) {
            return lease;
        }
        if let Some(client) = built.filter(|_| slots.len() < self.config.max_connections) {
            let slot = Arc::new(Slot {
                client,
                h1: self.h1.clone(),
                in_flight: AtomicUsize::new(0),
            });
            slots.push(Arc::clone(&slot));
            info!(
                connections = slots.len(),
                streams_per_connection = per,
                "upstream connection pool grows"
            );
            return Lease::take(slot);
        }
        // At the cap (or out of resources): the least busy connection; hyper queues the
        // call there until a stream frees up.
        let slot = slots
            .iter()
            .min_by_key(|s| s.in_flight.load(Ordering::Acquire))
            .map(Arc::clone)
            .unwrap_or_else(|| unreachable!("a pool always holds its first client"));
        Lease::take(slot)
    }
}

/// Takes a place on the first slot with fewer than `per` calls, atomically (two calls
/// racing for the last place cannot both get it).
fn first_with_room(slots: &[Arc<Slot>], per: usize) -> Option<Lease> {
    slots.iter().find_map(|slot| {
        slot.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < per).then_some(n + 1)
            })
            .ok()
            .map(|_| Lease {
                slot: Arc::clone(slot),
            })
    })
}

impl Lease {
    fn take(slot: Arc<Slot>) -> Lease {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        Lease { slot }
    }
}

/// Sent with every upstream call.
pub const USER_AGENT: &str = concat!("duet/", env!("CARGO_PKG_VERSION"));

/// The HTTP/2 receive window of one upstream call.
const UPSTREAM_STREAM_WINDOW: u32 = 32 * 1024;

/// What one read from an HTTP/1.1 upstream connection takes at most, and what the
/// connection's read buffer holds between reads.
///
/// hyper's default is adaptive: 8 KiB reserved at the first read, grown (to 16 KiB and up)
/// when a read finds it part-used, and never given back while the connection lives; every
/// open run holds its upstream connections as long as its answers last. A model's stream does
/// not need that: one SSE event of a token is 100–400 bytes and the upstream writes each as it
/// comes, so a read finds a few hundred bytes (about 300 against the mock), rarely more than a
/// couple of KiB even after a stall. 2 KiB takes five or more such events in one read; larger
/// events (a Gemini thought signature, an inline image) arrive over more reads, and the
/// response head still grows the buffer as far as it needs (up to hyper's 400 KiB limit), so
/// nothing that was accepted before is refused now.
///
/// Why 2 KiB and not 4: hyper reads into the front of the buffer again once a chunk is
/// consumed, so what is resident is the pages it writes, not what it reserves, and a 4 KiB
/// buffer kept about as many pages as the adaptive one; 2 KiB buffers share pages. Measured
/// per open run (docs/benchmarks.md, issue 18, "Memory per open run over HTTP/1.1"):
/// adaptive 60.3 KiB, 4 KiB 59.6, 2 KiB 54.6, with no more instructions per run (callgrind:
/// a read rarely finds more than one event).
pub const HTTP1_READ_BUF_BYTES: usize = 2 * 1024;

/// Where the connect timeout starts and ends: TCP and TLS both.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS configuration of every upstream client, as reqwest builds it: the Mozilla roots
/// of `webpki-roots` (no system store), ring, TLS 1.2 and 1.3.
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    tls_config_trusting(roots)
}

/// [`tls_config`] with other roots (the tests' own certificate).
fn tls_config_trusting(
    roots: rustls::RootCertStore,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One HTTP client: pooled connections (HTTP/2 when the upstream offers it over TLS, by
/// ALPN), a connect timeout so an unreachable upstream fails fast and can be retried, and no
/// overall timeout (the orchestrator's deadlines bound every call).
///
/// With `http2_prior_knowledge` (`UPSTREAM_HTTP2=1`) plain `http://` upstreams are spoken to
/// in HTTP/2 from the first byte, so calls to one upstream are streams on shared connections:
/// a file descriptor per connection instead of one per call in flight, which is what lets one
/// process hold more than about 6,000 runs under a 20,000-descriptor limit. It is off by
/// default because an HTTP/1.1-only upstream (most local servers) then fails.
///
/// The settings are reqwest's (which duet used until issue 18) plus
/// [`HTTP1_READ_BUF_BYTES`]; the proxy settings of the environment (`HTTPS_PROXY` and the
/// like), which reqwest read by itself, through [`ProxyConnector`].
pub fn build_client(http2_prior_knowledge: bool, tls: &rustls::ClientConfig) -> HttpClient {
    let tcp = tcp_connector();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    // ALPN: `h2` only with prior knowledge (as reqwest offers), else `h2` then `http/1.1`.
    let https = if http2_prior_knowledge {
        https.enable_http2().wrap_connector(tcp)
    } else {
        https.enable_http1().enable_http2().wrap_connector(tcp)
    };
    let mut builder = legacy::Client::builder(TokioExecutor::new());
    if http2_prior_knowledge {
        builder
            .http2_only(true)
            // Pings find a dead upstream connection that would otherwise hold every call
            // multiplexed on it until their deadlines.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true);
    }
    builder
        // What an HTTP/2 upstream may send for one call before duet reads it. hyper's default
        // (2 MiB a stream) let a run whose client stopped reading hold up to 2 MiB of each
        // model's answer in the connection's read buffers; at 32 KiB the upstream waits
        // instead. A reading run is not slowed: the window comes back as it reads, and 32 KiB
        // a round trip is far above any model's token rate.
        .http2_initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
        .http1_read_buf_exact_size(HTTP1_READ_BUF_BYTES)
        // Timers for the pool's idle timeout and HTTP/2 pings: without them hyper-util
        // keeps idle connections forever and sends no pings.
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(ConnectTimeout {
            inner: https,
            after: CONNECT_TIMEOUT,
        })
}

/// TCP connections to an upstream, or through the proxy the environment names for it.
fn tcp_connector() -> ProxyConnector {
    let mut tcp = HttpConnector::new();
    // `https://` goes through the TLS connector on top.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_keepalive(Some(Duration::from_secs(30)));
    tcp.set_nodelay(true);
    ProxyConnector::from_env(tcp)
}

/// A connector whose connections fail when not made within `after`, TLS handshake
/// included (hyper's TCP connector times out the TCP connect only), as reqwest's
/// `connect_timeout` does.
#[derive(Clone)]
pub struct ConnectTimeout<C> {
    inner: C,
    after: Duration,
}

/// The connect timeout passed.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimedOut(Duration);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C, T> tower::Service<Uri> for ConnectTimeout<C>
where
    C: tower::Service<Uri, Response = MaybeHttpsStream<T>>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
    T: 'static,
{
    type Response = UpstreamIo<T>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo<T>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let after = self.after;
        Box::pin(async move {
            match tokio::time::timeout(after, connecting).await {
                Ok(connected) => connected.map(UpstreamIo::from).map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimedOut(after)) as BoxError),
            }
        })
    }
}

/// An upstream connection as the client holds it: plain, or TLS with its state boxed.
///
/// hyper-rustls's own stream type keeps rustls's connection state inline (about 1 KB), and
/// hyper keeps the stream inline in each connection's task, so every plain `http://`
/// connection (a local model server, the benchmarks' mock) would carry the size of a TLS one
/// for its whole life. One more pointer to follow per read on a TLS connection, whose
/// decryption costs far more.
pub enum UpstreamIo<T> {
    Plain(T),
    Tls(Box<MaybeHttpsStream<T>>),
}

impl<T> std::fmt::Debug for UpstreamIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            UpstreamIo::Plain(_) => "Plain(..)",
            UpstreamIo::Tls(_) => "Tls(..)",
        })
    }
}

impl<T> From<MaybeHttpsStream<T>> for UpstreamIo<T> {
    fn from(stream: MaybeHttpsStream<T>) -> Self {
        match stream {
            MaybeHttpsStream::Http(plain) => UpstreamIo::Plain(plain),
            tls @ MaybeHttpsStream::Https(_) => UpstreamIo::Tls(Box::new(tls)),
        }
    }
}

impl<T> Connection for UpstreamIo<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Connection + Unpin,
{
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(s) => s.connected(),
            // ALPN's choice (HTTP/2 or not) is read here.
            UpstreamIo::Tls(s) => s.connected(),
        }
    }
}

impl<T> hyper::rt::Read for UpstreamIo<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl<T> hyper::rt::Write for UpstreamIo<T>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
    };

    use futures::StreamExt;
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::providers::{
        ModelRequest, Provider, ProviderEvent, http::BodyLimits, openai::OpenAi,
    };

    fn pool(per: usize, max: usize) -> Upstream {
        Upstream::new(PoolConfig {
            http2_prior_knowledge: true,
            streams_per_connection: per,
            max_connections: max,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn fills_connections_in_order_and_reuses_freed_places() {
        let up = pool(2, 10);
        let a = up.lease().await;
        let b = up.lease().await;
        assert_eq!(up.in_flight(), vec![2]);
        let c = up.lease().await;
        assert_eq!(up.in_flight(), vec![2, 1]);
        drop(a);
        // The freed place on the first connection is taken before the second fills.
        let d = up.lease().await;
        assert_eq!(up.in_flight(), vec![2, 1]);
        drop((b, c, d));
        assert_eq!(up.in_flight(), vec![0, 0]);
    }

    #[tokio::test]
    async fn past_the_cap_calls_share_the_least_busy_connection() {
        let up = pool(1, 2);
        let mut leases = Vec::new();
        for _ in 0..5 {
            leases.push(up.lease().await);
        }
        let counts = up.in_flight();
        assert_eq!(counts.len(), 2);
        assert_eq!(counts.iter().sum::<usize>(), 5);
        assert!(counts.iter().all(|&n| n >= 2), "{counts:?}");
        drop(leases);
        assert_eq!(up.in_flight(), vec![0, 0]);
    }

    #[test]
    fn concurrent_leases_never_overfill_a_connection() {
        let up = pool(3, 1000);
        // Eight OS threads race for places; each drives its leases itself, and the clients
        // they add are built on the runtime's blocking pool.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let leases = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..30)
                            .map(|_| runtime.block_on(up.lease()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        let counts = up.in_flight();
        assert_eq!(counts.iter().sum::<usize>(), 240);
        assert!(counts.iter().all(|&n| n <= 3), "{counts:?}");
        assert_eq!(counts.len(), 80);
        drop(leases);
    }

    /// An HTTP/1.1 upstream that keeps its connections alive and answers every request on
    /// them with `body` of type `content_type`, chunked, in chunks of the sizes in `pieces`
    /// (cycled): counts the connections it accepted and keeps every request head.
    struct KeepAlive {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    impl KeepAlive {
        #[expect(
            clippy::disallowed_methods,
            reason = "a test server: its tasks end with the test's runtime"
        )]
        async fn start(
            content_type: &'static str,
            body: Vec<u8>,
            pieces: &'static [usize],
        ) -> KeepAlive {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = KeepAlive {
                addr: listener.local_addr().unwrap(),
                connections: Arc::default(),
                heads: Arc::default(),
            };
            let (connections, heads) = (server.connections.clone(), server.heads.clone());
            let body = Arc::new(body);
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (body, heads) = (body.clone(), heads.clone());
                    tokio::spawn(answer_all(socket, content_type, body, pieces, heads));
                }
            });
            server
        }
    }

    async fn answer_all(
        socket: TcpStream,
        content_type: &'static str,
        body: Arc<Vec<u8>>,
        pieces: &'static [usize],
        heads: Arc<Mutex<Vec<String>>>,
    ) {
        let mut socket = BufReader::new(socket);
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line.to_ascii_lowercase());
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut request_body = vec![0; length];
            socket.read_exact(&mut request_body).await.unwrap();
            heads.lock().unwrap().push(head);
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\
                 transfer-encoding: chunked\r\n\r\n"
            )
            .into_bytes();
            let (mut at, mut sizes) = (0, pieces.iter().cycle());
            while at < body.len() {
                let end = (at + sizes.next().unwrap()).min(body.len());
                answer.extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
                answer.extend_from_slice(&body[at..end]);
                answer.extend_from_slice(b"\r\n");
                at = end;
            }
            answer.extend_from_slice(b"0\r\n\r\n");
            let socket = socket.get_mut();
            socket.write_all(&answer).await.unwrap();
            socket.flush().await.unwrap();
        }
    }

    fn request() -> ModelRequest {
        ModelRequest {
            role: crate::domain::Role::Flash,
            conversation: Arc::new(
                crate::conversation::Conversation::from_query("q".into(), None, usize::MAX)
                    .unwrap(),
            ),
            params: Default::default(),
            sampling: Default::default(),
            trace: None,
        }
    }

    async fn answer_text(provider: &OpenAi) -> String {
        let mut stream = provider.stream(&request());
        let mut text = String::new();
        loop {
            match stream.next().await.unwrap().unwrap() {
                ProviderEvent::Delta(t) => text.push_str(&t),
                ProviderEvent::Finished(_) => return text,
            }
        }
    }

    /// 256 KiB of text: far more than `HTTP1_READ_BUF_BYTES`.
    fn big_text() -> String {
        "0123456789abcdef".repeat(16 * 1024)
    }

    fn openai_on(server: &KeepAlive) -> OpenAi {
        let upstream = Upstream::new(PoolConfig::single()).unwrap();
        let base = format!("http://{}/v1", server.addr);
        OpenAi::new(upstream, &base, "m", "sk-test", BodyLimits::default()).unwrap()
    }

    #[tokio::test]
    async fn an_event_far_larger_than_the_read_buffer_arrives_whole() {
        // One delta of 256 KiB in chunks of 1 byte, 1,000 bytes and 70,000 bytes (a chunk
        // larger than the read buffer, and chunk heads cut across reads), then the finish.
        let big = big_text();
        let body = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{big}\"}}}}]}}\n\n\
             data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n\
             data: [DONE]\n\n"
        );
        let server =
            KeepAlive::start("text/event-stream", body.into_bytes(), &[1, 1000, 70_000]).await;
        assert_eq!(answer_text(&openai_on(&server)).await, big);
        // The request as reqwest's client sent it: origin-form path, host, the user agent.
        let heads = server.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 1);
        let head = &heads[0];
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
        let agent = format!("user-agent: duet/{}\r\n", env!("CARGO_PKG_VERSION"));
        assert!(head.contains(&agent), "{head}");
        assert!(
            head.contains(&format!("host: {}\r\n", server.addr)),
            "{head}"
        );
        assert!(head.contains("authorization: bearer sk-test\r\n"), "{head}");
        assert!(head.contains("accept: text/event-stream\r\n"), "{head}");
    }

    #[tokio::test]
    async fn a_connection_whose_answer_was_read_to_its_end_is_used_again() {
        // A whole JSON answer is read to its end, so its connection goes back to the pool
        // (a streamed one is dropped at its finish event, before the terminator).
        let big = big_text();
        let body = format!(
            "{{\"choices\":[{{\"index\":0,\"message\":{{\"content\":\"{big}\"}},\
             \"finish_reason\":\"stop\"}}]}}"
        );
        let server = KeepAlive::start("application/json", body.into_bytes(), &[3000]).await;
        let provider = openai_on(&server);
        assert_eq!(answer_text(&provider).await, big);
        assert_eq!(answer_text(&provider).await, big);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
        assert_eq!(server.heads.lock().unwrap().len(), 2);
    }

    /// The HTTP version a pool's client speaks to the mock provider (HTTP/1.1 and h2c).
    #[expect(
        clippy::disallowed_methods,
        reason = "a test server: it ends with the test's runtime"
    )]
    async fn version_spoken(http2_prior_knowledge: bool) -> http::Version {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = crate::devtools::mock::MockConfig::default();
        tokio::spawn(crate::devtools::mock::serve(
            listener,
            config,
            std::future::pending(),
        ));
        let up = Upstream::new(PoolConfig {
            http2_prior_knowledge,
            ..PoolConfig::single()
        })
        .unwrap();
        let lease = up.lease().await;
        let request = up
            .requests()
            .get(format!("http://{addr}/healthz"))
            .build()
            .unwrap();
        let response = lease
            .send(http::Request::try_from(request).unwrap())
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.version()
    }

    #[tokio::test]
    async fn prior_knowledge_speaks_http2_and_plain_http_speaks_http1() {
        assert_eq!(version_spoken(true).await, http::Version::HTTP_2);
        assert_eq!(version_spoken(false).await, http::Version::HTTP_11);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_made_in_time_fails_as_timed_out() {
        // A connector whose connections never complete (as a TLS handshake that stalls).
        let never = tower::service_fn(|_: Uri| {
            std::future::pending::<Result<MaybeHttpsStream<TcpStream>, BoxError>>()
        });
        let mut connector = ConnectTimeout {
            inner: never,
            after: CONNECT_TIMEOUT,
        };
        let uri = Uri::from_static("https://upstream.test/");
        let e = tower::Service::call(&mut connector, uri).await.unwrap_err();
        assert!(e.is::<ConnectTimedOut>(), "{e}");
    }

    const TLS_CERT: &str = include_str!("../../tests/fixtures/tls/localhost-cert.pem");
    const TLS_KEY: &str = include_str!("../../tests/fixtures/tls/localhost-key.pem");

    /// A TLS upstream on loopback that offers `alpn` and answers every request with the HTTP
    /// version it was made in.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test server: it ends with the test's runtime"
    )]
    async fn tls_upstream(alpn: &[&[u8]]) -> SocketAddr {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs = CertificateDer::pem_slice_iter(TLS_CERT.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(TLS_KEY.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        |request: http::Request<hyper::body::Incoming>| async move {
                            let version = format!("{:?}", request.version());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(version)),
                            ))
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    /// The client's TLS configuration as `tls_config` builds it, trusting the test
    /// certificate instead of the web's roots.
    fn trusting_test_certificate() -> rustls::ClientConfig {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(TLS_CERT.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        tls_config_trusting(roots).unwrap()
    }

    /// `https://` upstreams go through [`UpstreamIo::Tls`]: the handshake, reads and writes
    /// pass through it, and so does ALPN's choice — HTTP/2 where the upstream offers it, else
    /// HTTP/1.1, and HTTP/2 only with prior knowledge.
    #[tokio::test]
    async fn tls_upstreams_are_spoken_to_in_the_version_alpn_chose() {
        let tls = trusting_test_certificate();
        for (offered, prior_knowledge, expected) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], false, "HTTP/2.0"),
            (&[b"http/1.1".as_slice()][..], false, "HTTP/1.1"),
            (&[b"h2".as_slice()][..], true, "HTTP/2.0"),
        ] {
            let addr = tls_upstream(offered).await;
            let client = build_client(prior_knowledge, &tls);
            for host in ["localhost", "127.0.0.1"] {
                let uri: Uri = format!("https://{host}:{}/v1/chat", addr.port())
                    .parse()
                    .unwrap();
                let request = http::Request::get(uri)
                    .body(reqwest::Body::from(Vec::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let version = format!("{:?}", response.version());
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(
                    (version.as_str(), &body[..]),
                    (expected, expected.as_bytes())
                );
            }
        }
    }

    /// A certificate the client does not trust fails the call; nothing is sent.
    #[tokio::test]
    async fn an_untrusted_tls_upstream_is_refused() {
        let addr = tls_upstream(&[b"http/1.1"]).await;
        let client = build_client(false, &tls_config().unwrap());
        let uri: Uri = format!("https://localhost:{}/", addr.port())
            .parse()
            .unwrap();
        let request = http::Request::get(uri)
            .body(reqwest::Body::from(Vec::new()))
            .unwrap();
        let error = client.request(request).await.unwrap_err();
        assert!(error.is_connect(), "{error:?}");
    }
}
