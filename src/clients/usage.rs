//! Each named key's usage per UTC day (runs, tokens, cost) and its daily budgets
//! (contract §11).
//!
//! Two moments of a run touch it, each with one atomic step:
//! - its start ([`Usage::admit`]): refused when the key's usage today has reached a budget,
//!   else counted as one more run;
//! - its end ([`Metering`], the audit sink's wrapper, which sees every run's record): its
//!   tokens (input + output of both models) and `cost_usd` are added.
//!
//! A run counts on the UTC day it started (the day of its `created_at`), so these sums and
//! the audit queries of docs/audit.md agree. A run that started under budget always
//! finishes: nothing cuts a stream. Runs in flight are not yet counted, so a key can go over
//! its budget by what its concurrent runs use; the next run after they end is refused.
//!
//! On SQLite (one process) the counts live in memory; a key's first run of the day in a process
//! starts its count from the audit trail's runs of that day, so a restart does not hand out a
//! fresh budget (runs still in the audit queue when a process died are missed). On
//! PostgreSQL they are the rows of `client_usage` (migration 0010), shared by every replica:
//! the start is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE under budget`, the end one
//! `INSERT ... ON CONFLICT DO UPDATE SET tokens = tokens + ...`, so the row lock orders the
//! replicas. When the database does not answer, a start is admitted (a spending limit must
//! not turn a database outage, which the service survives by dead-lettering, into a full
//! one), counted in `duet_budget_fallbacks_total`, and logged at most once per
//! [`WARN_EVERY`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgPool, SqlitePool};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{Budgets, Client};
use crate::{
    audit::{AuditSink, RunRecord, StartWritten, StartedRun, Store},
    metrics::Metrics,
};

/// Longest wait for the shared count at a run's start before admitting the run anyway.
pub const ADMIT_TIMEOUT: Duration = Duration::from_millis(250);
/// Longest wait for one attempt to add a run's usage.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts to add a run's usage before it is given up (and logged).
const RECORD_ATTEMPTS: u32 = 3;
/// The least time between two warnings that the shared count cannot be reached.
pub const WARN_EVERY: Duration = Duration::from_secs(5);

/// Which budget refused a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Tokens,
    Cost,
}

impl Budget {
    /// The key file's name for it, which the refusal names.
    pub const fn as_str(self) -> &'static str {
        match self {
            Budget::Tokens => "daily_token_budget",
            Budget::Cost => "daily_cost_budget_usd",
        }
    }
}

/// A run refused because its key's usage today reached a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    pub budget: Budget,
    /// Until the next midnight UTC, when the day's usage starts again from zero.
    pub retry_after: Duration,
}

/// One key's usage on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct DayUsage {
    pub runs: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

impl DayUsage {
    /// The budget this usage has reached, if any.
    fn reached(&self, budgets: &Budgets) -> Option<Budget> {
        if budgets.daily_token_budget.is_some_and(|b| self.tokens >= b) {
            Some(Budget::Tokens)
        } else if budgets
            .daily_cost_budget_usd
            .is_some_and(|b| self.cost_usd >= b)
        {
            Some(Budget::Cost)
        } else {
            None
        }
    }
}

/// The UTC day of `t`, and the time from `t` to the end of it.
pub fn day_of(t: DateTime<Utc>) -> (NaiveDate, Duration) {
    let day = t.date_naive();
    let next = day
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc());
    let left = next
        .and_then(|n| (n - t).to_std().ok())
        .unwrap_or(Duration::from_secs(1));
    (day, left.max(Duration::from_secs(1)))
}

/// Where the counts are kept.
enum Counts {
    /// This process's, by key name: the day they are for, and the usage. With the SQLite
    /// audit database, a key's first count of a day in this process starts from what the
    /// audit trail holds for that day, so a restart does not hand out fresh budgets.
    Memory(
        Mutex<HashMap<Arc<str>, (NaiveDate, DayUsage)>>,
        Option<SqlitePool>,
    ),
    /// `client_usage`, shared by every replica.
    Shared(PgPool),
}

/// The usage of every named key, and the budget check.
pub struct Usage {
    counts: Counts,
    /// Where the end-of-run additions run (on PostgreSQL), so that shutdown waits for them.
    tracker: TaskTracker,
    metrics: Metrics,
    /// When the last warning about the shared count went out.
    warned: Mutex<Option<Instant>>,
}

