//! Rate limits (contract §8): a GCRA bucket per client, keyed on the API key when keys are
//! set, else on the client address; off unless `RATE_LIMIT_PER_MINUTE` is set, or a key of
//! `API_KEYS_FILE` has a `rate_limit_per_minute` of its own (contract §11; each key's rate is
//! resolved in `clients::KeySet`).
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
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use sqlx::PgPool;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{ApiError, client_addr};
use crate::{audit::Store, clients::Rate, config::Config, metrics::Metrics};

/// The identity a rate limit is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum ClientKey {
    /// An API key's bucket (`clients::Client::bucket`): its name, or a fingerprint of an
    /// unnamed key; never the key.
    Key(Arc<str>),
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

/// A key's own bucket, and the rate it was made for.
type OwnBucket = (Rate, Arc<DefaultDirectRateLimiter>);

fn quota(rate: Rate) -> Quota {
    Quota::per_minute(rate.per_minute).allow_burst(rate.burst)
}

pub(super) struct RateLimits {
    /// `RATE_LIMIT_PER_MINUTE` and `RATE_LIMIT_BURST`, when on.
    global: Option<Rate>,
    /// The buckets on the global limit (addresses, and keys without a rate of their own):
    /// the budget on SQLite, and the fallback on PostgreSQL.
    local: Option<DefaultKeyedRateLimiter<ClientKey>>,
    /// The buckets of keys with a rate of their own (`API_KEYS_FILE`), each with the rate it
    /// was made for: a reload that keeps a key's rate keeps its bucket, one that changes it
    /// starts a new one. At most one per key name ever configured.
    own: Mutex<HashMap<Arc<str>, OwnBucket>>,
    shared: Option<Shared>,
}

impl RateLimits {
    pub(super) fn new(config: &Config, store: Option<&Store>) -> RateLimits {
        let global = Rate::global(config);
        RateLimits {
            global,
            local: global.map(|rate| RateLimiter::keyed(quota(rate))),
            own: Mutex::default(),
            shared: match store {
                Some(Store::Postgres(pool)) => Some(Shared::new(pool.clone())),
                _ => None,
            },
        }
    }

    /// The global limit, which addresses are held to.
    pub(super) fn global(&self) -> Option<Rate> {
        self.global
    }

    /// Takes one request from `client`'s budget under `rate` (`None`: no limit), or says
    /// how long until it may come back.
    pub(super) async fn check(
        &self,
        client: &ClientKey,
        rate: Option<Rate>,
        metrics: &Metrics,
    ) -> Result<(), ApiError> {
        let Some(rate) = rate else {
            return Ok(());
        };
        if let Some(shared) = &self.shared {
            match shared.check(client, rate).await {
                Ok(result) => return result,
                Err(reason) => {
                    metrics
                        .rate_limit_fallbacks_total
                        .with_label_values(&[reason.label()])
                        .inc();
                }
            }
        }
        let refused = |not_until: governor::NotUntil<_>| ApiError::RateLimited {
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        };
        match (&self.local, client) {
            (Some(local), _) if Some(rate) == self.global => {
                local.check_key(client).map_err(refused)
            }
            (_, ClientKey::Key(bucket)) => self.own_bucket(bucket, rate).check().map_err(refused),
            // An address is only ever held to the global limit, handled above.
            (_, ClientKey::Address(_)) => Ok(()),
        }
    }

    fn own_bucket(&self, bucket: &Arc<str>, rate: Rate) -> Arc<DefaultDirectRateLimiter> {
        let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        match own.get(bucket) {
            Some((r, limiter)) if *r == rate => Arc::clone(limiter),
            _ => {
                let limiter = Arc::new(RateLimiter::direct(quota(rate)));
                own.insert(Arc::clone(bucket), (rate, Arc::clone(&limiter)));
                limiter
            }
        }
    }

    /// Forgets clients whose bucket is full again, here and (on PostgreSQL) in the shared
    /// table, so neither grows with every client ever seen.
    pub(super) async fn forget_idle(&self) {
        if let Some(local) = &self.local {
            local.retain_recent();
            local.shrink_to_fit();
        }
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
    /// Milliseconds after `epoch` before which the database is not asked (0: ask).
    backoff_until_ms: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn new(pool: PgPool) -> Shared {
        Shared {
            pool,
            backoff_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The bucket's row name. The same key is the same bucket on every replica, whatever
    /// order each lists its keys in.
    fn bucket(client: &ClientKey) -> String {
        match client {
            ClientKey::Key(bucket) => bucket.to_string(),
            ClientKey::Address(ip @ IpAddr::V4(_)) => format!("ip:{ip}"),
            ClientKey::Address(ip @ IpAddr::V6(_)) => format!("ip:{ip}/64"),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The decision of the shared budget, or why there is none.
    async fn check(
        &self,
        client: &ClientKey,
        rate: Rate,
    ) -> Result<Result<(), ApiError>, Fallback> {
        let q = quota(rate);
        // Seconds per request, and seconds of requests a full bucket holds.
        let emission_s = q.replenish_interval().as_secs_f64();
        let burst_s = emission_s * f64::from(q.burst_size().get());
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
            .bind(Shared::bucket(client))
            .bind(emission_s)
            .bind(burst_s)
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
        let wait_s = ahead_s.map_or(emission_s, |ahead| ahead + emission_s - burst_s);
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
