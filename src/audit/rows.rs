//! Rows to records and back, the same on both backends: number conversions, the columns
//! read, and building a [`RunRecord`] from its `dual_runs` row and `model_traces` rows.
//!
//! The per-backend modules (`sqlite`, `postgres`) use this; it uses neither, nor `store`,
//! so the dependencies go one way: `store` → backend → `rows`.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};
use uuid::Uuid;

use std::borrow::Cow;

use serde::Serialize;

use super::{
    AuditError, EndedRun, ModelTrace, OpenRun, OpenStatus, Result, RunRecord, StoredRun, events,
};
use crate::conversation::{Message, RunParams, Speaker};

/// One message as the `messages` column keeps it: `{"role", "content"}`.
#[derive(Serialize)]
struct MessageColumn<'a> {
    role: Speaker,
    content: Cow<'a, str>,
}

/// The `messages` column: a JSON array of `{"role", "content"}`, the system prompt first.
/// `clean` adapts each content to the backend (PostgreSQL cannot hold NUL, not even as
/// `\u0000` in `jsonb`).
pub(super) fn messages_column<'a>(
    messages: impl Iterator<Item = (Speaker, &'a str)>,
    clean: fn(&'a str) -> Cow<'a, str>,
) -> String {
    let column: Vec<MessageColumn<'_>> = messages
        .map(|(role, content)| MessageColumn {
            role,
            content: clean(content),
        })
        .collect();
    // Cannot fail: strings and a fixed enum.
    serde_json::to_string(&column).unwrap_or_else(|_| "[]".to_owned())
}

/// A `clean` for backends that hold any text (SQLite).
pub(super) fn as_is(s: &str) -> Cow<'_, str> {
    Cow::Borrowed(s)
}

/// The `params` column: the parameters as the client sent them, as JSON. `clean` adapts
/// their only text, the `stop` strings, to the backend as [`messages_column`]'s does: a
/// client's NUL in a stop string must not fail the batch its record shares with other
/// runs' records on PostgreSQL.
pub(super) fn params_column(params: &RunParams, clean: fn(&str) -> Cow<'_, str>) -> String {
    let to_json = |params: &RunParams| {
        // Cannot fail: numbers, strings and fixed words.
        serde_json::to_string(params).unwrap_or_else(|_| "{}".to_owned())
    };
    let stop = &params.sampling.stop;
    if !stop.iter().any(|s| matches!(clean(s), Cow::Owned(_))) {
        return to_json(params);
    }
    let mut cleaned = params.clone();
    for s in &mut cleaned.sampling.stop {
        *s = clean(s).into_owned();
    }
    to_json(&cleaned)
}

/// Reads the `messages` and `params` columns back.
fn json_columns<R>(run_id: Uuid, row: &R) -> Result<(Option<Vec<Message>>, Option<RunParams>)>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let messages = row
        .try_get::<Option<String>, _>("messages")?
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|e| corrupt(run_id, format!("messages: {e}")))?;
    let params = row
        .try_get::<Option<String>, _>("params")?
        .map(|json| serde_json::from_str(&json))
        .transpose()
        .map_err(|e| corrupt(run_id, format!("params: {e}")))?;
    Ok((messages, params))
}

/// Numbers are `u64` in records and signed 64-bit in both databases; values past `i64::MAX`
/// (585 million years of milliseconds) are clamped rather than refused.
pub(super) fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The schema's `CHECK (... >= 0)` keeps stored numbers non-negative.
pub(super) fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// Builds the error for a stored row that does not make a record.
pub(super) fn corrupt(run_id: Uuid, problem: impl Into<String>) -> AuditError {
    AuditError::Corrupt {
        run_id: run_id.to_string(),
        problem: problem.into(),
    }
}

/// How a backend names the run in a `WHERE` clause, reads `created_at` and the JSON columns:
/// the only things reading a record back does differently on SQLite and PostgreSQL.
pub(super) struct Dialect<R> {
    /// The `WHERE` condition on `run_id`, its one parameter the id as text.
    pub by_run_id: &'static str,
    /// The `messages` and `params` columns as text (`jsonb` on PostgreSQL).
    pub json_columns: &'static str,
    /// `created_at` is text on SQLite and `timestamptz` on PostgreSQL.
    pub created_at: fn(Uuid, &R) -> Result<DateTime<Utc>>,
}

/// The owner fingerprint of a stored run: `None` when no run has that id, `Some(None)` for
/// a run without an owner. One small read, the same for every run, so that a resume can
/// refuse another key's run in the time it refuses an unknown id (reading the whole record
/// and its traces first took measurably longer: run ids could be probed).
pub(super) async fn fetch_owner<DB>(
    pool: &Pool<DB>,
    dialect: &Dialect<DB::Row>,
    run_id: Uuid,
) -> Result<Option<Option<String>>>
where
    DB: Database,
    for<'e> &'e Pool<DB>: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB>,
    String: Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    for<'r> String: Decode<'r, DB>,
{
    let sql = format!(
        "SELECT owner_fingerprint FROM dual_runs WHERE {}",
        dialect.by_run_id
    );
    let row = sqlx::query::<DB>(&sql)
        .bind(run_id.to_string())
        .fetch_optional(pool)
        .await?;
    row.map(|row| row.try_get::<Option<String>, _>("owner_fingerprint"))
        .transpose()
        .map_err(AuditError::from)
}