const ADMIT: &str = "\
WITH counted AS (
    INSERT INTO client_usage AS u (client, day, runs) VALUES ($1, $2, 1)
    ON CONFLICT (client, day) DO UPDATE SET runs = u.runs + 1, updated_at = now()
        WHERE ($3::int8 IS NULL OR u.tokens < $3::int8)
          AND ($4::float8 IS NULL OR u.cost_usd < $4::float8)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM counted) AS admitted,
       (SELECT tokens FROM client_usage WHERE client = $1 AND day = $2) AS tokens,
       (SELECT cost_usd FROM client_usage WHERE client = $1 AND day = $2) AS cost_usd";

const RECORD: &str = "\
INSERT INTO client_usage AS u (client, day, tokens, cost_usd) VALUES ($1, $2, $3, $4)
ON CONFLICT (client, day) DO UPDATE
    SET tokens = u.tokens + $3, cost_usd = u.cost_usd + $4, updated_at = now()
RETURNING tokens, cost_usd";

/// One key's runs, tokens and cost on one day, from the SQLite audit trail (the index on
/// `(client_id, created_at)` finds them).
const AUDIT_DAY: &str = "\
SELECT count(*),
       coalesce(sum((SELECT sum(coalesce(t.input_tokens, 0) + coalesce(t.output_tokens, 0))
                     FROM model_traces t WHERE t.run_id = r.run_id)), 0),
       coalesce(sum(r.cost_usd), 0.0)
FROM dual_runs r
WHERE r.client_id = ?1 AND r.created_at >= ?2 AND r.created_at < ?3";

const RELEASE: &str =
    "UPDATE client_usage SET runs = runs - 1 WHERE client = $1 AND day = $2 AND runs > 0";

const TODAY: &str = "\
SELECT client, runs, tokens, cost_usd FROM client_usage WHERE day = $1 AND client = ANY($2)";

impl Usage {
    /// Counts shared in `store` when it is PostgreSQL, else in memory.
    pub fn new(store: Option<&Store>, tracker: TaskTracker, metrics: Metrics) -> Usage {
        let counts = match store {
            Some(Store::Postgres(pool)) => Counts::Shared(pool.clone()),
            Some(Store::Sqlite(s)) => Counts::Memory(Mutex::default(), Some(s.pool().clone())),
            None => Counts::Memory(Mutex::default(), None),
        };
        Usage {
            counts,
            tracker,
            metrics,
            warned: Mutex::new(None),
        }
    }

    /// Admits a run of `client` starting at `now` and counts it, or refuses it when the
    /// key's usage today has reached one of its budgets. Keys without a name are not
    /// counted.
    pub async fn admit(&self, client: &Client, now: DateTime<Utc>) -> Result<(), OverBudget> {
        let Some(name) = client.name() else {
            return Ok(());
        };
        let budgets = client.budgets;
        let (day, retry_after) = day_of(now);
        let refuse = |budget| OverBudget {
            budget,
            retry_after,
        };
        // A budget of 0 refuses every run (a way to pause a key); the shared statement's
        // first insert of the day would admit one.
        if let Some(budget) = DayUsage::default().reached(&budgets) {
            return Err(refuse(budget));
        }
        match &self.counts {
            Counts::Memory(map, audit) => {
                self.load_day(map, audit.as_ref(), name, day).await;
                let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
                let entry = map
                    .entry(Arc::clone(name))
                    .or_insert((day, DayUsage::default()));
                if entry.0 != day {
                    *entry = (day, DayUsage::default());
                }
                if let Some(budget) = entry.1.reached(&budgets) {
                    return Err(refuse(budget));
                }
                entry.1.runs += 1;
                Ok(())
            }
            Counts::Shared(pool) => {
                let query = sqlx::query_as::<_, (bool, Option<i64>, Option<f64>)>(ADMIT)
                    .bind(&**name)
                    .bind(day)
                    .bind(budgets.daily_token_budget.map(to_db))
                    .bind(budgets.daily_cost_budget_usd)
                    .fetch_one(pool);
                let (admitted, tokens, cost_usd) =
                    match tokio::time::timeout(ADMIT_TIMEOUT, query).await {
                        Ok(Ok(row)) => row,
                        Ok(Err(e)) => return self.fall_back("error", &e),
                        Err(_) => return self.fall_back("timeout", &"no answer in time"),
                    };
                if admitted {
                    return Ok(());
                }
                let seen = DayUsage {
                    runs: 0,
                    tokens: tokens.map_or(0, from_db),
                    cost_usd: cost_usd.unwrap_or(0.0),
                };
                // The row as this statement's snapshot saw it; a replica that created it in
                // the same instant leaves it unseen: then the token budget is named if set.
                let budget =
                    seen.reached(&budgets)
                        .unwrap_or(if budgets.daily_token_budget.is_some() {
                            Budget::Tokens
                        } else {
                            Budget::Cost
                        });
                Err(refuse(budget))
            }
        }
    }

