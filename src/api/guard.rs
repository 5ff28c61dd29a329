//! Who may call, how often: API keys, per-client rate limits, the throttle on wrong keys and
//! tokens, and request accounting.
//!
//! Keys are compared in constant time against every configured key (no early exit, see
//! `clients::KeySet::authenticate`), so the timing of a refusal says nothing about how close
//! a guess was. Rate limits (`rate_limit`) are keyed by the API key when keys are
//! configured, else by the client's address; they are off unless `RATE_LIMIT_PER_MINUTE` is
//! set or a named key has a rate of its own. Wrong keys and admin tokens are throttled per
//! client address whatever the rate limit says ([`AuthThrottle`]). The client's address is
//! the TCP peer's, or behind a trusted proxy the one it forwarded (`client_addr`).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::{Extensions, HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::warn;

use super::{
    ApiError, AppState,
    client_addr::{self, TrustedProxies, identity as throttle_key},
    rate_limit::{ClientKey, RateLimits},
};
use crate::{
    audit::Store,
    clients::{Client, Keys},
    config::Config,
    domain::Secret,
    metrics::Metrics,
};

pub struct Guard {
    /// `API_KEYS` and `API_KEYS_FILE`; swapped whole on `SIGHUP`.
    keys: Arc<Keys>,
    limits: RateLimits,
    /// One table for API keys and the admin token: an address gets one budget of guesses,
    /// not one per secret.
    throttle: Option<AuthThrottle>,
    proxies: TrustedProxies,
}

/// Which secret a wrong guess was for; the `endpoint` label of the auth metrics.
#[derive(Debug, Clone, Copy)]
pub enum Realm {
    /// `API_KEYS`, on `/query*`.
    Query,
    /// `ADMIN_TOKEN`, on `/runs*`.
    Admin,
    /// `METRICS_TOKEN`, on `/metrics`.
    Metrics,
}

impl Realm {
    fn label(self) -> &'static str {
        match self {
            Realm::Query => "query",
            Realm::Admin => "admin",
            Realm::Metrics => "metrics",
        }
    }
}

impl Guard {
    /// On PostgreSQL (`store`), rate limits are one budget shared with every replica of the
    /// database; otherwise they are this process's.
    pub fn new(config: &Config, store: Option<&Store>) -> Guard {
        Guard {
            keys: Arc::new(Keys::from_config(config)),
            limits: RateLimits::new(config, store),
            throttle: config
                .auth_failure_limit
                .map(|limit| AuthThrottle::new(limit, config.auth_failure_window, MAX_TRACKED)),
            proxies: TrustedProxies::new(config.trusted_proxies.clone()),
        }
    }

    /// The client's address: the TCP peer's, or, when the peer is a trusted proxy, the one
    /// it forwarded in `X-Forwarded-For`.
    pub(super) fn client(&self, extensions: &Extensions, headers: &HeaderMap) -> IpAddr {
        self.proxies.client(client_addr::peer(extensions), headers)
    }

    /// Refuses an address that has presented too many wrong keys or tokens lately. Called
    /// before the secret is even looked at, so a right guess made while refused tells the
    /// guesser nothing: brute force cannot go on at any speed past the limit.
    pub fn admit(&self, ip: IpAddr, realm: Realm, metrics: &Metrics) -> Result<(), ApiError> {
        let Some(retry_after) = self.throttle.as_ref().and_then(|t| t.refusal(ip)) else {
            return Ok(());
        };
        metrics
            .auth_throttled_total
            .with_label_values(&[realm.label()])
            .inc();
        Err(ApiError::AuthThrottled { retry_after })
    }

    /// Notes a wrong key or token presented from `ip`. Logs once when the address reaches
    /// the limit, not on every refusal after it (an attacker would flood the log).
    pub fn failed(&self, ip: IpAddr, realm: Realm, metrics: &Metrics) {
        metrics
            .auth_failures_total
            .with_label_values(&[realm.label()])
            .inc();
        let Some(throttle) = &self.throttle else {
            return;
        };
        if let Some(refused_for) = throttle.fail(ip) {
            warn!(
                client = %throttle_key(ip),
                endpoint = realm.label(),
                failures = throttle.limit,
                refused_for_s = refused_for.as_secs_f64().ceil() as u64,
                "too many wrong keys or tokens from one address; refusing it for a while"
            );
        }
    }

