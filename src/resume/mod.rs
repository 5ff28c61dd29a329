//! Resumable streams: every run's encoded events, kept while it runs and for a while after,
//! so a client that reconnects with `Last-Event-ID: {run_id}:{seq}` gets the events after
//! `seq` instead of a new run (contract §4).
//!
//! The log stores the very `Bytes` that went to the first client (a reference count, not a
//! copy). Followers learn of new events through a `watch` channel of the log's length, so a
//! resumed client of a run still in progress follows it live to `done`. Ended runs are kept
//! for `RESUME_RETENTION_S`, at most [`MAX_ENDED_RUNS`] of them and at most
//! `RESUME_STORE_MAX_BYTES` of their events, oldest leaving first; older ones are resumed
//! from the audit store instead.
//!
//! A run started with an API key belongs to that key: only the same key may resume it. The
//! run keeps an [`Owner`] fingerprint of the key, never the key.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::{sync::watch, time::Instant};
use uuid::Uuid;

use crate::{
    audit::{RunRecord, StoredEvent},
    domain::{Role, Secret},
    events::{AnswerEvent, EventKind},
    sse,
};

/// Ended runs kept in memory at most, whatever the retention time says.
pub const MAX_ENDED_RUNS: usize = 10_000;

/// What an ended run costs in memory besides its frames (map entry, log, its vector of 6,
/// the frames' headers, the watch channel: an upper estimate), counted
/// against `RESUME_STORE_MAX_BYTES` so that many small runs are bounded too.
const RUN_OVERHEAD_BYTES: usize = 1024;

/// Who may resume a run: SHA-256 over (the run id's 16 bytes ‖ the API key that started it).
///
/// Salted by the run id, so equal keys give unrelated values across runs and no table of
/// precomputed hashes helps; the key itself is never kept. Stored (as hex) in the audit
/// record, so that a resume from the database checks it too.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Owner([u8; 32]);

impl Owner {
    pub fn of(run_id: Uuid, key: &Secret) -> Owner {
        let mut hash = Sha256::new();
        hash.update(run_id.as_bytes());
        hash.update(key.expose().as_bytes());
        Owner(hash.finalize().into())
    }

    /// 64 lower-case hex digits, as stored in `dual_runs.owner_fingerprint`.
    pub fn to_hex(self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    pub fn from_hex(hex: &str) -> Option<Owner> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Owner(bytes))
    }

    /// Whether `caller` (the API key the request authenticated with, if keys are on) may
    /// resume the run `run_id` owned by `owner`. Compared in constant time, so the timing of
    /// a refusal says nothing about how close the key was.
    pub fn allows(owner: Option<Owner>, run_id: Uuid, caller: Option<&Secret>) -> bool {
        match (owner, caller) {
            // Started without API_KEYS: anyone may resume it, as anyone could have run it.
            (None, _) => true,
            // Started with a key, asked without one (keys since turned off): not theirs.
            (Some(_), None) => false,
            (Some(owner), Some(key)) => bool::from(Owner::of(run_id, key).0.ct_eq(&owner.0)),
        }
    }

    /// [`Owner::allows`] for a stored record, whose fingerprint is hex text. A value that is
    /// not a fingerprint matches no key.
    pub fn allows_stored(stored: Option<&str>, run_id: Uuid, caller: Option<&Secret>) -> bool {
        match stored {
            None => Owner::allows(None, run_id, caller),
            Some(hex) => {
                Owner::from_hex(hex).is_some_and(|o| Owner::allows(Some(o), run_id, caller))
            }
        }
    }
}

/// One run's events so far, without the deltas: `start`, the answers, errors, `done`.
///
/// Deltas are left out on purpose. A delta frame costs ~150 bytes for a few characters of
/// text, so keeping them would make a run's memory grow several times faster than its answer;
/// the answer events carry the whole texts, so a resumed client still gets every answer.
pub struct RunLog {
    /// In seq order.
    frames: Mutex<Vec<Logged>>,
    /// (number of frames, ended)
    progress: watch::Sender<(usize, bool)>,
    /// The highest seq sent to the run's client so far, deltas included: a `Last-Event-ID`
    /// past it names no event (see [`RunLog::issued`]).
    issued: AtomicU32,
    /// Bytes of the frames held, for `RESUME_STORE_MAX_BYTES`.
    bytes: AtomicUsize,
    owner: Option<Owner>,
}

/// One event of the log: its frame as sent, and what the audit record keeps of it.
struct Logged {
    seq: u32,
    event: EventKind,
    frame: Bytes,
    /// The frame's `data` (a slice of `frame`, not a copy).
    data: Bytes,
}