    /// Takes back the run [`Usage::admit`] counted at `now` for `client`, when it could not
    /// start after all (the service was at capacity), so `runs` counts runs that started.
    pub fn release(&self, client: &Client, now: DateTime<Utc>) {
        let Some(name) = client.name() else {
            return;
        };
        let (day, _) = day_of(now);
        match &self.counts {
            Counts::Memory(map, _) => {
                let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((d, used)) = map.get_mut(name)
                    && *d == day
                {
                    used.runs = used.runs.saturating_sub(1);
                }
            }
            Counts::Shared(pool) => {
                let query = sqlx::query(RELEASE).bind(String::from(&**name)).bind(day);
                let pool = pool.clone();
                self.tracker.spawn(async move {
                    if let Err(e) = query.execute(&pool).await {
                        warn!(error = %e, "cannot take back a run refused at capacity from the shared daily count");
                    }
                });
            }
        }
    }

    /// Makes sure `name`'s count of `day` is in memory, starting from the audit trail's runs
    /// of that day (the runs of earlier processes: this one has counted none of that day's
    /// yet, or the entry would be there). Two first runs at once both read; the first to
    /// store its reading wins and the other's is dropped, so nothing is counted twice.
    async fn load_day(
        &self,
        map: &Mutex<HashMap<Arc<str>, (NaiveDate, DayUsage)>>,
        audit: Option<&SqlitePool>,
        name: &Arc<str>,
        day: NaiveDate,
    ) {
        let Some(pool) = audit else {
            return;
        };
        let loaded = map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|(d, _)| *d >= day);
        if loaded {
            return;
        }
        let from = format!("{day}T00:00:00.000000Z");
        let until = day
            .succ_opt()
            .map_or_else(|| "9999".to_owned(), |d| format!("{d}T00:00:00.000000Z"));
        let query = sqlx::query_as::<_, (i64, i64, f64)>(AUDIT_DAY)
            .bind(&**name)
            .bind(from)
            .bind(until)
            .fetch_one(pool);
        let used = match tokio::time::timeout(ADMIT_TIMEOUT * 4, query).await {
            Ok(Ok((runs, tokens, cost_usd))) => DayUsage {
                runs: from_db(runs),
                tokens: from_db(tokens),
                cost_usd,
            },
            // Counted from zero, as before the audit trail was read: a budget is not a
            // reason to refuse runs while the database is slow.
            Ok(Err(e)) => {
                warn!(client = %name, error = %e, "cannot read today's usage from the audit database; counting from zero");
                DayUsage::default()
            }
            Err(_) => {
                warn!(client = %name, "reading today's usage from the audit database took too long; counting from zero");
                DayUsage::default()
            }
        };
        let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(Arc::clone(name)).or_insert((day, used));
        if entry.0 < day {
            *entry = (day, used);
        }
    }

    fn fall_back(&self, reason: &str, error: &dyn std::fmt::Display) -> Result<(), OverBudget> {
        self.metrics
            .budget_fallbacks_total
            .with_label_values(&[reason])
            .inc();
        let now = Instant::now();
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            *warned = Some(now);
            drop(warned);
            warn!(
                error = %error,
                "cannot reach the shared daily usage; runs are admitted without the budget check"
            );
        }
        Ok(())
    }

    /// Adds a run's usage to `name`'s count of `day` (the day the run started). Returns at
    /// once: on PostgreSQL the statement runs on the server's tracker, so that shutdown
    /// waits for it.
    pub fn record(&self, name: Arc<str>, budgets: Budgets, day: NaiveDate, used: DayUsage) {
        match &self.counts {
            Counts::Memory(map, _) => {
                let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
                let entry = map
                    .entry(Arc::clone(&name))
                    .or_insert((day, DayUsage::default()));
                if entry.0 < day {
                    *entry = (day, DayUsage::default());
                }
                // A run from a day already left behind adds to nothing kept.
                if entry.0 == day {
                    let before = entry.1;
                    entry.1.tokens = entry.1.tokens.saturating_add(used.tokens);
                    entry.1.cost_usd += used.cost_usd;
                    let after = entry.1;
                    drop(map);
                    log_crossing(&name, &budgets, &before, &after);
                }
            }
            Counts::Shared(pool) => {
                let pool = pool.clone();
                self.tracker
                    .spawn(record_shared(pool, name, budgets, day, used));
            }
        }
    }

    /// [`Usage::record`], waiting for the shared statement to be done: for measurements.
    pub async fn record_now(
        &self,
        name: Arc<str>,
        budgets: Budgets,
        day: NaiveDate,
        used: DayUsage,
    ) {
        match &self.counts {
            Counts::Memory(..) => self.record(name, budgets, day, used),
            Counts::Shared(pool) => record_shared(pool.clone(), name, budgets, day, used).await,
        }
    }

    /// Today's usage of `names` (keys with no run today have none).
    pub async fn today(
        &self,
        names: &[Arc<str>],
        now: DateTime<Utc>,
    ) -> Result<HashMap<Arc<str>, DayUsage>, sqlx::Error> {
        let (day, _) = day_of(now);
        match &self.counts {
            Counts::Memory(map, audit) => {
                for name in names {
                    self.load_day(map, audit.as_ref(), name, day).await;
                }
                let map = map.lock().unwrap_or_else(PoisonError::into_inner);
                Ok(names
                    .iter()
                    .filter_map(|n| {
                        map.get(n)
                            .filter(|(d, _)| *d == day)
                            .map(|(_, u)| (Arc::clone(n), *u))
                    })
                    .collect())
            }
            Counts::Shared(pool) => {
                let list: Vec<&str> = names.iter().map(|n| &**n).collect();
                let rows = sqlx::query_as::<_, (String, i64, i64, f64)>(TODAY)
                    .bind(day)
                    .bind(&list)
                    .fetch_all(pool)
                    .await?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(client, runs, tokens, cost_usd)| {
                        let name = names.iter().find(|n| ***n == *client)?;
                        Some((
                            Arc::clone(name),
                            DayUsage {
                                runs: from_db(runs),
                                tokens: from_db(tokens),
                                cost_usd,
                            },
                        ))
                    })
                    .collect())
            }
        }
    }
}

