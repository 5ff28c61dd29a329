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

/// A pool of up to `max_connections` that connects on first use.
pub(super) fn connect_lazy(
    url: &str,
    acquire_timeout: Duration,
    max_connections: u32,
) -> Result<PgPool> {
    use sqlx::ConnectOptions;
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(AuditError::Connect)?
        // As on SQLite (see `sqlite::SqliteStore::connect_lazy`): slow statements only.
        .log_statements(log::LevelFilter::Off);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options))
}

/// A whole batch in one statement: start rows and
/// records in one upsert, the records' traces, and the notification of the runs that ended.
///
/// One statement, sent without `BEGIN` and `COMMIT`: a single statement is its own
/// transaction, committed (and, with `synchronous_commit` on, flushed) before the server
/// answers, so a batch costs one round trip instead of six. Its parts still commit or fail
/// together.
///
/// The upsert: a start row (`status` 'running') never replaces anything. A record inserts its
/// run, or finalizes the run's `running` row (contract §8), or replaces an `interrupted` one
/// (the real record of a run presumed dead, back from the journal or the dead-letter file,
/// says more than the presumption). A row that already ended is left alone, so a record is
/// stored once however often it is replayed. Only the columns a start row does not know are
/// set: the others (the run's id, time, request, instance) are the same run's, and leaving
/// them out of `SET` spares their indexes. `RETURNING` counts the records that were new or
/// finalized a row.
///
/// The traces' foreign key is checked at the end of the statement, when the sibling insert
/// has put their runs' rows in place. `pg_notify` tells the replicas waiting for these runs'
/// ends (see `notify`) that their rows may be final; it is sent on commit, so a woken replica
/// reads the record. A run whose row was already final (a second replay) is named too, which
/// costs a waiter one read.
const WRITE: &str = "\
WITH runs AS (
    INSERT INTO dual_runs (run_id, client_request_id, created_at, query, system, status,
                           total_ms, service_version, events, owner_fingerprint, instance_id,
                           messages, params, client_id, cost_usd, agreement)
    SELECT r, c, t, q, s, st, ms, v, e, o, i, m::jsonb, p::jsonb, k, cu, a
    FROM UNNEST($1::text[]::uuid[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
                $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::text[],
                $12::text[], $13::text[], $14::text[], $15::float8[], $16::float8[])
         AS u(r, c, t, q, s, st, ms, v, e, o, i, m, p, k, cu, a)
    ON CONFLICT (run_id) DO UPDATE SET
        status = excluded.status, total_ms = excluded.total_ms,
        service_version = excluded.service_version, events = excluded.events,
        owner_fingerprint = excluded.owner_fingerprint, cost_usd = excluded.cost_usd,
        agreement = excluded.agreement
    WHERE excluded.status <> 'running' AND dual_runs.status IN ('running', 'interrupted')
    RETURNING status
), traces AS (
    INSERT INTO model_traces (run_id, model, provider, model_name, model_version, outcome,
                              error_type, error_message, deadline, text, finish_reason,
                              latency_ms, ttft_ms, input_tokens, output_tokens, cost_usd)
    SELECT * FROM UNNEST($17::text[]::uuid[], $18::text[], $19::text[], $20::text[],
                         $21::text[], $22::text[], $23::text[], $24::text[], $25::text[],
                         $26::text[], $27::text[], $28::int8[], $29::int8[], $30::int8[],
                         $31::int8[], $32::float8[])
    ON CONFLICT (run_id, model) DO NOTHING
), ended AS (
    SELECT pg_notify('duet_run_ended', r) FROM UNNEST($33::text[]) AS u(r)
)
SELECT (SELECT count(*) FROM runs WHERE status <> 'running') AS written,
       (SELECT count(*) FROM ended) AS notified";

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

/// The columns of `dual_runs`, one array each, for `UNNEST`: start rows and records alike.
#[derive(Default)]
struct Runs<'a> {
    run_id: Vec<String>,
    client_request_id: Vec<Option<String>>,
    created_at: Vec<chrono::DateTime<chrono::Utc>>,
    query: Vec<String>,
    system: Vec<Option<String>>,
    status: Vec<&'static str>,
    total_ms: Vec<i64>,
    service_version: Vec<String>,
    events: Vec<Option<String>>,
    owner: Vec<Option<&'a str>>,
    instance_id: Vec<Option<&'a str>>,
    messages: Vec<Option<String>>,
    params: Vec<Option<String>>,
    client: Vec<Option<&'a str>>,
    cost_usd: Vec<Option<f64>>,
    agreement: Vec<Option<f64>>,
}

impl<'a> Runs<'a> {
    fn with_capacity(n: usize) -> Self {
        Runs {
            run_id: Vec::with_capacity(n),
            client_request_id: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            query: Vec::with_capacity(n),
            system: Vec::with_capacity(n),
            status: Vec::with_capacity(n),
            total_ms: Vec::with_capacity(n),
            service_version: Vec::with_capacity(n),
            events: Vec::with_capacity(n),
            owner: Vec::with_capacity(n),
            instance_id: Vec::with_capacity(n),
            messages: Vec::with_capacity(n),
            params: Vec::with_capacity(n),
            client: Vec::with_capacity(n),
            cost_usd: Vec::with_capacity(n),
            agreement: Vec::with_capacity(n),
        }
    }