impl RunLog {
    fn new(owner: Option<Owner>) -> Self {
        RunLog {
            frames: Mutex::new(Vec::with_capacity(6)),
            progress: watch::Sender::new((0, false)),
            issued: AtomicU32::new(0),
            bytes: AtomicUsize::new(0),
            owner,
        }
    }

    /// Whether `caller` may resume this run (see [`Owner::allows`]).
    pub fn allows(&self, run_id: Uuid, caller: Option<&Secret>) -> bool {
        Owner::allows(self.owner, run_id, caller)
    }

    pub fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// Notes that an event that is not kept (a delta) went out with this seq.
    pub fn mark_issued(&self, seq: u32) {
        self.issued.fetch_max(seq, Ordering::Relaxed);
    }

    /// The highest seq issued so far. Marked before the event is handed to the client's
    /// channel, so any seq a client has seen is at most this.
    pub fn issued(&self) -> u32 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Bytes of the frames held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Logged>> {
        // A push cannot leave the vector half-written, so a poisoned lock is still sound.
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends the frame of event `event`, whose data (encoded by `sse::encode_data`) is
    /// `data_len` bytes long; called in seq order by the run.
    pub fn push(&self, seq: u32, event: EventKind, frame: Bytes, data_len: usize) {
        self.mark_issued(seq);
        self.bytes.fetch_add(frame.len(), Ordering::Relaxed);
        let data = sse::data_of(&frame, data_len);
        let len = {
            let mut frames = self.lock();
            frames.push(Logged {
                seq,
                event,
                frame,
                data,
            });
            frames.len()
        };
        // Wakes followers only; with none, this is a store and no wake-up.
        self.progress.send_modify(|p| p.0 = len);
    }

    pub fn finish(&self) {
        self.progress.send_modify(|p| p.1 = true);
    }

    /// The frames whose seq is after `seq`, and whether the run has ended. Chosen by seq,
    /// not by position, so nothing at or before `seq` is ever sent again.
    pub fn frames_after(&self, seq: u32) -> (Vec<(u32, Bytes)>, bool) {
        let ended = self.progress.borrow().1;
        let frames = self.lock();
        let from = frames.partition_point(|l| l.seq <= seq);
        let rest = frames
            .get(from..)
            .unwrap_or_default()
            .iter()
            .map(|l| (l.seq, l.frame.clone()))
            .collect();
        (rest, ended)
    }

    /// The events, as the audit record keeps them so that a reconnect can be answered after
    /// the run has left memory. The answer events (`flash`, `pro`) are kept without their
    /// data: it is the model's trace, which the record holds already, and storing the texts
    /// twice would halve the writer's throughput. [`stored_frames_after`] puts it back.
    pub fn to_events(&self) -> Vec<StoredEvent> {
        let frames = self.lock();
        frames
            .iter()
            .map(|l| StoredEvent {
                seq: l.seq,
                event: l.event.as_str().to_owned(),
                data: match l.event.answer_role() {
                    Some(_) => None,
                    // Our own `sse::encode_data` output: UTF-8 JSON, so this always parses.
                    _ => serde_json::value::RawValue::from_string(
                        String::from_utf8_lossy(&l.data).into_owned(),
                    )
                    .ok(),
                },
            })
            .collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }
}

/// All runs that can be resumed from memory.
pub struct Registry {
    inner: Mutex<Inner>,
    retention: Duration,
    /// `RESUME_STORE_MAX_BYTES`: ended runs' bytes kept at most.
    max_bytes: usize,
}

#[derive(Default)]
struct Inner {
    runs: HashMap<Uuid, Arc<RunLog>>,
    /// Ended runs, oldest first, for eviction: when each ended, and what it costs.
    ended: VecDeque<(Instant, Uuid, usize)>,
    /// The sum of the costs in `ended`.
    ended_bytes: usize,
}

impl Registry {
    pub fn new(retention: Duration, max_bytes: usize) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            retention,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self, run_id: Uuid, owner: Option<Owner>) -> Arc<RunLog> {
        let log = Arc::new(RunLog::new(owner));
        self.lock().runs.insert(run_id, Arc::clone(&log));
        log
    }

    /// Marks a run ended; it stays resumable from memory for the retention time.
    pub fn close(&self, run_id: Uuid, log: &RunLog) {
        log.finish();
        let now = Instant::now();
        // The log is complete (`done` was its last push), so its size is final.
        let cost = log.bytes().saturating_add(RUN_OVERHEAD_BYTES);
        let mut inner = self.lock();
        inner.ended.push_back((now, run_id, cost));
        inner.ended_bytes = inner.ended_bytes.saturating_add(cost);
        // Evict as we go, so memory is bounded without relying on the sweeper alone.
        self.evict(&mut inner, now);
    }