/// One run's usage into `client_usage`, retried a little; a run whose usage cannot be added
/// is logged (the audit record still has it: docs/audit.md shows how to recount a day).
async fn record_shared(
    pool: PgPool,
    name: Arc<str>,
    budgets: Budgets,
    day: NaiveDate,
    used: DayUsage,
) {
    let mut wait = Duration::from_millis(250);
    for attempt in 1..=RECORD_ATTEMPTS {
        let query = sqlx::query_as::<_, (i64, f64)>(RECORD)
            .bind(&*name)
            .bind(day)
            .bind(to_db(used.tokens))
            .bind(used.cost_usd)
            .fetch_one(&pool);
        let error = match tokio::time::timeout(RECORD_TIMEOUT, query).await {
            Ok(Ok((tokens, cost_usd))) => {
                let after = DayUsage {
                    runs: 0,
                    tokens: from_db(tokens),
                    cost_usd,
                };
                let before = DayUsage {
                    runs: 0,
                    tokens: after.tokens.saturating_sub(used.tokens),
                    cost_usd: after.cost_usd - used.cost_usd,
                };
                log_crossing(&name, &budgets, &before, &after);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        if attempt == RECORD_ATTEMPTS {
            warn!(
                client = %name,
                tokens = used.tokens,
                cost_usd = used.cost_usd,
                %error,
                "cannot add a run's usage to the shared daily count; it is missing from today's budget"
            );
            return;
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}

/// Logs once, when a run's usage takes its key over a budget: from then on its runs are
/// refused until midnight UTC.
fn log_crossing(name: &str, budgets: &Budgets, before: &DayUsage, after: &DayUsage) {
    if let Some(budget) = after.reached(budgets)
        && before.reached(budgets).is_none()
    {
        info!(
            client = name,
            budget = budget.as_str(),
            tokens = after.tokens,
            cost_usd = after.cost_usd,
            "a client reached a daily budget; its runs are refused until 00:00 UTC"
        );
    }
}

fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_db(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The audit sink, wrapped: each run's record, on its way to the audit trail, adds the run's
/// usage to its key's count (named keys only). Returns at once, as every sink must.
pub struct Metering {
    inner: Arc<dyn AuditSink>,
    usage: Arc<Usage>,
    keys: Arc<super::Keys>,
}

impl Metering {
    pub fn new(inner: Arc<dyn AuditSink>, usage: Arc<Usage>, keys: Arc<super::Keys>) -> Metering {
        Metering { inner, usage, keys }
    }
}

/// What a run used: input + output tokens of both models, and its `cost_usd`. A run whose
/// cost is unknown (`null`: a provider did not report its tokens) adds nothing to the cost.
pub fn used_by(record: &RunRecord) -> DayUsage {
    let tokens = record.tokens();
    DayUsage {
        runs: 1,
        tokens: tokens
            .input_tokens
            .unwrap_or(0)
            .saturating_add(tokens.output_tokens.unwrap_or(0)),
        cost_usd: record
            .cost_usd
            .filter(|c| c.is_finite() && *c > 0.0)
            .unwrap_or(0.0),
    }
}

impl AuditSink for Metering {
    fn submit(&self, record: RunRecord) {
        if let Some(name) = &record.client_id {
            // The budgets in force now: a reload since the run started applies.
            let keys = self.keys.current();
            let client = keys
                .named()
                .find(|c| c.name().is_some_and(|n| **n == **name));
            let (name, budgets) = match client.and_then(|c| c.name().map(|n| (n, c.budgets))) {
                Some((n, budgets)) => (Arc::clone(n), budgets),
                // A key removed since: its usage is still counted, under no budget.
                None => (Arc::from(name.as_str()), Budgets::default()),
            };
            let (day, _) = day_of(record.created_at);
            self.usage.record(name, budgets, day, used_by(&record));
        }
        self.inner.submit(record);
    }

    fn started(&self, run: StartedRun) -> StartWritten {
        self.inner.started(run)
    }

    fn backlogged(&self) -> bool {
        self.inner.backlogged()
    }

    fn write_failure(&self) -> Option<&'static str> {
        self.inner.write_failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::KeyFile, config::NamedKey, domain::Secret};
    use chrono::TimeZone;

    fn client(budgets: Budgets) -> Arc<Client> {
        let file = KeyFile {
            keys: vec![NamedKey {
                name: "web".into(),
                key: Secret::new("sk-web"),
                rate_limit_per_minute: None,
                burst: None,
                daily_token_budget: budgets.daily_token_budget,
                daily_cost_budget_usd: budgets.daily_cost_budget_usd,
            }],
        };
        let set = super::super::KeySet::new(&[], Some(&file), None, std::num::NonZeroU32::MIN);
        set.authenticate("sk-web").unwrap()
    }

    #[test]
    fn retry_after_is_the_time_to_midnight_utc() {
        let t = Utc.with_ymd_and_hms(2026, 3, 1, 23, 59, 30).unwrap();
        let (day, left) = day_of(t);
        assert_eq!(day, NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        assert_eq!(left, Duration::from_secs(30));
        let t = Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap();
        assert_eq!(day_of(t).1, Duration::from_secs(86_400));
    }

    #[tokio::test]
    async fn a_budget_refuses_the_run_after_the_one_that_crossed_it() {
        let usage = Usage::new(None, TaskTracker::new(), Metrics::new().unwrap());
        let c = client(Budgets {
            daily_token_budget: Some(100),
            daily_cost_budget_usd: None,
        });
        let name = Arc::clone(c.name().unwrap());
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
        let (day, _) = day_of(now);
        usage.admit(&c, now).await.unwrap();
        // Two runs in flight: both admitted; together they overshoot.
        usage.admit(&c, now).await.unwrap();
        let used = DayUsage {
            runs: 1,
            tokens: 60,
            cost_usd: 0.0,
        };
        usage.record(Arc::clone(&name), c.budgets, day, used);
        usage.admit(&c, now).await.unwrap();
        usage.record(Arc::clone(&name), c.budgets, day, used);
        usage.record(Arc::clone(&name), c.budgets, day, used);
        let refused = usage.admit(&c, now).await.unwrap_err();
        assert_eq!(refused.budget, Budget::Tokens);
        assert_eq!(refused.retry_after, Duration::from_secs(12 * 3600));
        let today = usage.today(&[Arc::clone(&name)], now).await.unwrap();
        assert_eq!(today[&name].runs, 3);
        assert_eq!(today[&name].tokens, 180);
        // The next day starts from zero.
        let tomorrow = now + chrono::Duration::days(1);
        usage.admit(&c, tomorrow).await.unwrap();
        assert_eq!(
            usage.today(&[Arc::clone(&name)], tomorrow).await.unwrap()[&name].runs,
            1
        );
    }

    #[tokio::test]
    async fn a_zero_budget_refuses_every_run() {
        let usage = Usage::new(None, TaskTracker::new(), Metrics::new().unwrap());
        let c = client(Budgets {
            daily_token_budget: None,
            daily_cost_budget_usd: Some(0.0),
        });
        let refused = usage.admit(&c, Utc::now()).await.unwrap_err();
        assert_eq!(refused.budget, Budget::Cost);
    }
}