    /// The keys in force (reloaded on `SIGHUP`).
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// Which configured key the request carries, if keys are required.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<Client>>, ApiError> {
        let keys = self.keys.current();
        if keys.is_empty() {
            return Ok(None);
        }
        bearer(headers)
            .and_then(|presented| keys.authenticate(presented))
            .map(Some)
            .ok_or(ApiError::Unauthorized)
    }

    /// Forgets clients idle long enough that their bucket is full again (and addresses whose
    /// failed attempts are out of their window), so the tables do not grow with every
    /// client ever seen.
    pub async fn forget_idle_clients(&self) {
        if let Some(throttle) = &self.throttle {
            throttle.forget_expired();
        }
        self.limits.forget_idle().await;
    }

    pub const CLEANUP_EVERY: Duration = Duration::from_secs(60);
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Which of `secrets` the request's `Authorization: Bearer X` carries: the one comparison of
/// presented keys and tokens. `X` is compared in constant time with every secret, with no
/// early exit, so the timing of an answer says nothing about how close a guess was or which
/// secret it was near; only the secrets' lengths could be learnt from it.
pub(super) fn bearer_secret(headers: &HeaderMap, secrets: &[Secret]) -> Option<usize> {
    let presented = bearer(headers)?.as_bytes();
    let mut found = None;
    for (i, secret) in secrets.iter().enumerate() {
        if bool::from(secret.expose().as_bytes().ct_eq(presented)) {
            found = Some(i);
        }
    }
    found
}

/// Authentication and rate limiting for the query routes.
pub(super) async fn protect(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let guard = &state.guard;
    let ip = guard.client(request.extensions(), request.headers());
    let address_key = || ClientKey::address(ip);
    let global = guard.limits.global();
    if !guard.keys.current().is_empty()
        && let Err(throttled) = guard.admit(ip, Realm::Query, &state.metrics)
    {
        return refuse(&state, "auth_throttled", throttled);
    }
    let client = match guard.authenticate(request.headers()) {
        Ok(client) => client,
        Err(e) => {
            // Only a key that was presented is a guess; a request without one (a client not
            // yet configured) is refused but not held against its address.
            if bearer(request.headers()).is_some() {
                guard.failed(ip, Realm::Query, &state.metrics);
            }
            // Failed attempts also spend the address's rate-limit budget, when limits are on.
            let address = address_key();
            if let Err(limited) = guard.limits.check(&address, global, &state.metrics).await {
                return refuse(&state, "rate_limited", limited);
            }
            return refuse(&state, "unauthorized", e);
        }
    };
    let (bucket, rate) = match &client {
        Some(c) => (ClientKey::Key(Arc::clone(c.bucket())), c.rate),
        None => (address_key(), global),
    };
    let label = ClientLabel(client.as_ref().and_then(|c| c.name().cloned()));
    if let Err(e) = guard.limits.check(&bucket, rate, &state.metrics).await {
        return labelled(refuse(&state, "rate_limited", e), label);
    }
    // Which key it was, for the handlers: a run belongs to the key that started it, and is
    // counted against its budgets.
    let mut request = request;
    if let Some(client) = client {
        request
            .extensions_mut()
            .insert(super::AuthenticatedClient(client));
    }
    labelled(next.run(request).await, label)
}

/// The name of the key a request authenticated with, for the `client` label of
/// `duet_requests_total` (read by [`count`] from the response).
#[derive(Clone)]
struct ClientLabel(Option<Arc<str>>);

fn labelled(mut response: Response, label: ClientLabel) -> Response {
    if label.0.is_some() {
        response.extensions_mut().insert(label);
    }
    response
}

fn refuse(state: &AppState, reason: &str, error: ApiError) -> Response {
    state
        .metrics
        .streams_rejected_total
        .with_label_values(&[reason])
        .inc();
    error.into_response()
}

