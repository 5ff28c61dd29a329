//! Rate limits (contract §8): a GCRA bucket per client, keyed on the API key when keys are
//! set, else on the client address; off unless `RATE_LIMIT_PER_MINUTE` is set.
//!
//! On SQLite (one process) the buckets live in memory (the `governor` crate). On PostgreSQL
//! every replica shares one budget per client: the bucket is a row of `rate_limit_buckets`
//! (migration 0006) moved forward in one statement, so the database's row lock orders
//! concurrent requests from every replica and the database's clock is the only clock.
//!
//! When the shared budget cannot be reached (an error, or no answer within
//! [`SHARED_CHECK_TIMEOUT`]) the request is decided by this replica's own in-memory bucket:
//! neither open (no limit at all while the database is down, which is when a flood hurts
//! most) nor closed (refusing every client because the limiter's store is down would turn
//! a database outage, which the service otherwise survives by dead-lettering, into a full
//! outage). During the outage the budget is one per replica, as before issue 13. After a
//! failure the database is left alone for [`SHARED_BACKOFF`], so an outage does not add the
//! timeout to every request. `duet_rate_limit_fallbacks_total{reason}` counts the requests
//! decided so.

use std::{
    net::IpAddr,
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{ApiError, client_addr};
use crate::{audit::Store, config::Config, domain::Secret, metrics::Metrics};

/// The identity a rate limit is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum ClientKey {
    /// Index of the API key used (in memory only: the shared table keeps a fingerprint).
    ApiKey(usize),
    /// The client's address, as [`client_addr::identity`] groups it.
    Address(IpAddr),
}

impl ClientKey {
    pub(super) fn address(ip: IpAddr) -> ClientKey {
        ClientKey::Address(client_addr::identity(ip))
    }
}

/// Longest wait for the shared budget before this replica decides alone.
pub(super) const SHARED_CHECK_TIMEOUT: Duration = Duration::from_millis(250);
/// After the shared budget failed, how long requests are decided locally before it is
/// tried again.
pub(super) const SHARED_BACKOFF: Duration = Duration::from_secs(5);

pub(super) struct RateLimits {
    /// The budget on SQLite, and the fallback on PostgreSQL.
    local: DefaultKeyedRateLimiter<ClientKey>,
    shared: Option<Shared>,
}

impl RateLimits {
    /// `None` when limits are off.
    pub(super) fn new(config: &Config, store: Option<&Store>) -> Option<RateLimits> {
        let rate = NonZeroU32::new(config.rate_limit_per_minute?)?;
        let burst = NonZeroU32::new(config.rate_limit_burst)?;
        let quota = Quota::per_minute(rate).allow_burst(burst);
        let shared = match store {
            Some(Store::Postgres(pool)) => Some(Shared::new(pool.clone(), config, quota)),
            _ => None,
        };
        Some(RateLimits {
            local: RateLimiter::keyed(quota),
            shared,
        })
    }

    /// Takes one request from `client`'s budget, or says how long until it may come back.
    pub(super) async fn check(
        &self,
        client: &ClientKey,
        metrics: &Metrics,
    ) -> Result<(), ApiError> {
        if let Some(shared) = &self.shared {
            match shared.check(client).await {
                Ok(result) => return result,
                Err(reason) => {
                    metrics
                        .rate_limit_fallbacks_total
                        .with_label_values(&[reason.label()])
                        .inc();
                }
            }
        }
        self.local
            .check_key(client)
            .map_err(|not_until| ApiError::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Forgets clients whose bucket is full again, here and (on PostgreSQL) in the shared
    /// table, so neither grows with every client ever seen.
    pub(super) async fn forget_idle(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
        if let Some(shared) = &self.shared {
            shared.forget_idle().await;
        }
    }
}

/// Why a request was decided by the local bucket; the `reason` label.
#[derive(Debug, Clone, Copy)]
enum Fallback {
    /// The statement failed (database down, table missing, pool exhausted...).
    Error,
    /// No answer within [`SHARED_CHECK_TIMEOUT`].
    Timeout,
    /// A recent failure: the database is not asked until [`SHARED_BACKOFF`] has passed.
    Backoff,
}

impl Fallback {
    fn label(self) -> &'static str {
        match self {
            Fallback::Error => "error",
            Fallback::Timeout => "timeout",
            Fallback::Backoff => "backoff",
        }
    }
}

/// One statement per request: insert the client's bucket, or move it forward when the
/// request fits; then report whether it did and, if not, how far ahead the bucket is. The
/// `WHERE` leaves a refused request's row unchanged (a flood of refusals writes nothing).
///
/// `$1` bucket, `$2` the emission interval (seconds per request), `$3` the burst's worth of
/// time (`$2` × burst). A request fits when, after it, the bucket is at most `$3` ahead of
/// now. The refused case reads the row from the statement's snapshot, which is the row as
/// the conflicting update found it unless another replica moved it in between: then the
/// wait told is a little short, never the decision wrong.
const TAKE: &str = "\
WITH taken AS (
    INSERT INTO rate_limit_buckets AS b (bucket, tat)
    VALUES ($1, now() + $2::float8 * interval '1 second')
    ON CONFLICT (bucket) DO UPDATE
        SET tat = GREATEST(b.tat, now()) + $2::float8 * interval '1 second'
        WHERE GREATEST(b.tat, now()) + $2::float8 * interval '1 second'
              <= now() + $3::float8 * interval '1 second'
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM taken) AS allowed,
       (SELECT EXTRACT(EPOCH FROM tat - now())::float8
          FROM rate_limit_buckets WHERE bucket = $1) AS ahead_s";

