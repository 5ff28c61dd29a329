//! The audit trail: one [`RunRecord`] per run that started (contract §5), handed to an
//! [`AuditSink`].
//!
//! The sink is synchronous and must never block: the orchestrator submits from a drop guard,
//! which may run during a panic or shutdown, so a sink queues the record (or dead-letters it)
//! and returns at once. Persisting happens elsewhere, on a background writer.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How one model ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Timeout,
    Error,
    Skipped,
    Cancelled,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// How the whole run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    Partial,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// One model's part of a run: a row of `model_traces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelTrace {
    pub provider: String,
    pub model: String,
    pub model_version: Option<String>,
    pub outcome: Outcome,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
    pub text: String,
    pub finish_reason: Option<String>,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

/// One run: a row of `dual_runs` and its two traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: Uuid,
    pub client_request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub query: String,
    pub system: Option<String>,
    pub status: RunStatus,
    pub total_ms: u64,
    pub service_version: String,
    pub flash: ModelTrace,
    pub pro: ModelTrace,
}

/// Where finished runs go. `submit` must return at once, whatever the backend is doing.
pub trait AuditSink: Send + Sync + 'static {
    fn submit(&self, record: RunRecord);
}

/// Keeps records in memory: for tests and for running without a database.
#[derive(Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<RunRecord>>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn records(&self) -> Vec<RunRecord> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl AuditSink for MemorySink {
    fn submit(&self, record: RunRecord) {
        // A poisoned lock still holds valid records (pushes cannot half-happen), so keep going.
        let mut records = match self.records.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        records.push(record);
    }
}
