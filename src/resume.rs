//! Resumable streams: every run's encoded events, kept while it runs and for a while after,
//! so a client that reconnects with `Last-Event-ID: {run_id}:{seq}` gets the events after
//! `seq` instead of a new run (contract §4).
//!
//! The log stores the very `Bytes` that went to the first client (a reference count, not a
//! copy). Followers learn of new events through a `watch` channel of the log's length, so a
//! resumed client of a run still in progress follows it live to `done`. Ended runs are kept
//! for `RESUME_RETENTION_S` and at most [`MAX_ENDED_RUNS`] of them; older ones are resumed
//! from the audit store instead.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::watch, time::Instant};
use uuid::Uuid;

use crate::{audit::RunRecord, config::Role, orchestrator::AnswerEvent, sse};

/// Ended runs kept in memory at most, whatever the retention time says.
pub const MAX_ENDED_RUNS: usize = 10_000;

/// One run's events so far, without the deltas: `start`, the answers, errors, `done`.
///
/// Deltas are left out on purpose. A delta frame costs ~150 bytes for a few characters of
/// text, so keeping them would make a run's memory grow several times faster than its answer;
/// the answer events carry the whole texts, so a resumed client still gets every answer.
pub struct RunLog {
    /// (seq, frame), in seq order.
    frames: Mutex<Vec<(u32, Bytes)>>,
    /// (number of frames, ended)
    progress: watch::Sender<(usize, bool)>,
}