const FORGET: &str = "DELETE FROM rate_limit_buckets WHERE tat < now()";

/// The shared budget on PostgreSQL.
struct Shared {
    pool: PgPool,
    /// Seconds per request.
    emission_s: f64,
    /// Seconds of requests a full bucket holds.
    burst_s: f64,
    /// The bucket name of each API key, by index: a fingerprint, never the key, computed
    /// once. The same key is the same bucket on every replica, whatever order each lists
    /// its keys in.
    key_buckets: Vec<String>,
    /// Milliseconds after `epoch` before which the database is not asked (0: ask).
    backoff_until_ms: AtomicU64,
    epoch: Instant,
}

/// The shared bucket of an API key: `key:` and 128 bits of SHA-256 over a fixed prefix and
/// the key. Enough that keys never collide; nothing to recover the key from (keys are long
/// random strings). The runbook shows the same computation in shell, for operators.
fn key_bucket(key: &Secret) -> String {
    let digest = Sha256::new()
        .chain_update(b"duet rate limit\0")
        .chain_update(key.expose().as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("key:{hex}")
}

impl Shared {
    fn new(pool: PgPool, config: &Config, quota: Quota) -> Shared {
        let emission_s = quota.replenish_interval().as_secs_f64();
        let key_buckets = config.api_keys.iter().map(key_bucket).collect();
        Shared {
            pool,
            emission_s,
            burst_s: emission_s * f64::from(quota.burst_size().get()),
            key_buckets,
            backoff_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn bucket(&self, client: &ClientKey) -> String {
        match client {
            ClientKey::ApiKey(i) => self
                .key_buckets
                .get(*i)
                .cloned()
                .unwrap_or_else(|| format!("key-index:{i}")),
            ClientKey::Address(ip @ IpAddr::V4(_)) => format!("ip:{ip}"),
            ClientKey::Address(ip @ IpAddr::V6(_)) => format!("ip:{ip}/64"),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The decision of the shared budget, or why there is none.
    async fn check(&self, client: &ClientKey) -> Result<Result<(), ApiError>, Fallback> {
        let backoff_until = self.backoff_until_ms.load(Ordering::Relaxed);
        if backoff_until != 0 {
            if self.now_ms() < backoff_until {
                return Err(Fallback::Backoff);
            }
            // Past the backoff: one request (the one that swaps) tries the database first;
            // the others keep deciding locally until it has answered.
            if self
                .backoff_until_ms
                .compare_exchange(backoff_until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                return Err(Fallback::Backoff);
            }
        }
        let query = sqlx::query_as::<_, (bool, Option<f64>)>(TAKE)
            .bind(self.bucket(client))
            .bind(self.emission_s)
            .bind(self.burst_s)
            .fetch_one(&self.pool);
        let (allowed, ahead_s) = match tokio::time::timeout(SHARED_CHECK_TIMEOUT, query).await {
            Ok(Ok(row)) => {
                if backoff_until != 0 {
                    info!("the shared rate-limit budget answers again");
                }
                row
            }
            Ok(Err(e)) => return Err(self.failed(Fallback::Error, &e)),
            Err(_) => return Err(self.failed(Fallback::Timeout, &"no answer in time")),
        };
        if allowed {
            return Ok(Ok(()));
        }
        // Allowed again once the bucket is no more than a burst ahead after one more request.
        let wait_s = ahead_s.map_or(self.emission_s, |ahead| {
            ahead + self.emission_s - self.burst_s
        });
        Ok(Err(ApiError::RateLimited {
            retry_after: Duration::try_from_secs_f64(wait_s.max(0.0)).unwrap_or(Duration::ZERO),
        }))
    }

    /// Starts a backoff and logs why: at most once per [`SHARED_BACKOFF`].
    fn failed(&self, reason: Fallback, error: &dyn std::fmt::Display) -> Fallback {
        let until = self.now_ms() + SHARED_BACKOFF.as_millis() as u64;
        self.backoff_until_ms.store(until.max(1), Ordering::Relaxed);
        warn!(
            error = %error,
            backoff_s = SHARED_BACKOFF.as_secs(),
            "cannot reach the shared rate-limit budget; this replica decides alone for now"
        );
        reason
    }

    async fn forget_idle(&self) {
        let forget = sqlx::query(FORGET).execute(&self.pool);
        match tokio::time::timeout(SHARED_CHECK_TIMEOUT * 8, forget).await {
            Ok(Ok(done)) => debug!(
                rows = done.rows_affected(),
                "idle rate-limit buckets forgotten"
            ),
            // The next round tries again; a database that is down is reported by checks.
            Ok(Err(e)) => debug!(error = %e, "cannot forget idle rate-limit buckets"),
            Err(_) => debug!("forgetting idle rate-limit buckets took too long"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runbook's `printf 'duet rate limit\0%s' "$KEY" | sha256sum | cut -c1-32`.
    #[test]
    fn a_keys_bucket_is_its_fingerprint_as_the_runbook_computes_it() {
        assert_eq!(
            key_bucket(&Secret::new("sk-test-alpha")),
            "key:d60ef6044804c9bcf9c2ba1e837e5426"
        );
    }
}