    pub fn get(&self, run_id: &Uuid) -> Option<Arc<RunLog>> {
        self.lock().runs.get(run_id).cloned()
    }

    /// Drops ended runs past their retention; call periodically.
    pub fn sweep(&self) {
        let mut inner = self.lock();
        self.evict(&mut inner, Instant::now());
    }

    /// Drops the oldest ended runs while any bound is exceeded: age, count, bytes. A run
    /// dropped here is still resumable from the audit store.
    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some(&(ended_at, id, cost)) = inner.ended.front() {
            if now.duration_since(ended_at) < self.retention
                && inner.ended.len() <= MAX_ENDED_RUNS
                && inner.ended_bytes <= self.max_bytes
            {
                break;
            }
            inner.ended.pop_front();
            inner.ended_bytes -= cost;
            inner.runs.remove(&id);
        }
    }

    /// Ended runs in memory, and their bytes (as counted against `RESUME_STORE_MAX_BYTES`).
    pub fn ended(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.ended.len(), inner.ended_bytes)
    }

    pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
}

/// The frames of a stored run's events whose seq is after `after`, in order, framed as they
/// were sent, with the answer events' data rebuilt from the record's traces (see
/// [`RunLog::to_events`]).
pub fn stored_frames_after(record: &RunRecord, after: u32) -> Vec<Bytes> {
    let run_id = record.run_id.hyphenated().to_string();
    record
        .events
        .iter()
        .filter(|e| e.seq > after)
        .filter_map(|e| {
            // Every stored name is one this service sent; a name it does not know (a record
            // from a newer version) cannot be framed as the contract's event, so it is left out.
            let kind = EventKind::from_wire(&e.event)?;
            let answer = kind
                .answer_role()
                .map(|role| (role, trace_of(record, role)));
            Some(match (&e.data, answer) {
                (Some(data), _) => sse::frame(kind, &run_id, e.seq, data.get().as_bytes()),
                (None, Some((role, trace))) => sse::encode(
                    kind,
                    &run_id,
                    e.seq,
                    &AnswerEvent::from_trace(&run_id, role, trace),
                ),
                // Only an old record's unreadable data comes here (see `audit::events`).
                (None, None) => sse::frame(kind, &run_id, e.seq, b"{}"),
            })
        })
        .collect()
}

fn trace_of(record: &RunRecord, role: Role) -> &crate::audit::ModelTrace {
    match role {
        Role::Flash => &record.flash,
        Role::Pro => &record.pro,
    }
}

/// The highest seq among a stored run's events (its `done`): the last one its client was
/// sent, since `done` is always last. `None` when no events are stored.
pub fn stored_last_seq(record: &RunRecord) -> Option<u32> {
    record.events.iter().map(|e| e.seq).max()
}

/// `Last-Event-ID` as `{run_id}:{seq}`.
pub fn parse_last_event_id(value: &str) -> Option<(Uuid, u32)> {
    let (id, seq) = value.trim().rsplit_once(':')?;
    Some((Uuid::parse_str(id).ok()?, seq.parse().ok()?))
}

/// Streams a run's frames after seq `after` into a bounded channel, following the run live
/// until it ends, the reader goes away, or the reader stops reading for `write_timeout`.
/// `hold` (the reader's place under `MAX_CONCURRENT_STREAMS`) is kept until then.
pub fn follow<H: Send + 'static>(
    log: Arc<RunLog>,
    after: u32,
    capacity: usize,
    write_timeout: Duration,
    tracker: &tokio_util::task::TaskTracker,
    hold: H,
) -> tokio::sync::mpsc::Receiver<Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tracker.spawn(async move {
        let _hold = hold;
        let mut progress = log.subscribe();
        let mut after = after;
        loop {
            // `ended` is read before the frames, so when it is true the frames are complete.
            let (frames, ended) = log.frames_after(after);
            for (seq, frame) in frames {
                after = seq;
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

/// Streams frames already known (a stored run's) into a channel, holding `hold` until the
/// reader has taken all but the last, goes away, or stops reading for `write_timeout`.
///
/// One frame at a time, like a run's own stream: the reader's place under
/// `MAX_CONCURRENT_STREAMS` is given back when the replay is over for it, not when the frames
/// were queued (at once), nor when the connection closes (maybe much later).
pub fn send_all<H: Send + 'static>(
    frames: Vec<Bytes>,
    write_timeout: Duration,
    tracker: &tokio_util::task::TaskTracker,
    hold: H,
) -> tokio::sync::mpsc::Receiver<Bytes> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tracker.spawn(async move {
        let _hold = hold;
        for frame in frames {
            match tokio::time::timeout(write_timeout, tx.send(frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    });
    rx
}

pub mod remote;

#[cfg(test)]
mod tests;