/// Most addresses the failed-attempt table tracks at once. Entries are fixed-size, so this
/// also bounds its memory: under 1.5 MiB on 64-bit targets (`max_bytes`, checked by a test).
const MAX_TRACKED: usize = 10_000;

/// Counts wrong keys and tokens per client address in a fixed window that opens with the
/// address's first failure. An address that reaches `limit` failures is refused (429) until
/// its window closes, whatever it sends, so it gets at most `limit` guesses per window. A
/// right secret does not reset the count: a client holding one key could otherwise keep
/// guessing another (or the admin token) between its good requests.
///
/// Bounded: at most `max_tracked` addresses; a new one past that evicts the address whose
/// window opened first (which is also the next to expire). IPv6 addresses count per /64,
/// since one host usually holds a whole /64 and could otherwise rotate through it.
pub(super) struct AuthThrottle {
    limit: u32,
    window: Duration,
    max_tracked: usize,
    table: Mutex<FailureTable>,
}

#[derive(Default)]
struct FailureTable {
    entries: HashMap<IpAddr, Failures>,
    /// Every entry's key and window start, oldest first: one item per entry, removed with it,
    /// so expiry and eviction never scan the map.
    order: VecDeque<(IpAddr, Instant)>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

impl AuthThrottle {
    pub(super) fn new(limit: u32, window: Duration, max_tracked: usize) -> AuthThrottle {
        AuthThrottle {
            limit,
            window,
            max_tracked: max_tracked.max(1),
            table: Mutex::default(),
        }
    }

    /// The most memory the table can hold, as hashbrown and `VecDeque` size their storage:
    /// map buckets (a power of two at most 7/8 full, one control byte each) plus the order
    /// queue, for `max_tracked` entries.
    #[cfg(test)]
    fn max_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(IpAddr, Failures)>() + 1;
        let queued = std::mem::size_of::<(IpAddr, Instant)>();
        let buckets = (self.max_tracked * 8 / 7 + 1).next_power_of_two();
        buckets * bucket + self.max_tracked.next_power_of_two() * queued
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailureTable> {
        // The table holds plain counters: whatever a panicking holder left is still usable.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `ip` is still refused, if it is.
    pub(super) fn refusal(&self, ip: IpAddr) -> Option<Duration> {
        let key = throttle_key(ip);
        let table = self.lock();
        let entry = table.entries.get(&key)?;
        let ends = entry.since + self.window;
        let now = Instant::now();
        (entry.count >= self.limit && now < ends).then(|| ends - now)
    }

    /// Counts one failure of `ip`; `Some(time left in the window)` when this one reached the
    /// limit.
    pub(super) fn fail(&self, ip: IpAddr) -> Option<Duration> {
        let key = throttle_key(ip);
        let mut table = self.lock();
        // Read under the lock, so the order queue is in time order.
        let now = Instant::now();
        table.expire(now, self.window);
        let entry = match table.entries.get_mut(&key) {
            Some(entry) => entry,
            None => {
                while table.entries.len() >= self.max_tracked {
                    table.evict_oldest();
                }
                table.order.push_back((key, now));
                table.entries.entry(key).or_insert(Failures {
                    since: now,
                    count: 0,
                })
            }
        };
        entry.count = entry.count.saturating_add(1);
        (entry.count == self.limit)
            .then(|| (entry.since + self.window).saturating_duration_since(now))
    }

    /// Drops addresses whose window has closed, and gives back memory after a flood.
    pub(super) fn forget_expired(&self) {
        let mut table = self.lock();
        table.expire(Instant::now(), self.window);
        if table.entries.capacity() > 4 * table.entries.len().max(64) {
            table.entries.shrink_to_fit();
            table.order.shrink_to_fit();
        }
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

impl FailureTable {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(_, since)) = self.order.front() {
            if since + window > now {
                break;
            }
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((key, _)) = self.order.pop_front() {
            self.entries.remove(&key);
        }
    }
}

/// Counts every answered request by route template (never the raw path: unbounded labels),
/// status, and client: the name of the key from `API_KEYS_FILE`, so bounded by the file;
/// empty for a request without a key, with a key of `API_KEYS`, or refused before its key
/// was known (Prometheus treats an empty label as no label, so sums by route and status read
/// as before).
pub(super) async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let mut response = next.run(request).await;
    let client = response.extensions_mut().remove::<ClientLabel>();
    let client = client.as_ref().and_then(|c| c.0.as_deref()).unwrap_or("");
    state
        .metrics
        .requests_total
        .with_label_values(&[&route, response.status().as_str(), client])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = [Secret::new("s3cret")];
        let matches = |h: &HeaderMap| bearer_secret(h, &token).is_some();
        assert!(matches(&headers("Bearer s3cret")));
        assert!(matches(&headers("bearer s3cret")));
        assert!(!matches(&headers("Bearer s3cre")));
        assert!(!matches(&headers("Bearer s3cret2")));
        assert!(!matches(&headers("Basic s3cret")));
        assert!(!matches(&headers("s3cret")));
        assert!(!matches(&HeaderMap::new()));
    }

