//! Listing runs for `GET /runs` (contract §12): filters, newest first, an opaque keyset
//! cursor, and a row stream for the JSON lines export.
//!
//! One SQL text per request, the same shape on both backends; only placeholders and casts
//! differ. Every bound value is text (SQLite keeps times and ids as text; PostgreSQL casts),
//! so that one `Vec<String>` carries the parameters of either.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use super::{Result, Store, rows::corrupt, sqlite::format_time};

/// The statuses a stored run can have (`running` and `interrupted` included).
pub const STATUSES: [&str; 6] = [
    "ok",
    "partial",
    "failed",
    "cancelled",
    "running",
    "interrupted",
];

/// Which runs to list. Every field narrows the list; `None` leaves it open.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// One of [`STATUSES`].
    pub status: Option<String>,
    /// Runs created at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Runs created before this instant.
    pub until: Option<DateTime<Utc>>,
    /// Runs where either model's `model_name` is exactly this.
    pub model_name: Option<String>,
    pub client_id: Option<String>,
    /// A case-sensitive substring of the stored query.
    pub q: Option<String>,
    /// Runs strictly older (in list order) than this one.
    pub after: Option<Cursor>,
}

/// Where a page ended: the last run's `(created_at, run_id)`. The list is ordered by this
/// pair, so the next page starts strictly after it whatever was inserted meanwhile (new runs
/// sort before it, and no run moves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub run_id: Uuid,
}

impl Cursor {
    /// base64url (no padding) of `created_at|run_id`: opaque to clients, readable by us.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}|{}", format_time(&self.created_at), self.run_id))
    }

    /// `None` for anything [`Cursor::encode`] did not make.
    pub fn decode(text: &str) -> Option<Cursor> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let (time, id) = text.split_once('|')?;
        Some(Cursor {
            created_at: DateTime::parse_from_rfc3339(time).ok()?.with_timezone(&Utc),
            run_id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// One model's part of a summary.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ModelSummary {
    /// `ok`, `timeout`, `error`, `skipped` or `cancelled`.
    pub outcome: String,
    /// The model name sent upstream.
    pub model_name: String,
}

/// One run in a list: what tells runs apart at a glance; `GET /runs/{run_id}` has the rest.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct RunSummary {
    pub run_id: Uuid,
    pub created_at: DateTime<Utc>,
    /// `ok`, `partial`, `failed`, `cancelled`, `running` or `interrupted`.
    pub status: String,
    /// 0 while the run is `running` or when it was `interrupted`.
    pub total_ms: u64,
    /// The query as stored (a placeholder when `AUDIT_STORE_TEXT` kept it out).
    pub query: String,
    pub client_id: Option<String>,
    pub cost_usd: Option<f64>,
    /// How far the Flash preview used the same words as the Pro answer, in [0, 1]
    /// ([`crate::agreement`]); null unless both answered `ok`, and in runs stored before
    /// it was measured.
    #[schema(minimum = 0, maximum = 1)]
    pub agreement: Option<f64>,
    /// Null while the run is `running` and when it was `interrupted` (no traces).
    pub flash: Option<ModelSummary>,
    pub pro: Option<ModelSummary>,
}

/// The two backends' differences in this one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Sqlite,
    Postgres,
}

struct Sql {
    flavour: Flavour,
    text: String,
    binds: Vec<String>,
}

impl Sql {
    /// Binds `value` and returns its placeholder, with `cast` on PostgreSQL.
    fn bind(&mut self, value: String, cast: &str) -> String {
        self.binds.push(value);
        match self.flavour {
            Flavour::Sqlite => "?".to_owned(),
            Flavour::Postgres => format!("${}{cast}", self.binds.len()),
        }
    }

    fn time(&mut self, t: &DateTime<Utc>) -> String {
        // Text order is time order in SQLite's fixed-width format.
        self.bind(format_time(t), "::timestamptz")
    }
}