impl RunLog {
    fn new() -> Self {
        RunLog {
            frames: Mutex::new(Vec::with_capacity(6)),
            progress: watch::Sender::new((0, false)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(u32, Bytes)>> {
        // A push cannot leave the vector half-written, so a poisoned lock is still sound.
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a frame; called in seq order by the run.
    pub fn push(&self, seq: u32, frame: Bytes) {
        let len = {
            let mut frames = self.lock();
            frames.push((seq, frame));
            frames.len()
        };
        // Wakes followers only; with none, this is a store and no wake-up.
        self.progress.send_modify(|p| p.0 = len);
    }

    pub fn finish(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// Index of the first frame whose seq is after `seq`.
    pub fn index_after(&self, seq: u32) -> usize {
        self.lock().partition_point(|(s, _)| *s <= seq)
    }

    /// Frames from index `from`, and whether the run has ended.
    pub fn frames_from(&self, from: usize) -> (Vec<Bytes>, bool) {
        let ended = self.progress.borrow().1;
        let frames = self.lock();
        let rest = frames
            .get(from..)
            .map(|r| r.iter().map(|(_, f)| f.clone()).collect())
            .unwrap_or_default();
        (rest, ended)
    }

    /// All frames as one SSE text: what the audit record keeps so that a reconnect can be
    /// answered after the run has left memory. The answer events (`flash`, `pro`) are kept
    /// as their `event:` and `id:` lines only: their data is the model's trace, which the
    /// record holds already, and storing the texts twice would halve the writer's throughput.
    /// [`stored_frames_after`] puts the data back.
    pub fn to_text(&self) -> String {
        let frames = self.lock();
        let mut text = String::with_capacity(frames.iter().map(|(_, f)| f.len().min(256)).sum());
        for (_, frame) in frames.iter() {
            // Frames are built from `str` by `sse::encode`, so they are valid UTF-8.
            let frame = String::from_utf8_lossy(frame);
            if frame.starts_with("event: flash\n") || frame.starts_with("event: pro\n") {
                let head = frame.split_inclusive('\n').take(2);
                head.for_each(|line| text.push_str(line));
                text.push('\n');
            } else {
                text.push_str(&frame);
            }
        }
        text
    }

    pub fn subscribe(&self) -> watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }
}

/// All runs that can be resumed from memory.
pub struct Registry {
    inner: Mutex<Inner>,
    retention: Duration,
}

#[derive(Default)]
struct Inner {
    runs: HashMap<Uuid, Arc<RunLog>>,
    /// Ended runs, oldest first, for eviction.
    ended: VecDeque<(Instant, Uuid)>,
}

impl Registry {
    pub fn new(retention: Duration) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self, run_id: Uuid) -> Arc<RunLog> {
        let log = Arc::new(RunLog::new());
        self.lock().runs.insert(run_id, Arc::clone(&log));
        log
    }

    /// Marks a run ended; it stays resumable from memory for the retention time.
    pub fn close(&self, run_id: Uuid, log: &RunLog) {
        log.finish();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.ended.push_back((now, run_id));
        // Evict as we go, so memory is bounded without relying on the sweeper alone.
        Self::evict(&mut inner, now, self.retention);
    }

    pub fn get(&self, run_id: &Uuid) -> Option<Arc<RunLog>> {
        self.lock().runs.get(run_id).cloned()
    }

    /// Drops ended runs past their retention; call periodically.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        Self::evict(&mut inner, Instant::now(), self.retention);
    }

    fn evict(inner: &mut Inner, now: Instant, retention: Duration) {
        while let Some(&(ended_at, id)) = inner.ended.front() {
            if now.duration_since(ended_at) < retention && inner.ended.len() <= MAX_ENDED_RUNS {
                break;
            }
            inner.ended.pop_front();
            inner.runs.remove(&id);
        }
    }

    pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
}

/// The frames of a stored run's events whose seq is after `after`, in order, with the answer
/// events rebuilt from the record's traces (see [`RunLog::to_text`]).
pub fn stored_frames_after(record: &RunRecord, after: u32) -> Vec<Bytes> {
    let run_id = record.run_id.hyphenated().to_string();
    record
        .events
        .split_inclusive("\n\n")
        .filter_map(|frame| {
            let seq = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .and_then(parse_last_event_id)
                .map(|(_, seq)| seq)
                .filter(|seq| *seq > after)?;
            let answer = match frame.lines().next() {
                Some("event: flash") => Some((Role::Flash, &record.flash)),
                Some("event: pro") => Some((Role::Pro, &record.pro)),
                _ => None,
            };
            Some(match answer {
                Some((role, trace)) if !frame.contains("\ndata: ") => sse::encode(
                    role.as_str(),
                    &run_id,
                    seq,
                    &AnswerEvent::from_trace(&run_id, role, trace),
                ),
                _ => Bytes::copy_from_slice(frame.as_bytes()),
            })
        })
        .collect()
}

/// `Last-Event-ID` as `{run_id}:{seq}`.
pub fn parse_last_event_id(value: &str) -> Option<(Uuid, u32)> {
    let (id, seq) = value.trim().rsplit_once(':')?;
    Some((Uuid::parse_str(id).ok()?, seq.parse().ok()?))
}

/// Streams a run's frames from index `from` into a bounded channel, following the run live
/// until it ends, the reader goes away, or the reader stops reading for `write_timeout`.
pub fn follow(
    log: Arc<RunLog>,
    from: usize,
    capacity: usize,
    write_timeout: Duration,
    tracker: &tokio_util::task::TaskTracker,
) -> tokio::sync::mpsc::Receiver<Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tracker.spawn(async move {
        let mut progress = log.subscribe();
        let mut cursor = from;
        loop {
            // `ended` is read before the frames, so when it is true the frames are complete.
            let (frames, ended) = log.frames_from(cursor);
            for frame in frames {
                cursor += 1;
                match tokio::time::timeout(write_timeout, tx.send(frame)).await {
                    Ok(Ok(())) => {}
                    // Gone, or not reading: either way this follower is done.
                    Ok(Err(_)) | Err(_) => return,
                }
            }
            if ended {
                return;
            }
            tokio::select! {
                changed = progress.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        let id = Uuid::now_v7();
        assert_eq!(parse_last_event_id(&format!("{id}:7")), Some((id, 7)));
        assert_eq!(parse_last_event_id("nope:1"), None);
        assert_eq!(parse_last_event_id(&format!("{id}")), None);
        assert_eq!(parse_last_event_id(&format!("{id}:-1")), None);
    }

    fn trace(text: &str) -> crate::audit::ModelTrace {
        crate::audit::ModelTrace {
            provider: "simulated".into(),
            model: "m".into(),
            model_version: None,
            outcome: crate::audit::Outcome::Ok,
            error_type: None,
            error_message: None,
            text: text.into(),
            finish_reason: Some("stop".into()),
            latency_ms: 5,
            ttft_ms: Some(1),
            input_tokens: Some(1),
            output_tokens: Some(2),
        }
    }

    #[test]
    fn stored_frames_are_cut_after_seq_and_answers_rebuilt() {
        let id = "0192d5c4-0000-7000-8000-000000000000";
        let record = RunRecord {
            run_id: Uuid::parse_str(id).unwrap(),
            client_request_id: None,
            created_at: chrono::Utc::now(),
            query: "q".into(),
            system: None,
            status: crate::audit::RunStatus::Ok,
            total_ms: 9,
            service_version: "t".into(),
            flash: trace("the flash text"),
            pro: trace("the pro text"),
            events: format!(
                "event: start\nid: {id}:0\ndata: {{}}\n\n\
                 event: flash\nid: {id}:4\n\n\
                 event: done\nid: {id}:9\ndata: {{}}\n\n"
            ),
        };
        let after = |seq| {
            stored_frames_after(&record, seq)
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect::<Vec<_>>()
        };
        let from_start = after(0);
        assert_eq!(from_start.len(), 2);
        assert!(from_start[0].starts_with(&format!("event: flash\nid: {id}:4\ndata: {{")));
        assert!(from_start[0].contains("\"text\":\"the flash text\""));
        assert!(from_start[1].starts_with("event: done\n"));
        assert_eq!(after(4).len(), 1);
        assert!(after(9).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ended_runs_expire() {
        let reg = Registry::new(Duration::from_secs(5));
        let id = Uuid::now_v7();
        let log = reg.open(id);
        log.push(0, Bytes::from_static(b"a"));
        reg.close(id, &log);
        assert!(reg.get(&id).is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        reg.sweep();
        assert!(reg.get(&id).is_none());
    }
}