/// What is stored of one run (its record, or its `running`/`interrupted` row), or `None`.
pub(super) async fn fetch<DB>(
    pool: &Pool<DB>,
    dialect: &Dialect<DB::Row>,
    run_id: Uuid,
) -> Result<Option<StoredRun>>
where
    DB: Database,
    for<'e> &'e Pool<DB>: Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> String: Encode<'q, DB>,
    String: Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    for<'r> String: Decode<'r, DB>,
    for<'r> i64: Decode<'r, DB>,
    i64: Type<DB>,
    for<'r> f64: Decode<'r, DB>,
    f64: Type<DB>,
{
    let id = run_id.to_string();
    let sql = format!(
        "SELECT client_request_id, created_at, query, system, status, total_ms, \
         service_version, events, owner_fingerprint, instance_id, client_id, cost_usd, agreement, \
         {} FROM dual_runs \
         WHERE {}",
        dialect.json_columns, dialect.by_run_id
    );
    let Some(run) = sqlx::query::<DB>(&sql)
        .bind(id.clone())
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let created_at = (dialect.created_at)(run_id, &run)?;
    let status: String = run.try_get("status")?;
    if let Some(status) = OpenStatus::parse(&status) {
        let (messages, params) = json_columns(run_id, &run)?;
        // No record, so no traces to read.
        return Ok(Some(StoredRun::Open(OpenRun {
            run_id,
            client_request_id: run.try_get("client_request_id")?,
            created_at,
            query: run.try_get("query")?,
            system: run.try_get("system")?,
            messages,
            params,
            status,
            total_ms: from_db(run.try_get("total_ms")?),
            service_version: run.try_get("service_version")?,
            instance_id: run.try_get("instance_id")?,
            owner_fingerprint: run.try_get("owner_fingerprint")?,
            client_id: run.try_get("client_id")?,
            flash: None,
            pro: None,
        })));
    }
    let sql = format!(
        "SELECT model, provider, model_name, model_version, outcome, error_type, \
         error_message, deadline, text, finish_reason, latency_ms, ttft_ms, input_tokens, \
         output_tokens, cost_usd FROM model_traces WHERE {}",
        dialect.by_run_id
    );
    let traces = sqlx::query::<DB>(&sql).bind(id).fetch_all(pool).await?;
    let record = assemble(run_id, &run, created_at, &traces)?;
    Ok(Some(StoredRun::Ended(EndedRun {
        record,
        instance_id: run.try_get("instance_id")?,
    })))
}

/// Builds a record from its `dual_runs` row and its `model_traces` rows.
fn assemble<R>(run_id: Uuid, run: &R, created_at: DateTime<Utc>, traces: &[R]) -> Result<RunRecord>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut flash = None;
    let mut pro = None;
    for row in traces {
        let role: String = row.try_get("model")?;
        let trace = trace(run_id, row)?;
        match role.as_str() {
            "flash" => flash = Some(trace),
            "pro" => pro = Some(trace),
            other => return Err(corrupt(run_id, format!("unknown model role {other:?}"))),
        }
    }
    let status: String = run.try_get("status")?;
    let (messages, params) = json_columns(run_id, run)?;
    Ok(RunRecord {
        run_id,
        client_request_id: run.try_get("client_request_id")?,
        created_at,
        query: run.try_get("query")?,
        system: run.try_get("system")?,
        messages,
        params,
        status: status.parse().map_err(|e: String| corrupt(run_id, e))?,
        total_ms: from_db(run.try_get("total_ms")?),
        service_version: run.try_get("service_version")?,
        flash: flash.ok_or_else(|| corrupt(run_id, "no flash trace"))?,
        pro: pro.ok_or_else(|| corrupt(run_id, "no pro trace"))?,
        cost_usd: run.try_get("cost_usd")?,
        agreement: run.try_get("agreement")?,
        events: events::from_column(run.try_get::<Option<String>, _>("events")?.as_deref())
            .map_err(|e| corrupt(run_id, format!("events: {e}")))?,
        owner_fingerprint: run.try_get("owner_fingerprint")?,
        client_id: run.try_get("client_id")?,
    })
}

fn trace<R>(run_id: Uuid, row: &R) -> Result<ModelTrace>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    let outcome: String = row.try_get("outcome")?;
    let opt =
        |col: &str| -> Result<Option<u64>> { Ok(row.try_get::<Option<i64>, _>(col)?.map(from_db)) };
    Ok(ModelTrace {
        provider: row.try_get("provider")?,
        model: row.try_get("model_name")?,
        model_version: row.try_get("model_version")?,
        outcome: outcome.parse().map_err(|e: String| corrupt(run_id, e))?,
        error_type: row.try_get("error_type")?,
        error_message: row.try_get("error_message")?,
        deadline: row
            .try_get::<Option<String>, _>("deadline")?
            .map(|d| d.parse())
            .transpose()
            .map_err(|e: String| corrupt(run_id, e))?,
        text: row.try_get("text")?,
        finish_reason: row.try_get("finish_reason")?,
        latency_ms: from_db(row.try_get("latency_ms")?),
        ttft_ms: opt("ttft_ms")?,
        input_tokens: opt("input_tokens")?,
        output_tokens: opt("output_tokens")?,
        cost_usd: row.try_get("cost_usd")?,
    })
}