    /// A start row: `running`, no total, no events, cost or agreement yet.
    fn started(&mut self, s: &'a StartedRun) {
        self.run_id.push(s.run_id.to_string());
        self.client_request_id
            .push(opt_text(s.client_request_id.as_deref()));
        self.created_at.push(s.created_at);
        self.query.push(text(&s.query));
        self.system.push(opt_text(s.system.as_deref()));
        self.status.push("running");
        self.total_ms.push(0);
        self.service_version.push(crate::SERVICE_VERSION.to_owned());
        self.events.push(None);
        self.owner.push(s.owner_fingerprint.as_deref());
        self.instance_id.push(s.instance_id.as_deref());
        self.messages.push(
            s.conversation
                .as_ref()
                .map(|c| messages_column(c.messages(), json_text)),
        );
        self.params
            .push(s.params.as_ref().map(|p| params_column(p, json_text)));
        self.client.push(s.client_id.as_deref());
        self.cost_usd.push(None);
        self.agreement.push(None);
    }

    fn ended(&mut self, r: &'a RunRecord, instance_id: Option<&'a str>) {
        self.run_id.push(r.run_id.to_string());
        self.client_request_id
            .push(opt_text(r.client_request_id.as_deref()));
        self.created_at.push(r.created_at);
        self.query.push(text(&r.query));
        self.system.push(opt_text(r.system.as_deref()));
        self.status.push(r.status.as_str());
        self.total_ms.push(to_db(r.total_ms));
        self.service_version.push(text(&r.service_version));
        self.events.push(Some(events::to_column(&r.events)));
        self.owner.push(r.owner_fingerprint.as_deref());
        self.instance_id.push(instance_id);
        self.messages.push(
            r.messages.as_ref().map(|m| {
                messages_column(m.iter().map(|m| (m.role, m.content.as_str())), json_text)
            }),
        );
        self.params
            .push(r.params.as_ref().map(|p| params_column(p, json_text)));
        self.client.push(r.client_id.as_deref());
        self.cost_usd.push(r.cost_usd);
        self.agreement.push(r.agreement);
    }
}

/// Batches the writer keeps in flight on PostgreSQL: while one commits (its WAL flushed),
/// the next is already being inserted, on a second connection.
///
/// Why: the server does a batch's inserts on one backend, one core, and waits for the flush
/// at its commit; with one batch at a time the second core and the flush were idle time
/// (docs/benchmarks.md, "Audit writer, fourth pass"). This replaces the previous pass's two
/// transactions per large batch, which measured slower with two batches in flight.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// Writes a batch as one statement ([`WRITE`]), which is its own transaction.
///
/// Batches in flight together may share runs: a run's start row in one, its record in the
/// next (the queue is in order, so never the other way round, except when a failed batch is
/// retried after the next one started). Whatever order they reach the server in, the run ends
/// with one row holding its record: the record inserts the row or finalizes it, a start row
/// never replaces anything, and an insert that meets the other transaction's uncommitted row
/// waits for it to commit or roll back. They must not wait for each other in a cycle, though
/// (a deadlock: the server aborts one, which fails its batch): so every statement takes its
/// rows in the order of their run ids, start rows and records merged (`write`), and two
/// transactions that lock rows in one order cannot each wait for the other.
pub(super) async fn write_batch(pool: &PgPool, batch: &Batch<'_>) -> Result<u64> {
    write(pool, batch.instance_id, &batch.started, &batch.records).await
}

/// A row of `dual_runs` to write: a start row or a record.
enum Write<'a> {
    Started(&'a StartedRun),
    Ended(&'a RunRecord),
}

impl Write<'_> {
    fn run_id(&self) -> Uuid {
        match self {
            Write::Started(s) => s.run_id,
            Write::Ended(r) => r.run_id,
        }
    }
}

/// One transaction, as one statement ([`WRITE`]): the start rows, the records' run rows and
/// traces, and the notification of the runs that ended.
async fn write(
    pool: &PgPool,
    instance_id: Option<&str>,
    started_runs: &[&StartedRun],
    records: &[&RunRecord],
) -> Result<u64> {
    if started_runs.is_empty() && records.is_empty() {
        return Ok(0);
    }
    // Every row in the order of its run id, start rows and records merged, so that
    // transactions in flight together take their row locks in one order (see `write_batch`).
    let mut rows: Vec<Write<'_>> = started_runs
        .iter()
        .map(|s| Write::Started(s))
        .chain(records.iter().map(|r| Write::Ended(r)))
        .collect();
    rows.sort_unstable_by_key(Write::run_id);
    let mut runs = Runs::with_capacity(rows.len());
    let mut t = Traces::with_capacity(2 * records.len());
    let mut ended = Vec::with_capacity(records.len());
    for row in rows {
        match row {
            Write::Started(s) => runs.started(s),
            Write::Ended(r) => {
                runs.ended(r, instance_id);
                t.push(r.run_id, "flash", &r.flash);
                t.push(r.run_id, "pro", &r.pro);
                ended.push(r.run_id.to_string());
            }
        }
    }

    let mut conn = pool.acquire().await?;
    let result = sqlx::query_scalar::<_, i64>(WRITE)
        .bind(&runs.run_id)
        .bind(&runs.client_request_id)
        .bind(&runs.created_at)
        .bind(&runs.query)
        .bind(&runs.system)
        .bind(&runs.status)
        .bind(&runs.total_ms)
        .bind(&runs.service_version)
        .bind(&runs.events)
        .bind(&runs.owner)
        .bind(&runs.instance_id)
        .bind(&runs.messages)
        .bind(&runs.params)
        .bind(&runs.client)
        .bind(&runs.cost_usd)
        .bind(&runs.agreement)
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
        .bind(&ended)
        .fetch_one(&mut *conn)
        .await;
    match result {
        Ok(written) => Ok(u64::try_from(written).unwrap_or_default()),
        Err(e) => {
            // A connection whose statement failed is not trusted again (see `sqlite`): a new
            // one costs a connect, a wrong connection state costs records.
            conn.close_on_drop();
            Err(e.into())
        }
    }
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
