//! PostgreSQL SQL for the audit store: bulk inserts through `UNNEST` of array parameters,
//! and reading back.
//!
//! `UNNEST` keeps the statement text the same whatever the batch size, so the prepared
//! statement is reused, and it has no bound-parameter limit to chunk around (unlike a
//! multi-row `VALUES` list).

use std::{borrow::Cow, time::Duration};

use sqlx::{
    PgPool, Row,
    postgres::{PgPoolOptions, PgRow},
};
use uuid::Uuid;

use super::{
    AuditError, Deadline, ModelTrace, Result, RunRecord, StartedRun, events,
    rows::{Dialect, messages_column, params_column, to_db},
    store::Batch,
};

/// How reading a record back differs on PostgreSQL: `$1` parameters (the id bound as text,
/// like every id here), `created_at` as `timestamptz`.
pub(super) const DIALECT: Dialect<PgRow> = Dialect {
    by_run_id: "run_id = $1::text::uuid",
    json_columns: "messages::text AS messages, params::text AS params",
    created_at: |_, row| Ok(row.try_get("created_at")?),
};

/// A pool that connects on first use.
pub(super) fn connect_lazy(url: &str, acquire_timeout: Duration) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(acquire_timeout)
        .connect_lazy(url)
        .map_err(AuditError::Connect)
}

/// The `running` rows of runs that started. A row already there (the run ended and its
/// record came first) is left alone.
const INSERT_STARTED: &str = "\
INSERT INTO dual_runs (run_id, client_request_id, created_at, query, system, status, total_ms,
                       service_version, owner_fingerprint, instance_id, messages, params,
                       client_id)
SELECT r, c, t, q, s, 'running', 0, $6, o, i, m::jsonb, p::jsonb, k
FROM UNNEST($1::text[]::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
     AS u(r, c, t, q, s, o, i, m, p, k)
ON CONFLICT (run_id) DO NOTHING";

/// A record's run row: inserted, or finalizing the run's `running` row (contract §8), or
/// replacing an `interrupted` one (the real record of a run presumed dead, back from the
/// journal or the dead-letter file, says more than the presumption). A row that already
/// ended is left alone, so a record is stored once however often it is replayed. Only the
/// columns a start row does not know are set: the others (the run's id, time, request,
/// instance) are the same run's, and leaving them out of `SET` spares their indexes.
const INSERT_RUNS: &str = "\
INSERT INTO dual_runs (run_id, client_request_id, created_at, query, system, status, total_ms,
                       service_version, events, owner_fingerprint, instance_id, messages, params,
                       client_id, cost_usd, agreement)
SELECT r, c, t, q, s, st, ms, v, e, o, $11, m::jsonb, p::jsonb, k, cu, a
FROM UNNEST($1::text[]::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
            $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[], $12::text[],
            $13::text[], $14::text[], $15::float8[], $16::float8[])
     AS u(r, c, t, q, s, st, ms, v, e, o, m, p, k, cu, a)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, total_ms = excluded.total_ms,
    service_version = excluded.service_version, events = excluded.events,
    owner_fingerprint = excluded.owner_fingerprint, cost_usd = excluded.cost_usd,
    agreement = excluded.agreement
WHERE dual_runs.status IN ('running', 'interrupted')";

/// Tells the replicas waiting for these runs' ends (see `notify`) that their rows may be
/// final. Sent on commit, so a woken replica reads the record; a run whose row was already
/// final (a second replay) is named too, which costs a waiter one read.
const NOTIFY_ENDED: &str = "SELECT pg_notify('duet_run_ended', r) FROM UNNEST($1::text[]) AS u(r)";

const INSERT_TRACES: &str = "\
INSERT INTO model_traces (run_id, model, provider, model_name, model_version, outcome,
                          error_type, error_message, deadline, text, finish_reason, latency_ms,
                          ttft_ms, input_tokens, output_tokens, cost_usd)
SELECT * FROM UNNEST($1::text[]::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
                     $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::float8[])
ON CONFLICT (run_id, model) DO NOTHING";

/// PostgreSQL text cannot hold NUL, which JSON (and so a query) can carry as `\u0000`.
/// Without this one such record would fail its whole batch on every retry and replay; the
/// stored text shows U+FFFD where the NUL was instead.
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
}