    #[test]
    fn bearer_names_which_secret_it_carries() {
        let keys = [Secret::new("k-one"), Secret::new("k-two")];
        assert_eq!(bearer_secret(&headers("Bearer k-one"), &keys), Some(0));
        assert_eq!(bearer_secret(&headers("Bearer k-two"), &keys), Some(1));
        assert_eq!(bearer_secret(&headers("Bearer k-three"), &keys), None);
        assert_eq!(bearer_secret(&headers("Bearer k-one"), &[]), None);
    }

    fn v4(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_is_refused_after_the_limit_until_its_window_closes() {
        let t = AuthThrottle::new(3, Duration::from_secs(60), 100);
        let ip = v4(1);
        assert_eq!(t.fail(ip), None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(t.fail(ip), None);
        assert_eq!(t.refusal(ip), None, "under the limit");
        // The third failure reaches the limit: refused until 60 s after the first one.
        assert_eq!(t.fail(ip), Some(Duration::from_secs(50)));
        assert_eq!(t.refusal(ip), Some(Duration::from_secs(50)));
        assert_eq!(t.refusal(v4(2)), None, "other addresses are not affected");
        tokio::time::advance(Duration::from_secs(49)).await;
        assert_eq!(t.refusal(ip), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.refusal(ip), None);
        // A new window: the count starts again.
        assert_eq!(t.fail(ip), None);
        assert_eq!(t.refusal(ip), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_evicts_the_oldest() {
        let t = AuthThrottle::new(2, Duration::from_secs(60), 1000);
        t.fail(v4(0));
        t.fail(v4(0));
        assert!(t.refusal(v4(0)).is_some());
        for n in 1..=5000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            t.fail(v4(n));
            assert!(t.tracked() <= 1000);
        }
        assert_eq!(t.tracked(), 1000);
        assert_eq!(t.refusal(v4(0)), None, "the oldest entry was evicted");
        // The newest are still counted.
        t.fail(v4(5000));
        assert!(t.refusal(v4(5000)).is_some());
        // Expired entries go at the next clean-up, and the memory with them.
        tokio::time::advance(Duration::from_secs(61)).await;
        t.forget_expired();
        assert_eq!(t.tracked(), 0);
        assert!(t.lock().entries.capacity() < 1000);
    }

    #[test]
    fn the_default_table_stays_small() {
        let t = AuthThrottle::new(10, Duration::from_secs(60), MAX_TRACKED);
        assert!(t.max_bytes() <= 1536 * 1024, "{} bytes", t.max_bytes());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_addresses_count_per_64() {
        let t = AuthThrottle::new(2, Duration::from_secs(60), 100);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        t.fail(a);
        t.fail(b);
        assert!(t.refusal(a).is_some() && t.refusal(b).is_some());
        assert!(t.refusal(other).is_none());
        // An IPv4 client seen through an IPv6 socket is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        t.fail(mapped);
        t.fail("192.0.2.7".parse().unwrap());
        assert!(t.refusal(mapped).is_some());
    }
}
