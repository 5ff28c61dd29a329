//! `duet bench audit`: records per second the audit writer sustains on one database.
//!
//! The records go through the service's own path: [`AuditWriter::submit`] into the bounded
//! queue, the one writer task, batched transactions. The generator keeps the queue below its
//! high-water mark (it waits a millisecond when the queue is that full) rather than letting
//! it overflow: an overflowing queue dead-letters, which would measure the file, not the
//! database. The result is therefore the writer's sustained rate with the queue kept busy.
//!
//! Each run also sends its start (the `running` row, contract §8) as the service does, a
//! fixed number of runs ahead of its record (`IN_FLIGHT`): so batches mix start rows of
//! new runs with records that finalize rows written earlier, as under real load.

use std::{collections::VecDeque, path::PathBuf, sync::Arc, time::Duration};

use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use super::BenchError;
use crate::{
    audit::{
        AuditSink, AuditWriter, ModelTrace, Outcome, RunRecord, RunStatus, StartedRun, Store,
        StoredEvent, WriterOptions,
    },
    metrics::Metrics,
};

/// Runs between a run's start and its record: as if this many runs were in flight.
const IN_FLIGHT: usize = 1000;

/// What to write where.
#[derive(Debug, Clone)]
pub struct Options {
    pub database_url: String,
    pub records: u64,
    /// Bytes of answer text per model (a short answer is a few hundred bytes).
    pub text_bytes: usize,
    pub deadletter: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: &'static str,
    pub records: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    /// Highest queue depth seen by the generator.
    pub peak_queue_depth: usize,
    /// Records the writer gave up on (must be 0).
    pub deadlettered: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit {}: {} records in {:.2}s = {:.0} records/s (peak queue {}, dead-lettered {})",
            self.backend,
            self.records,
            self.elapsed_s,
            self.records_per_s,
            self.peak_queue_depth,
            self.deadlettered
        )
    }
}

fn trace(role: &str, text: &str) -> ModelTrace {
    ModelTrace {
        provider: "openai".into(),
        model: format!("bench-{role}"),
        model_version: Some("bench-2025-01-01".into()),
        outcome: Outcome::Ok,
        error_type: None,
        error_message: None,
        deadline: None,
        text: text.to_owned(),
        finish_reason: Some("stop".into()),
        latency_ms: 400,
        ttft_ms: Some(200),
        input_tokens: Some(12),
        output_tokens: Some(19),
        cost_usd: Some(0.000_051),
    }
}

fn event(seq: u32, name: &str, data: Option<&str>) -> StoredEvent {
    StoredEvent {
        seq,
        event: name.to_owned(),
        data: data.and_then(|d| serde_json::value::RawValue::from_string(d.to_owned()).ok()),
    }
}

fn record(text: &str) -> RunRecord {
    RunRecord {
        run_id: Uuid::now_v7(),
        client_request_id: None,
        created_at: Utc::now(),
        query: "Write a haiku about the sea.".into(),
        system: None,
        messages: None,
        params: None,
        status: RunStatus::Ok,
        total_ms: 400,
        service_version: crate::SERVICE_VERSION.into(),
        flash: trace("flash", text),
        pro: trace("pro", text),
        // What a real run stores for resumes: its non-delta events, the answers without
        // their data (it is the traces above).
        events: vec![
            event(0, "start", Some(r#"{"run_id":"r","models":{}}"#)),
            event(1, "flash", None),
            event(2, "pro", None),
            event(3, "done", Some(r#"{"run_id":"r","status":"ok"}"#)),
        ],
        owner_fingerprint: None,
        client_id: None,
        cost_usd: Some(0.000_102),
        agreement: Some(1.0),
    }
}

pub async fn run(options: Options) -> Result<Report, BenchError> {
    let store = Store::connect(&options.database_url).await?;
    store.migrate().await?;
    let metrics = Metrics::new()?;
    // The writer as `duet serve` starts it: on a thread of its own, with its own connections.
    let writer_options = WriterOptions::new(&options.deadletter).with_own_thread();
    let high_water = writer_options.high_water;
    let writer = AuditWriter::start(
        Arc::new(store.for_writer(&options.database_url)?),
        writer_options,
        metrics.clone(),
    )?;
    let text: String = "Gray waves fold to foam "
        .chars()
        .cycle()
        .take(options.text_bytes)
        .collect();
    let started = std::time::Instant::now();
    let mut peak = 0;
    let mut submitted = 0;
    let mut created = 0;
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT + 1);
    // Bounded by the record count; each wait is a millisecond while the writer catches up.
    while submitted < options.records {
        let depth = writer.queue_depth();
        peak = peak.max(depth);
        if depth >= high_water {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        if created < options.records {
            let run = record(&text);
            // Nothing waits on the row here: the benchmark measures the writer's pace.
            let _ = writer.started(StartedRun::of(&run));
            in_flight.push_back(run);
            created += 1;
            if in_flight.len() <= IN_FLIGHT {
                continue;
            }
        }
        if let Some(run) = in_flight.pop_front() {
            writer.submit(run);
            submitted += 1;
        }
    }
    writer.shutdown(Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    store.close().await;
    let deadlettered = metrics
        .audit_writes_total
        .with_label_values(&["deadletter"])
        .get();
    Ok(Report {
        backend: match store {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        },
        records: options.records,
        elapsed_s: elapsed.as_secs_f64(),
        records_per_s: options.records as f64 / elapsed.as_secs_f64().max(1e-9),
        peak_queue_depth: peak,
        deadlettered,
    })
}