/// [`text`] for JSON contents: `jsonb` refuses NUL even escaped.
fn json_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The columns of the start rows, one array each, for `UNNEST`.
#[derive(Default)]
struct Started {
    run_id: Vec<String>,
    client_request_id: Vec<Option<String>>,
    created_at: Vec<chrono::DateTime<chrono::Utc>>,
    query: Vec<String>,
    system: Vec<Option<String>>,
    owner: Vec<Option<String>>,
    instance_id: Vec<Option<String>>,
    messages: Vec<Option<String>>,
    params: Vec<Option<String>>,
    client: Vec<Option<String>>,
}

/// Batches of at least this many items (start rows and records) are written as two
/// transactions at once; smaller ones as one.
const SPLIT_AT: usize = 128;

/// Writes a batch: one transaction, or two on two connections at once for a large one.
///
/// Why two: the server does a batch's inserts on one backend, one core, and that is what
/// bounds the writer on PostgreSQL — about 60 µs of server CPU per run with its start row and
/// its record (both touch every index of `dual_runs`, since finalizing a row changes its
/// indexed `status`), while duet's own part is under 10 µs. Two transactions let the
/// server use a second core and overlap one commit's flush with the other's inserts.
/// Small batches (an idle service writes a record or two at a time) stay whole: a second
/// transaction would only add a commit.
///
/// Safe because nothing in one half waits on the other: a batch never holds both the start
/// row and the record of one run (`Batch::new` drops such start rows), so the halves touch
/// disjoint rows. Both halves always run to their end (`join`, not `try_join`), so no
/// transaction is dropped half-way; if either fails the batch fails and is retried whole,
/// and the half that committed is skipped then, as every insert here is idempotent.
pub(super) async fn write_batch(pool: &PgPool, batch: &Batch<'_>) -> Result<u64> {
    let (started, records) = (&batch.started[..], &batch.records[..]);
    if started.len() + records.len() < SPLIT_AT {
        return write_part(pool, batch.instance_id, started, records).await;
    }
    let (s1, s2) = started.split_at(started.len() / 2);
    let (r1, r2) = records.split_at(records.len() / 2);
    let (a, b) = tokio::join!(
        write_part(pool, batch.instance_id, s1, r1),
        write_part(pool, batch.instance_id, s2, r2),
    );
    Ok(a? + b?)
}

