//! Who may call, how often: API keys, per-client rate limits, and request accounting.
//!
//! Keys are compared in constant time against every configured key (no early exit), so the
//! timing of a refusal says nothing about how close a guess was. Rate limits are GCRA buckets
//! (the `governor` crate) keyed by the API key when keys are configured, else by the peer's
//! address.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::config::{Config, Secret};

/// The identity a rate limit is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// Index of the API key used.
    ApiKey(usize),
    Peer(IpAddr),
}

pub struct Guard {
    keys: Vec<Secret>,
    limiter: Option<DefaultKeyedRateLimiter<ClientKey>>,
}

impl Guard {
    pub fn new(config: &Config) -> Guard {
        let limiter = config.rate_limit_per_minute.and_then(|per_minute| {
            let rate = NonZeroU32::new(per_minute)?;
            let burst = NonZeroU32::new(config.rate_limit_burst)?;
            Some(RateLimiter::keyed(
                Quota::per_minute(rate).allow_burst(burst),
            ))
        });
        Guard {
            keys: config.api_keys.clone(),
            limiter,
        }
    }

    /// Which configured key the request carries, if keys are required.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let presented = bearer(headers).ok_or(ApiError::Unauthorized)?;
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if bool::from(key.expose().as_bytes().ct_eq(presented.as_bytes())) {
                found = Some(i);
            }
        }
        found.map(Some).ok_or(ApiError::Unauthorized)
    }

    fn check_rate(&self, client: ClientKey) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&client)
            .map_err(|not_until| ApiError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Forgets clients idle long enough that their bucket is full again, so the map does not
    /// grow with every address ever seen.
    pub fn forget_idle_clients(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    pub const CLEANUP_EVERY: Duration = Duration::from_secs(60);
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authentication and rate limiting for the query routes.
pub async fn protect(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let guard = &state.guard;
    let ip = peer(&request).map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let peer_key = || ClientKey::Peer(ip);
    let key = match guard.authenticate(request.headers()) {
        Ok(key) => key,
        Err(e) => {
            // Failed attempts spend the address's budget, so keys cannot be guessed at speed.
            if let Err(limited) = guard.check_rate(peer_key()) {
                return refuse(&state, "rate_limited", limited);
            }
            return refuse(&state, "unauthorized", e);
        }
    };
    let client = match key {
        Some(i) => ClientKey::ApiKey(i),
        None => peer_key(),
    };
    if let Err(e) = guard.check_rate(client) {
        return refuse(&state, "rate_limited", e);
    }
    // Which key it was, for the handlers: a run belongs to the key that started it.
    let mut request = request;
    if let Some(i) = key {
        request.extensions_mut().insert(super::AuthenticatedKey(i));
    }
    next.run(request).await
}

fn refuse(state: &AppState, reason: &str, error: ApiError) -> Response {
    state
        .metrics
        .streams_rejected_total
        .with_label_values(&[reason])
        .inc();
    error.into_response()
}

fn peer(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// Counts every answered request by route template (never the raw path: unbounded labels)
/// and status.
pub async fn count(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state
        .metrics
        .requests_total
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}