/// The SQL and its text parameters for a filter; `limit` rows at most when given. Public
/// for the tests that check with `EXPLAIN` that every filter uses an index.
pub fn list_sql(flavour: Flavour, filter: &RunFilter, limit: Option<u32>) -> (String, Vec<String>) {
    let (run_id, created_at) = match flavour {
        Flavour::Sqlite => ("d.run_id", "d.created_at"),
        Flavour::Postgres => (
            "d.run_id::text",
            "to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        ),
    };
    let mut sql = Sql {
        flavour,
        text: String::new(),
        binds: Vec::new(),
    };
    let mut conditions: Vec<String> = Vec::new();
    if let Some(status) = &filter.status {
        conditions.push(format!("d.status = {}", sql.bind(status.clone(), "")));
    }
    if let Some(since) = &filter.since {
        conditions.push(format!("d.created_at >= {}", sql.time(since)));
    }
    if let Some(until) = &filter.until {
        conditions.push(format!("d.created_at < {}", sql.time(until)));
    }
    if let Some(name) = &filter.model_name {
        // IN over the traces' (model_name, run_id) index: the matching runs are looked up
        // by key instead of every run's traces being read.
        conditions.push(format!(
            "d.run_id IN (SELECT m.run_id FROM model_traces m WHERE m.model_name = {})",
            sql.bind(name.clone(), "")
        ));
    }
    if let Some(client) = &filter.client_id {
        conditions.push(format!("d.client_id = {}", sql.bind(client.clone(), "")));
    }
    if let Some(q) = &filter.q {
        // Case-sensitive on both backends. SQLite: a plain substring test (its LIKE folds
        // ASCII case, and no index could serve it anyway). PostgreSQL: the trigram index
        // (when migration 0011 could create it) holds ended runs only (0014), so the ended
        // runs are asked by LIKE — with `%`, `_` and `\` in `q` escaped so that they mean
        // themselves — which that index serves, and the running ones by `strpos`, which
        // `dual_runs_running` narrows to the runs in flight. The two tests differ on
        // purpose: were both LIKE, the planner would factor the common test out of the two
        // alternatives and then prove neither index's predicate.
        conditions.push(match flavour {
            Flavour::Sqlite => format!("instr(d.query, {}) > 0", sql.bind(q.clone(), "")),
            Flavour::Postgres => {
                let like = sql.bind(format!("%{}%", like_escaped(q)), "");
                let raw = sql.bind(q.clone(), "");
                format!(
                    "((d.status <> 'running' AND d.query LIKE {like}) \
                     OR (d.status = 'running' AND strpos(d.query, {raw}) > 0))"
                )
            }
        });
    }
    if let Some(after) = &filter.after {
        let t = sql.time(&after.created_at);
        let id = sql.bind(after.run_id.to_string(), "::uuid");
        conditions.push(format!("(d.created_at, d.run_id) < ({t}, {id})"));
    }
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let limit = limit.map(|n| format!("LIMIT {n}")).unwrap_or_default();
    sql.text = format!(
        "SELECT {run_id} AS run_id, {created_at} AS created_at, d.status, d.total_ms, d.query, \
         d.client_id, d.cost_usd, d.agreement, f.outcome AS flash_outcome, f.model_name AS flash_model, \
         p.outcome AS pro_outcome, p.model_name AS pro_model \
         FROM dual_runs d \
         LEFT JOIN model_traces f ON f.run_id = d.run_id AND f.model = 'flash' \
         LEFT JOIN model_traces p ON p.run_id = d.run_id AND p.model = 'pro' \
         {where_clause} ORDER BY d.created_at DESC, d.run_id DESC {limit}"
    );
    (sql.text, sql.binds)
}

/// `text` with LIKE's wildcards and its escape character (backslash) escaped.
fn like_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn summary<R>(row: &R) -> Result<RunSummary>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get("run_id")?;
    let run_id = Uuid::parse_str(&id).map_err(|e| corrupt(Uuid::nil(), format!("run_id: {e}")))?;
    let time: String = row.try_get("created_at")?;
    let created_at = DateTime::parse_from_rfc3339(&time)
        .map_err(|e| corrupt(run_id, format!("created_at {time:?}: {e}")))?
        .with_timezone(&Utc);
    let model = |outcome: &str, name: &str| -> Result<Option<ModelSummary>> {
        let outcome: Option<String> = row.try_get(outcome)?;
        let name: Option<String> = row.try_get(name)?;
        Ok(outcome.zip(name).map(|(outcome, model_name)| ModelSummary {
            outcome,
            model_name,
        }))
    };
    Ok(RunSummary {
        run_id,
        created_at,
        status: row.try_get("status")?,
        total_ms: super::rows::from_db(row.try_get("total_ms")?),
        query: row.try_get("query")?,
        client_id: row.try_get("client_id")?,
        cost_usd: row.try_get("cost_usd")?,
        agreement: row.try_get("agreement")?,
        flash: model("flash_outcome", "flash_model")?,
        pro: model("pro_outcome", "pro_model")?,
    })
}

impl Store {
    fn flavour(&self) -> Flavour {
        match self {
            Store::Sqlite(_) => Flavour::Sqlite,
            Store::Postgres(_) => Flavour::Postgres,
        }
    }

    /// One page: at most `limit` runs matching `filter`, newest first.
    pub async fn list_runs(&self, filter: &RunFilter, limit: u32) -> Result<Vec<RunSummary>> {
        let (text, binds) = list_sql(self.flavour(), filter, Some(limit));
        match self {
            Store::Sqlite(s) => {
                let mut query = sqlx::query(&text);
                for b in binds {
                    query = query.bind(b);
                }
                let rows = query.fetch_all(s.pool()).await?;
                rows.iter().map(summary).collect()
            }
            Store::Postgres(pool) => {
                let mut query = sqlx::query(&text);
                for b in binds {
                    query = query.bind(b);
                }
                let rows = query.fetch_all(pool).await?;
                rows.iter().map(summary).collect()
            }
        }
    }

    /// Every run matching `filter`, newest first, read row by row from the database: the
    /// caller holds one row at a time, never the result.
    #[expect(
        clippy::disallowed_methods,
        reason = "the task ends with the stream: when the rows run out, on an error, or when \
                  the receiver (the response body) is dropped"
    )]
    pub fn stream_runs(
        &self,
        filter: &RunFilter,
    ) -> impl Stream<Item = Result<RunSummary>> + Send + 'static {
        let (text, binds) = list_sql(self.flavour(), filter, None);
        let store = self.clone();
        // The query borrows its SQL text and pool: a task owns both and hands rows over a
        // small channel, which also bounds how far the database runs ahead of the client.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RunSummary>>(32);
        tokio::spawn(async move {
            macro_rules! pump {
                ($pool:expr) => {{
                    let mut query = sqlx::query(&text);
                    for b in binds {
                        query = query.bind(b);
                    }
                    let mut rows = query.fetch($pool).map_err(super::AuditError::from);
                    while let Some(row) = rows.next().await {
                        let item = row.and_then(|row| summary(&row));
                        let failed = item.is_err();
                        // A closed channel is a client that went away: stop reading.
                        if tx.send(item).await.is_err() || failed {
                            break;
                        }
                    }
                }};
            }
            match &store {
                Store::Sqlite(s) => pump!(s.pool()),
                Store::Postgres(pool) => pump!(pool),
            }
        });
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
    }
}