/// One transaction: the start rows, the records' run rows and traces, and the notification
/// of the runs that ended.
async fn write_part(
    pool: &PgPool,
    instance_id: Option<&str>,
    started_runs: &[&StartedRun],
    records: &[&RunRecord],
) -> Result<u64> {
    if started_runs.is_empty() && records.is_empty() {
        return Ok(0);
    }
    let mut started = Started::default();
    for s in started_runs {
        started.run_id.push(s.run_id.to_string());
        started
            .client_request_id
            .push(opt_text(s.client_request_id.as_deref()));
        started.created_at.push(s.created_at);
        started.query.push(text(&s.query));
        started.system.push(opt_text(s.system.as_deref()));
        started.owner.push(s.owner_fingerprint.clone());
        started.instance_id.push(s.instance_id.clone());
        started.messages.push(
            s.conversation
                .as_ref()
                .map(|c| messages_column(c.messages(), json_text)),
        );
        started.params.push(s.params.as_ref().map(params_column));
        started
            .client
            .push(s.client_id.as_deref().map(str::to_owned));
    }
    let n = records.len();
    let mut run_ids = Vec::with_capacity(n);
    let mut client_ids = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut queries = Vec::with_capacity(n);
    let mut systems = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut stored_events = Vec::with_capacity(n);
    let mut owners = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut params = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    let mut costs = Vec::with_capacity(n);
    let mut agreements = Vec::with_capacity(n);
    for r in records {
        run_ids.push(r.run_id.to_string());
        client_ids.push(opt_text(r.client_request_id.as_deref()));
        created.push(r.created_at);
        queries.push(text(&r.query));
        systems.push(opt_text(r.system.as_deref()));
        statuses.push(r.status.as_str());
        totals.push(to_db(r.total_ms));
        versions.push(text(&r.service_version));
        stored_events.push(events::to_column(&r.events));
        owners.push(r.owner_fingerprint.as_deref());
        messages.push(
            r.messages.as_ref().map(|m| {
                messages_column(m.iter().map(|m| (m.role, m.content.as_str())), json_text)
            }),
        );
        params.push(r.params.as_ref().map(params_column));
        clients.push(r.client_id.as_deref());
        costs.push(r.cost_usd);
        agreements.push(r.agreement);
    }

    let mut t = Traces::with_capacity(2 * n);
    for r in records {
        t.push(r.run_id, "flash", &r.flash);
        t.push(r.run_id, "pro", &r.pro);
    }

    let mut conn = pool.acquire().await?;
    let result = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if !started.run_id.is_empty() {
            sqlx::query(INSERT_STARTED)
                .bind(&started.run_id)
                .bind(&started.client_request_id)
                .bind(&started.created_at)
                .bind(&started.query)
                .bind(&started.system)
                .bind(crate::SERVICE_VERSION)
                .bind(&started.owner)
                .bind(&started.instance_id)
                .bind(&started.messages)
                .bind(&started.params)
                .bind(&started.client)
                .execute(&mut *tx)
                .await?;
        }
        if records.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let written = sqlx::query(INSERT_RUNS)
            .bind(&run_ids)
            .bind(&client_ids)
            .bind(&created)
            .bind(&queries)
            .bind(&systems)
            .bind(&statuses)
            .bind(&totals)
            .bind(&versions)
            .bind(&stored_events)
            .bind(&owners)
            .bind(instance_id)
            .bind(&messages)
            .bind(&params)
            .bind(&clients)
            .bind(&costs)
            .bind(&agreements)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(INSERT_TRACES)
            .bind(&t.run_id)
            .bind(&t.model)
            .bind(&t.provider)
            .bind(&t.model_name)
            .bind(&t.model_version)
            .bind(&t.outcome)
            .bind(&t.error_type)
            .bind(&t.error_message)
            .bind(&t.deadline)
            .bind(&t.text)
            .bind(&t.finish_reason)
            .bind(&t.latency_ms)
            .bind(&t.ttft_ms)
            .bind(&t.input_tokens)
            .bind(&t.output_tokens)
            .bind(&t.cost_usd)
            .execute(&mut *tx)
            .await?;
        sqlx::query(NOTIFY_ENDED)
            .bind(&run_ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok::<_, AuditError>(written)
    }
    .await;
    if result.is_err() {
        // A connection whose transaction failed is not trusted again (see `sqlite`): a new
        // one costs a connect, a wrong transaction state costs records.
        conn.close_on_drop();
    }
    result
}

/// The columns of `model_traces`, one array each, for `UNNEST`.
#[derive(Default)]
struct Traces {
    run_id: Vec<String>,
    model: Vec<&'static str>,
    provider: Vec<String>,
    model_name: Vec<String>,
    model_version: Vec<Option<String>>,
    outcome: Vec<&'static str>,
    error_type: Vec<Option<String>>,
    error_message: Vec<Option<String>>,
    deadline: Vec<Option<&'static str>>,
    text: Vec<String>,
    finish_reason: Vec<Option<String>>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    input_tokens: Vec<Option<i64>>,
    output_tokens: Vec<Option<i64>>,
    cost_usd: Vec<Option<f64>>,
}

impl Traces {
    fn with_capacity(n: usize) -> Self {
        Traces {
            run_id: Vec::with_capacity(n),
            text: Vec::with_capacity(n),
            ..Traces::default()
        }
    }

    fn push(&mut self, run_id: Uuid, role: &'static str, t: &ModelTrace) {
        self.run_id.push(run_id.to_string());
        self.model.push(role);
        self.provider.push(text(&t.provider));
        self.model_name.push(text(&t.model));
        self.model_version
            .push(opt_text(t.model_version.as_deref()));
        self.outcome.push(t.outcome.as_str());
        self.error_type.push(opt_text(t.error_type.as_deref()));
        self.error_message
            .push(opt_text(t.error_message.as_deref()));
        self.deadline.push(t.deadline.map(Deadline::as_str));
        self.text.push(text(&t.text));
        self.finish_reason
            .push(opt_text(t.finish_reason.as_deref()));
        self.latency_ms.push(to_db(t.latency_ms));
        self.ttft_ms.push(t.ttft_ms.map(to_db));
        self.input_tokens.push(t.input_tokens.map(to_db));
        self.output_tokens.push(t.output_tokens.map(to_db));
        self.cost_usd.push(t.cost_usd);
    }
}
