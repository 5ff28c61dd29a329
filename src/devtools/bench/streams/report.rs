//! What a load run measured: the [`Report`] built from every stream's sample, its table, and
//! the run-id file (`--run-ids`).

use std::{
    collections::BTreeMap, io::Write as _, path::PathBuf, sync::atomic::Ordering, time::Duration,
};

use serde::Serialize;

use super::{Kind, Sample, Shared, Target};
use crate::devtools::bench::{BenchError, stats::Summary};

/// The result of a load run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: Target,
    pub url: String,
    pub concurrency: usize,
    /// Streams attempted, warm-up included.
    pub streams: u64,
    /// Streams whose latencies were left out as warm-up.
    pub warmup: u64,
    pub elapsed_s: f64,
    /// Streams that reached their end (`done` / `[DONE]`), per second of the whole run.
    pub streams_per_s: f64,
    pub ended: u64,
    /// Streams the client left on purpose (`disconnect` kind).
    pub disconnected: u64,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    /// `done` statuses (duet) and how many streams of each kind ran.
    pub statuses: BTreeMap<String, u64>,
    pub kinds: BTreeMap<Kind, u64>,
    /// Most streams open at once (response headers received, end not yet reached).
    pub peak_open: i64,
    pub ttfb: Summary,
    pub first_event: Summary,
    pub first_token: Summary,
    pub first_flash: Summary,
    pub first_pro: Summary,
    pub end: Summary,
}

pub(super) fn write_run_ids(path: &PathBuf, samples: &[Sample]) -> Result<(), BenchError> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for s in samples {
        if let Some(id) = &s.run_id {
            let outcome = if s.end.is_some() {
                "done"
            } else if s.disconnected {
                "disconnected"
            } else {
                "error"
            };
            writeln!(out, "{id} {outcome}")?;
        }
    }
    out.flush()?;
    Ok(())
}

pub(super) fn report(shared: &Shared, samples: Vec<Sample>, elapsed: Duration) -> Report {
    let mut errors = BTreeMap::new();
    let mut statuses = BTreeMap::new();
    let mut kinds = BTreeMap::new();
    let (mut ended, mut disconnected, mut warmup) = (0, 0, 0);
    let mut measures: [Vec<Duration>; 6] = Default::default();
    for s in &samples {
        if let Some(kind) = s.kind {
            *kinds.entry(kind).or_insert(0) += 1;
        }
        if let Some(e) = &s.error {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
        if let Some(st) = &s.status {
            *statuses.entry(st.clone()).or_insert(0) += 1;
        }
        ended += u64::from(s.end.is_some());
        disconnected += u64::from(s.disconnected);
        if s.warmup {
            warmup += 1;
            continue;
        }
        let fields = [
            s.ttfb,
            s.first_event,
            s.first_token,
            s.first_flash,
            s.first_pro,
            s.end,
        ];
        for (m, v) in measures.iter_mut().zip(fields) {
            m.extend(v);
        }
    }
    let [ttfb, first_event, first_token, first_flash, first_pro, end] = measures.map(Summary::of);
    let options = &shared.options;
    Report {
        target: options.target,
        url: options.url.clone(),
        concurrency: options.concurrency,
        streams: samples.len() as u64,
        warmup,
        elapsed_s: elapsed.as_secs_f64(),
        streams_per_s: ended as f64 / elapsed.as_secs_f64().max(1e-9),
        ended,
        disconnected,
        errors_total: errors.values().sum(),
        errors,
        statuses,
        kinds,
        peak_open: shared.peak_open.load(Ordering::Relaxed),
        ttfb,
        first_event,
        first_token,
        first_flash,
        first_pro,
        end,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:?} {}  C={}  streams={} (warm-up {})  elapsed={:.2}s  ended={}  {:.1} streams/s  peak open={}",
            self.target,
            self.url,
            self.concurrency,
            self.streams,
            self.warmup,
            self.elapsed_s,
            self.ended,
            self.streams_per_s,
            self.peak_open
        )?;
        writeln!(
            f,
            "{:<13} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "ms", "count", "p50", "p90", "p99", "max", "mean"
        )?;
        for (name, s) in [
            ("ttfb", &self.ttfb),
            ("first event", &self.first_event),
            ("first token", &self.first_token),
            ("first flash", &self.first_flash),
            ("first pro", &self.first_pro),
            ("end", &self.end),
        ] {
            if s.count > 0 {
                writeln!(
                    f,
                    "{name:<13} {:>7} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                    s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.mean_ms
                )?;
            }
        }
        write!(f, "errors={}", self.errors_total)?;
        for (e, n) in &self.errors {
            write!(f, "  {e}: {n}")?;
        }
        if self.disconnected > 0 {
            write!(f, "  (left on purpose: {})", self.disconnected)?;
        }
        if !self.statuses.is_empty() {
            write!(f, "\nstatuses:")?;
            for (st, n) in &self.statuses {
                write!(f, " {st}={n}")?;
            }
        }
        if self.kinds.len() > 1 {
            write!(f, "\nkinds:")?;
            for (k, n) in &self.kinds {
                write!(f, " {}={n}", k.name())?;
            }
        }
        Ok(())
    }
}
