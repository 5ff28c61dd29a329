//! Upstream connections for one provider: its calls spread over as many HTTP/2 connections as
//! they need, none carrying more than `streams_per_connection` calls at once.
//!
//! Why: hyper (under reqwest) puts every call to a host on one HTTP/2 connection and never
//! opens a second one; calls beyond the server's `SETTINGS_MAX_CONCURRENT_STREAMS` wait for a
//! free stream (hyperium/hyper#2197, #3623). Real providers negotiate HTTP/2 and typically
//! allow about 100 streams per connection, and a model answer holds its stream for seconds:
//! the 101st concurrent call would wait for the first to finish, and time out on its
//! first-token deadline instead. So each provider holds a list of clients (one reqwest
//! client = one connection to the host), counts the calls in flight on each, and gives a new
//! call to the first client with room, opening a new one when all are full.
//!
//! A client is built only when needed, so a quiet service holds one, and on tokio's blocking
//! pool, so no runtime worker waits on its TLS set-up. Clients are never
//! dropped (an idle one keeps no connection past the pool's idle timeout), so their number
//! only grows to the peak need: `ceil(peak calls / streams_per_connection)`, capped.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tracing::{info, warn};

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

/// The clients of one provider. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    /// Read on every call, written only to add a client. Never held across an await.
    slots: RwLock<Vec<Arc<Slot>>>,
}

struct Slot {
    client: reqwest::Client,
    in_flight: AtomicUsize,
}

/// One call's place on a connection, given back when dropped (when the call's stream is).
pub struct Lease {
    slot: Arc<Slot>,
}

impl Lease {
    pub fn client(&self) -> &reqwest::Client {
        &self.slot.client
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstream {
    /// Builds the first client now, so that a broken TLS setup fails at start.
    pub fn new(config: PoolConfig) -> reqwest::Result<Self> {
        let first = build_client(config.http2_prior_knowledge)?;
        Ok(Upstream::with_first(config, first))
    }

    /// Every call on one given client (tests and tools that build their own).
    pub fn single(client: reqwest::Client) -> Self {
        let config = PoolConfig {
            http2_prior_knowledge: false,
            streams_per_connection: usize::MAX,
            max_connections: 1,
        };
        Upstream::with_first(config, client)
    }

    fn with_first(config: PoolConfig, first: reqwest::Client) -> Self {
        Upstream {
            inner: Arc::new(Inner {
                config: PoolConfig {
                    streams_per_connection: config.streams_per_connection.max(1),
                    max_connections: config.max_connections.max(1),
                    ..config
                },
                slots: RwLock::new(vec![Arc::new(Slot::new(first))]),
            }),
        }
    }

    /// A place for one call: on the first connection with room, else on a new one.
    ///
    /// Building a client (its TLS set-up: the root store, the rustls configuration) is
    /// blocking work of a few milliseconds, so it runs on tokio's blocking pool, never on a
    /// runtime worker that is driving streams. It is built before taking the write lock,
    /// which every call's `lease` would otherwise wait on meanwhile.
    pub async fn lease(&self) -> Lease {
        let inner = &*self.inner;
        if let Some(lease) = inner.try_existing() {
            return lease;
        }
        // All full: add a client, unless another call just did or the cap is reached.
        let built = if inner.has_room() {
            let http2 = inner.config.http2_prior_knowledge;
            match tokio::task::spawn_blocking(move || build_client(http2)).await {
                Ok(Ok(client)) => Some(client),
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot build another upstream client");
                    None
                }
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
    fn place(&self, built: Option<reqwest::Client>) -> Lease {
        let per = self.config.streams_per_connection;
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = first_with_room(&slots, per) {
            return lease;
        }
        if let Some(client) = built.filter(|_| slots.len() < self.config.max_connections) {
            let slot = Arc::new(Slot::new(client));
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

impl Slot {
    fn new(client: reqwest::Client) -> Self {
        Slot {
            client,
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Lease {
    fn take(slot: Arc<Slot>) -> Lease {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        Lease { slot }
    }
}

/// The HTTP/2 receive window of one upstream call.
const UPSTREAM_STREAM_WINDOW: u32 = 32 * 1024;

/// One HTTP client: pooled connections (HTTP/2 when the upstream offers it over TLS), a
/// connect timeout so an unreachable upstream fails fast and can be retried, and no overall
/// timeout (the orchestrator's deadlines bound every call).
///
/// With `http2_prior_knowledge` (`UPSTREAM_HTTP2=1`) plain `http://` upstreams are spoken to
/// in HTTP/2 from the first byte, so calls to one upstream are streams on shared connections:
/// a file descriptor per connection instead of one per call in flight, which is what lets one
/// process hold more than about 6,000 runs under a 20,000-descriptor limit. It is off by
/// default because an HTTP/1.1-only upstream (most local servers) then fails.
pub fn build_client(http2_prior_knowledge: bool) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder();
    let builder = if http2_prior_knowledge {
        builder
            .http2_prior_knowledge()
            // Pings find a dead upstream connection that would otherwise hold every call
            // multiplexed on it until their deadlines.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
    } else {
        builder
    };
    builder
        // What an HTTP/2 upstream may send for one call before duet reads it. hyper's default
        // (2 MiB a stream) let a run whose client stopped reading hold up to 2 MiB of each
        // model's answer in the connection's read buffers; at 32 KiB the upstream waits
        // instead. A reading run is not slowed: the window comes back as it reads, and 32 KiB
        // a round trip is far above any model's token rate.
        .http2_initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("duet/", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
